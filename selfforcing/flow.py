"""Flow matching in the Wan convention, as small pure functions.

Conventions (DESIGN.md): timesteps t live in [0, 1000] and sigma = t / 1000;
    x_t = (1 - sigma) * x0 + sigma * eps,        v = eps - x0,        x0 = x_t - sigma * v.
Latents are [B, F, C, H, W] and per-frame timesteps are [B, F]; every function here broadcasts a
timestep tensor over the trailing dimensions of the latent it is applied to, and checks that the
leading dimensions agree instead of broadcasting silently.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Shift warp of a noise level: sigma' = k sigma / (1 + (k - 1) sigma), k = ``shift``.

    k = 1 is the identity; k > 1 moves mass towards high noise. Works on floats and tensors alike.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def shift_timesteps(timesteps: Sequence[float] | torch.Tensor, shift: float) -> torch.Tensor:
    """Warp timesteps t in [0, 1000] through :func:`shift_sigma`; returns float64 [N].

    With shift 5, [1000, 750, 500, 250] -> [1000, 937.5, 833.33, 625] (the Self Forcing list).
    """
    t = torch.as_tensor(timesteps, dtype=torch.float64)
    return shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift) * NUM_TRAIN_TIMESTEPS


def denoising_step_list(steps: Sequence[float], shift: float = 1.0, warp: bool = True) -> torch.Tensor:
    """The few-step sampler's timesteps: the nominal list, shift-warped when ``warp``; float64 [S].

    A trailing 0 is dropped (the sampler ends with the x0 prediction of the last listed step).
    """
    t = torch.as_tensor(list(steps), dtype=torch.float64)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"denoising steps must be a non-empty list, got {list(steps)}")
    if bool(((t < 0) | (t > NUM_TRAIN_TIMESTEPS)).any()):
        raise ValueError(f"denoising steps must lie in [0, {NUM_TRAIN_TIMESTEPS}], got {list(steps)}")
    if t.numel() > 1 and t[-1] == 0:
        t = t[:-1]
    if bool((t[1:] >= t[:-1]).any()):
        raise ValueError(f"denoising steps must be strictly decreasing, got {list(steps)}")
    return shift_timesteps(t, shift) if warp else t


def training_timestep_grid(num_steps: int = NUM_TRAIN_TIMESTEPS, shift: float = 1.0) -> torch.Tensor:
    """The N-point training grid: u_i = linspace(1, 0, N + 1)[:-1], t_i = 1000 * shift_sigma(u_i); [N].

    Descending from 1000; its last point is the smallest noise level the grid contains
    (about 4.98 for N = 1000, shift 5).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return shift_sigma(u, shift) * NUM_TRAIN_TIMESTEPS


