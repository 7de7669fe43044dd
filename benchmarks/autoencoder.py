"""Benchmark the shipped Moving-Digits autoencoder: held-out PSNR, size, encode / decode speed.

    .venv/bin/python benchmarks/autoencoder.py [--clips 128] [--out benchmarks/results/autoencoder.json]

Loads the shipped weights (no training); PSNR is on [0, 1] pixels of whole held-out clips (split="test"),
averaged over clips, for the whole frame and for pixels near the digits (see
``selfforcing.autoencoders.train.near_digit_mask``). Speed: float32, 2 threads, median of repeated calls,
frames/s where "batch" is the number of 64x64 frames per call. The training time is the one recorded in the
weights' config.json when they were trained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from selfforcing.autoencoders import SHIPPED, get_autoencoder  # noqa: E402
from selfforcing.autoencoders.train import (  # noqa: E402
    AEDataConfig,
    clip_psnr,
    evaluate_reconstruction,
    held_out_clips,
)
from selfforcing.autoencoders.video_ae import WEIGHTS_NAME  # noqa: E402


def frames_per_second(fn, x: torch.Tensor, repeats: int) -> float:
    """Median frames/s of fn(x) over ``repeats`` timed calls (after 2 warm-up calls); x [B, F, ...]."""
    with torch.no_grad():
        for _ in range(2):
            fn(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return x.shape[0] * x.shape[1] / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=128, help="held-out clips for PSNR (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per speed figure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "autoencoder.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    folder = SHIPPED["moving-digits"]
    ae = get_autoencoder("moving-digits")
    meta = ae.metadata
    data = AEDataConfig(**{k: v for k, v in meta["training_recipe"]["data"].items()})

    start = time.perf_counter()
    videos = held_out_clips(data, args.clips)
    quality = evaluate_reconstruction(ae, videos, radius=meta["training_recipe"]["near_digit_radius"])
    eval_seconds = time.perf_counter() - start
    with torch.no_grad():
        latents_all = torch.cat([ae.encode(v) for v in videos.split(16)])  # [N, F, C, h, w]
        per_channel = latents_all.transpose(1, 2).flatten(2)  # [N, C, F h w]
        channel_mean = per_channel.mean(dim=(0, 2))
        channel_std = per_channel.transpose(0, 1).flatten(1).std(dim=1)
        # smoothness: how much the decoder moves under a small latent perturbation (diffusion sampling error)
        # (0.1, 0.3 and 0.5 of the unit latent std: a decoder that shrugs these off turns a denoiser's small errors
        # into clean strokes, so fragmented samples then come from the denoiser, not from the latent space)
        gen = torch.Generator().manual_seed(0)
        noisy_psnr = {}
        for level in (0.1, 0.3, 0.5):
            noisy = latents_all[:16] + level * torch.randn(latents_all[:16].shape, generator=gen)
            psnr = clip_psnr(videos[:16], ae.decode(noisy)).mean().item()
            noisy_psnr[f"psnr_db_after_latent_noise_{level}"] = round(psnr, 2)

    speed = {}
    size = data.size
    for batch in (1, 8):
        frames = videos.flatten(0, 1)[:batch].unsqueeze(1)  # [batch, 1, 3, H, W]
        latents = ae.encode(frames)
        speed[f"encode_frames_per_s_batch{batch}"] = round(frames_per_second(ae.encode, frames, args.repeats), 1)
        speed[f"decode_frames_per_s_batch{batch}"] = round(frames_per_second(ae.decode, latents, args.repeats), 1)
    stream = ae.stream_decoder(1)
    one_latent = ae.encode(videos[:1, :1])
    speed["stream_decode_frames_per_s_batch1"] = round(frames_per_second(stream.decode_chunk, one_latent,
                                                                        args.repeats), 1)

    result = {
        "autoencoder": "moving-digits",
        "weights": os.path.relpath(os.path.join(folder, WEIGHTS_NAME), REPO),
        "architecture": meta["architecture"],
        "latent_shape_per_frame": list(ae.latent_shape(1, size, size)[1:]),
        "parameters": sum(p.numel() for p in ae.parameters()),
        "weights_file_bytes": os.path.getsize(os.path.join(folder, WEIGHTS_NAME)),
        "held_out": {
            "split": "test",
            "clips": quality["clips"],
            "frames_per_clip": data.num_frames,
            "psnr_db": round(quality["psnr"], 2),
            "psnr_near_digits_db": round(quality["psnr_near_digits"], 2),
            "psnr_worst_clip_db": round(quality["psnr_min_clip"], 2),
            "psnr_near_digits_worst_clip_db": round(quality["psnr_near_digits_min_clip"], 2),
            "near_digit_radius_px": meta["training_recipe"]["near_digit_radius"],
            "seconds": round(eval_seconds, 1),
        },
        "held_out_latents": {
            "channel_mean": [round(v, 3) for v in channel_mean.tolist()],
            "channel_std": [round(v, 3) for v in channel_std.tolist()],
            **noisy_psnr,
        },
        "speed": {"dtype": "float32", "threads": args.threads, "frame_size": [size, size], **speed},
        "training": {
            "seconds": meta["train_seconds"],
            "steps": meta["steps"],
            "threads": meta["torch_threads"],
            "held_out_psnr_at_save": meta["held_out"],
            "command": "python -m selfforcing.autoencoders.train configs/autoencoder/moving_digits.yaml",
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
