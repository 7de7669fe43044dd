"""Interleaved A/B of settings for the AR chunk step (`selfforcing bench chunk`) on a shared machine.

Each variant is a set of environment settings (none = the defaults). Every round runs every variant once, each in a
fresh process (process-level choices such as SELFFORCING_CPU_FFN's timed kernel choice are made anew), in an order
that alternates from round to round, so that a slow spell of a shared VM falls on all variants alike. The JSON holds
every run's median step and fraction of the matmul peak, each variant's median over its runs, its ratio to the first
variant, and how many rounds each variant won.

    .venv/bin/python benchmarks/chunk_ab.py --variant SELFFORCING_CPU_FFN=onednn \\
        --variant SELFFORCING_CPU_FFN=feature_major [--variant ''] [--rounds 6] [--repeats 12] \\
        [--out benchmarks/results/chunk_ab.json] [-- extra `bench chunk` arguments, e.g. --no-fuse-cache-pass]

Why: on this project's 2-core VM a chunk step varies by up to 2x from day to day and by about 10% between
back-to-back runs, more than most of the changes one wants to compare (README, Performance).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def parse_variant(text: str) -> dict[str, str]:
    """'A=1,B=2' -> {'A': '1', 'B': '2'}; '' -> {} (the defaults). A malformed pair is a ValueError that names it."""
    env = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"variant {text!r}: {pair!r} is not NAME=VALUE")
        env[name] = value
    return env


def variant_name(env: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in env.items()) or "defaults"


def run_once(env: dict[str, str], repeats: int, extra: list[str]) -> dict:
    """One `selfforcing bench chunk` in a fresh process with ``env`` added; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "chunk.json")
        cmd = [sys.executable, "-m", "selfforcing.cli", "bench", "chunk", "--repeats", str(repeats), "--out", out,
               *extra]
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench chunk failed under {variant_name(env)} (exit {proc.returncode}):\n"
                             f"{proc.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def ab(variants: list[dict[str, str]], rounds: int, repeats: int, extra: list[str]) -> dict:
    """Run ``rounds`` rounds over ``variants`` (order reversed every other round); per-run and summary numbers."""
    names = [variant_name(v) for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variants must differ: {names}")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    wins = dict.fromkeys(names, 0)
    for r in range(rounds):
        order = list(zip(names, variants))
        if r % 2:
            order.reverse()
        this_round = {}
        for name, env in order:
            res = run_once(env, repeats, extra)
            this_round[name] = res["seconds"]
            runs[name].append({"round": r, "seconds": res["seconds"], "fraction_of_peak": res["fraction_of_peak"],
                               "fraction_of_local_peak": res["fraction_of_local_peak"],
                               "matmul_peak_gflops": res["matmul_peak_gflops"], "cpu_ffn": res.get("cpu_ffn"),
                               "cpu_blocks": res.get("cpu_blocks")})
            print(f"round {r + 1}/{rounds} {name}: {1e3 * res['seconds']:.1f} ms, "
                  f"{100 * res['fraction_of_peak']:.0f}% of peak", flush=True)
        wins[min(this_round, key=this_round.get)] += 1
    base = statistics.median(x["seconds"] for x in runs[names[0]])
    summary = {}
    for name in names:
        secs = [x["seconds"] for x in runs[name]]
        med = statistics.median(secs)
        summary[name] = {"median_seconds": med, "min_seconds": min(secs), "ratio_to_first": med / base,
                         "median_fraction_of_peak": statistics.median(x["fraction_of_peak"] for x in runs[name]),
                         "median_fraction_of_local_peak": statistics.median(
                             x["fraction_of_local_peak"] for x in runs[name]),
                         "rounds_won": wins[name]}
    return {"benchmark": "chunk_ab", "rounds": rounds, "repeats_per_run": repeats, "bench_chunk_args": extra,
            "time_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", required=True,
                   help="NAME=VALUE[,NAME=VALUE...] added to the environment; '' for the defaults (twice or more)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=12, help="timed chunk steps per run")
    p.add_argument("--out", default=None)
    args = p.parse_args(own)
    try:
        variants = [parse_variant(v) for v in args.variant]
    except ValueError as e:
        p.error(str(e))
    if len(variants) < 2:
        p.error("give at least two --variant")
    result = ab(variants, args.rounds, args.repeats, extra)
    for name, s in result["summary"].items():
        print(f"{name}: median {1e3 * s['median_seconds']:.1f} ms ({s['ratio_to_first']:.3f}x the first), "
              f"{100 * s['median_fraction_of_peak']:.0f}% of peak, won {s['rounds_won']}/{args.rounds} rounds")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
