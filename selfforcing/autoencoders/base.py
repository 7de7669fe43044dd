"""The one autoencoder interface: pixels [B, F, 3, H, W] <-> latents [B, F', C, h, w], plus streaming decode.

Every autoencoder maps a pixel video (float32 in [-1, 1]) to latents whose frame axis is second, as the
diffusion model wants them, and back:

* ``h = H / s``, ``w = W / s`` with ``s = spatial_compression``;
* ``F = 1 + T (F' - 1)`` with ``T = temporal_compression`` (Wan's causal layout: the first latent frame
  holds one pixel frame, every later one holds ``T``). With ``T = 1`` this is simply ``F = F'``.

``stream_decoder(batch_size)`` returns a :class:`StreamDecoder` that takes the latents a chunk at a time
(as an autoregressive generator produces them) and returns the pixel frames of each chunk, keeping whatever
state the decoder needs between chunks. Contract, tested for every autoencoder: concatenating the chunks'
pixels along the frame axis equals ``decode`` of the concatenated latents, for any chunking.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


class Autoencoder(nn.Module):
    """Base class. Subclasses set the four attributes below and implement ``_encode`` / ``_decode`` (and
    ``_new_stream_state`` / ``_decode_stream_chunk`` when decoding has temporal context).

    Attributes:
        name: short identifier ("identity", "moving-digits", "wan").
        latent_channels: C of the latents.
        spatial_compression: s, with h = H / s and w = W / s.
        temporal_compression: T, with F = 1 + T (F' - 1).
    """

    name: str = "autoencoder"
    latent_channels: int
    spatial_compression: int
    temporal_compression: int

    # ------------------------------------------------------------------------------------ frame counts
    def latent_frames(self, num_frames: int) -> int:
        """F' = 1 + (F - 1) / T for F pixel frames; ValueError if T does not divide F - 1."""
        t = self.temporal_compression
        if num_frames < 1:
            raise ValueError(f"{self.name} autoencoder needs at least 1 pixel frame, got {num_frames}")
        if (num_frames - 1) % t:
            raise ValueError(
                f"{self.name} autoencoder takes 1 + {t}k pixel frames (temporal compression {t}), "
                f"got {num_frames} frames"
            )
        return 1 + (num_frames - 1) // t

    def pixel_frames(self, num_latent_frames: int) -> int:
        """F = 1 + T (F' - 1) pixel frames for F' latent frames (F' >= 1)."""
        if num_latent_frames < 1:
            raise ValueError(f"need at least 1 latent frame, got {num_latent_frames}")
        return 1 + self.temporal_compression * (num_latent_frames - 1)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[F', C, h, w] of the latents of a [F, 3, height, width] video."""
        self._check_size(height, width)
        s = self.spatial_compression
        return self.latent_frames(num_frames), self.latent_channels, height // s, width // s

    # ------------------------------------------------------------------------------------ validation
    def _check_size(self, height: int, width: int) -> None:
        s = self.spatial_compression
        if height % s or width % s:
            raise ValueError(
                f"{self.name} autoencoder needs frame height and width divisible by its spatial compression "
                f"{s}, got {height}x{width}"
            )

    def check_video(self, video: torch.Tensor) -> None:
        """ValueError unless ``video`` is [B, F, 3, H, W] with a frame count and size this autoencoder takes."""
        if not isinstance(video, torch.Tensor) or video.ndim != 5:
            got = _shape(video) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be [B, F, 3, H, W], got {got}")
        if video.shape[2] != 3:
            raise ValueError(
                f"video must have 3 (RGB) channels on axis 2 of [B, F, 3, H, W], got {video.shape[2]} "
                f"(shape {_shape(video)})"
            )
        self.latent_frames(video.shape[1])
        self._check_size(video.shape[3], video.shape[4])

    def check_latents(self, latents: torch.Tensor) -> None:
        """ValueError unless ``latents`` is [B, F', C, h, w] with C = latent_channels."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
            got = _shape(latents) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be [B, F', C, h, w], got {got}")
        if latents.shape[2] != self.latent_channels:
            raise ValueError(
                f"{self.name} autoencoder expects latents with {self.latent_channels} channels on axis 2 of "
                f"[B, F', C, h, w], got {latents.shape[2]} (shape {_shape(latents)})"
            )
        if latents.shape[1] < 1:
            raise ValueError(f"latents have no frames (shape {_shape(latents)})")

    # ------------------------------------------------------------------------------------ public API
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Pixel video [B, F, 3, H, W] in [-1, 1] -> latents [B, F', C, H/s, W/s], F' = 1 + (F - 1)/T."""
        self.check_video(video)
        return self._encode(video)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, F', C, h, w] -> pixel video [B, 1 + T (F' - 1), 3, h s, w s], clamped to [-1, 1]."""
        self.check_latents(latents)
        return self._decode(latents)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction decode(encode(video)), same shape as ``video``."""
        return self.decode(self.encode(video))

    def stream_decoder(self, batch_size: int) -> StreamDecoder:
        """A fresh chunk-by-chunk decoder for ``batch_size`` videos (see :class:`StreamDecoder`)."""
        return StreamDecoder(self, batch_size)

    # ------------------------------------------------------------------------------------ for subclasses
    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _new_stream_state(self, batch_size: int):
        """State carried between chunks (None: decoding is frame-local, each chunk decodes on its own)."""
        return None

    def _decode_stream_chunk(self, latents: torch.Tensor, state, first_frame: int) -> torch.Tensor:
        """Decode latent frames [first_frame, first_frame + f) given ``state`` (updated in place)."""
        return self._decode(latents)

    def extra_repr(self) -> str:
        return (
            f"latent_channels={self.latent_channels}, spatial_compression={self.spatial_compression}, "
            f"temporal_compression={self.temporal_compression}"
        )


