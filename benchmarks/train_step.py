"""Seconds per training iteration of teacher forcing, diffusion forcing, CausVid and Self Forcing (DMD, SiD, GAN) at
equal model and batch (the paper's Fig. 6 claim: Self Forcing costs about as much as TF/DF per iteration).

An iteration of a distribution-matching method is one generator update plus one critic update (update
ratio 1 here, so every step has both); TF/DF iterations are one update. Random latents of the Moving-Digits
shape (12 latent frames x 8 x 16 x 16, 64 tokens per frame), float32 on CPU.

    .venv/bin/python benchmarks/train_step.py [--presets tiny,small] [--steps 5] [--methods ...]
        [--out benchmarks/results/train_step_methods.json]

The methods run round-robin, one timed iteration each per round, so that load from other processes on a shared
machine falls on all of them alike; the JSON records the load average before and after.
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
    "self_forcing_sid": dict(method="self_forcing", dm={"loss": "sid", "critic_updates_per_generator_update": 1}),
    "self_forcing_gan": dict(method="self_forcing", dm={"loss": "gan", "critic_updates_per_generator_update": 1}),
}


class _Run:
    """One method's training state, stepped on demand."""

    def __init__(self, preset: str, name: str, batch_size: int, frames: int, device: torch.device) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.cfg = build_config(TrainConfig, dict(
            METHODS[name], generator={"preset": preset}, batch_size=batch_size, out_dir=self.tmp.name,
            tensorboard=False, data={"kind": "random", "latent_shape": [frames, 8, 16, 16], "text_len": 16}))
        self.device = device
        self.state = setup(self.cfg, device)
        self.batches = build_batch_source(self.cfg, self.state.method.generator.config.text_dim, device)
        self.times: list[float] = []

    def step(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(self.cfg, self.state, self.batches, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def bench(preset: str, names: list[str], steps: int, batch_size: int, frames: int, device: torch.device) -> list[dict]:
    runs = {name: _Run(preset, name, batch_size, frames, device) for name in names}
    for run in runs.values():  # the first step pays one-off allocation costs
        run.step()
    for _ in range(steps):
        for run in runs.values():
            run.times.append(run.step())
    rows = []
    for name, run in runs.items():
        run.tmp.cleanup()
        rows.append({"preset": preset, "method": name, "batch_size": batch_size, "latent_frames": frames,
                     "seconds_per_iteration": statistics.median(run.times), "min": min(run.times),
                     "max": max(run.times), "steps": steps})
    base = {r["method"]: r["seconds_per_iteration"] for r in rows}
    for r in rows:
        for ref in ("teacher_forcing", "diffusion_forcing"):
            if ref in base:
                r[f"relative_to_{ref}"] = r["seconds_per_iteration"] / base[ref]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/train_step_methods.json")
    args = p.parse_args()
    load_before = os.getloadavg()
    rows = []
    for preset in args.presets.split(","):
        for row in bench(preset, args.methods.split(","), args.steps, args.batch_size, args.frames,
                         torch.device(args.device)):
            print(json.dumps(row))
            rows.append(row)
    result = {"benchmark": "train_step", "rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "device": args.device, "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "note": "one iteration = one generator + one critic update for causvid / self_forcing_*; "
                      "median over the timed iterations (methods interleaved round-robin)"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