def _sigma_like(timestep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sigma = t / 1000 shaped to broadcast over ``x``: t is [B], [B, F] or a scalar."""
    t = torch.as_tensor(timestep, device=x.device)
    if t.ndim > 0 and (t.ndim > x.ndim or tuple(t.shape) != tuple(x.shape[: t.ndim])):
        raise ValueError(
            f"timestep of shape {tuple(t.shape)} does not match the leading dims of x {tuple(x.shape)}"
        )
    sigma = t.to(torch.float64 if x.dtype == torch.float64 else torch.float32) / NUM_TRAIN_TIMESTEPS
    return sigma.reshape(*t.shape, *([1] * (x.ndim - t.ndim))).to(x.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
    """Forward process x_t = (1 - sigma) x0 + sigma eps, sigma = t / 1000; same shape as x0."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    sigma = _sigma_like(timestep, x0)
    return (1 - sigma) * x0 + sigma * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The network's regression target v = eps - x0."""
    return noise - x0


def flow_to_x0(flow: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
    """x0 = x_t - sigma v (computed in float64, returned in the dtype of ``flow``)."""
    sigma = _sigma_like(timestep, x_t.double())
    return (x_t.double() - sigma * flow.double()).to(flow.dtype)


def x0_to_flow(x0: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
    """v = (x_t - x0) / sigma; undefined at sigma = 0, so timesteps must be > 0."""
    sigma = _sigma_like(timestep, x_t.double())
    if bool((sigma <= 0).any()):
        raise ValueError("x0_to_flow needs timesteps > 0 (sigma = 0 has no flow)")
    return ((x_t.double() - x0.double()) / sigma).to(x0.dtype)


def euler_step(x_t: torch.Tensor, flow: torch.Tensor, t_from, t_to) -> torch.Tensor:
    """One Euler step of the probability-flow ODE: x_{t_to} = x_t + (sigma_to - sigma_from) v."""
    d_sigma = _sigma_like(t_to, x_t) - _sigma_like(t_from, x_t)
    return x_t + d_sigma * flow


def sample_timesteps(
    shape: Sequence[int],
    *,
    shift: float = 1.0,
    min_t: float = 0.0,
    max_t: float = NUM_TRAIN_TIMESTEPS,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training timesteps: u ~ U[min_t, max_t) / 1000, t = 1000 shift_sigma(u); float32 of ``shape``.

    This is Wan's shifted sampling (and the DMD/critic sampler before its clamp).
    """
    u = torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float64)
    return timesteps_from_uniform(u, shift=shift, min_t=min_t, max_t=max_t)


def timesteps_from_uniform(
    u: torch.Tensor, *, shift: float = 1.0, min_t: float = 0.0, max_t: float = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """Map u in [0, 1) to t = 1000 shift_sigma((min_t + (max_t - min_t) u) / 1000); float32, shape of u."""
    if not 0 <= min_t < max_t <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"need 0 <= min_t < max_t <= {NUM_TRAIN_TIMESTEPS}, got {min_t}, {max_t}")
    u = (min_t + (max_t - min_t) * u.double()) / NUM_TRAIN_TIMESTEPS
    return (shift_sigma(u, shift) * NUM_TRAIN_TIMESTEPS).float()


def logit_normal_from_uniform(u: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Map u in (0, 1) to a logit-normal sigma: sigma = sigmoid(mean + std * Phi^-1(u)) (SD3's sampling); float64.

    An inverse-CDF map, so one uniform draw per sample serves either distribution and a run's random streams do
    not depend on which is chosen. u is clamped to [1e-6, 1 - 1e-6] so that u = 0 gives a finite sigma.
    """
    if std <= 0:
        raise ValueError(f"logit-normal std must be > 0, got {std}")
    z = torch.special.ndtri(u.double().clamp(1e-6, 1 - 1e-6))
    return torch.sigmoid(mean + std * z)


TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal")


def training_timesteps(u: torch.Tensor, *, distribution: str = "uniform", shift: float = 1.0, mean: float = 0.0,
                       std: float = 1.0) -> torch.Tensor:
    """Training timesteps t in [0, 1000] from uniform draws u in [0, 1) (float32, shape of u):

        uniform:       t = 1000 shift_sigma(u)                             (Wan's shifted sampling)
        logit_normal:  t = 1000 shift_sigma(sigmoid(mean + std Phi^-1(u)))  (SD3; shift 1 leaves it as it is)
    """
    if distribution == "uniform":
        return timesteps_from_uniform(u, shift=shift)
    if distribution == "logit_normal":
        return (shift_sigma(logit_normal_from_uniform(u, mean, std), shift) * NUM_TRAIN_TIMESTEPS).float()
    raise ValueError(f"unknown timestep distribution {distribution!r}; choose one of {list(TIMESTEP_DISTRIBUTIONS)}")


def blockwise_timesteps(per_block: torch.Tensor, block_sizes: Sequence[int]) -> torch.Tensor:
    """Expand one timestep per block [B, nb] to per-frame timesteps [B, sum(block_sizes)]."""
    if per_block.ndim != 2 or per_block.shape[1] != len(block_sizes):
        raise ValueError(
            f"per-block timesteps must be [B, {len(block_sizes)}], got {tuple(per_block.shape)}"
        )
    sizes = torch.as_tensor(list(block_sizes), device=per_block.device)
    return per_block.repeat_interleave(sizes, dim=1)
