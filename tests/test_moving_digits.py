"""Moving-Digits: real digits, deterministic, bouncing inside the canvas, captions that match the motion,
train / test disjoint in images and in captions."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from selfforcing.data.moving_digits import (
    DIGIT_SIZE,
    DIRECTION_NAMES,
    MovingDigits,
    caption_for,
    collate_clips,
    digit_pool,
    direction_of,
    held_out_captions,
    is_held_out,
    load_mnist_digits,
    parse_caption,
    render_clip,
    split_indices,
)


def fold(p: np.ndarray, limit: float) -> np.ndarray:
    """Where a point moving freely along a line ends up when it bounces between walls at 0 and ``limit``:
    the triangle wave limit - |limit - (p mod 2 limit)| (a closed form, independent of the renderer's loop)."""
    return limit - np.abs(limit - np.mod(p, 2 * limit))


def uint8_of(video: torch.Tensor) -> np.ndarray:
    return ((video + 1) * 127.5).round().to(torch.uint8).numpy()


def test_real_mnist_digits_are_loaded_once():
    images, labels = load_mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert (np.diff(labels) >= 0).all()  # the file is sorted by label
    assert 0.05 < (images > 128).mean() < 0.35  # strokes on a black background
    again, _ = load_mnist_digits()
    assert again is images  # parsed once per process
    with pytest.raises(ValueError):
        images[0, 0, 0] = 1  # read-only: no caller can corrupt the cached digits


def test_deterministic_for_split_index_and_seed():
    a, b = render_clip("train", 7, seed=1, num_frames=8), render_clip("train", 7, seed=1, num_frames=8)
    for key in ("video", "labels", "positions", "velocities", "image_indices"):
        assert torch.equal(a[key], b[key]), key
    assert a["caption"] == b["caption"]
    assert not torch.equal(render_clip("train", 7, seed=2, num_frames=8)["video"], a["video"])
    assert not torch.equal(render_clip("train", 8, seed=1, num_frames=8)["video"], a["video"])
    assert not torch.equal(render_clip("test", 7, seed=1, num_frames=8)["video"], a["video"])
    # the Dataset is the pure function with its settings
    ds = MovingDigits("train", num_frames=8, seed=1, length=10)
    assert torch.equal(ds[7]["video"], a["video"]) and ds[7]["caption"] == a["caption"]


@pytest.mark.parametrize("size, speed", [(64, (2.0, 3.0)), (32, (5.0, 9.0))])  # 2nd: steps longer than the box
def test_digits_move_at_constant_speed_stay_inside_and_bounce(size, speed):
    limit = size - DIGIT_SIZE
    flips = 0
    for i in range(20):
        clip = render_clip("train", i, num_frames=120, size=size, num_digits=(1, 3), speed=speed)
        pos = clip["positions"].double().numpy()  # [F, n, 2]
        v0 = clip["velocities"].double().numpy()  # [n, 2]
        assert pos.min() >= 0 and pos.max() <= limit
        # free motion p0 + v0 f folded at the walls: constant speed, reflections only
        frames = np.arange(pos.shape[0])[:, None, None]
        np.testing.assert_allclose(pos, fold(pos[0] + v0 * frames, limit), atol=1e-3)
        step = pos[1:] - pos[:-1]
        flipped = step[1:] * step[:-1] < 0  # [F - 2, n, 2]: a velocity component changed sign at frame f + 1
        for f, d, axis in zip(*np.nonzero(flipped)):
            p, reach = pos[f + 1, d, axis], abs(v0[d, axis])
            assert p <= reach + 1e-4 or p >= limit - reach - 1e-4, "a bounce away from every wall"
        flips += int(flipped.sum())
        # every moving component reaches a wall within 120 frames (speed >= 2 px, box <= 36 px)
        moving = np.abs(v0) > 0
        assert (flipped.any(0) | ~moving).all()
    assert flips > 20


def test_video_holds_the_digits_at_their_recorded_positions():
    images, _ = load_mnist_digits()
    clip = render_clip("train", 3, num_digits=(1, 1), num_frames=6)
    video = clip["video"]
    assert video.shape == (6, 3, 64, 64) and video.dtype == torch.float32
    assert torch.equal(video[:, 0], video[:, 1]) and torch.equal(video[:, 0], video[:, 2])  # grey as RGB
    img = images[int(clip["image_indices"][0])]
    for f in range(6):
        x, y = (int(round(v)) for v in clip["positions"][f, 0].tolist())
        frame = uint8_of(video[f, 0])
        assert np.array_equal(frame[y:y + 28, x:x + 28], img)
        frame[y:y + 28, x:x + 28] = 0
        assert frame.max() == 0  # nothing else on the canvas
    # several digits: each frame is the per-pixel max of the digit images placed at their positions
    clip = render_clip("test", 11, num_digits=(3, 3), num_frames=10, size=48)
    expected = np.zeros((10, 48, 48), np.uint8)
    for f in range(10):
        for d, row in enumerate(clip["image_indices"].tolist()):
            x, y = (int(round(v)) for v in clip["positions"][f, d].tolist())
            np.maximum(expected[f, y:y + 28, x:x + 28], images[row], out=expected[f, y:y + 28, x:x + 28])
    assert np.array_equal(uint8_of(clip["video"][:, 0]), expected)
    assert float(clip["video"].min()) == -1.0 and float(clip["video"].max()) <= 1.0


def test_caption_agrees_with_metadata():
    images, labels_all = load_mnist_digits()
    counts = set()
    for split in ("train", "test"):
        for i in range(60):
            clip = render_clip(split, i, num_digits=(1, 3), num_frames=1, speed=(1.5, 2.5))
            parsed = parse_caption(clip["caption"])
            v = clip["velocities"]
            assert [d for d, _ in parsed] == clip["labels"].tolist()
            assert [name for _, name in parsed] == [direction_of(x) for x in v] == clip["directions"]
            assert labels_all[clip["image_indices"].numpy()].tolist() == clip["labels"].tolist()
            speed = v.norm(dim=1)
            assert bool(((speed >= 1.5 - 1e-5) & (speed <= 2.5 + 1e-5)).all())
            angles = torch.atan2(-v[:, 1], v[:, 0]) / (math.pi / 4)  # exactly a compass direction
            torch.testing.assert_close(angles, angles.round(), atol=1e-5, rtol=0)
            assert caption_for(clip["labels"], v) == clip["caption"]  # from labels + velocities
            counts.add(len(parsed))
    assert counts == {1, 2, 3}


def test_caption_for_and_parse_caption_round_trip_and_reject():
    assert caption_for([3, 8], [(1.0, -1.0), (-2.0, 0.0)]) == \
        "the digit 3 moves up and to the right while the digit 8 moves left"
    assert caption_for([5], ["down"]) == caption_for([5], [6]) == "the digit 5 moves down"
    for k, name in enumerate(DIRECTION_NAMES):
        assert parse_caption(caption_for([k], [k])) == [(k, name)]
    assert parse_caption("  the digit 2 moves up while the digit 2 moves up and to the left \n") == \
        [(2, "up"), (2, "up and to the left")]
    for bad in ("a cat sits on a mat", "the digit 12 moves up", "the digit 3 moves sideways",
                "the digit 3 moves up while", ""):
        with pytest.raises(ValueError, match="not a Moving-Digits caption"):
            parse_caption(bad)
    with pytest.raises(ValueError, match="one direction per digit"):
        caption_for([1, 2], ["up"])
    with pytest.raises(ValueError, match="0..9"):
        caption_for([10], ["up"])
    with pytest.raises(ValueError, match="unknown direction"):
        caption_for([1], ["north"])
    with pytest.raises(ValueError, match="zero velocity"):
        caption_for([1], [(0.0, 0.0)])


def test_splits_are_disjoint_in_images_and_captions():
    train, test = split_indices("train"), split_indices("test")
    for d in range(10):
        assert len(train[d]) == 400 and len(test[d]) == 100 and not set(train[d]) & set(test[d])
    train_images = set(np.concatenate(list(train.values())).tolist())
    test_images = set(np.concatenate(list(test.values())).tolist())
    train_captions, train_pairs = set(), set()
    for i in range(2000):
        clip = render_clip("train", i, num_digits=(1, 3), num_frames=1)
        train_captions.add(clip["caption"])
        train_pairs |= {(d, DIRECTION_NAMES.index(n)) for d, n in parse_caption(clip["caption"])}
        assert set(clip["image_indices"].tolist()) <= train_images
    assert not any(is_held_out(d, k) for d, k in train_pairs)
    assert len(train_pairs) == 70  # every other pair does occur in training
    test_captions = set()
    for i in range(300):
        clip = render_clip("test", i, num_digits=(1, 3), num_frames=1)
        assert set(clip["image_indices"].tolist()) <= test_images
        pairs = [(d, DIRECTION_NAMES.index(n)) for d, n in parse_caption(clip["caption"])]
        assert any(is_held_out(d, k) for d, k in pairs)
        test_captions.add(clip["caption"])
    assert not test_captions & train_captions
    held = [(d, k) for d in range(10) for k in range(8) if is_held_out(d, k)]
    assert len(held) == 10 and {d for d, _ in held} == set(range(10)) and {k for _, k in held} == set(range(8))


def test_images_per_digit_draws_each_class_from_its_first_train_images_in_both_splits():
    train = split_indices("train")
    images, labels = load_mnist_digits()
    for k in (1, 3):
        pool = digit_pool("test", k)
        assert pool.keys() == train.keys() and all(pool[d].tolist() == train[d][:k].tolist() for d in pool)
        seen = {d: set() for d in range(10)}
        for split in ("train", "test"):
            for i in range(200):
                clip = render_clip(split, i, num_digits=(1, 2), num_frames=2, images_per_digit=k)
                for d, idx in zip(clip["labels"].tolist(), clip["image_indices"].tolist()):
                    assert labels[idx] == d and idx in set(train[d][:k].tolist())
                    seen[d].add(idx)
                # the pixels are that image: frame 0 holds it at the recorded position (max-combined)
                x, y = (int(round(v)) for v in clip["positions"][0, 0].tolist())
                region = uint8_of(clip["video"])[0, 0, y:y + DIGIT_SIZE, x:x + DIGIT_SIZE]
                assert (region >= images[clip["image_indices"][0]]).all()
        assert all(len(v) == k for v in seen.values())  # every pooled image is used, none other
    # captions stay held out: a test clip's first pair is still a held-out one
    clip = render_clip("test", 7, num_digits=(1, 1), images_per_digit=1, num_frames=1)
    (d, name), = parse_caption(clip["caption"])
    assert is_held_out(d, DIRECTION_NAMES.index(name))
    # the default (None) is the split's own pool, unchanged
    assert render_clip("test", 3)["image_indices"].tolist() == render_clip("test", 3, images_per_digit=None)[
        "image_indices"].tolist()
    ds = MovingDigits("train", num_frames=2, length=3, images_per_digit=2)
    assert all(int(i) in set(np.concatenate([v[:2] for v in train.values()]).tolist())
               for j in range(3) for i in ds[j]["image_indices"])
    for bad in (0, 401, 1.5, True):
        with pytest.raises(ValueError, match="images_per_digit"):
            render_clip("train", 0, images_per_digit=bad)


def test_held_out_prompts_are_fixed_distinct_and_never_train_captions():
    prompts = MovingDigits.test_prompts(50)
    assert prompts == held_out_captions(50) and len(set(prompts)) == 50
    assert prompts[:10] == MovingDigits.test_prompts() and held_out_captions(5) == prompts[:5]
    for p in prompts:
        pairs = parse_caption(p)
        assert 1 <= len(pairs) <= 2 and any(is_held_out(d, DIRECTION_NAMES.index(n)) for d, n in pairs)
    assert len(set(held_out_captions(810))) == 810
    with pytest.raises(ValueError, match="810"):
        held_out_captions(811)


def test_dataset_interface_dataloader_and_bad_input():
    ds = MovingDigits("test", num_frames=4, length=5, num_digits=(1, 3))
    assert len(ds) == 5 and ds[4]["video"].shape == (4, 3, 64, 64) and ds[4]["index"] == 4
    batch = next(iter(DataLoader(ds, batch_size=5, collate_fn=collate_clips)))
    assert batch["video"].shape == (5, 4, 3, 64, 64) and batch["index"].tolist() == [0, 1, 2, 3, 4]
    assert [len(x) for x in batch["labels"]] == [len(parse_caption(c)) for c in batch["caption"]]
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError, match="split must be"):
        MovingDigits("val")
    with pytest.raises(ValueError, match="num_digits"):
        MovingDigits(num_digits=(0, 4))
    with pytest.raises(ValueError, match="num_digits"):
        render_clip("train", 0, num_digits=(2, 1))
    with pytest.raises(ValueError, match="canvas size"):
        render_clip("train", 0, size=28)
    with pytest.raises(ValueError, match="speed"):
        render_clip("train", 0, speed=(0.0, 1.0))
    with pytest.raises(ValueError, match="seed"):
        render_clip("train", 0, seed=-1)
    with pytest.raises(ValueError, match="num_frames"):
        MovingDigits(num_frames=0)


