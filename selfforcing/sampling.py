"""Samplers: small functions over a model, written once and shared by training and inference.

* :func:`predict_x0` -- G(x_t; t): the model's flow prediction turned into x0.
* :func:`denoise_chunk` -- the few-step sampler of one chunk (DMD2 / CausVid style): predict x0, re-noise
  to the next listed timestep with fresh noise, repeat; optionally stop at an "exit" step with gradient.
* :func:`cache_chunk` -- G^KV(x0; t_ctx, KV): run the finished chunk once more to cache its K/V.
* :func:`generate_chunk` -- one inference chunk: the sampler, then its cache pass (now, or fused into the next chunk).
* :func:`rollout_with_kv_cache` -- Algorithm 1 (training) and Algorithm 2 (inference) of the paper:
  chunks one after another through the KV cache.
* :func:`sample_exit_steps` -- the exit step(s) of a Self Forcing iteration.
* :func:`denoise_chunk_in_context` -- the few-step sampler of one chunk without a cache, over [context | chunk].
* many steps: :func:`sample_bidirectional`, :func:`sample_causal_many_step` (Euler with CFG).
* whole videos by name (:data:`SAMPLERS`): :func:`sample_few_step`, :func:`sample_causal_many_step`,
  :func:`sample_bidirectional_sliding`.

Shapes follow the project convention: latents [B, F, C, H, W], per-frame timesteps [B, F].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import flow


def predict_x0(model, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kw) -> torch.Tensor:
    """x0 = x_t - sigma * v(x_t, t): the model's clean-data prediction; x_t [B, F, C, H, W], t [B, F]."""
    return flow.flow_to_x0(model(x_t, t, context, **kw), x_t, t)


def frame_timesteps(x: torch.Tensor, value: float) -> torch.Tensor:
    """The per-frame timesteps [B, F] (float32) of latents x [B, F, ...], all ``value``."""
    return torch.full(x.shape[:2], float(value), device=x.device, dtype=torch.float32)


