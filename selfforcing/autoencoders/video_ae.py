"""A small per-frame convolutional video autoencoder (the one trained here on Moving-Digits).

Each frame is encoded on its own by a 2-D conv net (no temporal compression, T = 1): 64x64x3 frames become
8 x 16 x 16 latents with ``channels = (16, 32, 64)`` (two stride-2 downsamplings, 4x spatial compression),
which is what the ``tiny`` / ``small`` model presets expect (in_channels 8, 64 tokens per frame with patch 2).

Because the decoder is frame-local too, streaming decode needs no state: each latent frame decodes to its
pixel frame whatever came before, so the chunks of a stream equal the full decode exactly.

Latent scale: the raw encoder output ``r`` is normalised per channel, ``z = (r - latent_mean) / latent_std``,
with statistics measured on training clips after training (buffers saved with the weights), so ``encode``
returns roughly zero-mean unit-variance latents as the diffusion model assumes.

Files: a folder with ``model.safetensors`` (parameters and the two statistics buffers) and ``config.json``
(``{"_class_name": "VideoAutoencoder", "architecture": {...}, ...training facts}``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import plain_data
from ..fileio import atomic_write
from .base import Autoencoder

CLASS_NAME = "VideoAutoencoder"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class VideoAEConfig:
    """Architecture of :class:`VideoAutoencoder`.

    channels[i] is the width at resolution H / 2^i; there are len(channels) - 1 stride-2 steps, so the
    spatial compression is 2^(len(channels) - 1).
    """

    latent_channels: int = 8
    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = 1
    norm_groups: int = 8


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), 3x3 convs, width preserved: [N, c, H, W] -> [N, c, H, W]."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class FrameEncoder(nn.Module):
    """Frames [N, 3, H, W] -> raw latents [N, latent_channels, H / 2^L, W / 2^L], L = len(channels) - 1."""

    def __init__(self, cfg: VideoAEConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            layers += [ResBlock(c, cfg.norm_groups) for _ in range(cfg.num_res_blocks)]
            if i + 1 < len(ch):
                layers.append(nn.Conv2d(c, ch[i + 1], 3, stride=2, padding=1))  # downsample 2x
        self.blocks = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class FrameDecoder(nn.Module):
    """Raw latents [N, latent_channels, h, w] -> frames [N, 3, h 2^L, w 2^L] (not clamped)."""

    def __init__(self, cfg: VideoAEConfig) -> None:
        super().__init__()
        ch = tuple(reversed(cfg.channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            layers += [ResBlock(c, cfg.norm_groups) for _ in range(cfg.num_res_blocks)]
            if i + 1 < len(ch):
                # nearest-neighbour upsampling + conv: no checkerboard artefacts of transposed convs
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, ch[i + 1], 3, padding=1)]
        self.blocks = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


class VideoAutoencoder(Autoencoder):
    """Per-frame conv autoencoder with per-channel latent normalisation.

    encode: video [B, F, 3, H, W] -> latents [B, F, C, H/s, W/s], z = (E(x) - latent_mean) / latent_std.
    decode: latents [B, F, C, h, w] -> video [B, F, 3, h s, w s] = clamp(D(z latent_std + latent_mean), -1, 1).
    """

    name = "video-ae"
    temporal_compression = 1

    def __init__(self, config: VideoAEConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = config or VideoAEConfig(**kwargs)
        cfg = replace(cfg, channels=tuple(cfg.channels))  # a copy: never edit the caller's config
        if not cfg.channels or any(c % cfg.norm_groups for c in cfg.channels):
            raise ValueError(
                f"every width in channels must be divisible by norm_groups={cfg.norm_groups}, got {cfg.channels}"
            )
        self.config = cfg
        self.latent_channels = cfg.latent_channels
        self.spatial_compression = 2 ** (len(cfg.channels) - 1)
        self.encoder = FrameEncoder(cfg)
        self.decoder = FrameDecoder(cfg)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    # ------------------------------------------------------------------------------------ raw per-frame maps
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) encoder output: frames [N, 3, H, W] -> [N, C, H/s, W/s]."""
        return self.encoder(frames)

    def decode_frames(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents [N, C, h, w] -> unclamped frames [N, 3, h s, w s] (the training target is [-1, 1])."""
        return self.decoder(raw)

    def _stat(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(1, 1, -1, 1, 1)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        raw = self.encode_frames(video.flatten(0, 1)).unflatten(0, video.shape[:2])
        return (raw - self._stat(self.latent_mean)) / self._stat(self.latent_std)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raw = latents * self._stat(self.latent_std) + self._stat(self.latent_mean)
        frames = self.decode_frames(raw.flatten(0, 1)).unflatten(0, latents.shape[:2])
        return frames.clamp(-1.0, 1.0)

    # ------------------------------------------------------------------------------------ files
    def save_pretrained(self, folder: str | os.PathLike, extra: dict | None = None) -> None:
        """Write ``model.safetensors`` and ``config.json`` (with ``extra`` facts) atomically into ``folder``."""
        from safetensors.torch import save_file

        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"_class_name": CLASS_NAME, "architecture": plain_data(asdict(self.config)), **(extra or {})}
        atomic_write(os.path.join(folder, WEIGHTS_NAME), lambda path: save_file(state, path))
        atomic_write(os.path.join(folder, CONFIG_NAME), lambda path: _write_json(path, meta))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> VideoAutoencoder:
        """Load a folder written by :meth:`save_pretrained`. Missing files: FileNotFoundError; a corrupt or
        mismatched weights file or config: ValueError naming the file and the problem."""
        from safetensors.torch import load_file

        folder = os.fspath(folder)
        meta = read_config(folder)
        try:
            arch = meta["architecture"]
            config = VideoAEConfig(**arch)
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"{os.path.join(folder, CONFIG_NAME)}: 'architecture' must hold the fields of VideoAEConfig "
                f"{sorted(VideoAEConfig.__dataclass_fields__)}: {err}"
            ) from err
        weights = os.path.join(folder, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"autoencoder weights file not found: {weights}")
        try:
            state = load_file(weights)
        except Exception as err:  # safetensors raises its own error types for truncated / garbage files
            raise ValueError(f"corrupt autoencoder weights file {weights}: {err}") from err
        model = cls(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        wrong = [k for k, v in state.items() if k in model.state_dict() and model.state_dict()[k].shape != v.shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"weights file {weights} does not fit the architecture in its config.json: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}, wrong shapes {wrong[:4]}"
            )
        model.load_state_dict(state)
        model.metadata = meta
        return model.eval()


def read_config(folder: str | os.PathLike) -> dict:
    """The ``config.json`` of a :class:`VideoAutoencoder` folder (FileNotFoundError / ValueError if bad)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"autoencoder folder not found: {folder}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"autoencoder config not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except ValueError as err:
        raise ValueError(f"corrupt autoencoder config {path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("_class_name") != CLASS_NAME:
        got = meta.get("_class_name") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: expected _class_name {CLASS_NAME!r}, got {got!r}")
    return meta


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2) + "\n")
