"""The ``selfforcing`` command line: one subcommand per job.

Each subcommand lives in a module that defines ``add_arguments(parser)`` and ``run(args) -> int``
(or, for a module serving several subcommands, ``<name>_args`` / ``<name>_run``); ``COMMANDS`` maps a
name to (help, module, prefix). Modules are imported only when their command runs, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str, str]] = {
    "presets": ("list the model presets and their sizes", "selfforcing.commands.basic", "presets"),
    "demo": ("stream a video through the KV cache and report its speed", "selfforcing.commands.basic", "demo"),
    "data": ("Moving-Digits clips and the store of precomputed latents / embeddings", "selfforcing.commands.data", ""),
    "generate": ("stream videos from prompts with a few-step causal model (rolling KV cache)", "selfforcing.commands.generate", ""),
    "bench": ("benchmarks: stream (rolling KV cache vs recompute vs sliding window)", "selfforcing.commands.bench", ""),
    "train-autoencoder": ("train the small video autoencoder (configs/autoencoder/)", "selfforcing.autoencoders.train", ""),
    "train": ("train with a recipe: teacher, TF, DF, ODE init, CausVid, Self Forcing", "selfforcing.commands.train", ""),
    "eval": ("compare checkpoints on Moving-Digits over long rollouts (FD, adherence, drift, GT-cache gap)", "selfforcing.commands.eval", ""),
    "serve": ("the streaming server and web page: watch the video being made, switch prompts live", "selfforcing.commands.serve", ""),
}


def _hooks(name: str):
    _, module, prefix = COMMANDS[name]
    mod = importlib.import_module(module)
    if prefix:
        return getattr(mod, f"{prefix}_args"), getattr(mod, f"{prefix}_run")
    return mod.add_arguments, mod.run


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the arguments of command ``load`` are imported (None: all commands)."""
    parser = argparse.ArgumentParser(
        prog="selfforcing",
        description="Autoregressive video diffusion with Self Forcing: train, generate, stream.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load in (None, name):
            _hooks(name)[0](p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=name if name in COMMANDS else "")
    args = parser.parse_args(argv)
    from .perf import keep_freed_memory

    keep_freed_memory()  # every command allocates the same activations step after step (see its docstring)
    return _hooks(args.command)[1](args)


if __name__ == "__main__":
    sys.exit(main())
