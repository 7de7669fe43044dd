"""The teacher's flow-matching loss on Moving-Digits over the first N steps of configs/tiny/teacher.yaml
(the check that training learns: the loss must fall). Writes benchmarks/results/teacher_loss.json.

    .venv/bin/python benchmarks/teacher_loss.py [--steps 200] [--window 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from selfforcing.config import load_config
from selfforcing.training.config import TrainConfig
from selfforcing.training.trainer import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny/teacher.yaml")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/teacher_loss.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, TrainConfig, [f"out_dir={tmp}", "checkpoint_every=0", "sample_every=0",
                                                      "tensorboard=false"])
        t0 = time.perf_counter()
        state = train(cfg, max_steps=args.steps, progress=False, resume=False)
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in state.history]
    first, last = statistics.mean(losses[: args.window]), statistics.mean(losses[-args.window:])
    result = {"benchmark": "teacher_loss", "config": args.config, "steps": args.steps, "batch_size": cfg.batch_size,
              "loss_first_window": first, "loss_last_window": last, "relative_drop": 1 - last / first,
              "seconds": seconds, "seconds_per_step": seconds / args.steps, "losses": losses}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    if not last < first:
        raise SystemExit(f"the teacher's loss did not fall: {first:.4f} -> {last:.4f}")


if __name__ == "__main__":
    main()