class StreamDecoder:
    """Decodes latents chunk by chunk, keeping the decoder's state between chunks.

    ``decode_chunk(latents [B, f, C, h, w])`` returns the pixel frames of that chunk: with temporal
    compression T, the first latent frame of the stream gives 1 pixel frame and every later one gives T,
    so a chunk gives ``f T`` frames (``1 + (f - 1) T`` for the first chunk). Concatenating all chunks'
    outputs equals ``Autoencoder.decode`` of all latents at once. ``reset()`` starts a new stream.
    """

    def __init__(self, autoencoder: Autoencoder, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.autoencoder = autoencoder
        self.batch_size = batch_size
        self.reset()

    def reset(self) -> None:
        """Forget all state: the next chunk is the first frame of a new video."""
        self.frames_decoded = 0  # latent frames consumed so far
        self._latent_hw: tuple[int, int] | None = None
        self._state = self.autoencoder._new_stream_state(self.batch_size)

    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent chunk [B, f, C, h, w] -> its pixel frames [B, f T (or 1 + (f-1) T first), 3, h s, w s]."""
        ae = self.autoencoder
        ae.check_latents(latents)
        if latents.shape[0] != self.batch_size:
            raise ValueError(
                f"this stream decoder was made for batch size {self.batch_size}, got a chunk of batch size "
                f"{latents.shape[0]} (shape {_shape(latents)})"
            )
        hw = (latents.shape[3], latents.shape[4])
        if self._latent_hw is not None and hw != self._latent_hw:
            raise ValueError(
                f"latent size changed mid-stream: earlier chunks were {self._latent_hw[0]}x{self._latent_hw[1]}, "
                f"this one is {hw[0]}x{hw[1]}; call reset() to start a new video"
            )
        self._latent_hw = hw
        out = ae._decode_stream_chunk(latents, self._state, self.frames_decoded)
        self.frames_decoded += latents.shape[1]
        return out
