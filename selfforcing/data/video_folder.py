"""Folders of real video clips with captions, as a torch Dataset of [F, 3, H, W] tensors in [-1, 1].

Layout: ``root`` holds video files (``.mp4`` and the other containers PyAV reads, searched recursively,
hidden files skipped) and their captions, given one of two ways:

- a ``.txt`` beside each video with the same stem (``clips/cat.mp4`` + ``clips/cat.txt``), or
- one caption file passed as ``captions=``: a CSV with a header row and columns ``path`` (or ``file``)
  and ``caption``, or a JSONL file with one ``{"path": ..., "caption": ...}`` object per line (``file``
  may stand for ``path``). Paths are relative to ``root`` (absolute paths inside ``root`` also work).
  A mapping {relative path: caption} is accepted too.

A clip is F = ``num_frames`` frames taken every ``stride`` frames, starting at frame ``s``:
frames s, s + stride, ..., s + (F - 1) stride, so a clip needs (F - 1) stride + 1 decoded frames.
The decoder runs forward from the first frame (no seeking, so the frames are exact for every codec) and
stops after the last frame it needs. Each frame is scaled, keeping its aspect ratio, so that it covers
``size`` = (H, W), then centre-cropped to (H, W) (antialiased bilinear), and mapped from uint8 u to
u / 127.5 - 1.

Bad files never stop a run:

- when the dataset is built, every file is probed once (container header, video stream, frame count,
  first frame decoded). A file that fails, or that has fewer frames than a clip needs, is left out with a
  :class:`SkippedVideoWarning` naming it and the reason, and counted in ``num_skipped`` /
  ``skipped_paths`` / ``skipped`` (path -> reason).
- a file that fails later, in ``__getitem__`` (changed on disk, corrupt past its first frame), is warned
  about and counted the same way, and the item falls through to the next index that decodes
  (index + 1, index + 2, ... wrapping around), so the result for an index is deterministic. The dataset's
  length does not change. Counts made inside DataLoader workers stay in those worker processes. Code that
  must not substitute one clip for another (``selfforcing data encode``) calls :meth:`load` and
  :meth:`skip` instead. ``skip_kinds`` says why each file was left out: unreadable, too_short or
  decode_failed.

Errors (not skips): ``root`` missing or holding no videos, a video with no caption (unless
``default_caption`` is given), a malformed caption file, and bad arguments.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")

# What a broken or truncated file raises in PyAV: FFmpegError (a subclass of OSError or ValueError
# depending on the code), plus our own too-short / no-stream errors. Programming errors still propagate.
_DECODE_ERRORS = (av.FFmpegError, OSError, EOFError, ValueError, IndexError, RuntimeError)


class SkippedVideoWarning(UserWarning):
    """A video file was left out (unreadable, corrupt, or too short); the message names it."""


class VideoDecodeError(RuntimeError):
    """A video could not be decoded into the requested clip; the message names the file."""


class ClipTooShortError(VideoDecodeError):
    """The video decoded cleanly but ended (after ``decoded`` frames) before the clip's last frame."""

    def __init__(self, message: str, decoded: int) -> None:
        super().__init__(message)
        self.decoded = decoded


def skip_kind(err: VideoDecodeError) -> str:
    """Why a video read failed, as a summary key: ``too_short`` (it ended before the clip's last frame) or
    ``decode_failed`` (an error while decoding)."""
    return "too_short" if isinstance(err, ClipTooShortError) else "decode_failed"


@dataclass(frozen=True)
class VideoEntry:
    """One usable video: its path, caption and what the probe found (frame_count None if unknown)."""

    path: str
    caption: str
    width: int
    height: int
    frame_count: int | None


def frames_needed(num_frames: int, stride: int) -> int:
    """Decoded frames a clip spans: (num_frames - 1) * stride + 1."""
    return (num_frames - 1) * stride + 1


