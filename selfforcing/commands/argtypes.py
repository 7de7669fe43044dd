"""argparse types shared by the commands: each parses one flag's text or raises ``ArgumentTypeError`` (a one-line
usage error, status 2)."""

from __future__ import annotations

import argparse


def int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def range_of(kind):
    """argparse type: "LO,HI" (or one value, meaning LO = HI) -> (LO, HI) of ``kind``, LO <= HI."""
    def parse(text: str) -> tuple:
        parts = [p.strip() for p in text.split(",")]
        try:
            values = [kind(p) for p in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LO,HI ({kind.__name__}s), got {text!r}") from None
        if len(values) == 1:
            values = values * 2
        if len(values) != 2 or values[0] > values[1]:
            raise argparse.ArgumentTypeError(f"expected LO,HI with LO <= HI, got {text!r}")
        return tuple(values)
    return parse
