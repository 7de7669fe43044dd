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
from .rng import BatchRNG


def sample_seed(seed: int, step: int, micro: int, purpose: int, index: int, stream: int = 0) -> int:
    """A distinct 63-bit seed for every (run seed, step, micro-batch, purpose, global sample index, stream)."""
    h = seed
    for v in (step, micro, purpose, index, stream):
        h = (h * 1_000_003 + v + 1) % (2**61 - 1)
    return h


def global_indices(batch_size: int) -> list[int]:
    """Global indices of this rank's samples: rank r holds [r * B, (r + 1) * B)."""
    return [rank() * batch_size + j for j in range(batch_size)]


def batch_rng(cfg: TrainConfig, step: int, micro: int, purpose: int, device) -> BatchRNG:
    """The per-sample random streams of one micro-batch (timesteps, noise, dropout, block indices...)."""
    return BatchRNG([sample_seed(cfg.seed, step, micro, purpose, i, stream=1) for i in global_indices(cfg.batch_size)],
                    device)


class RandomLatents:
    """Gaussian latents [B, F, C, H, W] and contexts [B, L, D] (smoke tests and speed benchmarks).

    ODE states, when asked for, lie on the straight path of a random x0: states[k] = add_noise(x0, eps, t_k),
    the last one being x0 itself."""

    def __init__(self, cfg: TrainConfig, text_dim: int, device: torch.device) -> None:
        self.cfg, self.text_dim, self.device = cfg, text_dim, device

    def _sample(self, seed: int) -> dict:
        cfg = self.cfg
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randn(tuple(cfg.data.latent_shape), generator=g)
        ctx = torch.randn(cfg.data.text_len, self.text_dim, generator=g)
        out = {"latents": x0, "context": ctx, "null_context": torch.zeros_like(ctx)}
        if cfg.method == "ode_init":
            steps = flow.denoising_step_list(cfg.rollout.denoising_steps, shift=cfg.timestep_shift,
                                             warp=cfg.rollout.warp_denoising_step)
            eps = torch.randn(x0.shape, generator=g)
            states = [flow.add_noise(x0[None], eps[None], torch.full((1, x0.shape[0]), float(t)))[0] for t in steps]
            out["ode_states"] = torch.stack(states + [x0])
        return out

    def batch(self, step: int, micro: int, purpose: int) -> dict:
        cfg = self.cfg
        samples = [self._sample(sample_seed(cfg.seed, step, micro, purpose, i)) for i in global_indices(cfg.batch_size)]
        out = {k: torch.stack([s[k] for s in samples]).to(self.device) for k in samples[0]}
        out["rng"] = batch_rng(cfg, step, micro, purpose, self.device)
        return out


def build_batch_source(cfg: TrainConfig, text_dim: int, device: torch.device):
    """The batch source named by ``cfg.data.kind``."""
    kind = cfg.data.kind
    if kind == "random":
        return RandomLatents(cfg, text_dim, device)
    raise ValueError(f"unknown data kind {kind!r}; choose one of ['random']")
