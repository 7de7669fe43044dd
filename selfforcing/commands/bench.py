"""`selfforcing bench stream`: per-chunk cost against video length for three ways of extending a video.

* ``rolling_kv`` (Self Forcing, Algorithm 2): a rolling KV cache of the training length; each chunk runs the
  few denoising steps against the cache and one cache pass. Cost per chunk is constant.
* ``recompute`` (CausVid-style window shifting): the cache is rebuilt for every chunk by re-running the
  clean frames of the context window, then the chunk is denoised. Cost grows with the context until the
  window is full, and every chunk pays for the whole window again.
* ``sliding_window`` (a bidirectional model, no cache): every denoising step runs the model over the whole
  window (context frames at t = 0 and the noisy chunk).

Random weights: speed does not depend on them. Lengths are multiples of the training length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    s = sub.add_parser("stream", help="chunk latency / fps against video length: rolling KV vs recompute vs sliding window")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--lengths", default="1,2,5,10", help="video lengths in multiples of the training length")
    s.add_argument("--train-frames", type=int, default=None, help="training length in latent frames "
                   "(default: 12 for the laptop presets, 21 for Wan)")
    s.add_argument("--latent-size", default=None, help="h,w (default: 16,16 laptop presets, 60,104 Wan)")
    s.add_argument("--strategies", default="rolling_kv,recompute,sliding_window")
    s.add_argument("--steps", type=int, default=4, help="denoising steps per chunk")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", default=None, help="also write the JSON here")
    s.add_argument("--json", action="store_true")
    c = sub.add_parser("chunk", help="one AR chunk step (denoising steps + cache pass): time, FLOPs, share of the "
                                     "measured float32 matmul peak")
    c.add_argument("--preset", default="small")
    c.add_argument("--latent-size", default="16,16")
    c.add_argument("--context-frames", type=int, default=9, help="cached frames the chunk attends to")
    c.add_argument("--text-len", type=int, default=16)
    c.add_argument("--steps", type=int, default=4)
    c.add_argument("--repeats", type=int, default=10)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--out", default=None)
    c.add_argument("--json", action="store_true")


def _chunk_rolling(model, state, x, steps, ctx, start):
    from selfforcing.sampling import cache_chunk, denoise_chunk

    x0 = denoise_chunk(model, x, steps, ctx, kv_cache=state["cache"], start_frame=start)
    cache_chunk(model, x0, ctx, kv_cache=state["cache"], start_frame=start)
    return x0


def _chunk_recompute(model, state, x, steps, ctx, start):
    from selfforcing.sampling import cache_chunk, denoise_chunk

    k = x.shape[1]
    history = state["history"]
    keep = state["window"] - k
    context = history[-keep:] if keep > 0 else []
    first = start - len(context)
    cache = model.new_kv_cache(x.shape[0], x.shape[-2], x.shape[-1], window_frames=state["window"], sink_frames=0)
    if first > 0:
        cache.skip_to(first)
    for i in range(0, len(context), k):  # rebuild the window's KV from its clean frames
        frames = __import__("torch").cat(context[i:i + k], 1)
        cache_chunk(model, frames, ctx, kv_cache=cache, start_frame=first + i)
    x0 = denoise_chunk(model, x, steps, ctx, kv_cache=cache, start_frame=start)
    history.extend(x0[:, j:j + 1] for j in range(k))
    del history[:-state["window"]]
    return x0


def _chunk_sliding(model, state, x, steps, ctx, start):
    import torch

    from selfforcing import flow

    k = x.shape[1]
    history = state["history"]
    context = torch.cat(history[-(state["window"] - k):], 1) if len(history) and state["window"] > k else None
    for j, t in enumerate(steps):
        seq = x if context is None else torch.cat([context, x], 1)
        tt = torch.zeros(seq.shape[:2])
        tt[:, -k:] = float(t)
        v = model(seq, tt, ctx, causal=False)[:, -k:]
        x0 = flow.flow_to_x0(v, x, tt[:, -k:])
        if j + 1 < len(steps):
            x = flow.add_noise(x0, torch.randn_like(x0), torch.full(x0.shape[:2], float(steps[j + 1])))
    history.extend(x0[:, i:i + 1] for i in range(k))
    del history[:-state["window"]]
    return x0


STRATEGIES = {"rolling_kv": _chunk_rolling, "recompute": _chunk_recompute, "sliding_window": _chunk_sliding}


def stream_benchmark(preset: str, lengths: list[int], strategies: list[str], train_frames: int | None = None,
                     latent_size: tuple[int, int] | None = None, num_steps: int = 4, device: str = "cpu") -> dict:
    """Rows {strategy, length, chunk_latency_s (median), first_chunk_latency_s, fps} for every strategy and length."""
    import torch

    from selfforcing import flow
    from selfforcing.models import CausalWanModel

    wan = preset.startswith("wan")
    train_frames = train_frames or (21 if wan else 12)
    h, w = latent_size or ((60, 104) if wan else (16, 16))
    torch.manual_seed(0)
    model = CausalWanModel.from_preset(preset).to(device).eval()
    c = model.config
    k = c.num_frame_per_block
    steps = flow.denoising_step_list([1000 - 1000 * i / num_steps for i in range(num_steps)], shift=5.0).tolist()
    ctx = torch.randn(1, 16 if not wan else 512, c.text_dim, device=device)
    rows = []
    for name in strategies:
        for m in lengths:
            frames = m * train_frames
            state = {"window": train_frames, "history": [],
                     "cache": model.new_kv_cache(1, h, w, window_frames=train_frames, sink_frames=0)}
            latencies = []
            t_start = time.perf_counter()
            with torch.no_grad():
                for start in range(0, frames, k):
                    x = torch.randn(1, k, c.in_channels, h, w, device=device)
                    t0 = time.perf_counter()
                    STRATEGIES[name](model, state, x, steps, ctx, start)
                    if device != "cpu":
                        torch.cuda.synchronize()
                    latencies.append(time.perf_counter() - t0)
            total = time.perf_counter() - t_start
            rows.append({"strategy": name, "length": m, "latent_frames": frames,
                         "chunk_latency_s": statistics.median(latencies),
                         "first_chunk_latency_s": latencies[0], "fps": frames / total,
                         "chunks": len(latencies)})
    return {"benchmark": "stream", "preset": preset, "train_frames": train_frames, "latent_size": [h, w],
            "chunk_frames": k, "denoising_steps": num_steps, "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in model.parameters()), "rows": rows,
            "note": "chunk_latency_s: median over all chunks of the video; fps: latent frames per second"}


def chunk_benchmark(preset: str, latent_size: tuple[int, int], context_frames: int, text_len: int, num_steps: int,
                    repeats: int) -> dict:
    """Median time of one chunk step with ``context_frames`` cached, its analytic FLOPs, and the share of the
    float32 matmul peak measured in the same run."""
    import torch

    from selfforcing import flow
    from selfforcing.models import CausalWanModel
    from selfforcing.perf import chunk_step_flops, matmul_peak_gflops
    from selfforcing.sampling import cache_chunk, denoise_chunk

    torch.manual_seed(0)
    model = CausalWanModel.from_preset(preset).eval()
    c = model.config
    k, (h, w) = c.num_frame_per_block, latent_size
    steps = flow.denoising_step_list([1000 - 1000 * i / num_steps for i in range(num_steps)], shift=5.0).tolist()
    ctx = torch.randn(1, text_len, c.text_dim)
    window = context_frames + k
    cache = model.new_kv_cache(1, h, w, window_frames=window, sink_frames=0)
    times = []
    with torch.no_grad():
        start = 0
        for i in range(repeats + window // k + 1):
            x = torch.randn(1, k, c.in_channels, h, w)
            t0 = time.perf_counter()
            x0 = denoise_chunk(model, x, steps, ctx, kv_cache=cache, start_frame=start)
            cache_chunk(model, x0, ctx, kv_cache=cache, start_frame=start)
            dt = time.perf_counter() - t0
            if start >= context_frames:  # a full window of context
                times.append(dt)
            start += k
    peak = matmul_peak_gflops()
    tpf = model.tokens_per_frame(h, w)
    flops = chunk_step_flops(c, tpf, k, context_frames, text_len, num_steps)
    median = statistics.median(times)
    achieved = flops / median / 1e9
    return {"benchmark": "chunk_step", "preset": preset, "dim": model.dim, "layers": c.num_layers,
            "tokens_per_frame": tpf, "chunk_frames": k, "context_frames": context_frames, "steps": num_steps,
            "threads": torch.get_num_threads(), "seconds": median, "min_seconds": min(times),
            "gflop": flops / 1e9, "achieved_gflops": achieved, "matmul_peak_gflops": peak,
            "fraction_of_peak": achieved / peak}


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bench_command == "chunk":
        size = tuple(int(v) for v in args.latent_size.split(","))
        result = chunk_benchmark(args.preset, size, args.context_frames, args.text_len, args.steps, args.repeats)
        if args.out:
            from selfforcing.fileio import atomic_write_text

            atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(json.dumps(result) if args.json else
              f"{args.preset}: {result['seconds'] * 1e3:.1f} ms per chunk step, {result['gflop']:.2f} GFLOP, "
              f"{result['achieved_gflops']:.1f} GFLOP/s = {100 * result['fraction_of_peak']:.0f}% of the "
              f"{result['matmul_peak_gflops']:.1f} GFLOP/s float32 matmul peak")
        return 0
    size = tuple(int(v) for v in args.latent_size.split(",")) if args.latent_size else None
    result = stream_benchmark(args.preset, [int(v) for v in args.lengths.split(",")], args.strategies.split(","),
                              args.train_frames, size, args.steps, args.device)
    if args.out:
        from selfforcing.fileio import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for r in result["rows"]:
            print(f"{r['strategy']:>15} x{r['length']:<3} chunk {r['chunk_latency_s'] * 1e3:8.1f} ms   "
                  f"first {r['first_chunk_latency_s'] * 1e3:8.1f} ms   {r['fps']:7.1f} frames/s")
    return 0
