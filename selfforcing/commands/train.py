"""`selfforcing train --config RECIPE.yaml [--max-steps N] [--out DIR] [key=value ...]`."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (see configs/)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: the recipe's)")
    p.add_argument("--out", default=None, help="output directory (checkpoints, logs); default: the recipe's out_dir")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if out/checkpoints exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="recipe overrides as dotted key=value, e.g. generator_optim.lr=1e-5")


def run(args: argparse.Namespace) -> int:
    from selfforcing.config import load_config
    from selfforcing.training import distributed as D
    from selfforcing.training.config import TrainConfig
    from selfforcing.training.trainer import train

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    cfg = load_config(args.config, TrainConfig, overrides)
    state = train(cfg, max_steps=args.max_steps, progress=not args.no_progress, resume=not args.no_resume)
    if D.is_main() and state.history:
        print(json.dumps({"step": state.step, **{k: round(v, 6) for k, v in state.history[-1].items() if k != "step"}}))
    return 0