def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Fresh noise like x from a torch.Generator, a per-sample ``BatchRNG`` (training), or the global RNG."""
    if hasattr(generator, "randn_like"):
        return generator.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def denoise_chunk(
    model,
    noise: torch.Tensor,
    steps: Sequence[float] | torch.Tensor,
    context: torch.Tensor,
    *,
    exit_step: int | None = None,
    grad_at_exit: bool = False,
    generator: torch.Generator | None = None,
    pending: torch.Tensor | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """Few-step sampling of one chunk: for j = 0..exit, x0 = G(x_{t_j}; t_j), x_{t_{j+1}} = Psi(x0, eps, t_{j+1}).

    Psi(x0, eps, t) = (1 - t/1000) x0 + (t/1000) eps with fresh eps (the re-noising of Algorithm 1, line 19).
    Every step but the exit runs without gradient; the exit step (default: the last) runs with gradient
    when ``grad_at_exit``. noise [B, f, C, H, W] is x_{t_0}; returns the exit step's x0 [B, f, C, H, W].

    ``pending`` [B, f', C, H, W] (with ``kv_cache``): the previous chunk, finished but not yet cached (frames
    [start_frame - f', start_frame), cached at t = 0). Its cache pass G^KV(x0; 0, KV) runs fused with the first
    step (``pending_x`` of the model: one forward over both chunks' tokens), or just before it when that step
    needs gradient. The result equals :func:`cache_chunk` followed by the plain sampler up to float rounding.
    """
    steps = [float(s) for s in steps]
    exit_step = len(steps) - 1 if exit_step is None else exit_step
    if not 0 <= exit_step < len(steps):
        raise ValueError(f"exit_step {exit_step} outside the {len(steps)} denoising steps")
    if pending is not None and exit_step == 0 and grad_at_exit and torch.is_grad_enabled():
        cache_chunk(model, pending, context, kv_cache=model_kwargs.get("kv_cache"),
                    start_frame=model_kwargs.get("start_frame", 0) - pending.shape[1])
        pending = None
    x = noise
    for j in range(exit_step + 1):
        t = frame_timesteps(x, steps[j])
        kw = dict(model_kwargs, pending_x=pending.detach()) if j == 0 and pending is not None else model_kwargs
        if j == exit_step:
            with torch.set_grad_enabled(grad_at_exit and torch.is_grad_enabled()):
                return predict_x0(model, x, t, context, **kw)
        with torch.no_grad():
            x0 = predict_x0(model, x, t, context, **kw)
            x = flow.add_noise(x0, randn_like(x0, generator), frame_timesteps(x0, steps[j + 1]))
    raise AssertionError("unreachable")


@torch.no_grad()
def cache_chunk(model, x0: torch.Tensor, context: torch.Tensor, *, kv_cache, start_frame: int,
                context_noise: float = 0.0, generator: torch.Generator | None = None) -> None:
    """G^KV(x0; t_ctx, KV): run the finished chunk at timestep ``context_noise`` to write its K/V.

    With context_noise = 0 the clean x0 itself is cached (Algorithms 1 and 2); with t_ctx > 0 the chunk is
    first noised to t_ctx (context-noise augmentation). Always without gradient: the cache holds constants. Only the
    K/V are computed (``kv_only``): the last block stops after its K/V projection and there is no output head.
    """
    x = x0.detach()
    if context_noise > 0:
        x = flow.add_noise(x, randn_like(x, generator), frame_timesteps(x, context_noise))
    model(x, frame_timesteps(x, context_noise), context, kv_cache=kv_cache, start_frame=start_frame, kv_only=True)


def generate_chunk(model, noise: torch.Tensor, steps, context: torch.Tensor, *, kv_cache, start_frame: int,
                   pending: torch.Tensor | None = None, fuse_cache_pass: bool = True,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk of Algorithm 2 (inference): :func:`denoise_chunk` of ``noise`` [B, f, C, H, W] against the cache (with
    the previous chunk's ``pending`` cache pass fused into its first step), then the clean chunk's own cache pass:
    deferred to the next chunk with ``fuse_cache_pass``, else :func:`cache_chunk` now.
    Returns (x0 [B, f, C, H, W], the ``pending`` to hand to the next chunk: x0, or None when already cached)."""
    x0 = denoise_chunk(model, noise, steps, context, generator=generator, kv_cache=kv_cache, start_frame=start_frame,
                       pending=pending)
    if fuse_cache_pass:
        return x0, x0
    cache_chunk(model, x0, context, kv_cache=kv_cache, start_frame=start_frame)
    return x0, None


def sample_exit_steps(
    num_blocks: int,
    num_steps: int,
    *,
    same_step_across_blocks: bool = True,
    last_step_only: bool = False,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Exit step per block, s ~ Uniform{0..S-1} (Algorithm 1, line 4): one shared draw, or one per block."""
    if last_step_only:
        return [num_steps - 1] * num_blocks
    draws = torch.randint(0, num_steps, (1 if same_step_across_blocks else num_blocks,), generator=generator)
    return draws.tolist() * num_blocks if same_step_across_blocks else draws.tolist()


@dataclass
class RolloutResult:
    """What a rollout produced: the clean video [B, F, C, H, W] (with graph at the supervised chunks), the
    exit step of every chunk, and how many model forwards ran with gradient."""

    video: torch.Tensor
    exit_steps: list[int]
    block_sizes: list[int]
    grad_forwards: int


def rollout_with_kv_cache(
    model,
    noise: torch.Tensor,
    context: torch.Tensor,
    steps: Sequence[float] | torch.Tensor,
    *,
    block_sizes: Sequence[int],
    exit_steps: Sequence[int] | None = None,
    grad_from_frame: int | None = None,
    context_noise: float = 0.0,
    kv_cache=None,
    initial_latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
) -> RolloutResult:
    """Autoregressive generation chunk by chunk with a KV cache (Algorithms 1 and 2 of Self Forcing).

    For block i (frames [s_i, s_i + f_i)): x_{t_0} = noise[:, s_i:s_i+f_i]; run :func:`denoise_chunk` up to
    ``exit_steps[i]`` (the last step when None: inference); append x0^i to the output; then cache x0^i with
    :func:`cache_chunk` (without gradient). The exit forward carries gradient only when gradients are enabled
    and the block starts at or after ``grad_from_frame`` (default 0: every block; a rollout longer than the
    supervised window sets it to F - N so only the last N frames are trained).

    ``initial_latents`` [B, P, C, H, W] (image-to-video / continuation) are cached first at t = 0 and
    prepended to the output. ``noise`` [B, F, C, H, W]; returns a :class:`RolloutResult`.
    """
    b, nf = noise.shape[:2]
    block_sizes = list(block_sizes)
    if sum(block_sizes) != nf:
        raise ValueError(f"block sizes {block_sizes} sum to {sum(block_sizes)}, noise has {nf} frames")
    steps = [float(s) for s in steps]
    if exit_steps is None:
        exit_steps = [len(steps) - 1] * len(block_sizes)
    if len(exit_steps) != len(block_sizes):
        raise ValueError(f"{len(exit_steps)} exit steps for {len(block_sizes)} blocks")
    prefix = 0 if initial_latents is None else initial_latents.shape[1]
    if kv_cache is None:
        h, w = noise.shape[-2:]
        kv_cache = model.new_kv_cache(b, h, w, max_frames=prefix + nf)
    else:
        kv_cache.reset()
    grad_from = 0 if grad_from_frame is None else grad_from_frame
    outputs = []
    if initial_latents is not None:
        cache_chunk(model, initial_latents, context, kv_cache=kv_cache, start_frame=0)
        outputs.append(initial_latents)

    grad_forwards = 0
    start = 0
    for i, (f, exit_step) in enumerate(zip(block_sizes, exit_steps)):
        supervised = torch.is_grad_enabled() and start >= grad_from
        grad_forwards += int(supervised)
        x0 = denoise_chunk(
            model, noise[:, start:start + f], steps, context,
            exit_step=exit_step, grad_at_exit=supervised, generator=generator,
            kv_cache=kv_cache, start_frame=prefix + start,
        )
        outputs.append(x0)
        if on_chunk is not None:
            on_chunk(i, x0)
        cache_chunk(model, x0, context, kv_cache=kv_cache, start_frame=prefix + start,
                    context_noise=context_noise, generator=generator)
        start += f
    return RolloutResult(torch.cat(outputs, dim=1), list(exit_steps), block_sizes, grad_forwards)


# ---------------------------------------------------------------------------------------------- many-step
def ode_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The Euler grid: sigma_i = shift_sigma(1 - i / N), i = 0..N (float64 [N + 1], from 1 down to 0)."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return flow.shift_sigma(u, shift)


def guided_flow(model, x_t, t, context, null_context, guidance_scale: float, **kw) -> torch.Tensor:
    """Classifier-free guided flow v = v_u + w (v_c - v_u) (one forward when w = 1 or no null context)."""
    v_c = model(x_t, t, context, **kw)
    if null_context is None or guidance_scale == 1.0:
        return v_c
    v_u = model(x_t, t, null_context, **kw)
    return v_u + guidance_scale * (v_c - v_u)


@torch.no_grad()
def sample_bidirectional(
    model,
    noise: torch.Tensor,
    context: torch.Tensor,
    *,
    null_context: torch.Tensor | None = None,
    num_steps: int = 48,
    shift: float = 5.0,
    guidance_scale: float = 1.0,
    record_timesteps: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Many-step Euler sampling of the probability-flow ODE with a bidirectional model (the teacher):
    x_{sigma_{i+1}} = x_{sigma_i} + (sigma_{i+1} - sigma_i) v(x, 1000 sigma_i), with CFG.

    noise [B, F, C, H, W] is x at t = 1000. ``record_timesteps`` (e.g. the warped few-step list) must lie on
    the grid; the states there, followed by the final x0, are returned as [B, S + 1, F, C, H, W] (ODE pairs).
    Returns (x0, states or None)."""
    sig = ode_sigmas(num_steps, shift)
    want = {}
    if record_timesteps is not None:
        grid_t = (sig * flow.NUM_TRAIN_TIMESTEPS).tolist()
        for t in record_timesteps:
            i = min(range(len(grid_t)), key=lambda j: abs(grid_t[j] - float(t)))
            if abs(grid_t[i] - float(t)) > 1e-3:
                raise ValueError(f"timestep {float(t):.3f} is not on the {num_steps}-step grid with shift {shift}; "
                                 f"use a step count that is a multiple of the few-step list's length")
            want[i] = len(want)
    states: list[torch.Tensor | None] = [None] * len(want)
    x = noise
    for i in range(num_steps):
        if i in want:
            states[want[i]] = x
        t = torch.full(x.shape[:2], float(sig[i] * flow.NUM_TRAIN_TIMESTEPS), device=x.device)
        v = guided_flow(model, x, t, context, null_context, guidance_scale, causal=False)
        x = x + float(sig[i + 1] - sig[i]) * v
    recorded = torch.stack(states + [x], 1) if want else None
    return x, recorded


@torch.no_grad()
def sample_causal_many_step(
    model,
    noise: torch.Tensor,
    context: torch.Tensor,
    *,
    block_sizes: Sequence[int],
    null_context: torch.Tensor | None = None,
    num_steps: int = 50,
    shift: float = 5.0,
    guidance_scale: float = 1.0,
    context_noise: float = 0.0,
    window_frames: int | None = None,
    sink_frames: int | None = None,
    cached_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Many-step AR sampling for causal models trained by teacher or diffusion forcing: chunk by chunk, Euler
    over ``num_steps`` with CFG, the conditional and unconditional branches each with their own KV cache
    (their contexts differ, so their cached K/V differ); then the clean chunk is cached in both.
    ``cached_latents`` [B, F, C, H, W]: cache these (e.g. ground-truth latents: a teacher-forced context) instead
    of the generated chunks, so each chunk is the model's prediction from that context.
    noise [B, F, C, H, W] -> video [B, F, C, H, W]."""
    b, nf, _, h, w = noise.shape
    if sum(block_sizes) != nf:
        raise ValueError(f"block sizes {list(block_sizes)} sum to {sum(block_sizes)}, noise has {nf} frames")
    use_cfg = null_context is not None and guidance_scale != 1.0

    def new_cache():
        return model.new_kv_cache(b, h, w, max_frames=nf, window_frames=window_frames, sink_frames=sink_frames)

    caches = [new_cache()] + ([new_cache()] if use_cfg else [])
    sig = ode_sigmas(num_steps, shift)
    out, start = [], 0
    for f in block_sizes:
        x = noise[:, start:start + f]
        for i in range(num_steps):
            t = torch.full((b, f), float(sig[i] * flow.NUM_TRAIN_TIMESTEPS), device=x.device)
            v = model(x, t, context, kv_cache=caches[0], start_frame=start)
            if use_cfg:
                v_u = model(x, t, null_context, kv_cache=caches[1], start_frame=start)
                v = v_u + guidance_scale * (v - v_u)
            x = x + float(sig[i + 1] - sig[i]) * v
        out.append(x)
        clean = x if cached_latents is None else cached_latents[:, start:start + f]
        for cache, ctx in zip(caches, (context, null_context)):
            cache_chunk(model, clean, ctx, kv_cache=cache, start_frame=start, context_noise=context_noise)
        start += f
    return torch.cat(out, 1)


# ---------------------------------------------------------------------------------------------- whole videos
@torch.no_grad()
def sample_few_step(model, noise: torch.Tensor, context: torch.Tensor, steps, *, generator=None,
                    window_frames: int | None = None, sink_frames: int = 0,
                    cached_latents: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 2 over a whole video: :func:`rollout_with_kv_cache` in a cache of ``window_frames`` (None: all
    frames). ``cached_latents`` [B, F, C, H, W]: each finished chunk's place in the cache is taken by these frames
    (a teacher-forced context), so the video is the model's per-chunk prediction from them; the noise draws are the
    same. noise [B, F, C, H, W] -> video [B, F, C, H, W]."""
    b, nf, _, h, w = noise.shape
    rolling = bool(window_frames and window_frames > 0)  # None: all frames, whatever the model's config streams with
    cache = model.new_kv_cache(b, h, w, max_frames=nf, window_frames=window_frames if rolling else 0,
                               sink_frames=sink_frames if rolling else 0)
    blocks = model.block_sizes(nf)
    if cached_latents is None:
        return rollout_with_kv_cache(model, noise, context, steps, block_sizes=blocks, kv_cache=cache,
                                     generator=generator).video
    out, start = [], 0
    for f in blocks:
        out.append(denoise_chunk(model, noise[:, start:start + f], steps, context, generator=generator,
                                 kv_cache=cache, start_frame=start))
        cache_chunk(model, cached_latents[:, start:start + f], context, kv_cache=cache, start_frame=start)
        start += f
    return torch.cat(out, 1)


def denoise_chunk_in_context(model, noise: torch.Tensor, steps, context: torch.Tensor,
                             history: torch.Tensor | None, *, start_frame: int, causal: bool = True,
                             generator=None) -> torch.Tensor:
    """:func:`denoise_chunk` without a cache: every step runs the model over [history at t = 0 | chunk at t], the
    history being the clean frames just before the chunk [B, P, C, H, W] (or None). ``causal``: block-causal
    (CausVid-style recomputation of the context at every step); else a bidirectional model over the window."""
    k = noise.shape[1]
    first = start_frame - (0 if history is None else history.shape[1])
    x = noise
    for j, t in enumerate(steps):
        seq = x if history is None else torch.cat([history, x], 1)
        tt = torch.zeros(seq.shape[:2], device=x.device)
        tt[:, -k:] = float(t)
        v = model(seq, tt, context, causal=causal, start_frame=first)[:, -k:]
        x0 = flow.flow_to_x0(v, x, tt[:, -k:])
        if j + 1 < len(steps):
            x = flow.add_noise(x0, randn_like(x0, generator), frame_timesteps(x0, steps[j + 1]))
    return x0


@torch.no_grad()
def sample_bidirectional_sliding(model, noise: torch.Tensor, context: torch.Tensor, null_context=None, *,
                                 num_steps: int, shift: float, guidance_scale: float, window: int, stride: int,
                                 generator=None) -> torch.Tensor:
    """A bidirectional model past its window: :func:`sample_bidirectional` over the first ``window`` latent frames;
    then, while frames are missing, a window of the last ``window - n`` known frames and ``n = min(stride, missing)``
    new ones is sampled with the known frames replaced at every step by their re-noised copy
    x_s = (1 - s) x + s eps (one eps per window); the new frames are appended. noise [B, F, ...] supplies the new
    frames' initial noise."""
    nf = noise.shape[1]
    video, _ = sample_bidirectional(model, noise[:, :min(window, nf)], context, null_context=null_context,
                                    num_steps=num_steps, shift=shift, guidance_scale=guidance_scale)
    sig = ode_sigmas(num_steps, shift)
    while video.shape[1] < nf:
        n = min(stride, nf - video.shape[1])
        known = video[:, video.shape[1] - (window - n):]
        k = known.shape[1]
        eps = randn_like(known, generator)
        x = torch.cat([eps, noise[:, video.shape[1]:video.shape[1] + n]], 1)
        for i in range(num_steps):
            x = torch.cat([(1 - float(sig[i])) * known + float(sig[i]) * eps, x[:, k:]], 1)
            t = torch.full(x.shape[:2], float(sig[i] * flow.NUM_TRAIN_TIMESTEPS), device=x.device)
            v = guided_flow(model, x, t, context, null_context, guidance_scale, causal=False)
            x = x + float(sig[i + 1] - sig[i]) * v
        video = torch.cat([video, x[:, k:]], 1)
    return video


# the samplers a pipeline or an evaluation names: few-step AR with a KV cache (Algorithm 2), many-step AR with CFG,
# and the bidirectional model (sliding past its window)
SAMPLERS: dict[str, Callable] = {"few-step": sample_few_step, "many-step": sample_causal_many_step,
                                 "bidirectional": sample_bidirectional_sliding}