def probe_video(path: str) -> tuple[int, int, int | None]:
    """Open ``path`` once and return (width, height, frame_count) of its first video stream.

    frame_count is the container's exact count when it stores one (mp4 does), else the number of
    video packets (demuxed without decoding), else None. The first frame is decoded as a cheap check
    that the stream is decodable. Raises :class:`VideoDecodeError` naming the file on any failure.
    """
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width <= 0 or height <= 0:
                raise VideoDecodeError(f"{path}: video stream has no frame size ({width}x{height})")
            frame_count = int(stream.frames) or None
            first = next(iter(container.decode(stream)), None)
            if first is None:
                raise VideoDecodeError(f"{path}: video stream has no decodable frame")
        if frame_count is None:  # e.g. mkv/webm store no count: count packets, no decoding
            with av.open(path) as container:
                frame_count = sum(1 for p in container.demux(container.streams.video[0]) if p.size) or None
    except VideoDecodeError:
        raise
    except _DECODE_ERRORS as err:
        raise VideoDecodeError(f"{path}: cannot read video ({type(err).__name__}: {err})") from err
    return width, height, frame_count


def decode_frames(path: str, num_frames: int, stride: int = 1, start: int = 0) -> torch.Tensor:
    """Decode frames start + i * stride, i = 0..num_frames-1, of ``path``; uint8 [F, H, W, 3] (RGB).

    Decodes forward from the first frame (no seek) and stops at the last frame needed. Raises
    :class:`VideoDecodeError` naming the file if it cannot be read or has too few frames.
    """
    if num_frames < 1 or stride < 1 or start < 0:
        raise ValueError(f"need num_frames >= 1, stride >= 1, start >= 0; got {num_frames}, {stride}, {start}")
    frames: list[np.ndarray] = []
    last = start + frames_needed(num_frames, stride) - 1
    decoded = 0
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame + slice threads: several times faster on long GOPs
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                if index >= start and (index - start) % stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if index >= last:
                    break
    except VideoDecodeError:
        raise
    except _DECODE_ERRORS as err:
        raise VideoDecodeError(f"{path}: decoding failed after {decoded} frames "
                               f"({type(err).__name__}: {err})") from err
    if len(frames) < num_frames:
        raise ClipTooShortError(f"{path}: has {decoded} frames, a clip of {num_frames} frames with stride "
                               f"{stride} from frame {start} needs {last + 1}", decoded)
    return torch.from_numpy(np.stack(frames))


