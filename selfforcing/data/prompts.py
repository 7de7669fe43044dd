"""Prompt files: one prompt a line, UTF-8, blank lines ignored."""

from __future__ import annotations

import os

from ..fileio import atomic_write_text


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a file (stripped, blank lines skipped). Errors name the file and the 1-based line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            line = line.strip().lstrip("\ufeff")
            if line:
                prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty or blank)")
    return prompts


def write_prompt_file(path: str | os.PathLike, prompts: list[str]) -> str:
    """Write prompts one a line (a prompt may not contain a newline)."""
    for i, p in enumerate(prompts):
        if "\n" in p or not p.strip():
            raise ValueError(f"prompt {i} is empty or contains a newline: {p!r}")
    atomic_write_text(path, "".join(p.strip() + "\n" for p in prompts))
    return os.fspath(path)
