"""The one-digit judge of benchmarks/digit_rate.py: real clips of the benchmark's prompts read as their prompt's digit
and move the captioned way; the same clips played backwards, captioned with another digit or held still do not."""

import math

import numpy as np
import pytest
import torch
from benchmark_loader import load_benchmark

from selfforcing.data.moving_digits import caption_for, held_out_captions, is_held_out, render_clip
from selfforcing.eval.metrics import (
    captioned_reads,
    direction_agreement,
    identity_persistence,
    initial_displacement,
    motion_direction_agreement,
    one_digit_reads,
    one_digit_tracks,
    temporal_flip_rate,
)


@pytest.fixture(scope="module")
def dr():
    return load_benchmark("digit_rate")


@pytest.fixture(scope="module")
def real(dr):
    """Real clips of the benchmark's 40 prompts (one seed), 24 frames, gray [40, 24, 64, 64], and their prompts."""
    prompts = dr.prompt_set(range(10), 4)
    gray, sources = dr.real_videos(prompts, 1, 24, 4)
    return {"gray": gray, "videos": gray[:, :, None].expand(-1, -1, 3, -1, -1), "prompts": prompts,
            "digits": [d for d, _ in prompts], "directions": [k for _, k in prompts],
            "held": [is_held_out(d, k) for d, k in prompts], "sources": sources}


def test_prompt_set_holds_every_digit_in_four_directions_and_the_ten_held_out_captions(dr):
    prompts = dr.prompt_set(range(10), 4)
    assert len(prompts) == 40 and len(set(prompts)) == 40
    for d in range(10):
        ks = [k for dd, k in prompts if dd == d]
        assert len(ks) == 4 and sum(is_held_out(d, k) for k in ks) == 1 and is_held_out(d, ks[0])
    assert set(held_out_captions()) <= {caption_for([d], [k]) for d, k in prompts}
    assert np.bincount([k for _, k in prompts], minlength=8).tolist() == [5] * 8
    assert dr.prompt_set([3], 2) == [(3, 5), (3, 1)]  # held-out (3 + 5 = 8), then the opposite direction
    with pytest.raises(ValueError, match="1..8"):
        dr.prompt_set([3], 9)


def test_real_clips_match_their_prompt_and_the_split(real):
    for (d, k), held, src in zip(real["prompts"], real["held"], real["sources"]):
        assert src["split"] == ("test" if held else "train")
        clip = render_clip(src["split"], src["index"], num_frames=1, num_digits=(1, 1), images_per_digit=4)
        assert clip["caption"] == caption_for([d], [k])


def test_real_clips_read_as_their_prompt_digit_and_keep_it(dr, real):
    summary, per_video = dr.judge(real["gray"], real["digits"], real["directions"], real["held"], window=12)
    assert summary["captioned_digit_rate"] == 1.0 and summary["min_digit_rate"] == 1.0
    assert summary["per_window"] == [1.0, 1.0] and summary["last_window_rate"] == 1.0
    assert summary["identity_persistence"] == 1.0 and summary["same_digit_rate"] == 1.0
    assert summary["flip_rate"] == 0.0
    assert summary["direction_agreement"]["all"] >= 0.9 and summary["direction_agreement"]["held_out"] >= 0.9
    assert summary["direction_agreement"]["n_held_out"] == 10 and len(per_video) == 40
    # the judge's single detection gives the library's own one-digit reads and flip rate
    tracks = one_digit_tracks(real["videos"][:8])
    reads = one_digit_reads(real["videos"][:8].flatten(0, 1), torch.tensor(real["digits"][:8]).repeat_interleave(24))
    assert torch.equal(captioned_reads(tracks, real["digits"][:8]).flatten(), reads["captioned"])
    assert torch.equal(tracks["confident"].flatten(), reads["confident"])
    labels = tracks["labels"]
    assert torch.allclose((labels[:, 1:] != labels[:, :-1]).float().mean(1),
                          temporal_flip_rate(real["videos"][:8], max_digits=1, reduce=False))


def test_a_swapped_digit_label_scores_zero_but_keeps_its_motion(dr, real):
    wrong = [(d + 1) % 10 for d in real["digits"]]
    right, _ = dr.judge(real["gray"], real["digits"], real["directions"], real["held"])
    summary, per_video = dr.judge(real["gray"], wrong, real["directions"], real["held"])
    assert summary["captioned_digit_rate"] == 0.0 and summary["min_digit_rate"] == 0.0
    assert all(v["captioned_digit_rate"] == 0.0 for v in per_video)
    assert summary["starts_as_prompt_digit"] == 0.0
    assert summary["confident_digit_rate"] == right["confident_digit_rate"] == 1.0  # a digit is there...
    assert summary["direction_agreement"] == right["direction_agreement"]  # ...and moves the same way


def test_direction_agreement_collapses_backwards_or_with_another_direction(real):
    videos, dirs = real["videos"], real["directions"]
    forward = motion_direction_agreement(videos, dirs)
    assert forward.float().mean() >= 0.9
    backward = motion_direction_agreement(videos[:, :12].flip(1), dirs)  # the first 12 frames played backwards
    # a clip that bounced in those frames, played backwards, does move the captioned way on the bounced axis (so a
    # straight clip still agrees); one that did not bounce now moves exactly against its caption
    assert backward.float().mean() <= 0.55
    steps = one_digit_tracks(videos[:, :12])["centers"].diff(dim=1)  # [B, 11, 2]
    no_bounce = ~((steps > 0.5).any(1) & (steps < -0.5).any(1)).any(1)  # no axis moved both ways
    # (a clip that hits the wall on its very first step also looks unbounced: it shows the other way, so it fails
    # forwards and agrees backwards); on all of them, playing backwards flips the verdict
    assert forward[no_bounce].sum() >= 12 and torch.equal(backward[no_bounce], ~forward[no_bounce])
    assert motion_direction_agreement(videos, [(k + 4) % 8 for k in dirs]).float().mean() <= 0.1  # opposite
    assert not motion_direction_agreement(videos, [(k + 2) % 8 for k in dirs]).any()  # 90 degrees off
    assert not motion_direction_agreement(videos[:, :1].expand(-1, 12, -1, -1, -1), dirs).any()  # held still


