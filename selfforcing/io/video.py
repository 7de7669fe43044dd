"""Writing and reading videos. Tensors are float32 [F, 3, H, W] in [-1, 1]; files hold uint8 [F, H, W, 3].

mp4 is H.264 (libx264, yuv420p) through PyAV; GIF and PNG through Pillow. Every write goes through a temp
file in the target's directory and a rename (``selfforcing.fileio``, which also creates the parent
directories), so a killed job never leaves a half-written video. :class:`Mp4Writer` encodes a video chunk by
chunk as it is made (``selfforcing generate`` streams to disk with it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..fileio import atomic_write, commit_temp, discard_temp, temp_beside


def to_uint8_frames(video) -> np.ndarray:
    """A video for a file: uint8 numpy [F, H, W, 3].

    Accepts float [F, 3, H, W] (or grey [F, 1, H, W]) in [-1, 1] as a tensor or array: u = round((x + 1) *
    127.5) after clamping x to [-1, 1] (generators overshoot a little); or uint8 [F, H, W, 3] (numpy or
    torch), returned as a numpy array. NaN / inf values and empty videos are errors.
    """
    if isinstance(video, torch.Tensor) and video.dtype == torch.uint8:
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray) and video.dtype == np.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [F, H, W, 3], got shape {video.shape}")
        if 0 in video.shape:
            raise ValueError(f"video has no pixels: shape {video.shape}")
        return np.ascontiguousarray(video)
    v = torch.as_tensor(video).detach().cpu()
    if not v.is_floating_point():
        raise ValueError(f"video must be float [F, 3, H, W] in [-1, 1] or uint8 [F, H, W, 3], got dtype {v.dtype}")
    if v.ndim != 4 or v.shape[1] not in (1, 3):
        raise ValueError(f"video must be [F, 3, H, W] (or [F, 1, H, W]) in [-1, 1], got shape {tuple(v.shape)}")
    if v.numel() == 0:
        raise ValueError(f"video has no pixels: shape {tuple(v.shape)}")
    frames = v.float().numpy().transpose(0, 2, 3, 1)  # numpy: single-threaded, fast on a busy machine
    if not np.isfinite(frames).all():
        raise ValueError("video holds NaN or inf values")
    if frames.shape[-1] == 1:
        frames = np.broadcast_to(frames, (*frames.shape[:-1], 3))
    return np.ascontiguousarray(np.rint((np.clip(frames, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8))


def to_float_video(frames) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [F, 3, H, W] in [-1, 1]: x = u / 127.5 - 1 (inverse of :func:`to_uint8_frames`)."""
    frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} of shape {frames.shape}")
    x = frames.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(x))


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad [F, H, W, 3] to even H and W (yuv420p halves both for chroma) by repeating the last row / column."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _check_fps(fps: float) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")


def _check_crf(crf: int) -> None:
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer in 0..51, got {crf!r}")


