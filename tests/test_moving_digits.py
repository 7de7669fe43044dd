"""Moving-Digits: real digits, deterministic, bouncing inside the canvas, captions that match the motion."""

import numpy as np
import pytest
import torch

from selfforcing.data.moving_digits import (
    DIGIT_SIZE,
    MovingDigits,
    direction_of,
    is_held_out,
    load_mnist_digits,
    parse_caption,
    render_clip,
    split_indices,
)


def test_real_mnist_digits_are_loaded():
    images, labels = load_mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert 0.05 < (images > 128).mean() < 0.35  # strokes on a black background


def test_deterministic_for_a_seed():
    a, b = render_clip("train", 7, seed=1, num_frames=8), render_clip("train", 7, seed=1, num_frames=8)
    assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
    c = render_clip("train", 7, seed=2, num_frames=8)
    assert not torch.equal(a["video"], c["video"])
    assert not torch.equal(render_clip("train", 8, seed=1, num_frames=8)["video"], a["video"])


def test_digits_stay_inside_and_bounce():
    flips = 0
    for i in range(30):
        clip = render_clip("train", i, num_frames=80, size=64, num_digits=(1, 3), speed=(2.0, 3.0))
        pos = clip["positions"]  # [F, n, 2]
        assert float(pos.min()) >= 0 and float(pos.max()) <= 64 - DIGIT_SIZE
        v = pos[1:] - pos[:-1]
        flips += int(((v[1:] * v[:-1]) < 0).sum())  # a velocity component changed sign: a bounce
        # between bounces the displacement is the initial velocity up to sign (reflections only flip signs)
        torch.testing.assert_close(v.abs().max(0).values, clip["velocities"].abs(), atol=1e-4, rtol=0)
    assert flips > 30


def test_rendered_pixels_are_the_digit_at_its_position():
    clip = render_clip("train", 3, num_digits=(1, 1), num_frames=5)
    images, _ = load_mnist_digits()
    img = images[int(clip["image_indices"][0])]
    for f in range(5):
        x, y = (int(round(v)) for v in clip["positions"][f, 0].tolist())
        crop = ((clip["video"][f, 0, y:y + 28, x:x + 28] + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(crop, img)
        assert float(clip["video"][f].max()) == 1.0 or img.max() < 255
    assert clip["video"].shape == (5, 3, 64, 64) and float(clip["video"].min()) == -1.0


def test_caption_agrees_with_metadata():
    for i in range(50):
        clip = render_clip("train", i, num_digits=(1, 3))
        parsed = parse_caption(clip["caption"])
        assert [d for d, _ in parsed] == clip["labels"].tolist()
        assert [name for _, name in parsed] == [direction_of(v) for v in clip["velocities"]]
    with pytest.raises(ValueError, match="not a Moving-Digits caption"):
        parse_caption("a cat sits on a mat")


def test_splits_are_disjoint_in_images_and_held_out_captions():
    train, test = split_indices("train"), split_indices("test")
    for d in range(10):
        assert not set(train[d]) & set(test[d])
    train_pairs = set()
    for i in range(300):
        clip = render_clip("train", i, num_digits=(1, 3))
        train_pairs |= {(d, name) for d, name in parse_caption(clip["caption"])}
        assert not set(clip["image_indices"].tolist()) - set(np.concatenate(list(train.values())).tolist())
    test_captions = set()
    for i in range(100):
        clip = render_clip("test", i, num_digits=(1, 2))
        pairs = parse_caption(clip["caption"])
        assert any(is_held_out(d, ["right", "up and to the right", "up", "up and to the left", "left",
                                   "down and to the left", "down", "down and to the right"].index(n)) for d, n in pairs)
        test_captions.add(clip["caption"])
    train_captions = {render_clip("train", i, num_digits=(1, 2))["caption"] for i in range(300)}
    assert not test_captions & train_captions
    assert all(not is_held_out(d, k) for d, k in [(d, ["right", "up and to the right", "up", "up and to the left", "left",
                                                         "down and to the left", "down", "down and to the right"].index(n))
                                                  for d, n in train_pairs])
    prompts = MovingDigits.test_prompts()
    assert len(prompts) == 10 and not set(prompts) & train_captions


def test_dataset_interface_and_bad_input():
    ds = MovingDigits("test", num_frames=4, length=5)
    assert len(ds) == 5 and ds[4]["video"].shape == (4, 3, 64, 64)
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError, match="split must be"):
        MovingDigits("val")
    with pytest.raises(ValueError, match="num_digits"):
        render_clip("train", 0, num_digits=(0, 4))
