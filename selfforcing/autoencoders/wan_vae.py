"""The Wan2.1 VAE (``diffusers.AutoencoderKLWan``) behind the common interface, with streaming decode.

Latents are normalised as ``diffusers.WanPipeline`` does: ``z = (mu - latents_mean) / latents_std`` per
channel, where ``mu`` is the mean of the encoder's Gaussian and ``latents_mean`` / ``latents_std`` come from
the VAE config; decoding inverts it. Wan's causal 3-D convolutions compress time by T = 4 in the layout
F = 1 + 4 (F' - 1) (the first latent frame holds one pixel frame, each later one holds four) and space by
8 (16 with Wan2.2's patchified VAE).

Streaming: ``AutoencoderKLWan._decode`` runs its decoder one latent frame at a time and carries each causal
conv's last input frames in a feature cache (``_feat_map``) from frame to frame. The stream decoder runs the
very same per-frame loop but keeps that cache in the stream object, so decoding can stop after any chunk
and resume with the next one; the concatenated chunks equal ``AutoencoderKLWan.decode`` of all frames.
"""

from __future__ import annotations

import json
import os

import torch

from .base import Autoencoder

WAN_CLASS_NAME = "AutoencoderKLWan"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def find_wan_vae_folder(path: str | os.PathLike) -> str | None:
    """The folder holding an AutoencoderKLWan ``config.json``: ``path`` itself, or ``path/vae`` (a whole
    diffusers Wan pipeline folder); None when neither is one."""
    path = os.fspath(path)
    for folder in (path, os.path.join(path, "vae")):
        config = os.path.join(folder, "config.json")
        if os.path.isfile(config):
            try:
                with open(config, encoding="utf-8") as fh:
                    if json.load(fh).get("_class_name") == WAN_CLASS_NAME:
                        return folder
            except (OSError, ValueError):
                continue
    return None


class WanVAE(Autoencoder):
    """``AutoencoderKLWan`` with Wan's latent normalisation, [B, F, C, H, W] layout and streaming decode.

    encode: video [B, F, 3, H, W] (F = 1 + 4k) -> latents [B, 1 + k, z_dim, H/s, W/s], normalised per channel.
    decode: latents [B, F', z_dim, h, w] -> video [B, 1 + 4 (F' - 1), 3, h s, w s] in [-1, 1].
    Outputs are float32 whatever the VAE's dtype.
    """

    name = "wan"

    def __init__(self, vae) -> None:
        super().__init__()
        cfg = vae.config
        self.vae = vae
        self.latent_channels = int(cfg.z_dim)
        # compression follows from the architecture, not from the informational scale_factor_* fields
        # (a small test config with 3 levels compresses space 4x while still saying 8)
        self.spatial_compression = 2 ** (len(cfg.dim_mult) - 1) * int(cfg.patch_size or 1)
        self.temporal_compression = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
        if self.temporal_compression != 4:
            raise ValueError(
                f"AutoencoderKLWan encodes in chunks of 4 frames, so its config must compress time 4x "
                f"(two True entries in temperal_downsample), got temperal_downsample={list(cfg.temperal_downsample)}"
            )
        for key in ("latents_mean", "latents_std"):
            if len(getattr(cfg, key)) != self.latent_channels:
                raise ValueError(
                    f"VAE config {key} must have z_dim={self.latent_channels} entries, got {len(getattr(cfg, key))}"
                )
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std, dtype=torch.float32), persistent=False)
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self._num_decoder_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32) -> WanVAE:
        """Load a local ``save_pretrained`` folder of AutoencoderKLWan (or a Wan pipeline folder with ``vae/``)."""
        from diffusers import AutoencoderKLWan

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Wan VAE folder not found: {path}")
        folder = find_wan_vae_folder(path)
        if folder is None:
            raise ValueError(
                f"{path} is not an AutoencoderKLWan folder: expected config.json with "
                f'"_class_name": "{WAN_CLASS_NAME}" there or in {os.path.join(path, "vae")}'
            )
        if not any(os.path.isfile(os.path.join(folder, n)) for n in WEIGHTS_NAMES):
            raise FileNotFoundError(f"Wan VAE weights not found in {folder}: expected one of {list(WEIGHTS_NAMES)}")
        try:
            vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch_dtype)
        except Exception as err:  # diffusers raises OSError / RuntimeError / safetensors errors for bad files
            raise ValueError(f"cannot load the Wan VAE weights in {folder}: {err}") from err
        return cls(vae.eval())

    # ------------------------------------------------------------------------------------ normalisation
    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, 1, 1, 1)  # per channel, for diffusers' [B, C, F, H, W]

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """z = (mu - latents_mean) / latents_std per channel; mu [B, C, F', h, w] (diffusers layout)."""
        return (mu.float() - self._view(self.latents_mean)) / self._view(self.latents_std)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """mu = z latents_std + latents_mean per channel, in the VAE's dtype; z [B, C, F', h, w]."""
        mu = z.float() * self._view(self.latents_std) + self._view(self.latents_mean)
        return mu.to(self.vae.dtype)

    # ------------------------------------------------------------------------------------ encode / decode
    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        x = video.permute(0, 2, 1, 3, 4).to(self.vae.dtype)  # -> [B, 3, F, H, W]
        mu = self.vae.encode(x).latent_dist.mode()  # deterministic: the mean of the posterior
        return self.normalize(mu).permute(0, 2, 1, 3, 4).contiguous()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.denormalize(latents.permute(0, 2, 1, 3, 4))
        video = self.vae.decode(z).sample  # [B, 3, F, H, W], already clamped to [-1, 1]
        return video.float().permute(0, 2, 1, 3, 4).contiguous()

    # ------------------------------------------------------------------------------------ streaming
    def _new_stream_state(self, batch_size: int) -> dict:
        # one slot per causal conv of the decoder, filled as AutoencoderKLWan.clear_cache() would
        return {"feat_map": [None] * self._num_decoder_convs}

    def _decode_stream_chunk(self, latents: torch.Tensor, state: dict, first_frame: int) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.vae
        # post_quant_conv is a 1x1x1 conv (no temporal context), so applying it per chunk is exact
        x = vae.post_quant_conv(self.denormalize(latents.permute(0, 2, 1, 3, 4)))
        frames = []
        for i in range(x.shape[2]):
            # the same call AutoencoderKLWan._decode makes for frame first_frame + i
            frames.append(
                vae.decoder(
                    x[:, :, i : i + 1], feat_cache=state["feat_map"], feat_idx=[0], first_chunk=first_frame + i == 0
                )
            )
        out = torch.cat(frames, dim=2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0).float().permute(0, 2, 1, 3, 4).contiguous()