class Mp4Writer:
    """An H.264 mp4 (libx264, yuv420p, constant quality ``crf``) written as its frames come, chunk by chunk, so a
    long video never sits in memory. The frames go to a temp file beside ``path``; :meth:`close` renames it to
    ``path``, :meth:`abort` removes it, so ``path`` appears only complete. As a context manager it closes on
    success and aborts on any exception (Ctrl-C included).

        with Mp4Writer("out.mp4", fps=8) as mp4:
            for chunk in chunks:
                mp4.write(chunk)        # float [F, 3, H, W] in [-1, 1] or uint8 [F, H, W, 3]
    """

    def __init__(self, path: str | os.PathLike, fps: float = 8, crf: int = 18) -> None:
        import av

        _check_fps(fps)
        _check_crf(crf)
        self.path, self.fps, self.crf = os.fspath(path), fps, crf
        self.frames = 0
        self._size: tuple[int, int] | None = None
        self._stream = None
        self._tmp = temp_beside(self.path)
        try:
            self._container = av.open(self._tmp, mode="w", format="mp4")
        except BaseException:
            discard_temp(self._tmp)
            raise

    def write(self, video) -> None:
        """Encode frames (see :func:`to_uint8_frames`; odd H / W padded to even). Every call must have the first
        call's frame size."""
        import av

        if self._container is None:
            raise ValueError(f"{self.path}: the writer is closed")
        frames = _even(to_uint8_frames(video))
        size = (frames.shape[1], frames.shape[2])
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1000))
            self._stream.height, self._stream.width = size
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf)}
            self._size = size
        elif size != self._size:
            raise ValueError(f"{self.path}: frames of {size[0]}x{size[1]} "
                             f"after frames of {self._size[0]}x{self._size[1]}")
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)
        self.frames += len(frames)

    def close(self) -> str:
        """Flush the encoder, finish the file and rename it to ``path``; returns the path. No frames is an error."""
        if self._container is None:
            raise ValueError(f"{self.path}: the writer is closed")
        if self._stream is None:
            self.abort()
            raise ValueError(f"{self.path}: no frames were written")
        try:
            for packet in self._stream.encode():  # the encoder's delayed frames
                self._container.mux(packet)
            self._container.close()
            self._container = None
            commit_temp(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the video: close the container and remove the temp file (``path`` is left as it was)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away
                pass
            self._container = None
        discard_temp(self._tmp)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_mp4(path: str | os.PathLike, video, fps: float = 8, crf: int = 18) -> str:
    """Encode ``video`` (see :func:`to_uint8_frames`) as H.264 mp4 (libx264, yuv420p, constant quality ``crf``,
    0 = lossless luma .. 51) at ``fps``; odd H / W are padded to even. Atomic write; returns the path."""
    _check_fps(fps)
    _check_crf(crf)
    frames = to_uint8_frames(video)  # checked before a temp file exists
    with Mp4Writer(path, fps=fps, crf=crf) as mp4:
        mp4.write(frames)
    return os.fspath(path)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of the first video stream of a file to uint8 [F, H, W, 3] (RGB); errors name the file."""
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as err:  # noqa: BLE001 - PyAV raises many types for a broken file
        raise ValueError(f"cannot decode video {path}: {err}") from err
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return np.stack(frames)


def gif_frame_durations(num_frames: int, fps: float) -> list[int]:
    """Per-frame GIF durations in ms: d_i = 10 (c_{i+1} - c_i) with c_i = round(100 i / fps), at least 20 ms.

    GIF stores whole centiseconds; rounding the frame START times (not each duration) keeps the total play
    time within 10 ms of F / fps (8 fps: 120 and 130 ms alternate). Players show frames shorter than 20 ms
    at 100 ms, so frames are never shorter (fps above 50 plays at 50).
    """
    _check_fps(fps)
    starts = [round(100 * i / fps) for i in range(num_frames + 1)]
    return [max(20, 10 * (b - a)) for a, b in zip(starts, starts[1:])]


def write_gif(path: str | os.PathLike, video, fps: float = 8) -> str:
    """Animated GIF of ``video`` (see :func:`to_uint8_frames`) that loops forever, timed by
    :func:`gif_frame_durations`. Pillow stores identical consecutive frames once with their durations summed,
    so fewer frames may be stored but the play time is unchanged. Atomic write; returns the path."""
    _check_fps(fps)
    frames = [Image.fromarray(f) for f in to_uint8_frames(video)]
    durations = gif_frame_durations(len(frames), fps)

    def write(tmp: str) -> None:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)

    atomic_write(path, write)
    return os.fspath(path)


def contact_sheet(video, columns: int = 8, labels: bool | Sequence[str] | None = True, pad: int = 2) -> Image.Image:
    """A grid of the frames, row-major, ``pad`` grey pixels around and between them.

    With F frames of H x W and c = min(columns, F) columns, r = ceil(F / c) rows, the sheet is
    (c (W + pad) + pad) x (r (H + pad) + pad) pixels (width x height). ``labels``: True writes each frame's
    index in its top-left corner, a sequence of F strings writes those, None / False writes nothing.
    """
    frames = to_uint8_frames(video)
    f, h, w, _ = frames.shape
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be an integer >= 1, got {columns!r}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be an integer >= 0, got {pad!r}")
    if labels is True:
        texts = [str(i) for i in range(f)]
    elif labels is None or labels is False:
        texts = None
    else:
        texts = [str(t) for t in labels]
        if len(texts) != f:
            raise ValueError(f"need one label per frame: {f} frames, {len(texts)} labels")
    cols = min(columns, f)
    rows = -(-f // cols)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, frame in enumerate(frames):
        x, y = pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)
        sheet.paste(Image.fromarray(frame), (x, y))
        if texts is not None:
            draw.text((x + 2, y + 1), texts[i], fill=(255, 80, 80))
    return sheet


def write_contact_sheet(path: str | os.PathLike, video, columns: int = 8,
                        labels: bool | Sequence[str] | None = True) -> str:
    """PNG contact sheet of the frames (see :func:`contact_sheet`). Atomic write; returns the path."""
    sheet = contact_sheet(video, columns, labels)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return os.fspath(path)
