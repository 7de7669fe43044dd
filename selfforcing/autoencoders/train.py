"""Train the small video autoencoder on Moving-Digits, measure it, and save it.

    python -m selfforcing.autoencoders.train configs/autoencoder/moving_digits.yaml [key=value ...]

Each step reconstructs ``batch_size`` frames drawn as ``frames_per_clip`` random frames from each of
``batch_size / frames_per_clip`` random training clips (frames of one clip are alike, so a batch of many
clips is a better gradient). Loss: mean squared error on [-1, 1] pixels plus ``l1_weight`` x mean absolute
error. Latent regulariser: during training the decoder sees ``r + latent_noise * std_c(r) * eps`` where
``std_c`` is the batch std of latent channel c (detached), so the decoder tolerates small latent errors
(the diffusion model's) and the encoder cannot escape the noise by scaling its output up.
After training, per-channel latent mean / std are measured on ``stats_clips`` training clips and stored,
held-out PSNR is measured on the test split, and weights + config are written atomically.

PSNR is on [0, 1]-scaled pixels of whole clips: PSNR = 10 log10(1 / MSE_clip), averaged over clips.
Because Moving-Digits frames are mostly black, "near-digit" PSNR restricts the MSE to pixels within
``near_digit_radius`` of a digit pixel (any channel > -0.9 in the input frame).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import load_config, to_dict
from .video_ae import VideoAEConfig, VideoAutoencoder

DEFAULT_RECIPE = os.path.join("configs", "autoencoder", "moving_digits.yaml")


@dataclass
class AEDataConfig:
    """Moving-Digits clips (see ``selfforcing.data.moving_digits.MovingDigits``)."""

    num_frames: int = 16
    size: int = 64
    num_digits: tuple[int, int] = (1, 2)
    train_clips: int = 10000  # length of the train split (clip i is a pure function of (seed, i))
    test_clips: int = 128  # held-out clips for the final PSNR
    seed: int = 0


@dataclass
class AETrainConfig:
    """A training run of :class:`VideoAutoencoder` (recipe: configs/autoencoder/moving_digits.yaml)."""

    out_dir: str = "selfforcing/assets/autoencoders/moving_digits"
    model: VideoAEConfig = field(default_factory=VideoAEConfig)
    data: AEDataConfig = field(default_factory=AEDataConfig)
    steps: int = 7000
    batch_size: int = 16  # frames per step
    frames_per_clip: int = 2  # frames taken from each sampled clip
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decay from lr to lr * min_lr_ratio
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    l1_weight: float = 0.0
    latent_noise: float = 0.1  # relative std of the training-time latent noise (0: plain autoencoder)
    stats_clips: int = 256  # training clips used to measure the latent mean / std
    eval_every: int = 1000  # steps between held-out PSNR checks in the log (0: only at the end)
    eval_clips_during_training: int = 16
    near_digit_radius: int = 2  # pixels: the near-digit mask is the digit mask dilated by this
    seed: int = 0
    num_threads: int = 2


# ---------------------------------------------------------------------------------------------- metrics
def near_digit_mask(video: torch.Tensor, radius: int = 2, threshold: float = -0.9) -> torch.Tensor:
    """Pixels within ``radius`` (Chebyshev distance) of a lit pixel: video [B, F, 3, H, W] -> bool [B, F, 1, H, W].

    A pixel is lit when any channel exceeds ``threshold`` (Moving-Digits background is -1)."""
    lit = (video > threshold).any(dim=2, keepdim=True).float()
    k = 2 * radius + 1
    dilated = F.max_pool2d(lit.flatten(0, 1), k, stride=1, padding=radius).unflatten(0, video.shape[:2])
    return dilated > 0


def clip_psnr(reference: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-clip PSNR in dB on [0, 1] pixels: 10 log10(1 / mean((x - y)^2 / 4)) over each clip's (masked) pixels.

    reference, reconstruction: [B, F, 3, H, W] in [-1, 1]; mask: bool [B, F, 1, H, W] or None -> [B]."""
    se = ((reference - reconstruction) / 2).square()  # /2: [-1, 1] -> [0, 1] scale
    if mask is None:
        mse = se.flatten(1).mean(1)
    else:
        m = mask.expand_as(se).float()
        mse = (se * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def evaluate_reconstruction(autoencoder, videos: torch.Tensor, radius: int = 2, batch_size: int = 8) -> dict:
    """Mean per-clip PSNR of decode(encode(videos)): whole frame and near digits. videos [N, F, 3, H, W]."""
    whole, near = [], []
    for chunk in videos.split(batch_size):
        recon = autoencoder.decode(autoencoder.encode(chunk))
        whole.append(clip_psnr(chunk, recon))
        near.append(clip_psnr(chunk, recon, near_digit_mask(chunk, radius)))
    whole_t, near_t = torch.cat(whole), torch.cat(near)
    return {
        "psnr": whole_t.mean().item(),
        "psnr_near_digits": near_t.mean().item(),
        "psnr_min_clip": whole_t.min().item(),
        "psnr_near_digits_min_clip": near_t.min().item(),
        "clips": len(videos),
    }


# ---------------------------------------------------------------------------------------------- data
def make_dataset(data: AEDataConfig, split: str, length: int):
    """The Moving-Digits split as a sequence of dicts with "video" [F, 3, size, size] in [-1, 1]."""
    from ..data.moving_digits import MovingDigits

    return MovingDigits(split=split, num_frames=data.num_frames, size=data.size,
                        num_digits=tuple(data.num_digits), length=length, seed=data.seed)


def load_clips(dataset, indices) -> torch.Tensor:
    """Stack ``dataset[i]["video"]`` for i in indices -> [N, F, 3, H, W]."""
    return torch.stack([dataset[int(i)]["video"] for i in indices])


def held_out_clips(data: AEDataConfig, count: int) -> torch.Tensor:
    """The first ``count`` clips of the test split -> [count, F, 3, H, W]."""
    return load_clips(make_dataset(data, "test", max(count, 1)), range(count))


# ---------------------------------------------------------------------------------------------- training
def _lr_at(cfg: AETrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def reconstruction_loss(model: VideoAutoencoder, frames: torch.Tensor, latent_noise: float, l1_weight: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE + l1_weight * L1 between frames [N, 3, H, W] and D(E(frames) + latent_noise * std_c * eps)."""
    raw = model.encode_frames(frames)
    if latent_noise > 0:
        std_c = raw.detach().std(dim=(0, 2, 3), keepdim=True)
        eps = torch.randn(raw.shape, generator=generator, dtype=raw.dtype, device=raw.device)
        raw = raw + latent_noise * std_c * eps
    recon = model.decode_frames(raw)
    loss = F.mse_loss(recon, frames)
    if l1_weight > 0:
        loss = loss + l1_weight * F.l1_loss(recon, frames)
    return loss


@torch.no_grad()
def measure_latent_stats(model: VideoAutoencoder, videos: torch.Tensor, batch_size: int = 16):
    """Per-channel mean and std of the raw latents of videos [N, F, 3, H, W] -> ([C], [C])."""
    total = total_sq = None
    count = 0
    for chunk in videos.split(batch_size):
        raw = model.encode_frames(chunk.flatten(0, 1)).double()  # [n, C, h, w]
        s, s2 = raw.sum(dim=(0, 2, 3)), raw.square().sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = s2 if total_sq is None else total_sq + s2
        count += raw.shape[0] * raw.shape[2] * raw.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def train_autoencoder(cfg: AETrainConfig, progress: bool = True) -> tuple[VideoAutoencoder, dict]:
    """Train, normalise, evaluate and save a :class:`VideoAutoencoder`; returns it and its facts dict."""
    _check_recipe(cfg)
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    model = VideoAutoencoder(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    train_set = make_dataset(cfg.data, "train", cfg.data.train_clips)
    eval_videos = held_out_clips(cfg.data, cfg.eval_clips_during_training) if cfg.eval_every else None
    train_seconds = _fit(model, opt, cfg, train_set, eval_videos, gen, progress)
    model.eval()

    # fix the latent scale: zero mean, unit variance per channel on training clips
    stats_set_ids = torch.randperm(cfg.data.train_clips, generator=gen)[: cfg.stats_clips]
    mean, std = measure_latent_stats(model, load_clips(train_set, stats_set_ids))
    model.latent_mean.copy_(mean)
    model.latent_std.copy_(std)

    test_videos = held_out_clips(cfg.data, cfg.data.test_clips)
    metrics = evaluate_reconstruction(model, test_videos, cfg.near_digit_radius)
    facts = {
        "train_seconds": round(train_seconds, 1),
        "steps": cfg.steps,
        "torch_threads": cfg.num_threads,
        "held_out": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in metrics.items()},
        "training_recipe": to_dict(cfg),
    }
    model.save_pretrained(cfg.out_dir, extra=facts)
    if progress:
        print(f"saved {cfg.out_dir}: held-out PSNR {metrics['psnr']:.2f} dB (near digits "
              f"{metrics['psnr_near_digits']:.2f} dB) after {train_seconds:.0f} s of training")
    return model, facts


def _check_recipe(cfg: AETrainConfig) -> None:
    if cfg.batch_size % cfg.frames_per_clip:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be a multiple of frames_per_clip ({cfg.frames_per_clip})"
        )
    if cfg.frames_per_clip > cfg.data.num_frames:
        raise ValueError(f"frames_per_clip ({cfg.frames_per_clip}) exceeds num_frames ({cfg.data.num_frames})")
    if cfg.data.size % 2 ** (len(cfg.model.channels) - 1):
        raise ValueError(f"data.size {cfg.data.size} is not divisible by the spatial compression of channels "
                         f"{tuple(cfg.model.channels)}")


def _training_frames(cfg: AETrainConfig, train_set, gen: torch.Generator) -> torch.Tensor:
    """One batch [batch_size, 3, H, W]: ``frames_per_clip`` distinct random frames of each of
    ``batch_size / frames_per_clip`` random training clips."""
    clips_per_step = cfg.batch_size // cfg.frames_per_clip
    clip_ids = torch.randint(0, cfg.data.train_clips, (clips_per_step,), generator=gen)
    videos = load_clips(train_set, clip_ids)  # [n, F, 3, H, W]
    frame_ids = torch.rand(clips_per_step, cfg.data.num_frames, generator=gen).argsort(1)[:, : cfg.frames_per_clip]
    return videos[torch.arange(clips_per_step)[:, None], frame_ids].flatten(0, 1)  # [batch, 3, H, W]


def _fit(model: VideoAutoencoder, opt, cfg: AETrainConfig, train_set, eval_videos, gen: torch.Generator,
         progress: bool) -> float:
    """``cfg.steps`` optimiser steps on the reconstruction loss (held-out PSNR every ``eval_every`` steps when
    ``eval_videos`` is given); the seconds they took."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    model.train()
    bar = tqdm(range(cfg.steps), desc="autoencoder", disable=not progress, mininterval=2.0)
    ema_loss = None
    for step in bar:
        frames = _training_frames(cfg, train_set, gen)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        loss = reconstruction_loss(model, frames, cfg.latent_noise, cfg.l1_weight, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()

        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.5f}", lr=f"{_lr_at(cfg, step):.1e}", refresh=False)
        if eval_videos is not None and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            model.eval()
            m = evaluate_reconstruction(model, eval_videos, cfg.near_digit_radius)  # unnormalised: same decode
            model.train()
            bar.write(f"step {step + 1}: held-out PSNR {m['psnr']:.2f} dB, near digits {m['psnr_near_digits']:.2f} dB, "
                      f"{time.perf_counter() - start:.0f} s")
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help="YAML recipe (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 out_dir=/tmp/ae")


def run(args: argparse.Namespace) -> int:
    recipe, overrides = args.recipe, list(args.overrides)
    if "=" in recipe and not os.path.isfile(recipe):  # only overrides were given: use the default recipe
        recipe, overrides = DEFAULT_RECIPE, [recipe, *overrides]
    cfg = load_config(recipe, AETrainConfig, overrides=overrides)
    train_autoencoder(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfforcing.autoencoders.train",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
