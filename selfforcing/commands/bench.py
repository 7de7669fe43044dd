"""`selfforcing bench stream|chunk`: what a streamed chunk costs, against video length and against the hardware.

The arguments; the benchmarks themselves are :mod:`selfforcing.benchmark`.

``bench stream`` extends a video chunk by chunk in one of several ways (rolling KV cache, recompute, recompute_kv,
sliding window) and reports the chunk latency against video length; ``bench chunk`` times one AR chunk step with a
full window against the measured matmul peak. ``--device cuda --dtype bfloat16`` runs them on a GPU.
"""

from __future__ import annotations

import argparse
import json

DTYPES = ("float32", "bfloat16")
STRATEGY_NAMES = ("rolling_kv", "recompute", "recompute_kv", "sliding_window")


def _common(p: argparse.ArgumentParser, preset: str, threads: int | None) -> None:
    p.add_argument("--preset", default=preset)
    p.add_argument("--steps", type=int, default=4, help="denoising steps per chunk")
    p.add_argument("--threads", type=int, default=threads, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights, activations and KV cache (bfloat16 is meant for CUDA; it is slow on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block (opt-in)")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "flex"),
                   help="CUDA kernel for masked (block-causal) forwards; unmasked ones always use SDPA")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default: the preset's)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--json", action="store_true")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    s = sub.add_parser("stream",
                       help="chunk latency / fps against video length: rolling KV vs recompute vs sliding window")
    _common(s, "tiny", None)
    s.add_argument("--lengths", default="1,2,5,10", help="video lengths in multiples of the training length")
    s.add_argument("--train-frames", type=int, default=None, help="training length in latent frames "
                   "(default: the preset's)")
    s.add_argument("--latent-size", default=None, help="h,w (default: the preset's)")
    s.add_argument("--strategies", default="rolling_kv,recompute,sliding_window",
                   help=f"comma-separated, from {','.join(STRATEGY_NAMES)}")
    s.add_argument("--repeats", type=int, default=5,
                   help="rounds per strategy; a round streams every length in turn, a video shorter than 4 "
                        "training lengths ceil(4 / length) times; medians pool the chunks of every stream")
    c = sub.add_parser("chunk", help="one AR chunk step (denoising steps + cache pass): time, FLOPs, share of the "
                                     "measured matmul peak")
    _common(c, "small", 2)
    c.add_argument("--latent-size", default=None, help="h,w (default: the preset's)")
    c.add_argument("--context-frames", type=int, default=None,
                   help="cached frames the chunk attends to (default: the preset's training "
                   "length minus one chunk)")
    c.add_argument("--repeats", type=int, default=10)
    c.add_argument("--compare-plain", action="store_true",
                   help="also time the same step in plain PyTorch (the model's CPU shortcuts off, the cache pass "
                        "unfused), alternating with ours step by step, and report the speed-up")
    c.add_argument("--no-fuse-cache-pass", dest="fuse_cache_pass", action="store_false",
                   help="run each chunk's cache pass as its own forward (default: fused into the next chunk's "
                        "first step, as streaming does)")


def _write(path: str | None, result: dict) -> None:
    if path:
        from selfforcing.fileio import atomic_write_text

        atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def run(args: argparse.Namespace) -> int:
    import torch

    from selfforcing.benchmark import chunk_benchmark, stream_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(num_steps=args.steps, device=args.device, dtype=args.dtype, compile=args.compile,
                  attention=args.attention, text_len=args.text_len)
    size = tuple(int(v) for v in args.latent_size.split(",")) if args.latent_size else None
    if args.bench_command == "chunk":
        result = chunk_benchmark(args.preset, size, args.context_frames, repeats=args.repeats,
                                 fuse_cache_pass=args.fuse_cache_pass, compare_plain=args.compare_plain, **common)
        _write(args.out, result)
        if args.json:
            print(json.dumps(result))
            return 0
        print(f"{args.preset}: {result['seconds'] * 1e3:.1f} ms per chunk step, {result['gflop']:.2f} GFLOP, "
              f"{result['achieved_gflops']:.1f} GFLOP/s = {100 * result['fraction_of_peak']:.0f}% of the "
              f"{result['matmul_peak_gflops']:.1f} GFLOP/s {args.dtype} matmul peak ({args.device}); "
              f"{100 * result['fraction_of_local_peak']:.0f}% step by step against the peak timed right after it")
        if args.compare_plain:
            print(f"plain PyTorch: {result['plain_seconds'] * 1e3:.1f} ms per chunk step "
                  f"({100 * result['plain_fraction_of_peak']:.0f}% of the peak); ours is "
                  f"{result['speedup_over_plain']:.2f}x faster ({result['speedup_over_plain_step_by_step']:.2f}x "
                  f"step by step)")
        return 0
    result = stream_benchmark(args.preset, [int(v) for v in args.lengths.split(",")], args.strategies.split(","),
                              args.train_frames, size, repeats=args.repeats, **common)
    _write(args.out, result)
    if args.json:
        print(json.dumps(result))
    else:
        for r in result["rows"]:
            work = f"   {r['chunk_gflop_median']:6.2f} GFLOP" if "chunk_gflop_median" in r else ""
            print(f"{r['strategy']:>15} x{r['length']:<3} chunk {r['chunk_latency_s'] * 1e3:8.1f} ms   "
                  f"full window {r['full_window_chunk_latency_s'] * 1e3:8.1f} ms   "
                  f"first {r['first_chunk_latency_s'] * 1e3:8.1f} ms   {r['fps']:7.1f} frames/s{work}")
        for name, value in result["ratios"].items():
            print(f"{name}: {value:.3f}")
    return 0
