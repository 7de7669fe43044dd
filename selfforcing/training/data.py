"""Batches for training, as a pure function of (step, micro-batch, purpose, rank).

Making every batch a deterministic function of its position (instead of an iterator with hidden state) is
what makes resume exact: a run restarted at step N draws exactly the batches it would have drawn.
``purpose`` separates the generator's and the critic's batches (each update takes a fresh batch).
"""

from __future__ import annotations

import functools
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


def batch_rng(cfg: TrainConfig, step: int, micro: int, purpose: int, device, batch_size: int | None = None,
              stream: int = 1) -> BatchRNG:
    """The per-sample random streams of one micro-batch (timesteps, noise, dropout, block indices...); the image
    half of a joint batch takes its own ``stream`` and ``batch_size``."""
    n = cfg.batch_size if batch_size is None else batch_size
    return BatchRNG([sample_seed(cfg.seed, step, purpose, i, stream=stream) for i in global_indices(n, micro)],
                    device)


SAMPLE_PURPOSE = 99  # the purpose of the fixed batch that samples and pipeline specs are drawn from
IMAGE_RNG_STREAM, IMAGE_CLIP_STREAM = 2, 3  # streams of the single frames of image-video joint training
IMAGE_FRAME_STREAM = 12  # the stream that picks which frame of their clips a micro-batch's single frames are


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
    autoencoder, with their captions through the text encoder: latents [B, F', C, h, w], context [B, L, D].

    With ``data.image_batch_size`` = Bi > 0 the batch also holds Bi single frames (the first frame of clips drawn
    from their own seeds: a digit at a uniform position): ``image_latents`` [Bi, 1, C, h, w], ``image_context``,
    ``image_null_context`` and ``image_rng``."""

    def __init__(self, cfg: TrainConfig, text_dim: int, device: torch.device) -> None:
        from ..autoencoders import get_autoencoder

        self.cfg, self.device = cfg, device
        self.autoencoder = get_autoencoder(cfg.data.autoencoder, device)
        self.text = TextContexts(cfg, text_dim, device)

    def clips(self, step: int, micro: int, purpose: int, images: bool = False) -> list[dict]:
        from ..data.moving_digits import render_clip

        d = self.cfg.data
        n, frames, stream = (d.image_batch_size, 1, IMAGE_CLIP_STREAM) if images else (self.cfg.batch_size,
                                                                                     d.num_frames, 0)
        return [render_clip("train", _pick(sample_seed(self.cfg.seed, step, purpose, i, stream), 2**31),
                            num_frames=frames, size=d.size, num_digits=tuple(d.num_digits), seed=self.cfg.seed,
                            images_per_digit=d.images_per_digit, start=d.start)
                for i in global_indices(n, micro)]

    def _encode(self, clips: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        video = torch.stack([c["video"] for c in clips]).to(self.device)
        prompts = [c["caption"] for c in clips]
        return self.autoencoder.encode(video), self.text(prompts), prompts

    @torch.no_grad()
    def batch(self, step: int, micro: int, purpose: int) -> dict:
        latents, context, prompts = self._encode(self.clips(step, micro, purpose))
        out = {"latents": latents, "context": context, "null_context": self.text.null(len(prompts)),
               "prompts": prompts, "rng": batch_rng(self.cfg, step, micro, purpose, self.device)}
        bi = self.cfg.data.image_batch_size
        if bi and purpose != SAMPLE_PURPOSE:  # the fixed sample batch holds clips only
            images, image_context, _ = self._encode(self.clips(step, micro, purpose, images=True))
            out.update(image_latents=images, image_context=image_context, image_null_context=self.text.null(bi),
                       image_start_frame=0,
                       image_rng=batch_rng(self.cfg, step, micro, purpose, self.device, bi, IMAGE_RNG_STREAM))
        return out


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

    @functools.cached_property
    def autoencoder(self):
        """The autoencoder a store of encoded clips names in its attrs (``data encode``), for sample videos; a store
        without one (ODE pairs) has no decoder, so ``hasattr(source, "autoencoder")`` is False."""
        name = self.store.attrs.get("autoencoder")
        if not name:
            raise AttributeError(f"store {self.cfg.data.path} names no autoencoder")
        from ..autoencoders import get_autoencoder

        return get_autoencoder(name, self.device)

    def batch(self, step: int, micro: int, purpose: int) -> dict:
        recs = [self.store[_pick(sample_seed(self.cfg.seed, step, purpose, i), len(self.store))]
                for i in global_indices(self.cfg.batch_size, micro)]
        out = {k: torch.stack([r[k] for r in recs]).to(self.device)
               for k in ("latents", "ode_states", "context") if k in recs[0]}
        out["prompts"] = [r.get("caption", r.get("prompt", "")) for r in recs]
        out["null_context"] = self.null_context[None].expand(len(recs), -1, -1).to(self.device)
        out["rng"] = batch_rng(self.cfg, step, micro, purpose, self.device)
        bi = self.cfg.data.image_batch_size
        if bi and purpose != SAMPLE_PURPOSE:
            out.update(self._images(step, micro, purpose, bi))
        return out

    @functools.cached_property
    def _clip_frames(self) -> int:
        """Latent frames of a stored clip (every record of a store has the same shape)."""
        return self.store.get(0, ("latents",))["latents"].shape[0]

    def _images(self, step: int, micro: int, purpose: int, bi: int) -> dict:
        """Image-video joint training from a store of clips: frame f of record r as a 1-frame video [1, C, h, w] with
        its clip's caption states. r is picked by the image's seed; f is one per micro-batch (``image_start_frame``,
        picked by the step's seed), so the images are one forward at their frame's position (frame embeddings)."""
        latents, contexts = [], []
        f = _pick(sample_seed(self.cfg.seed, step, purpose, global_indices(1, micro)[0], IMAGE_FRAME_STREAM),
                  self._clip_frames)
        for i in global_indices(bi, micro):
            seed = sample_seed(self.cfg.seed, step, purpose, i, IMAGE_CLIP_STREAM)
            rec = self.store.get(_pick(seed, len(self.store)), ("latents", "context"))
            latents.append(rec["latents"][f:f + 1])
            contexts.append(rec["context"])
        return {"image_latents": torch.stack(latents).to(self.device), "image_start_frame": f,
                "image_context": torch.stack(contexts).to(self.device),
                "image_null_context": self.null_context[None].expand(bi, -1, -1).to(self.device),
                "image_rng": batch_rng(self.cfg, step, micro, purpose, self.device, bi, IMAGE_RNG_STREAM)}


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
