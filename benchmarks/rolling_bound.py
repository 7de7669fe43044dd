"""How often the rolling KV cache's 10x-vs-1x bound holds, and why it can only hold by chance as written: runs
``selfforcing bench stream --strategies rolling_kv --lengths 1,10`` (the performance issue's protocol) ``--runs``
times in one process and reports, per run, the ratio of the median chunk latencies (all chunks: at 1x most of them
attend to a window that is still filling), the same ratio over full-window chunks only, the analytic matmul work of
the two median chunks and the cost per unit of that work.

    .venv/bin/python benchmarks/rolling_bound.py [--preset tiny] [--runs 8] [--bound 1.15]
        [--out benchmarks/results/rolling_bound_tiny.json]

The work ratio is fixed by the shapes (tiny: 1.235): the latency ratio equals it times the cost-per-work ratio, so
the bound holds only in runs where a 10x chunk happens to cost at least 1 - bound / work_ratio less per FLOP.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from selfforcing.benchmark import stream_benchmark
from selfforcing.perf import keep_freed_memory


def rolling_bound(preset: str = "tiny", runs: int = 8, bound: float = 1.15, lengths: tuple[int, int] = (1, 10),
                  log=print, **stream_kwargs) -> dict:
    """``runs`` runs of ``stream_benchmark(preset, lengths, ["rolling_kv"], **stream_kwargs)``: per run the long / short
    ratios (all chunks, full-window chunks, analytic work, cost per FLOP), and a summary: how many runs stay within
    ``bound``, each ratio's median / min / max, and the cost-per-FLOP ratio needed, bound / work ratio."""
    lo, hi = lengths
    names = {"all_chunks": f"rolling_kv_x{hi}_over_x{lo}", "full_window": f"rolling_kv_full_window_x{hi}_over_x{lo}",
             "flops": f"rolling_kv_flops_x{hi}_over_x{lo}",
             "seconds_per_flop": f"rolling_kv_seconds_per_flop_x{hi}_over_x{lo}"}
    key = {what: f"{what}_x{hi}_over_x{lo}" for what in names}  # the result's keys name the lengths compared
    per_run = []
    for i in range(runs):
        r = stream_benchmark(preset, [lo, hi], ["rolling_kv"], **stream_kwargs)["ratios"]
        per_run.append({key[what]: r[name] for what, name in names.items()})
        log(f"run {i + 1}/{runs}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_run[-1].items()))
    work = per_run[0][key["flops"]]
    summary = {
        "runs": runs, "bound": bound, "lengths": list(lengths), key["flops"]: work,
        # the cost-per-FLOP ratio a run needs for the literal bound to hold
        "seconds_per_flop_ratio_needed": bound / work,
        "all_chunks_passes": sum(r[key["all_chunks"]] <= bound for r in per_run),
        "full_window_passes": sum(r[key["full_window"]] <= bound for r in per_run),
    }
    for what in ("all_chunks", "full_window", "seconds_per_flop"):
        values = [r[key[what]] for r in per_run]
        summary[key[what]] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return {"benchmark": "rolling_bound", "preset": preset, "summary": summary, "per_run": per_run,
            "load_average": list(os.getloadavg())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--bound", type=float, default=1.15, help="the issue's bound on the 10x / 1x median ratio")
    p.add_argument("--out", default="benchmarks/results/rolling_bound_tiny.json")
    args = p.parse_args()
    keep_freed_memory()  # as the CLI does for `bench stream`
    result = rolling_bound(args.preset, args.runs, args.bound, log=lambda line: print(line, flush=True))
    print(json.dumps(result["summary"]))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