def test_start_behind_puts_the_digit_behind_its_motion_with_the_same_draws():
    """``start="behind"``: along each axis the digit moves on, frame 0 lies in the third of the box its motion
    leaves, so the clip's first frames move the captioned way with no bounce; labels, images, speeds and the
    caption are the uniform start's (the same random draws, only the start mapped)."""
    limit = 64 - 28
    for i in range(40):
        uni = render_clip("train", i, num_frames=12, num_digits=(1, 1), start="uniform")
        beh = render_clip("train", i, num_frames=12, num_digits=(1, 1), start="behind")
        assert beh["caption"] == uni["caption"] and torch.equal(beh["labels"], uni["labels"])
        assert torch.equal(beh["image_indices"], uni["image_indices"])
        assert torch.allclose(beh["velocities"], uni["velocities"])
        v, p0 = beh["velocities"][0], beh["positions"][0, 0]
        for axis in range(2):
            if v[axis] > 0:
                assert p0[axis] <= limit / 3 + 1e-4
            elif v[axis] < 0:
                assert p0[axis] >= 2 * limit / 3 - 1e-4
            else:
                assert p0[axis] == uni["positions"][0, 0, axis]
        # the first frames move the captioned way: no bounce before the digit has crossed half its travel
        frames = min(11, int(limit / 2 / v.abs().max()))
        step = beh["positions"][1:frames + 1, 0] - beh["positions"][:frames, 0]
        assert torch.allclose(step, v.expand_as(step), atol=1e-4)
    with pytest.raises(ValueError, match="start must be one of"):
        render_clip("train", 0, start="middle")
