"""Batches for training, as a pure function of (step, micro-batch, purpose, rank).

Making every batch a deterministic function of its position (instead of an iterator with hidden state) is
what makes resume exact: a run restarted at step N draws exactly the batches it would have drawn.
``purpose`` separates the generator's and the critic's batches (each update takes a fresh batch).
"""

from __future__ import annotations

import os

import torch

from .. import flow
from .config import TrainConfig
from .distributed import rank, world_size
from .rng import BatchRNG


def sample_seed(seed: int, step: int, purpose: int, index: int, stream: int = 0) -> int:
    """A distinct 61-bit seed for every (run seed, step, purpose, global sample index, stream)."""
    h = seed
    for v in (step, purpose, index, stream):
        h = (h * 1_000_003 + v + 1) % (2**61 - 1)
    return h


def global_indices(batch_size: int, micro: int) -> list[int]:
    """Global indices of this rank's samples in micro-batch ``micro``: micro m, rank r holds
    [(m W + r) B, (m W + r + 1) B). So a step sees the same samples whether they are split over ranks, over
    accumulated micro-batches, or held in one big batch."""
    first = (micro * world_size() + rank()) * batch_size
    return list(range(first, first + batch_size))


def batch_rng(cfg: TrainConfig, step: int, micro: int, purpose: int, device) -> BatchRNG:
    """The per-sample random streams of one micro-batch (timesteps, noise, dropout, block indices...)."""
    return BatchRNG([sample_seed(cfg.seed, step, purpose, i, stream=1) for i in global_indices(cfg.batch_size, micro)],
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
        samples = [self._sample(sample_seed(cfg.seed, step, purpose, i)) for i in global_indices(cfg.batch_size, micro)]
        out = {k: torch.stack([s[k] for s in samples]).to(self.device) for k in samples[0]}
        out["rng"] = batch_rng(cfg, step, micro, purpose, self.device)
        return out


class TextContexts:
    """Prompts -> text states [B, L, D] through the (disk-cached) text encoder of the recipe."""

    def __init__(self, cfg: TrainConfig, text_dim: int, device: torch.device) -> None:
        from ..text import build_text_encoder

        cache = cfg.data.embedding_cache or os.path.join(cfg.out_dir, "text_cache")
        self.encoder = build_text_encoder(cfg.data.text_encoder, cfg.data.text_len, cache_dir=cache)
        if self.encoder.dim != text_dim:
            raise ValueError(f"text encoder {cfg.data.text_encoder!r} gives {self.encoder.dim}-dim states, "
                             f"the model expects text_dim={text_dim}")
        self.device = device
        self.negative_prompt = cfg.data.negative_prompt

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self.encoder.encode(list(prompts)).states.to(self.device)

    def null(self, batch_size: int) -> torch.Tensor:
        """The unconditional prompt's states, [B, L, D] (CFG and text dropout)."""
        return self([self.negative_prompt]).expand(batch_size, -1, -1)


def _pick(seed: int, n: int) -> int:
    return seed % n


class MovingDigitsLatents:
    """Moving-Digits clips rendered on the fly (a pure function of the sample's seed), encoded by the recipe's
    autoencoder, with their captions through the text encoder: latents [B, F', C, h, w], context [B, L, D]."""

    def __init__(self, cfg: TrainConfig, text_dim: int, device: torch.device) -> None:
        from ..autoencoders import get_autoencoder

        self.cfg, self.device = cfg, device
        self.autoencoder = get_autoencoder(cfg.data.autoencoder, device)
        self.text = TextContexts(cfg, text_dim, device)

    def clips(self, step: int, micro: int, purpose: int) -> list[dict]:
        from ..data.moving_digits import render_clip

        d = self.cfg.data
        return [render_clip("train", _pick(sample_seed(self.cfg.seed, step, purpose, i), 2**31),
                            num_frames=d.num_frames, size=d.size, num_digits=tuple(d.num_digits), seed=self.cfg.seed,
                            images_per_digit=d.images_per_digit)
                for i in global_indices(self.cfg.batch_size, micro)]

    @torch.no_grad()
    def batch(self, step: int, micro: int, purpose: int) -> dict:
        clips = self.clips(step, micro, purpose)
        video = torch.stack([c["video"] for c in clips]).to(self.device)
        prompts = [c["caption"] for c in clips]
        return {"latents": self.autoencoder.encode(video), "context": self.text(prompts),
                "null_context": self.text.null(len(clips)), "prompts": prompts,
                "rng": batch_rng(self.cfg, step, micro, purpose, self.device)}


class StoreRecords:
    """Records of a store written by ``selfforcing data encode`` / ``data ode-pairs``: each sample is one record
    (picked by its seed), giving ``latents`` / ``ode_states`` / ``context`` as stored."""

    def __init__(self, cfg: TrainConfig, text_dim: int, device: torch.device) -> None:
        from ..data.store import Store

        if not cfg.data.path:
            raise ValueError("data.kind=store needs data.path (the store folder)")
        self.cfg, self.device = cfg, device
        self.store = Store(cfg.data.path)
        if len(self.store) == 0:
            raise ValueError(f"store {cfg.data.path} holds no records")
        null_path = os.path.join(cfg.data.path, "null_context.pt")
        if not os.path.isfile(null_path):
            raise FileNotFoundError(f"{null_path} missing: the store has no unconditional-prompt embedding")
        self.null_context = torch.load(null_path, map_location="cpu", weights_only=True)
        if self.null_context.shape[-1] != text_dim:
            raise ValueError(f"store {cfg.data.path} holds {self.null_context.shape[-1]}-dim text states, "
                             f"the model expects text_dim={text_dim}")

    def batch(self, step: int, micro: int, purpose: int) -> dict:
        recs = [self.store[_pick(sample_seed(self.cfg.seed, step, purpose, i), len(self.store))]
                for i in global_indices(self.cfg.batch_size, micro)]
        out = {k: torch.stack([r[k] for r in recs]).to(self.device)
               for k in ("latents", "ode_states", "context") if k in recs[0]}
        out["null_context"] = self.null_context[None].expand(len(recs), -1, -1).to(self.device)
        out["rng"] = batch_rng(self.cfg, step, micro, purpose, self.device)
        return out


class PromptContexts:
    """Data-free training (Self Forcing with DMD / SiD): prompts from a file, no latents."""

    def __init__(self, cfg: TrainConfig, text_dim: int, device: torch.device) -> None:
        from ..data.prompts import read_prompt_file

        if not cfg.data.path:
            raise ValueError("data.kind=prompts needs data.path (a prompt file)")
        self.cfg, self.device = cfg, device
        self.prompts = read_prompt_file(cfg.data.path)
        self.text = TextContexts(cfg, text_dim, device)

    def batch(self, step: int, micro: int, purpose: int) -> dict:
        prompts = [self.prompts[_pick(sample_seed(self.cfg.seed, step, purpose, i), len(self.prompts))]
                   for i in global_indices(self.cfg.batch_size, micro)]
        return {"context": self.text(prompts), "null_context": self.text.null(len(prompts)), "prompts": prompts,
                "rng": batch_rng(self.cfg, step, micro, purpose, self.device)}


SOURCES = {"random": RandomLatents, "moving-digits": MovingDigitsLatents, "store": StoreRecords,
           "prompts": PromptContexts}


def build_batch_source(cfg: TrainConfig, text_dim: int, device: torch.device):
    """The batch source named by ``cfg.data.kind``."""
    if cfg.data.kind not in SOURCES:
        raise ValueError(f"unknown data kind {cfg.data.kind!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[cfg.data.kind](cfg, text_dim, device)
