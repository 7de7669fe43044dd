"""Prompt files: UTF-8 text, one prompt a line; blank lines are ignored and surrounding whitespace is stripped."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..fileio import atomic_write_text


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts of a file, in order: each line stripped of surrounding whitespace, blank lines skipped.

    Lines end at "\\n" ("\\r\\n" works too: the "\\r" is stripped); a UTF-8 byte-order mark at the start of
    the file is ignored. Errors: FileNotFoundError naming a missing file; ValueError naming the file and the
    1-based line of invalid UTF-8 ("prompts.txt:3: not valid UTF-8 ..."), or a file with no prompts.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, expected a prompt file (one prompt a line)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    with open(path, "rb") as fh:
        # decoded line by line (a UTF-8 character never spans a "\n") so an error can name its line
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start} of the line)"
                                 ) from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            line = line.strip()
            if line:
                prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty or holds only blank lines)")
    return prompts


def require_prompt(prompt: str, where: str = "the prompt") -> str:
    """``prompt`` as it is, after checking it: an empty or whitespace-only prompt is a ValueError naming ``where``
    (unconditional generation is asked for explicitly, never by an empty prompt)."""
    if not isinstance(prompt, str):
        raise ValueError(f"{where} must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"{where} is empty: give a prompt, or ask for unconditional generation explicitly")
    return prompt


def write_prompt_file(path: str | os.PathLike, prompts: Iterable[str]) -> str:
    """Write prompts one a line (UTF-8, stripped, atomic; parent folders created) so that
    :func:`read_prompt_file` gives them back; returns the path.

    A prompt that is blank, not a string, or holds a line break ("\\n" or "\\r") is a ValueError naming its
    0-based position.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to write (a prompt file needs at least one)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is not a string: {p!r}")
        if not p.strip() or "\n" in p or "\r" in p:
            raise ValueError(f"prompt {i} is blank or contains a line break: {p!r}")
    atomic_write_text(path, "".join(p.strip() + "\n" for p in prompts))
    return os.fspath(path)
