"""Batches for training, as a pure function of (step, micro-batch, purpose, rank).

Making every batch a deterministic function of its position (instead of an iterator with hidden state) is
what makes resume exact: a run restarted at step N draws exactly the batches it would have drawn.
``purpose`` separates the generator's and the critic's batches (each update takes a fresh batch).
"""

from __future__ import annotations

import torch

from .. import flow
from .config import TrainConfig
from .distributed import rank


def batch_seed(seed: int, step: int, micro: int, purpose: int) -> int:
    """A distinct 63-bit seed for every (run seed, step, micro-batch, purpose, rank)."""
    return (((seed * 1_000_003 + step) * 1_009 + micro) * 101 + purpose) * 4_099 + rank()


class RandomLatents:
    """Gaussian latents [B, F, C, H, W] and contexts [B, L, D] (smoke tests and speed benchmarks).

    ODE states, when asked for, lie on the straight path of a random x0: states[k] = add_noise(x0, eps, t_k),
    the last one being x0 itself."""

    def __init__(self, cfg: TrainConfig, text_dim: int, device: torch.device) -> None:
        self.cfg, self.text_dim, self.device = cfg, text_dim, device

    def batch(self, step: int, micro: int, purpose: int) -> dict:
        cfg = self.cfg
        g = torch.Generator().manual_seed(batch_seed(cfg.seed, step, micro, purpose))
        shape = (cfg.batch_size, *cfg.data.latent_shape)
        x0 = torch.randn(shape, generator=g)
        ctx = torch.randn(cfg.batch_size, cfg.data.text_len, self.text_dim, generator=g)
        out = {"latents": x0, "context": ctx, "null_context": torch.zeros_like(ctx)}
        if cfg.method == "ode_init":
            steps = flow.denoising_step_list(cfg.rollout.denoising_steps, shift=cfg.timestep_shift,
                                             warp=cfg.rollout.warp_denoising_step)
            eps = torch.randn(shape, generator=g)
            states = [flow.add_noise(x0, eps, torch.full(shape[:2], float(t))) for t in steps] + [x0]
            out["ode_states"] = torch.stack(states, 1)
        return {k: v.to(self.device) for k, v in out.items()}


def build_batch_source(cfg: TrainConfig, text_dim: int, device: torch.device):
    """The batch source named by ``cfg.data.kind``."""
    kind = cfg.data.kind
    if kind == "random":
        return RandomLatents(cfg, text_dim, device)
    raise ValueError(f"unknown data kind {kind!r}; choose one of ['random']")
