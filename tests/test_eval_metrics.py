"""Evaluation metrics: the shipped digit classifier is accurate on held-out digits, and every metric separates
real Moving-Digits clips from corrupted ones in the direction (and order) it should."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfforcing.data.moving_digits import DIRECTION_NAMES, caption_for, parse_caption, render_clip
from selfforcing.eval.digit_classifier import INFO_PATH, accuracy, digit_tensors, load_digit_classifier
from selfforcing.eval.metrics import (
    detect_digits,
    error_accumulation_slope,
    frame_features,
    frechet_distance,
    frechet_per_window,
    one_digit_reads,
    pixel_stats,
    pixel_stats_drift,
    prompt_adherence,
    temporal_flip_rate,
)


def _clips(split, n, num_frames=16, **kw):
    cs = [render_clip(split, i, num_frames=num_frames, **kw) for i in range(n)]
    return torch.stack([c["video"] for c in cs]), [c["caption"] for c in cs]


@pytest.fixture(scope="module")
def real():
    test, test_caps = _clips("test", 20)
    train, _ = _clips("train", 40)
    return {"test": test, "captions": test_caps, "train": train,
            "train_feats": frame_features(train).flatten(0, 1)}


def _fd_vs_train(videos, real):
    return frechet_distance(frame_features(videos).flatten(0, 1), real["train_feats"])


def _noisy(videos, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (videos + sigma * torch.randn(videos.shape, generator=g)).clamp(-1, 1)


def _blur(videos, k):
    x = videos.flatten(0, 1)
    w = torch.ones(3, 1, k, k) / (k * k)
    return F.conv2d(F.pad(x, (k // 2,) * 4, mode="replicate"), w, groups=3).reshape(videos.shape)


def test_shipped_classifier_is_accurate_on_held_out_digits():
    model = load_digit_classifier()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 200_000
    x, y = digit_tensors("test")
    acc = accuracy(model, x, y)
    assert acc >= 0.97
    with open(INFO_PATH) as fh:
        info = json.load(fh)
    assert info["test_accuracy"] == pytest.approx(acc, abs=1e-9)  # the json describes these weights
    assert {"steps", "seconds"} <= set(info)
    # train and test images are disjoint: the accuracy above is on unseen digits
    xt, _ = digit_tensors("train")
    assert not (x[:, None] == xt[None, :200]).flatten(2).all(-1).any()


def test_frechet_distance_of_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 8, generator=g)
    b = torch.randn(2000, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    same = frechet_distance(a, b)
    assert same < 0.1
    shifts = [frechet_distance(a, b + s) for s in (0.25, 0.5, 1.0, 2.0)]
    assert same < shifts[0] < shifts[1] < shifts[2] < shifts[3]
    assert shifts[3] == pytest.approx(8 * 2.0 ** 2, rel=0.05)  # ||mu_a - mu_b||^2 dominates
    # covariance term: N(0, I) vs N(0, 4 I) in D dims: Tr(I + 4I - 2 * 2I) = D
    assert frechet_distance(a, 2 * b) == pytest.approx(8.0, rel=0.1)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, b[:, :4])
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_frame_features_shape_and_validation(real):
    feats = frame_features(real["test"][:2])
    assert feats.shape == (2, 16, 64) and torch.isfinite(feats).all()
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        frame_features(real["test"][0])


def test_real_clips_beat_corrupted_ones_and_fd_grows_with_corruption(real):
    clean = _fd_vs_train(real["test"], real)
    noise = [_fd_vs_train(_noisy(real["test"], s), real) for s in (0.1, 0.3, 0.6)]
    blur = [_fd_vs_train(_blur(real["test"], k), real) for k in (3, 5, 9)]
    assert noise[0] < noise[1] < noise[2]
    assert blur[0] < blur[1] < blur[2]
    assert clean < noise[0] and clean < blur[0]
    assert noise[1] > 1.2 * clean and noise[2] > 2 * clean and blur[1] > 1.5 * clean


def test_frechet_per_window_shows_drift(real):
    test = real["test"].clone()
    test[:, 8:] = _blur(test[:, 8:], 9)  # quality collapses in the second half
    fds = frechet_per_window(test, real["train"], 4)
    assert len(fds) == 4 and all(np.isfinite(fds))
    assert min(fds[2:]) > 1.8 * max(fds[:2])
    clean = frechet_per_window(real["test"], real["train"], 4)
    assert clean[:2] == pytest.approx(fds[:2])  # untouched frames score the same
    assert max(clean) < 0.6 * min(fds[2:])
    assert len(frechet_per_window(real["test"], real["train"], 5)) == 4  # [0,5) [5,10) [10,15) [15,16)
    with pytest.raises(ValueError, match="window"):
        frechet_per_window(real["test"], real["train"], 0)


def test_flip_rate_low_for_real_high_for_frames_shuffled_across_clips(real):
    test = real["test"]
    rate_real = temporal_flip_rate(test)
    g = torch.Generator().manual_seed(0)
    shuffled = test.flatten(0, 1)[torch.randperm(test.shape[0] * test.shape[1], generator=g)].reshape(test.shape)
    rate_shuffled = temporal_flip_rate(shuffled)
    assert rate_real < 0.25
    assert rate_shuffled > 0.7
    per_clip = temporal_flip_rate(test, reduce=False)
    assert per_clip.shape == (20,) and float(per_clip.mean()) == pytest.approx(rate_real)
    # a static clip of one digit never flips
    assert temporal_flip_rate(test[:1, :1].expand(1, 6, -1, -1, -1)) == 0.0


def test_detect_digits_finds_a_lone_digit():
    clip = render_clip("test", 3, num_frames=6, num_digits=(1, 1))
    det = detect_digits(clip["video"])
    centre = clip["positions"][:, 0] + 14  # MNIST digits are centred in their 28x28 box
    assert (det["labels"][:, 0] == clip["labels"][0]).float().mean() >= 0.8
    assert (det["centers"][:, 0] - centre).abs().max() < 3.0
    assert not det["valid"][:, 1:].any()  # nothing else on the canvas


def test_one_digit_reads_separate_the_asked_digit_from_another_and_from_blank_frames():
    clips = [render_clip("test", i, num_frames=4, num_digits=(1, 1)) for i in range(6)]
    frames = torch.cat([c["video"] for c in clips])
    digits = torch.tensor([int(c["labels"][0]) for c in clips]).repeat_interleave(4)
    right, wrong = one_digit_reads(frames, digits), one_digit_reads(frames, (digits + 1) % 10)
    assert right["confident"].float().mean() >= 0.8 and right["captioned"].float().mean() >= 0.8
    assert torch.equal(wrong["confident"], right["confident"]) and wrong["captioned"].float().mean() <= 0.2
    blank = one_digit_reads(-torch.ones(3, 3, 64, 64), torch.zeros(3, dtype=torch.long))
    assert not blank["confident"].any() and not blank["captioned"].any() and (blank["probs"] == 0).all()


def _wrong(caption, digit_shift=1, dir_shift=4):
    parts = parse_caption(caption)
    return caption_for([(d + digit_shift) % 10 for d, _ in parts],
                       [DIRECTION_NAMES[(DIRECTION_NAMES.index(n) + dir_shift) % 8] for _, n in parts])


def test_prompt_adherence_separates_right_from_wrong_captions(real):
    test, caps = real["test"], real["captions"]
    right = prompt_adherence(test, caps)
    assert right.shape == (20,) and float(right.min()) >= 0 and float(right.max()) <= 1
    assert float(right.mean()) >= 0.8
    wrong = prompt_adherence(test, [_wrong(c) for c in caps])  # other digits, opposite directions
    assert float(wrong.mean()) <= 0.2
    wrong_dir = prompt_adherence(test, [_wrong(c, digit_shift=0) for c in caps])  # right digits, opposite way
    assert float(wrong_dir.mean()) < float(right.mean()) - 0.25
    with pytest.raises(ValueError, match="one caption per clip"):
        prompt_adherence(test, caps[:3])


def test_prompt_adherence_on_single_digit_clips():
    videos, caps = _clips("test", 12, num_digits=(1, 1))
    assert float(prompt_adherence(videos, caps).mean()) >= 0.9


def test_pixel_stats_and_drift_are_exact_on_constant_frames():
    frames = torch.tensor([-1.0, -0.5, 0.0, 0.5]).view(1, 4, 1, 1, 1).expand(2, 4, 3, 32, 32)
    stats = pixel_stats(frames)
    assert stats.shape == (2, 4, 3)
    assert torch.allclose(stats[0, :, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5]))
    assert torch.allclose(stats[..., 1], torch.zeros(2, 4))
    assert stats[0, :, 2].tolist() == [1.0, 0.0, 0.0, 0.0]
    half = torch.where(torch.arange(32) < 16, -1.0, 1.0).expand(1, 1, 3, 32, 32)  # half black, half white
    assert pixel_stats(half)[0, 0].tolist() == pytest.approx([0.0, 1.0, 1.0])
    drift = pixel_stats_drift(frames, torch.full((3, 5, 3, 32, 32), -0.5))
    assert torch.allclose(drift[:, 0], torch.tensor([0.5, 0.0, 0.5, 1.0]))
    assert error_accumulation_slope(drift[1:, 0]) == pytest.approx(0.5)


def test_error_accumulation_slope_of_a_ramp_is_exact():
    assert error_accumulation_slope([3.0 + 0.25 * f for f in range(10)]) == pytest.approx(0.25, abs=1e-12)
    assert error_accumulation_slope(torch.full((7,), 2.0)) == 0.0
    assert error_accumulation_slope([5.0, 3.0]) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="at least 2"):
        error_accumulation_slope([1.0])
