"""Resident memory while streaming 10x the training length through a rolling KV cache: it must stay flat after
the first window (the cache is preallocated and rolls; nothing grows with the video).

    .venv/bin/python benchmarks/stream_memory.py [--preset tiny] [--multiple 10] [--window 12] [--out FILE]

Writes benchmarks/results/stream_memory.json: RSS after every chunk, the growth between the end of the first window
and the end of the stream and over its second half, and what the model's bounded lookup caches hold at the end
(they fill while the stream visits new positions, up to their bound, then stay). Random weights (memory does not
depend on them), the Moving-Digits autoencoder's streaming decode and MiniLM, as `selfforcing generate` uses them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import psutil
import torch

from selfforcing.autoencoders import get_autoencoder
from selfforcing.inference import StreamingGenerator
from selfforcing.models import CausalWanModel
from selfforcing.perf import keep_freed_memory
from selfforcing.text import build_text_encoder


def lookup_cache_mb(model) -> float:
    """MB held by the model's bounded lookup caches (RoPE chunk tables, up to 16; per-frame RoPE tables, up to 64
    frames, computed 16 at a time; time embeddings, up to 32 timestep vectors), counting each storage once: they fill
    while a stream visits new positions, then stay at their bound."""
    tensors = list(model.rope._tables.values()) + list(model.rope._frame_tables.values())
    tensors += [t for pair in model.condition_embedder._time_cache.values() for t in pair]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--window", type=int, default=12, help="training length = rolling window, latent frames")
    p.add_argument("--sinks", type=int, default=3)
    p.add_argument("--multiple", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/stream_memory.json")
    args = p.parse_args()
    keep_freed_memory()  # as the selfforcing CLI does: freed blocks stay in the heap, so RSS is what the stream holds
    torch.manual_seed(0)
    model = CausalWanModel.from_preset(args.preset).eval()
    gen = StreamingGenerator(model, get_autoencoder("moving-digits"), build_text_encoder("minilm", 24), (16, 16),
                             window_frames=args.window, sink_frames=args.sinks)
    proc = psutil.Process(os.getpid())
    rss, frames = [], []
    total = args.multiple * args.window
    for chunk in gen.stream("the digit 3 moves right", num_latent_frames=total, seed=0):
        del chunk
        gc.collect()
        rss.append(proc.memory_info().rss)
        frames.append(gen.frame)
    first_window = next(i for i, f in enumerate(frames) if f >= args.window)
    steady = rss[first_window:]
    half = len(rss) // 2
    result = {"benchmark": "stream_memory", "preset": args.preset, "window_frames": args.window,
              "sink_frames": args.sinks, "latent_frames": total, "chunks": len(rss),
              "rss_mb_after_first_window": steady[0] / 2**20, "rss_mb_at_end": rss[-1] / 2**20,
              "rss_mb_max_after_first_window": max(steady) / 2**20,
              "growth_mb_after_first_window": (max(steady) - steady[0]) / 2**20,
              "growth_mb_over_second_half": (max(rss[half:]) - rss[half]) / 2**20,
              "lookup_caches_mb_at_end": lookup_cache_mb(model),
              "kv_cache_mb": gen.cache.memory_bytes() / 2**20, "rss_mb_per_chunk": [r / 2**20 for r in rss]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb_per_chunk"}))


if __name__ == "__main__":
    main()
