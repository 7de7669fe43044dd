"""End-to-end sanity check of the data -> autoencoder -> text -> teacher training -> sampler path: the tiny teacher
trained on ONE Moving-Digits clip must reproduce it from noise. Writes benchmarks/results/overfit_one_clip.json
(final loss, PSNR of the sample against the clip) and a contact sheet of both.

    .venv/bin/python benchmarks/overfit_one_clip.py [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from selfforcing.autoencoders import get_autoencoder
from selfforcing.cli import main as cli
from selfforcing.config import load_config
from selfforcing.data.moving_digits import render_clip
from selfforcing.io import write_contact_sheet
from selfforcing.models import CausalWanModel
from selfforcing.sampling import sample_bidirectional
from selfforcing.text import build_text_encoder
from selfforcing.training.config import TrainConfig
from selfforcing.training.trainer import train


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).square().mean()
    return float(-10 * torch.log10(mse))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", default="benchmarks/results/overfit_one_clip.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store, run = os.path.join(tmp, "one"), os.path.join(tmp, "run")
        cli(["data", "encode", "--num-clips", "1", "--num-frames", "12", "--text-len", "24", "--out", store])
        cfg = load_config("configs/tiny/teacher.yaml", TrainConfig, [
            f"out_dir={run}", "data.kind=store", f"data.path={store}", "batch_size=4", "text_dropout=0.0",
            "sample_every=0", "checkpoint_every=0", "tensorboard=false", "generator_optim.lr=1.0e-3", "ema_weight=0.0"])
        t0 = time.perf_counter()
        state = train(cfg, max_steps=args.steps, progress=False, resume=False)
        seconds = time.perf_counter() - t0
        model = CausalWanModel.from_checkpoint(os.path.join(run, "final")).eval()
    clip = render_clip("train", 0, num_frames=12, num_digits=(1, 2))
    text = build_text_encoder("minilm", 24)
    ctx = text.encode([clip["caption"]]).states
    noise = torch.randn(1, 12, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    latents, _ = sample_bidirectional(model, noise, ctx, num_steps=24, shift=cfg.timestep_shift)
    video = get_autoencoder("moving-digits").decode(latents)[0]
    sheet = os.path.splitext(args.out)[0] + ".png"
    write_contact_sheet(sheet, torch.cat([clip["video"], video]), columns=12)
    losses = [h["loss"] for h in state.history]
    result = {"benchmark": "overfit_one_clip", "steps": args.steps, "seconds": seconds,
              "loss_first_10": sum(losses[:10]) / 10, "loss_last_10": sum(losses[-10:]) / 10,
              "sample_psnr_db": psnr(video, clip["video"]),
              "black_video_psnr_db": psnr(torch.zeros_like(video) - 1, clip["video"]),  # the empty-canvas baseline
              "caption": clip["caption"],
              "contact_sheet": sheet}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
