"""Writing and reading videos. Tensors are float32 [F, 3, H, W] in [-1, 1]; files hold uint8 [F, H, W, 3].

mp4 is H.264 (libx264, yuv420p) through PyAV; GIF and PNG through Pillow. Every write goes through a temp
file and a rename (``selfforcing.fileio``), so a killed job never leaves a half-written video.
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..fileio import atomic_write


def to_uint8_frames(video) -> np.ndarray:
    """float [F, 3, H, W] in [-1, 1] (or [F, 1, H, W]) -> uint8 [F, H, W, 3]; uint8 [F, H, W, 3] passes through."""
    if isinstance(video, np.ndarray) and video.dtype == np.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [F, H, W, 3], got {video.shape}")
        return video
    v = torch.as_tensor(video).detach().float().cpu()
    if v.ndim != 4 or v.shape[1] not in (1, 3):
        raise ValueError(f"video must be [F, 3, H, W] (or [F, 1, H, W]) in [-1, 1], got {tuple(v.shape)}")
    if v.shape[1] == 1:
        v = v.expand(-1, 3, -1, -1)
    return ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def to_float_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [F, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad to even height/width (yuv420p needs it) by repeating the last row/column."""
    f, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_mp4(path: str | os.PathLike, video, fps: float = 8, crf: int = 18) -> str:
    """Encode ``video`` as H.264 mp4 at ``fps``; returns the path."""
    import av

    frames = _even(to_uint8_frames(video))
    path = os.fspath(path)

    def write(tmp: str) -> None:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    atomic_write(path, write)
    return path


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video file to uint8 [F, H, W, 3]; errors name the file."""
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with av.open(path) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as err:  # noqa: BLE001 - PyAV raises many types for a broken file
        raise ValueError(f"cannot decode video {path}: {err}") from err
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return np.stack(frames)


def write_gif(path: str | os.PathLike, video, fps: float = 8) -> str:
    """Animated GIF (loops forever)."""
    frames = [Image.fromarray(f) for f in to_uint8_frames(video)]

    def write(tmp: str) -> None:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)

    atomic_write(path, write)
    return os.fspath(path)


def contact_sheet(video, columns: int = 8, labels: bool = True, pad: int = 2) -> Image.Image:
    """A grid of the frames (row-major), each labelled with its index when ``labels``."""
    frames = to_uint8_frames(video)
    f, h, w, _ = frames.shape
    cols = max(1, min(columns, f))
    rows = -(-f // cols)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, frame in enumerate(frames):
        x, y = pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)
        sheet.paste(Image.fromarray(frame), (x, y))
        if labels:
            draw.text((x + 2, y + 1), str(i), fill=(255, 80, 80))
    return sheet


def write_contact_sheet(path: str | os.PathLike, video, columns: int = 8, labels: bool = True) -> str:
    """PNG contact sheet of the frames (see :func:`contact_sheet`)."""
    sheet = contact_sheet(video, columns, labels)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return os.fspath(path)
