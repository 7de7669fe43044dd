"""The ``selfforcing`` command line: one subcommand per job.

Each subcommand lives in a module that defines ``add_arguments(parser)`` and ``run(args) -> int``
(or, for a module serving several subcommands, ``<name>_args`` / ``<name>_run``); ``COMMANDS`` maps a
name to (help, module, prefix). Modules are imported only when their command runs, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import warnings

COMMANDS: dict[str, tuple[str, str, str]] = {
    "presets": ("list the model presets and their sizes", "selfforcing.commands.basic", "presets"),
    "demo": ("stream a video through the KV cache and report its speed", "selfforcing.commands.basic", "demo"),
    "data": ("Moving-Digits clips and the store of precomputed latents / embeddings", "selfforcing.commands.data", ""),
    "generate": ("stream videos from prompts with a few-step causal model (rolling KV cache)",
                 "selfforcing.commands.generate", ""),
    "bench": ("benchmarks: stream (rolling KV cache vs recompute vs sliding window)", "selfforcing.commands.bench", ""),
    "train-autoencoder": ("train the small video autoencoder (configs/autoencoder/)", "selfforcing.autoencoders.train",
                          ""),
    "train": ("train with a recipe: teacher, TF, DF, ODE init, CausVid, Self Forcing", "selfforcing.commands.train",
              ""),
    "eval": ("compare checkpoints on Moving-Digits over long rollouts (FD, adherence, drift, GT-cache gap)",
             "selfforcing.commands.eval", ""),
    "serve": ("the streaming server and web page: watch the video being made, switch prompts live",
              "selfforcing.commands.serve", ""),
}


def _hooks(name: str):
    _, module, prefix = COMMANDS[name]
    mod = importlib.import_module(module)
    if prefix:
        return getattr(mod, f"{prefix}_args"), getattr(mod, f"{prefix}_run")
    return mod.add_arguments, mod.run


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``selfforcing generate: argument --x: ...``), status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the arguments of command ``load`` are imported (None: all commands)."""
    parser = _Parser(
        prog="selfforcing",
        description="Autoregressive video diffusion with Self Forcing: train, generate, stream.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load in (None, name):
            _hooks(name)[0](p)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as ``selfforcing: warning: MESSAGE`` lines (no source line): the command line's format."""
    return f"selfforcing: warning: {' '.join(str(message).split())}\n"


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: temp files are removed on the way out


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (2 for an error a user can fix, printed as one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SELFFORCING_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    name = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=name if name in COMMANDS else "")
    args = parser.parse_args(argv)
    from .perf import keep_freed_memory

    keep_freed_memory()  # every command allocates the same activations step after step (see its docstring)
    with _command_line_handlers(debug):
        return _run(args, debug)


def _run(args: argparse.Namespace, debug: bool) -> int:
    """The command's exit status; a user's error (ValueError, OSError, MemoryError) or Ctrl-C as one line."""
    from .errors import reason

    prog = f"selfforcing {args.command}"
    try:
        return _hooks(args.command)[1](args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: stopped", file=sys.stderr)
        return 130
    except (ValueError, OSError, MemoryError) as err:
        if debug:
            raise
        print(f"{prog}: {reason(err)}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _command_line_handlers(debug: bool):
    """While a command runs: one-line warnings (unless ``debug``), and SIGTERM unwinding like Ctrl-C (main thread
    only). Both are put back afterwards, so ``main`` can be called from a test or another program."""
    old_format = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _one_line_warning
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _stop_on_sigterm) if in_main else None
    try:
        yield
    finally:
        warnings.formatwarning = old_format
        if in_main:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.exit(main())
