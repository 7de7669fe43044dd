"""The identity autoencoder: pixels are the latents (C = 3, no compression). For pixel-space models and tests."""

from __future__ import annotations

import torch

from .base import Autoencoder


class IdentityAutoencoder(Autoencoder):
    """encode(x) = x and decode(z) = clamp(z, -1, 1); latents [B, F, 3, H, W] are the video itself."""

    name = "identity"
    latent_channels = 3
    spatial_compression = 1
    temporal_compression = 1

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        return video.clone()  # a copy, so that editing the latents never edits the caller's video

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        # generated latents may overshoot; every decoder returns pixels in [-1, 1]
        return latents.clamp(-1.0, 1.0)
