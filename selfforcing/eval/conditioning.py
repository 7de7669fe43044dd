"""How much a model uses each part of its caption, measured on its own training loss.

Sampling-based judges (:mod:`selfforcing.eval.metrics`) say whether a video shows the captioned digit moving the
captioned way; they cannot say why not. These measures can:

* :func:`flow_loss_by_context` -- the flow-matching loss of a model on the same clips, noise and timesteps under
  several captions: the true one, and variants that change one part (the direction, the digit) or drop it all.
  The gap loss(variant) - loss(true) is what the model gains from that part of the caption: a gap of zero for
  the direction means the model ignores the direction words, whatever its samples happen to do.
* :func:`group_mean_gain` -- what an ideal model could gain at t -> 1 from knowing a label (the caption, or only
  its digit): the per-element reduction of the squared error of the posterior mean, E_k ||m_k - m||^2, estimated
  without bias from two halves of each group.
* :func:`time_reversal_residual` -- how far a model is from treating a clip played backwards as the same clip: a
  model with only relative positions in time (Wan's RoPE) and a per-frame autoencoder cannot tell the first frame
  from the last when the frames are noise, so it cannot put a digit where its caption's motion starts.
* :func:`caption_variant` -- the caption with its direction reversed or its digit replaced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from selfforcing.data.moving_digits import DIRECTION_NAMES, caption_for, parse_caption
from selfforcing.flow import add_noise, flow_target

VARIANTS = ("opposite_direction", "other_digit")


def caption_variant(caption: str, variant: str) -> str:
    """``caption`` with one part changed for every digit in it: ``opposite_direction`` turns each direction by 180
    degrees ("up" -> "down", "up and to the left" -> "down and to the right"); ``other_digit`` replaces each
    digit d by (d + 5) mod 10. Anything but a Moving-Digits caption is a ValueError."""
    parts = parse_caption(caption)
    if variant == "opposite_direction":
        parts = [(d, DIRECTION_NAMES[(DIRECTION_NAMES.index(k) + 4) % 8]) for d, k in parts]
    elif variant == "other_digit":
        parts = [((d + 5) % 10, k) for d, k in parts]
    else:
        raise ValueError(f"unknown caption variant {variant!r}: one of {VARIANTS}")
    return caption_for([d for d, _ in parts], [k for _, k in parts])


@torch.no_grad()
def flow_loss_by_context(model, latents: torch.Tensor, contexts: Mapping[str, torch.Tensor],
                         timesteps: Sequence[float], noise: torch.Tensor | None = None, *, causal: bool = False,
                         seed: int = 0) -> dict[str, list[float]]:
    r"""Flow-matching loss of ``model`` per timestep under each set of text states.

    latents: clean x_0 [B, F, C, H, W]; contexts: name -> text states [B, L, D] (e.g. "true", "opposite_direction",
    "null"); timesteps: t values in [0, 1000]. For each t, x_t = (1 - t/1000) x_0 + (t/1000) eps with the same
    eps ~ N(0, I) (``noise``, else drawn from ``seed``) for every context, and
    loss_c(t) = mean (v_theta(x_t, t, c) - (eps - x_0))^2 over all elements. Returns name -> [loss per t].
    The same noise for every context makes the differences between contexts exact paired comparisons."""
    if latents.dim() != 5:
        raise ValueError(f"latents must be [B, F, C, H, W], got shape {tuple(latents.shape)}")
    for name, ctx in contexts.items():
        if ctx.dim() != 3 or ctx.shape[0] != latents.shape[0]:
            raise ValueError(f"context {name!r} must be [B={latents.shape[0]}, L, D], got {tuple(ctx.shape)}")
    if noise is None:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
    target = flow_target(latents, noise)
    out: dict[str, list[float]] = {name: [] for name in contexts}
    for t in timesteps:
        ts = torch.full((latents.shape[0],), float(t), device=latents.device)
        x_t = add_noise(latents, noise, ts)
        for name, ctx in contexts.items():
            v = model(x_t, ts, ctx, causal=causal)
            out[name].append(float((v.float() - target.float()).pow(2).mean()))
    return out


def group_mean_gain(x: torch.Tensor, groups: Sequence) -> float:
    r"""Unbiased estimate of E_k ||m_k - m||^2 / numel (per element), the squared-error reduction of predicting
    each sample of ``x`` [N, ...] by its group's mean m_k instead of the overall mean m.

    The plug-in estimate ||mean_k - m||^2 is biased upwards by Var/n_k (noise of a small group's mean looks like
    signal); the product of two independent halves' deviations, (mean_k^A - m) . (mean_k^B - m), plus s^2 / N
    (the within-group variance over the sample count: m shares the halves' noise) is not. Groups are weighted by
    their size; a group of one sample adds nothing."""
    groups = np.asarray(list(groups))
    if x.shape[0] != len(groups) or x.shape[0] < 2:
        raise ValueError(f"need one group label per sample and at least 2 samples: x has {x.shape[0]} rows, "
                         f"{len(groups)} labels")
    x = x.double().flatten(1)
    m = x.mean(0)
    total, within, dof = 0.0, 0.0, 0
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        within += float((x[idx] - x[idx].mean(0)).pow(2).sum(0).mean())
        dof += len(idx) - 1
        if len(idx) < 2:
            continue
        a, b = x[idx[0::2]].mean(0) - m, x[idx[1::2]].mean(0) - m
        total += float((a * b).mean()) * len(idx)
    # E[(a - m)(b - m)] = (m_k - mu)^2 - s^2 / N, s^2 the within-group variance (m shares the halves' noise)
    return total / x.shape[0] + (within / dof if dof else 0.0) / x.shape[0]


@torch.no_grad()
def time_reversal_residual(model, latents: torch.Tensor, context: torch.Tensor, t: float, *, seed: int = 0,
                           causal: bool = False) -> dict[str, float]:
    r"""Relative residuals of ``model``'s prediction under a reordering R of the frames of x_t:
    ||v(x_t) - R^-1 v(R x_t)|| / ||v(x_t)|| for R = time reversal ("reversed") and for a random permutation
    ("permuted", the scale of a model that does use frame order).

    latents: clean x_0 [B, F, C, H, W]; context: text states [B, L, D]; x_t at timestep ``t`` (0-1000) with noise
    from ``seed``. A model whose frames interact only through |f - f'| gives "reversed" = 0 for any input; one that
    knows which frame comes first cannot."""
    if latents.dim() != 5:
        raise ValueError(f"latents must be [B, F, C, H, W], got shape {tuple(latents.shape)}")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g).to(latents)
    ts = torch.full((latents.shape[0],), float(t), device=latents.device)
    x_t = add_noise(latents, noise, ts)
    v = model(x_t, ts, context, causal=causal).float()
    perm = torch.randperm(latents.shape[1], generator=g)
    orders = {"reversed": torch.arange(latents.shape[1] - 1, -1, -1), "permuted": perm}
    out = {}
    for name, order in orders.items():
        v_r = torch.empty_like(v)
        v_r[:, order] = model(x_t[:, order], ts, context, causal=causal).float()
        out[name] = float((v - v_r).norm() / v.norm())
    return out
