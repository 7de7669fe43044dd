"""Streaming speed of two source trees of this package, interleaved in one run: `selfforcing bench chunk` and
`selfforcing bench stream`, each in a fresh process, the trees alternating within every round (order reversed every
other round), so that a slow spell of a shared machine falls on both alike.

    cd /tmp && /work/main/.venv/bin/python /work/main/benchmarks/before_after.py --before /tmp/before \\
        --after /work/main [--rounds 3] [--threads 1] [--out /work/main/benchmarks/results/redesign_before_after.json]

Each tree is put first on PYTHONPATH (run it from a folder that holds no ``selfforcing`` package) and builds its C++
blocks into its own build folder. The JSON holds every run's numbers and, per tree, the median over runs of the
chunk step (`bench chunk`, small preset) and of the rolling-KV chunk latency and fps (`bench stream`, tiny preset).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(tree: str, args: list[str], threads: int) -> dict:
    """One `selfforcing bench ...` of the package in ``tree``, in a fresh process; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(threads), "MAX_JOBS": "1",
               "SELFFORCING_BUILD_DIR": os.path.join(tempfile.gettempdir(), "selfforcing-build-" +
                                                     os.path.basename(os.path.abspath(tree)))}
        code = ("import sys, selfforcing; assert selfforcing.__file__.startswith(sys.argv[1]), selfforcing.__file__; "
                "from selfforcing.cli import main; sys.argv = ['selfforcing'] + sys.argv[2:]; sys.exit(main())")
        cmd = [sys.executable, "-c", code, os.path.abspath(tree), "bench", *args, "--threads", str(threads),
               "--out", out]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench {args[0]} failed in {tree} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def summarise(result: dict) -> dict:
    if result["benchmark"] == "chunk_step":
        return {"chunk_step_s": result["seconds"], "fraction_of_peak": result["fraction_of_peak"]}
    rows = {r["length"]: r for r in result["rows"] if r["strategy"] == "rolling_kv"}
    return {f"stream_x{m}_chunk_latency_s": r["chunk_latency_s"] for m, r in rows.items()} | {
        f"stream_x{m}_fps": r["fps"] for m, r in rows.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk-repeats", type=int, default=8)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    benches = {"chunk": ["chunk", "--preset", "small", "--repeats", str(a.chunk_repeats)],
               "stream": ["stream", "--preset", "tiny", "--lengths", "1,2", "--strategies", "rolling_kv",
                          "--repeats", "2"]}
    trees = {"before": a.before, "after": a.after}
    runs = []
    for r in range(a.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for bench, args in benches.items():
            for name in order:
                numbers = summarise(run(trees[name], args, a.threads))
                runs.append({"round": r, "tree": name, "bench": bench, **numbers})
                print(json.dumps(runs[-1]), flush=True)
    medians = {}
    for name in trees:
        mine = [x for x in runs if x["tree"] == name]
        keys = sorted({k for x in mine for k in x} - {"round", "tree", "bench"})
        medians[name] = {k: statistics.median(x[k] for x in mine if k in x) for k in keys}
    ratios = {k: medians["after"][k] / medians["before"][k] for k in medians["after"]}
    result = {"benchmark": "before_after", "trees": trees, "threads": a.threads, "rounds": a.rounds,
              "benches": benches, "load_average": [round(v, 2) for v in os.getloadavg()], "medians": medians,
              "after_over_before": ratios, "runs": runs}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({"medians": medians, "after_over_before": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
