"""Losses as pure functions of predictions: each states its math; none calls a model.

Notation: x is a generator sample [B, F, C, H, W] (carrying the generator's graph where it must),
x_t = (1 - sigma) x + sigma eps, and p_real / p_fake are x0 predictions of the real score (teacher, with
CFG) and of the fake score (critic) at x_t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the batch: [B, ...] -> [B, 1, 1, ...] (broadcastable back)."""
    return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)


def _masked_mean(x: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of x [B, F, ...] over the frames where frame_mask [B, F] (or [F]) is True (all if None)."""
    if frame_mask is None:
        return x.mean()
    m = frame_mask.to(x.dtype)
    if m.ndim == 1:
        m = m[None].expand(x.shape[0], -1)
    m = m.reshape(*m.shape, *([1] * (x.ndim - 2))).expand_as(x)
    return (x * m).sum() / m.sum().clamp_min(1)


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """p = p_uncond + w (p_cond - p_uncond). (The reference code writes p_cond + g (p_cond - p_uncond): g = w - 1.)"""
    return uncond + scale * (cond - uncond)


def flow_matching_loss(
    flow_pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    frame_weight: torch.Tensor | None = None,
    frame_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L = mean_frames w_f * mean((v_hat - (eps - x0))^2): the Wan flow-matching objective.

    flow_pred, x0, noise: [B, F, C, H, W]; frame_weight [B, F] (e.g. a timestep weighting) and frame_mask
    [B, F] select/weight frames (clean context frames of teacher forcing carry no loss).
    """
    err = (flow_pred.float() - (noise.float() - x0.float())).square().mean(dim=(2, 3, 4))  # [B, F]
    if frame_weight is not None:
        err = err * frame_weight
    return _masked_mean(err, frame_mask)


def ode_regression_loss(x0_pred: torch.Tensor, target: torch.Tensor,
                        frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L = mean over supervised frames of (x0_hat - x0_ODE)^2: regress the student onto the teacher's ODE end
    point (CausVid's ODE initialisation). frame_mask [B, F] drops frames whose input was already clean."""
    err = (x0_pred.float() - target.float()).square().mean(dim=(2, 3, 4))
    return _masked_mean(err, frame_mask)


@torch.no_grad()
def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """The DMD update direction g = (p_fake - p_real) / mean_{F,C,H,W} |x - p_real| (per sample; DMD eq. 8).

    Moving x along -g moves it towards the real distribution; non-finite entries become 0. float64.
    """
    x, real_x0, fake_x0 = x.double(), real_x0.double(), fake_x0.double()
    normaliser = _per_sample_mean((x - real_x0).abs())
    return torch.nan_to_num((fake_x0 - real_x0) / normaliser)


def dmd_generator_loss(
    x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, frame_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """L = 1/2 mean((x - stopgrad(x - g))^2) with g = :func:`dmd_gradient`: its gradient w.r.t. x is g / N.

    The value is 1/2 mean(g^2) (logged); x [B, F, C, H, W] carries the generator graph, the scores do not.
    frame_mask [B, F] restricts the loss to supervised frames. Returns (loss, g).
    """
    g = dmd_gradient(x.detach(), real_x0, fake_x0)
    target = (x.double() - g).detach()
    err = 0.5 * (x.double() - target).square().mean(dim=(2, 3, 4))
    return _masked_mean(err, frame_mask).float(), g


def critic_denoising_loss(critic_flow: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The fake score's loss: flow matching on generator samples, mean((v_fake(x_t, t) - (eps - x))^2).

    x is the (detached) generator sample, x_t = add_noise(x, noise, t); the critic thus learns the score of
    the generator's distribution."""
    return flow_matching_loss(critic_flow, x.detach(), noise)


def sid_generator_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor,
                       alpha: float = 1.0) -> torch.Tensor:
    """Score identity distillation: L = mean((p_real - p_fake) * ((p_real - x) - alpha (p_real - p_fake)) / n),
    n = stopgrad mean_{F,C,H,W}|x - p_real| per sample. Gradients flow through x AND through both score
    predictions (which must be computed from x_t = add_noise(x, eps, t) with grad enabled). float64."""
    x, real_x0, fake_x0 = x.double(), real_x0.double(), fake_x0.double()
    with torch.no_grad():
        normaliser = _per_sample_mean((x - real_x0).abs())
    diff = real_x0 - fake_x0
    loss = diff * ((real_x0 - x) - alpha * diff) / normaliser
    return torch.nan_to_num(loss).mean().float()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean softplus(-D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss: mean softplus(-D(real)) + mean softplus(D(fake))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def r1_penalty(logits: torch.Tensor, perturbed_logits: torch.Tensor, sigma: float) -> torch.Tensor:
    """Finite-difference R1: mean(((D(x + sigma eps) - D(x)) / sigma)^2) ~ E ||grad_x D||^2 along eps.

    A finite difference (as the reference code does) instead of a double backward, so it works with any
    attention kernel; logits at x and at the perturbed x, both [B] (or [B, 1])."""
    return ((perturbed_logits.float() - logits.float()) / sigma).square().mean()
