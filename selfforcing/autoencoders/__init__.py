"""Autoencoders: one interface (pixels [B, F, 3, H, W] <-> latents [B, F', C, h, w], streaming decode).

* ``identity``: pixels are the latents;
* ``moving-digits``: the small per-frame conv autoencoder trained here on Moving-Digits (64x64 -> 8x16x16),
  shipped in ``selfforcing/assets/autoencoders/moving_digits``;
* a Wan VAE folder: ``diffusers.AutoencoderKLWan`` with Wan's latent normalisation and streaming decode.

``get_autoencoder(name_or_path)`` returns any of them, frozen and in eval mode.
"""

from __future__ import annotations

import os

import torch

from .base import Autoencoder, StreamDecoder
from .identity import IdentityAutoencoder
from .video_ae import VideoAEConfig, VideoAutoencoder
from .wan_vae import WanVAE, find_wan_vae_folder

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "autoencoders")
SHIPPED = {"moving-digits": os.path.join(ASSETS_DIR, "moving_digits")}
NAMES = ("identity", *SHIPPED)


def get_autoencoder(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Autoencoder:
    """An autoencoder by name ("identity", "moving-digits") or by folder (a :class:`VideoAutoencoder` folder,
    an ``AutoencoderKLWan`` folder, or a diffusers Wan pipeline folder with ``vae/``); frozen, eval mode.

    ``dtype`` applies to the Wan VAE's weights (its outputs are float32 regardless); the small models stay
    float32. Unknown names / missing folders: FileNotFoundError; folders of another kind: ValueError.
    """
    key = os.fspath(name_or_path)
    if key == "identity":
        ae: Autoencoder = IdentityAutoencoder()
    elif key in SHIPPED:
        ae = VideoAutoencoder.from_pretrained(SHIPPED[key])
        ae.name = key
    else:
        if not os.path.exists(key):
            raise FileNotFoundError(
                f"unknown autoencoder {key!r}: not one of {list(NAMES)} and no such folder"
            )
        if os.path.isfile(os.path.join(key, "config.json")) and find_wan_vae_folder(key) is None:
            ae = VideoAutoencoder.from_pretrained(key)  # raises ValueError naming the file if not ours
        else:
            ae = WanVAE.from_pretrained(key, torch_dtype=dtype)
    return ae.to(device).eval().requires_grad_(False)


__all__ = [
    "Autoencoder",
    "StreamDecoder",
    "IdentityAutoencoder",
    "VideoAEConfig",
    "VideoAutoencoder",
    "WanVAE",
    "get_autoencoder",
    "NAMES",
]
