"""Seconds per training iteration of teacher forcing, diffusion forcing, CausVid and Self Forcing (DMD) at
equal model and batch (the paper's Fig. 6 claim: Self Forcing costs about as much as TF/DF per iteration).

An iteration of a distribution-matching method is one generator update plus one critic update (update
ratio 1 here, so every step has both); TF/DF iterations are one update. Random latents of the Moving-Digits
shape (12 latent frames x 8 x 16 x 16, 64 tokens per frame), float32 on CPU.

    .venv/bin/python benchmarks/train_step.py [--presets tiny,small] [--steps 5] [--out benchmarks/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from selfforcing.config import build_config
from selfforcing.training.config import TrainConfig
from selfforcing.training.data import build_batch_source
from selfforcing.training.trainer import setup, train_step

METHODS = {
    "teacher_forcing": dict(method="teacher_forcing"),
    "diffusion_forcing": dict(method="diffusion_forcing"),
    "causvid": dict(method="causvid", dm={"critic_updates_per_generator_update": 1}),
    "self_forcing_dmd": dict(method="self_forcing", dm={"critic_updates_per_generator_update": 1}),
}


def bench(preset: str, name: str, steps: int, batch_size: int, frames: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = build_config(TrainConfig, dict(
            METHODS[name], generator={"preset": preset}, batch_size=batch_size, out_dir=out, tensorboard=False,
            data={"kind": "random", "latent_shape": [frames, 8, 16, 16], "text_len": 16}))
        device = torch.device("cpu")
        state = setup(cfg, device)
        batches = build_batch_source(cfg, state.method.generator.config.text_dim, device)
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            train_step(cfg, state, batches, device)
            if i > 0:  # the first step pays one-off allocation costs
                times.append(time.perf_counter() - t0)
    return {"preset": preset, "method": name, "batch_size": batch_size, "latent_frames": frames,
            "seconds_per_iteration": statistics.median(times), "min": min(times), "max": max(times), "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    args = p.parse_args()
    rows = []
    for preset in args.presets.split(","):
        for name in METHODS:
            row = bench(preset, name, args.steps, args.batch_size, args.frames)
            print(json.dumps(row))
            rows.append(row)
    result = {"benchmark": "train_step", "rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "note": "one iteration = one generator + one critic update for causvid / self_forcing_dmd"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
