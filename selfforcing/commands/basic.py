"""`selfforcing presets` and `selfforcing demo`."""

from __future__ import annotations

import argparse
import json
import time


# ---------------------------------------------------------------------------------------------- presets
def presets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def presets_run(args: argparse.Namespace) -> int:
    import torch

    from selfforcing.models import PRESETS, CausalWanModel

    rows = []
    for name in PRESETS:
        with torch.device("meta"):
            model = CausalWanModel.from_preset(name)
        c = model.config
        rows.append(dict(
            name=name,
            parameters=sum(p.numel() for p in model.parameters()),
            dim=model.dim,
            layers=c.num_layers,
            heads=c.num_attention_heads,
            ffn_dim=c.ffn_dim,
            in_channels=c.in_channels,
            text_dim=c.text_dim,
            num_frame_per_block=c.num_frame_per_block,
        ))
    if args.json:
        print(json.dumps({"presets": rows}))
    else:
        print(f"{'preset':<18}{'params':>16}{'dim':>6}{'layers':>8}{'heads':>7}{'ffn':>7}{'C':>4}{'text':>6}")
        for r in rows:
            print(f"{r['name']:<18}{r['parameters']:>16,}{r['dim']:>6}{r['layers']:>8}{r['heads']:>7}"
                  f"{r['ffn_dim']:>7}{r['in_channels']:>4}{r['text_dim']:>6}")
    return 0


# ---------------------------------------------------------------------------------------------- demo
def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--chunks", type=int, default=8, help="number of chunks to stream")
    p.add_argument("--seed", type=int, default=0)


def demo_run(args: argparse.Namespace) -> int:
    """Stream chunks through the KV cache with the few-step sampler of Algorithm 2.

    Until a trained model ships (the inference issue), this runs randomly initialised weights: it checks
    the installation and the streaming path end to end and reports its speed, nothing more.
    """
    import torch

    from selfforcing import flow
    from selfforcing.models import CausalWanModel
    from selfforcing.sampling import rollout_with_kv_cache

    torch.manual_seed(args.seed)
    model = CausalWanModel.from_preset(args.preset).eval()
    c = model.config
    k, h, w = c.num_frame_per_block, 16, 16
    steps = flow.denoising_step_list([1000, 750, 500, 250], shift=5.0)
    ctx = torch.randn(1, 16, c.text_dim)
    cache = model.new_kv_cache(1, h, w, max_frames=k * args.chunks)
    print(f"selfforcing demo: {args.preset} preset with RANDOM weights (no trained model ships yet); "
          f"streaming {args.chunks} chunks of {k} latent frames, {len(steps)} steps each")
    latencies = []
    t_start = time.perf_counter()
    last = [t_start]

    def chunk_done(i, x0):  # called as each chunk's x0 is ready
        now = time.perf_counter()
        latencies.append(now - last[0])
        last[0] = now

    noise = torch.randn(1, k * args.chunks, c.in_channels, h, w)
    with torch.no_grad():
        rollout_with_kv_cache(model, noise, ctx, steps, block_sizes=[k] * args.chunks, kv_cache=cache,
                              on_chunk=chunk_done)
    total = time.perf_counter() - t_start
    frames = k * args.chunks
    print(json.dumps({
        "latent_frames": frames,
        "seconds": round(total, 3),
        "latent_fps": round(frames / total, 2),
        "first_chunk_latency_s": round(latencies[0], 4),
        "median_chunk_latency_s": round(sorted(latencies)[len(latencies) // 2], 4),
    }))
    return 0