def resize_center_crop(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scale [F, C, h, w] by r = max(H / h, W / w) (antialiased bilinear), centre-crop to [F, C, H, W].

    The scaled frame is round(h r) x round(w r) (at least H x W), so the crop drops only the overhang of
    the longer side and the aspect ratio is kept. A frame already of size (H, W) is returned unchanged.
    Works on float and on uint8 (torch's uint8 antialias kernel, much faster than float on large frames, see
    docs/performance.md, rounds each output to the nearest level).
    """
    if video.ndim != 4:
        raise ValueError(f"video must be [F, C, h, w], got shape {tuple(video.shape)}")
    out_h, out_w = size
    h, w = video.shape[-2:]
    if (h, w) != (out_h, out_w):
        scale = max(out_h / h, out_w / w)
        new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
        if (new_h, new_w) != (h, w):
            video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                  antialias=True)
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
        video = video[..., top: top + out_h, left: left + out_w]
    return video.contiguous()


def uint8_to_video(frames: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 RGB [F, h, w, 3] -> float32 [F, 3, H, W] in [-1, 1]: resize_center_crop, then u / 127.5 - 1.

    The resize runs on the uint8 frames (a channels-last view, which torch's fast kernel wants) before the
    float conversion, so a 720p clip never exists as float.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [F, h, w, 3], got {frames.dtype} {tuple(frames.shape)}")
    video = frames.permute(0, 3, 1, 2)
    if size is not None:
        video = resize_center_crop(video, size)
    return video.float().div_(127.5).sub_(1.0).contiguous()


def _normalize_size(size) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size must be a positive int or (H, W) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _relative_key(path: str, root: str) -> str:
    """A video's path relative to ``root``, normalised with '/' separators (the caption lookup key)."""
    if os.path.isabs(path):
        path = os.path.relpath(path, root)
    return os.path.normpath(path).replace(os.sep, "/")


def _find_videos(root: str, extensions: tuple[str, ...]) -> list[str]:
    """Relative paths of video files under ``root``, sorted, hidden files and folders skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(_relative_key(os.path.join(folder, name), root))
    return sorted(found)


def load_caption_file(path: str, root: str) -> dict[str, str]:
    """Read a CSV (header with path|file and caption) or JSONL caption file: {relative path: caption}.

    Raises ValueError naming the file and the row/line for missing columns, bad JSON or a video listed
    twice.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file not found: {path}")
    rows: list[tuple[int, dict]] = []
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            if not ({"path", "file"} & set(columns)) or "caption" not in columns:
                raise ValueError(f"caption file {path}: needs columns 'path' (or 'file') and 'caption', "
                                 f"found {columns}")
            rows = [(reader.line_num, row) for row in reader]
    elif ext in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as fh:
            for line_num, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"caption file {path}, line {line_num}: invalid JSON ({err})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"caption file {path}, line {line_num}: expected a JSON object, got {row!r}")
                rows.append((line_num, row))
    else:
        raise ValueError(f"caption file {path}: unknown format {ext!r}; use .csv or .jsonl")
    captions: dict[str, str] = {}
    where: dict[str, int] = {}
    for line_num, row in rows:
        video = row.get("path") if row.get("path") not in (None, "") else row.get("file")
        caption = row.get("caption")
        if not isinstance(video, str) or not video or not isinstance(caption, str):
            raise ValueError(f"caption file {path}, line {line_num}: needs a 'path' (or 'file') string and "
                             f"a 'caption' string, got {dict(row)}")
        key = _relative_key(video, root)
        if key in captions:
            raise ValueError(f"caption file {path}: {key!r} is listed twice (lines {where[key]} and {line_num})")
        captions[key], where[key] = caption.strip(), line_num
    return captions


class VideoFolderDataset(Dataset):
    """Captioned clips from a folder of videos: item = {"video": [F, 3, H, W] in [-1, 1], "caption", "path"}.

    Args:
        root: the folder (searched recursively).
        num_frames: F, frames per clip.
        size: (H, W) or an int for square frames.
        stride: take every ``stride``-th decoded frame.
        captions: None (a ``.txt`` beside each video), a CSV / JSONL path, or a {relative path: caption}
            mapping.
        default_caption: caption for videos that have none; None makes a missing caption an error.
        start: where a clip starts: "first" (frame 0), "center" (the middle span of the video), or "random"
            (uniform over valid starts, drawn from (seed, epoch, index), so reproducible; see set_epoch).
        seed: seed of the random starts.
        extensions: file endings treated as videos (case-insensitive).
    """

    def __init__(
        self,
        root: str,
        num_frames: int,
        size: int | tuple[int, int],
        stride: int = 1,
        captions: str | Mapping[str, str] | None = None,
        *,
        default_caption: str | None = None,
        start: str = "first",
        seed: int = 0,
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
    ) -> None:
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if start not in ("first", "center", "random"):
            raise ValueError(f"start must be 'first', 'center' or 'random', got {start!r}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"video folder not found: {root}")
        self.root = os.path.abspath(root)
        self.num_frames, self.stride, self.size = num_frames, stride, _normalize_size(size)
        self.start, self.seed, self.epoch = start, seed, 0
        self.skipped: dict[str, str] = {}
        self.skip_kinds: dict[str, str] = {}  # path -> unreadable | too_short | decode_failed

        extensions = tuple(e.lower() for e in extensions)
        relative_paths = _find_videos(self.root, extensions)
        if not relative_paths:
            raise FileNotFoundError(f"no videos ({', '.join(extensions)}) found in {self.root}")
        caption_of = self._captions(relative_paths, captions, default_caption)

        span = frames_needed(num_frames, stride)
        self.videos: list[VideoEntry] = []
        for rel in relative_paths:
            path = os.path.join(self.root, rel)
            try:
                width, height, frame_count = probe_video(path)
            except VideoDecodeError as err:
                self._skip(path, str(err), "unreadable")
                continue
            if frame_count is not None and frame_count < span:
                self._skip(path, f"{path}: has {frame_count} frames, a clip of {num_frames} frames with "
                                 f"stride {stride} needs {span}", "too_short")
                continue
            self.videos.append(VideoEntry(path, caption_of[rel], width, height, frame_count))
        if not self.videos:
            raise RuntimeError(f"no usable videos in {self.root}: all {len(relative_paths)} were skipped "
                               f"(first: {next(iter(self.skipped.values()))})")

    # -- captions -------------------------------------------------------------------------------------
    def _captions(self, relative_paths, captions, default_caption) -> dict[str, str]:
        if captions is None:
            table = {}
            for rel in relative_paths:
                txt = os.path.join(self.root, os.path.splitext(rel)[0] + ".txt")
                if os.path.isfile(txt):
                    with open(txt, encoding="utf-8") as fh:
                        table[rel] = fh.read().strip()
            source = "a .txt file with the same stem beside it"
        else:
            if isinstance(captions, Mapping):
                table = {_relative_key(k, self.root): str(v).strip() for k, v in captions.items()}
                source = "the captions mapping"
            else:
                table = load_caption_file(os.fspath(captions), self.root)
                source = f"caption file {captions}"
            unknown = sorted(set(table) - set(relative_paths))
            if unknown:  # a deleted clip must not stop a run; say so once
                warnings.warn(f"{source} lists {len(unknown)} video(s) not found in {self.root}, ignored: "
                              f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}", SkippedVideoWarning,
                              stacklevel=3)
        missing = [rel for rel in relative_paths if rel not in table]
        if missing and default_caption is None:
            first = os.path.join(self.root, missing[0])
            raise ValueError(f"no caption for video {first} ({len(missing)} of {len(relative_paths)} videos "
                             f"have none; expected {source}, or pass default_caption=)")
        return {rel: table.get(rel, default_caption) for rel in relative_paths}

    # -- skipping -------------------------------------------------------------------------------------
    def _skip(self, path: str, reason: str, kind: str) -> None:
        """Leave ``path`` out: ``reason`` (starting with the path) is warned and kept in ``skipped``, ``kind``
        (unreadable, too_short or decode_failed) in ``skip_kinds``."""
        self.skipped[path] = reason
        self.skip_kinds[path] = kind
        warnings.warn(f"skipping video {reason}", SkippedVideoWarning, stacklevel=3)

    def skip(self, index: int, err: VideoDecodeError) -> None:
        """Leave item ``index``'s file out after :meth:`load` raised ``err`` (counted, warned)."""
        self._skip(self.videos[index].path, str(err), skip_kind(err))

    @property
    def num_skipped(self) -> int:
        """How many files were left out (at build time, and so far in __getitem__ in this process)."""
        return len(self.skipped)

    @property
    def skipped_paths(self) -> list[str]:
        """Paths of the files left out, in the order they were found bad."""
        return list(self.skipped)

    # -- items ----------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random starts are drawn (start='random'); deterministic per (seed, epoch)."""
        self.epoch = int(epoch)

    def clip_start(self, index: int) -> int:
        """The first decoded frame of item ``index``'s clip (0 when the frame count is unknown)."""
        entry = self.videos[index]
        if self.start == "first" or entry.frame_count is None:
            return 0
        room = entry.frame_count - frames_needed(self.num_frames, self.stride)
        if self.start == "center":
            return room // 2
        return int(np.random.default_rng([self.seed, self.epoch, index]).integers(0, room + 1))

    def load(self, index: int) -> torch.Tensor:
        """Item ``index``'s clip, float32 [F, 3, H, W] in [-1, 1]; raises VideoDecodeError on failure."""
        entry = self.videos[index]
        start = self.clip_start(index)
        try:
            frames = decode_frames(entry.path, self.num_frames, self.stride, start)
        except ClipTooShortError as err:
            # The header overstated the frame count (edit lists, a cut tail): take the last window that
            # fits instead of losing the whole file; if none fits, the file really is too short.
            fallback = err.decoded - frames_needed(self.num_frames, self.stride)
            if not 0 <= fallback < start:
                raise
            frames = decode_frames(entry.path, self.num_frames, self.stride, fallback)
        return uint8_to_video(frames, self.size)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict:
        n = len(self.videos)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} videos in {self.root}")
        index %= n
        for offset in range(n):
            i = (index + offset) % n
            entry = self.videos[i]
            if entry.path in self.skipped:  # failed before: it would fail again, go straight on
                continue
            try:
                video = self.load(i)
            except VideoDecodeError as err:
                self.skip(i, err)
                continue
            return {"video": video, "caption": entry.caption, "path": entry.path}
        raise RuntimeError(f"no video in {self.root} could be decoded ({self.num_skipped} skipped; "
                           f"last: {next(reversed(self.skipped.values()))})")

    def __repr__(self) -> str:
        return (f"VideoFolderDataset({self.root!r}, videos={len(self)}, skipped={self.num_skipped}, "
                f"num_frames={self.num_frames}, size={self.size}, stride={self.stride}, start={self.start!r})")
