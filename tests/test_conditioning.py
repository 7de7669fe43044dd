"""Caption-use measures (selfforcing.eval.conditioning) and the caption_sensitivity benchmark."""

import math

import pytest
import torch

from selfforcing.eval.conditioning import caption_variant, flow_loss_by_context, group_mean_gain, time_reversal_residual
from tests.benchmark_loader import load_benchmark


def test_caption_variants_change_one_part_and_are_involutions():
    c = "the digit 3 moves up and to the left while the digit 8 moves right"
    assert caption_variant(c, "opposite_direction") == \
        "the digit 3 moves down and to the right while the digit 8 moves left"
    assert caption_variant(c, "other_digit") == "the digit 8 moves up and to the left while the digit 3 moves right"
    for v in ("opposite_direction", "other_digit"):
        assert caption_variant(caption_variant(c, v), v) == c
    with pytest.raises(ValueError, match="unknown caption variant"):
        caption_variant(c, "mirror")
    with pytest.raises(ValueError, match="not a Moving-Digits caption"):
        caption_variant("a cat", "other_digit")


class _ReadsX0FromContext(torch.nn.Module):
    """v = (x_t - x0_hat) / sigma with x0_hat carried by the context: the exact flow when the context holds x_0."""

    def forward(self, x, t, ctx, causal=True):
        sigma = (t / 1000.0).view(-1, 1, 1, 1, 1)
        return (x - ctx.reshape(x.shape)) / sigma


def test_flow_loss_by_context_pairs_the_noise_across_contexts():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, 4, generator=g)
    wrong = torch.randn(x0.shape, generator=g)
    losses = flow_loss_by_context(_ReadsX0FromContext(), x0, {"true": x0.reshape(3, 1, -1),
                                                              "wrong": wrong.reshape(3, 1, -1)}, [900.0, 500.0])
    # the same noise makes x_t and the target agree: the true context is exact, a wrong one costs ||dx0||^2 / sigma^2
    assert max(losses["true"]) < 1e-10
    for t, loss in zip([900.0, 500.0], losses["wrong"]):
        assert loss == pytest.approx(float((wrong - x0).pow(2).mean()) / (t / 1000) ** 2, rel=1e-5)
    ignores = flow_loss_by_context(lambda x, t, c, causal: x * 0.5, x0, {"a": x0.reshape(3, 1, -1),
                                                                         "b": wrong.reshape(3, 1, -1)}, [700.0])
    assert ignores["a"] == ignores["b"]
    with pytest.raises(ValueError, match="must be"):
        flow_loss_by_context(_ReadsX0FromContext(), x0, {"bad": x0.reshape(1, 3, -1)}, [500.0])


def test_group_mean_gain_is_unbiased_where_the_plug_in_estimate_is_not():
    g = torch.Generator().manual_seed(1)
    labels = [i % 2 for i in range(200)]
    means = torch.tensor([1.0, -1.0])[labels].view(-1, 1)
    x = means + 3.0 * torch.randn(200, 2000, generator=g)  # two groups at +-1: the ideal gain is exactly 1
    assert group_mean_gain(x, labels) == pytest.approx(1.0, abs=0.05)
    same = 3.0 * torch.randn(200, 2000, generator=g)  # 50 groups of 4 from one distribution: no gain at all
    small = [i // 4 for i in range(200)]
    plug_in = sum(float(same[i * 4:(i + 1) * 4].mean(0).pow(2).mean()) for i in range(50)) / 50
    assert plug_in > 2.0  # ~ 9 / 4: noise that looks like signal
    assert abs(group_mean_gain(same, small)) < 0.05
    with pytest.raises(ValueError, match="one group label per sample"):
        group_mean_gain(x, labels[:10])


@pytest.mark.slow
def test_the_shipped_model_uses_its_captions_digit():
    """On clips drawn as its training clips were (pipeline.json's ``start``), the shipped model does better with the
    true caption than with another digit or the opposite direction. (Not than the null prompt: a student distilled
    from the guided teacher predicts the guided flow, whose error against the data can exceed the unguided one's; the
    caption-layout student's null gap is -0.03 to +0.03 over t, benchmarks/caption_sensitivity.py.)"""
    from selfforcing.pipeline import PipelineSpec, resolve_checkpoint

    start = PipelineSpec.for_checkpoint(resolve_checkpoint("moving-digits")).dataset.get("start", "uniform")
    bench = load_benchmark("caption_sensitivity")
    row = bench.sensitivity("moving-digits", start, 8, [900.0], use_ema=False)
    assert set(row) >= {"loss_true", "gap_opposite_direction", "gap_other_digit", "gap_null"}
    assert all(math.isfinite(v) for v in row["loss_true"])
    assert row["gap_other_digit"][0] > 0 and row["gap_opposite_direction"][0] > 0


def test_time_reversal_residual_is_zero_for_order_blind_models_only():
    """A model that treats frames independently, or through |f - f'| only, is blind to time reversal (residual 0,
    to rounding); a causal running mean, or a Wan model with frame embeddings, is not; a permutation is seen by all
    but the per-frame one."""
    x = torch.randn(2, 6, 3, 4, 4)
    ctx = torch.zeros(2, 1, 1)

    def per_frame(x_t, t, c, causal=False):
        return 2 * x_t

    def symmetric(x_t, t, c, causal=False):  # frames mix with weights exp(-|f - f'|)
        f = torch.arange(x_t.shape[1], dtype=x_t.dtype)
        w = torch.exp(-(f[:, None] - f[None]).abs())
        return torch.einsum("gf,bfchw->bgchw", w, x_t)

    def running_mean(x_t, t, c, causal=False):
        n = torch.arange(1, x_t.shape[1] + 1, dtype=x_t.dtype)
        return x_t.cumsum(1) / n[None, :, None, None, None]

    assert time_reversal_residual(per_frame, x, ctx, 900)["reversed"] < 1e-6
    assert time_reversal_residual(per_frame, x, ctx, 900)["permuted"] < 1e-6
    sym = time_reversal_residual(symmetric, x, ctx, 900)
    assert sym["reversed"] < 1e-5 and sym["permuted"] > 0.1
    assert time_reversal_residual(running_mean, x, ctx, 900)["reversed"] > 0.1

    from conftest import WAN_CONFIGS, make_model

    cfg = WAN_CONFIGS["a"]
    model = make_model(cfg, num_frame_embeddings=6)
    xs, cs = torch.randn(1, 6, cfg["in_channels"], 4, 6), torch.randn(1, 5, cfg["text_dim"])
    assert time_reversal_residual(model, xs, cs, 900)["reversed"] > 1e-2
