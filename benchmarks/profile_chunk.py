"""Where the time of one AR chunk step goes: torch.profiler's top operators (self CPU time) over a few chunk steps of
``selfforcing bench chunk``'s set-up (default: the small preset, a full window of 9 cached frames, 4 denoising steps
plus the cache pass, fused into the next chunk's first step as streaming does, float32, 2 threads), and, where the
C++ blocks run, the wall time of each of their stages (``native_stages_ms_per_chunk``): their fused kernels and
register-tile products are not torch ops, so the profiler does not see them.

    .venv/bin/python benchmarks/profile_chunk.py [--preset small] [--chunks 5]
        [--out benchmarks/results/profile_chunk_small.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from selfforcing.accel.cpu import timed_kernel_choice
from selfforcing.benchmark import build_model, denoising_steps
from selfforcing.models.wan.presets import preset_sizes
from selfforcing.perf import keep_freed_memory
from selfforcing.sampling import generate_chunk


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default="benchmarks/results/profile_chunk_small.json")
    args = p.parse_args()
    keep_freed_memory()  # as the CLI does for `bench chunk`
    torch.set_num_threads(args.threads)
    model = build_model(args.preset)
    c = model.config
    sizes = preset_sizes(args.preset)
    k, window, (h, w) = c.num_frame_per_block, sizes["train_frames"], sizes["latent_size"]
    steps = denoising_steps(4, sizes["shift"])
    ctx = torch.randn(1, sizes["text_len"], c.text_dim)
    cache = model.new_kv_cache(1, h, w, window_frames=window, sink_frames=0)
    start, pending = 0, None

    def chunk():
        nonlocal start, pending
        _, pending = generate_chunk(model, torch.randn(1, k, c.in_channels, h, w), steps, ctx, kv_cache=cache,
                                    start_frame=start, pending=pending)
        start += k

    with torch.no_grad(), timed_kernel_choice():  # the kernels streaming would choose
        for _ in range(window // k + 1):  # fill the window
            chunk()
        plain = []
        for _ in range(args.chunks):  # the same steps without the profiler, for its overhead
            t0 = time.perf_counter()
            chunk()
            plain.append(time.perf_counter() - t0)
        stages = _native_stages(chunk, args.chunks)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.chunks):
                chunk()
        wall = (time.perf_counter() - t0) / args.chunks
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [{"op": e.key, "self_cpu_ms_per_chunk": e.self_cpu_time_total / 1e3 / args.chunks,
             "share": e.self_cpu_time_total / total, "calls_per_chunk": e.count / args.chunks}
            for e in events[:args.top]]
    result = {"benchmark": "profile_chunk", "preset": args.preset, "threads": args.threads, "chunks": args.chunks,
              "self_cpu_ms_per_chunk": total / 1e3 / args.chunks,
              # the profiler slows the steps (by ~100 ms of 210 on 2026-11-29) and inflates the ops' self times;
              # the same steps' wall time without it puts the shares in context
              "wall_ms_per_chunk_profiled": 1e3 * wall,
              "wall_ms_per_chunk_unprofiled_median": 1e3 * statistics.median(plain), "top_ops": rows,
              "native_stages_ms_per_chunk": stages, "load_average": list(os.getloadavg())}
    print(f"per chunk: {result['wall_ms_per_chunk_unprofiled_median']:.1f} ms unprofiled, "
          f"{result['wall_ms_per_chunk_profiled']:.1f} ms profiled, of which ops' self time "
          f"{result['self_cpu_ms_per_chunk']:.1f} ms")
    for r in rows:
        print(f"{r['op'][:48]:48s} {r['self_cpu_ms_per_chunk']:7.2f} ms {100 * r['share']:5.1f}%  "
              f"{r['calls_per_chunk']:6.0f} calls")
    if stages:
        print(f"C++ blocks, wall time per stage ({stages['total']:.1f} ms of the chunk step's "
              f"{stages['chunk_step']:.1f} ms):")
        for name, ms in sorted(stages["stages"].items(), key=lambda kv: -kv[1]):
            print(f"  {name:32s} {ms:7.2f} ms")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


def _native_stages(chunk, chunks: int) -> dict | None:
    """Milliseconds per chunk step in each stage of the C++ forward over ``chunks`` steps (None where it does not run),
    with the steps' own median wall time: what is not in a stage is Python (time embedding, plans, sampler) and
    glue."""
    from selfforcing.accel.cpu import native as native_blocks

    if native_blocks.blocks_setting() == "python" or native_blocks.extension() is None:
        return None
    ext = native_blocks.extension()
    ext.section_seconds(reset=True)
    ext.profile_sections(True)
    walls = []
    try:
        for _ in range(chunks):
            t0 = time.perf_counter()
            chunk()
            walls.append(time.perf_counter() - t0)
    finally:
        ext.profile_sections(False)
    stages = {name: 1e3 * s / chunks for name, s in ext.section_seconds(reset=True).items()}
    if not any(stages.values()):
        return None
    return {"stages": stages, "total": sum(stages.values()), "chunk_step": 1e3 * statistics.median(walls)}


if __name__ == "__main__":
    main()