def test_initial_displacement_stops_at_a_wall_bounce_only():
    # x: 30 -> 48 at 3 px/frame, then back (the centroid was 16 px from the right wall: a bounce)
    xs = [30, 33, 36, 39, 42, 45, 48, 45, 42, 39, 36, 33]
    track = np.stack([xs, [32.0] * 12], 1).astype(float)
    assert initial_displacement(track).tolist() == [18.0, 0.0]
    assert direction_agreement(torch.tensor(track)[None], ["right"])["agree"].tolist() == [True]
    # the same turn in the middle of the frame (x 20 -> 30 -> 25) is not a bounce: the net move counts
    mid = np.stack([[20, 22, 24, 26, 28, 30, 29, 28, 27, 26, 25, 24], [32.0] * 12], 1).astype(float)
    assert initial_displacement(mid).tolist() == [4.0, 0.0]
    # frames without a digit (NaN) are skipped; one found frame is no motion at all
    gaps = track.copy()
    gaps[[1, 2, 8]] = np.nan
    assert initial_displacement(gaps).tolist() == [18.0, 0.0]
    assert initial_displacement(np.full((12, 2), np.nan)) is None
    out = direction_agreement(torch.full((1, 12, 2), float("nan")), [0])
    assert out["agree"].tolist() == [False] and math.isnan(out["angle"][0])
    # 45 degrees is the limit; under 1 px is no motion
    diag = torch.tensor([[[20.0, 20.0], [23.0, 20.0], [26.0, 20.0]]])
    assert direction_agreement(diag, ["up and to the right"])["agree"].tolist() == [True]
    assert direction_agreement(diag, ["up"])["agree"].tolist() == [False]
    creep = torch.tensor([[[20.0, 20.0], [20.5, 20.0], [20.9, 20.0]]])
    assert direction_agreement(creep, ["right"])["agree"].tolist() == [False]


def test_identity_persistence_counts_the_digit_the_video_starts_as():
    labels = torch.tensor([[3] * 12 + [5] * 12,  # turns into a 5 halfway
                           [3, -1] * 6 + [3] * 10 + [8, 8],  # unread frames count neither way; one stray window
                           [-1] * 12 + [7] * 12,  # starts blank, then a steady 7
                           [-1] * 24])  # never read
    out = identity_persistence(labels, window=12)
    assert out["reference"].tolist() == [3, 3, 7, -1]
    assert out["window_majority"].tolist() == [[3, 5], [3, 3], [-1, 7], [-1, -1]]
    assert out["persistence"][:3].tolist() == pytest.approx([0.5, 16 / 18, 1.0]) and math.isnan(out["persistence"][3])
    assert out["same_digit"].tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="window"):
        identity_persistence(labels, window=0)


def test_the_benchmark_runs_on_real_clips_end_to_end(dr, tmp_path):
    out = tmp_path / "r.json"
    result = dr.main(["real", "--digits", "2", "--directions-per-digit", "2", "--seeds", "2", "--frames", "24",
                      "--threads", "1", "--out", str(out)])
    assert out.is_file() and result["n_videos"] == 4 and result["n_frames"] == 96
    assert result["prompts"] == ["the digit 2 moves down", "the digit 2 moves up"]
    assert result["held_out_prompts"] == ["the digit 2 moves down"]
    assert result["captioned_digit_rate"] == 1.0 and result["per_digit"] == {2: 1.0}
    assert [v["clip"]["split"] for v in result["per_video"]] == ["test", "test", "train", "train"]
    assert len({(v["clip"]["split"], v["clip"]["index"]) for v in result["per_video"]}) == 4  # two clips a prompt
    assert {"all", "held_out", "train"} <= set(result["direction_agreement"])


def test_the_benchmark_samples_a_teacher_with_the_guidance_and_steps_asked_for(dr, tmp_path):
    """``--guidance-scale`` / ``--num-steps`` replace the pipeline's many-step sampler settings (recorded in the
    result); a few-step generator has neither, so asking for them is a usage error (exit status 2)."""
    from selfforcing.models import CausalWanModel
    from selfforcing.pipeline import PipelineSpec

    torch.manual_seed(0)
    CausalWanModel.from_preset("tiny", num_layers=1).save_pretrained(tmp_path / "teacher")
    PipelineSpec(sampler="bidirectional", training_frames=12, text_len=16, num_steps=24,
                 guidance_scale=3.0).save(str(tmp_path / "teacher"))
    argv = [str(tmp_path / "teacher"), "--digits", "4", "--directions-per-digit", "1", "--seeds", "1", "--no-reference",
            "--threads", "1"]
    default = dr.main(argv + ["--num-steps", "2"])
    assert (default["num_steps"], default["guidance_scale"], default["n_frames"]) == (2, 3.0, 12)
    asked = dr.main(argv + ["--num-steps", "2", "--guidance-scale", "7"])
    assert (asked["num_steps"], asked["guidance_scale"]) == (2, 7.0)
    PipelineSpec(sampler="few-step", training_frames=12, text_len=16).save(str(tmp_path / "teacher"))
    with pytest.raises(SystemExit) as exc:
        dr.main(argv + ["--guidance-scale", "5"])
    assert exc.value.code == 2
