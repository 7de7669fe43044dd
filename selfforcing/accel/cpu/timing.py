"""Choose between equivalent kernels by timing them, once per process and key."""

from __future__ import annotations

import time

_FASTEST: dict[tuple, str] = {}


def fastest_name(key: tuple, candidates: dict, args: tuple, repeats: int = 5) -> str:
    """The name of the fastest of ``candidates`` (name -> function) on ``args`` for ``key``, timed once per process.

    The candidates must compute the same function (to float rounding). The first call for a key times each of them
    ``repeats`` + 1 times (the first round also warms caches and oneDNN's primitive cache up), interleaved so that a
    slow spell of a shared machine falls on all alike, and keeps the one with the lowest best time; later calls with
    that key only look it up. Why: on this project's 2-core VM the
    faster of two FFN kernels (oneDNN's fused GELU linear vs BLAS on transposed activations) changed from day to day
    (docs/performance.md), so no fixed choice is right. ``key`` should hold everything the
    timing depends on (shapes, dtype, thread count). One candidate: no timing."""
    name = _FASTEST.get(key)
    if name is not None:
        return name
    if len(candidates) == 1:
        name = next(iter(candidates))
        _FASTEST[key] = name
        return name
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(repeats + 1):
        for cand, fn in candidates.items():
            t0 = time.perf_counter()
            fn(*args)
            best[cand] = min(best[cand], time.perf_counter() - t0)
    name = min(best, key=best.get)
    _FASTEST[key] = name
    return name


def chosen_paths() -> dict[tuple, str]:
    """The choices :func:`fastest_name` made in this process, key -> implementation (for benchmark reports)."""
    return dict(_FASTEST)


