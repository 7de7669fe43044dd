"""Streaming generation (Algorithm 2) as a Python API: chunks of decoded frames as soon as they exist.

``StreamingGenerator`` holds a model, an autoencoder and a text encoder, and streams one chunk at a time:
a few denoising steps of fresh noise against the KV cache, the clean chunk cached at t = 0, its latents
decoded by the autoencoder's streaming decoder. The cache can roll (window of L frames, S sinks), so a
stream has no length limit; the prompt can change between chunks (the cross-attention cache takes the new
prompt; with ``recache`` the self-attention cache is rebuilt from the frames still in the window under the
new prompt, as LongLive's KV re-cache does); and a stream can start from given frames (continuation,
image-to-video) that are encoded and cached first.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import flow
from .accel import cpu as cpu_acceleration
from .accel.cpu import timed_kernel_choice
from .sampling import cache_chunk, generate_chunk


class CacheTooLarge(MemoryError):
    """A KV cache over the whole stream (no rolling window) would not fit: ``frames`` latent frames need ``need``
    bytes, ``have`` bytes are available on the device."""

    def __init__(self, frames: int, need: int, have: int, device: str = "cpu") -> None:
        self.frames, self.need, self.have = frames, need, have
        super().__init__(f"a KV cache over the whole stream ({frames} latent frames, no rolling window) needs "
                         f"{need / 1e9:.1f} GB and {have / 1e9:.1f} GB of {device} memory is available: give "
                         f"window_frames (a rolling cache) or fewer frames")


@dataclass
class Chunk:
    """One streamed chunk: pixel frames [f_pix, 3, H, W] in [-1, 1] (batch item 0 unless batch > 1: then
    [B, f_pix, 3, H, W]), its latents [B, f, C, h, w], its index, first latent frame and the seconds it took."""

    index: int
    start_frame: int
    latents: torch.Tensor
    frames: torch.Tensor
    seconds: float
    prompt: str


class StreamingGenerator:
    """Few-step autoregressive streaming with a (rolling) KV cache.

    Args:
        model: a causal ``CausalWanModel`` (few-step generator).
        autoencoder: latents <-> pixels, with ``stream_decoder``.
        text_encoder: prompts -> ``TextEmbedding`` (its dim must be the model's text_dim).
        latent_size: (h, w) of the latents.
        steps: the warped few-step timesteps (default [1000, 750, 500, 250] warped with ``shift``).
        window_frames / sink_frames: rolling cache (default: the model config's local_attn_size / sink_size;
            no window means a global cache of ``max_frames``).
        max_frames: capacity of a global cache (ignored with a window).
        fuse_cache_pass: cache each finished chunk in the same forward as the next chunk's first denoising step
            (one pass over both chunks' tokens, :func:`~selfforcing.sampling.denoise_chunk` ``pending``): the same
            video up to float rounding, less compute per chunk on CPU, and a chunk is returned before its cache
            pass. The cache then holds the last returned chunk only after :meth:`cache_pending` (done
            automatically before a prompt switch). False: the cache pass runs at the end of every chunk.
    """

    def __init__(self, model, autoencoder, text_encoder, latent_size: tuple[int, int], *,
                 steps: Sequence[float] | None = None, shift: float = 5.0, window_frames: int | None = None,
                 sink_frames: int | None = None, max_frames: int = 1024, batch_size: int = 1,
                 negative_prompt: str = "", fuse_cache_pass: bool = True) -> None:
        if getattr(text_encoder, "dim", model.config.text_dim) != model.config.text_dim:
            raise ValueError(f"text encoder gives {text_encoder.dim}-dim states, "
                             f"the model expects {model.config.text_dim}")
        self.model, self.autoencoder, self.text_encoder = model.eval(), autoencoder, text_encoder
        self.latent_size = tuple(latent_size)
        self.steps = [float(s) for s in (steps if steps is not None else
                                         flow.denoising_step_list([1000, 750, 500, 250], shift=shift))]
        cfg = model.config
        self.window = cfg.local_attn_size if window_frames is None else window_frames
        self.sink = (cfg.sink_size if sink_frames is None else sink_frames) if self.window and self.window > 0 else 0
        self.max_frames, self.batch_size = max_frames, batch_size
        self.negative_prompt = negative_prompt
        self.fuse_cache_pass = fuse_cache_pass
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if not (self.window and self.window > 0):
            self._check_global_cache_fits()
        self.cache = model.new_kv_cache(batch_size, *self.latent_size, max_frames=max_frames,
                                        window_frames=self.window, sink_frames=self.sink)
        if self.device.type == "cpu" and self.dtype == torch.float32:
            cpu_acceleration.prepare()  # load (or build) the C++ blocks now, not inside the first chunk's latency
        self._reset_state()

    def _check_global_cache_fits(self) -> None:
        """Raise :class:`CacheTooLarge` before allocating a cache over the whole stream (no rolling window) that
        would take more than 90% of the memory available on the device."""
        from .models.kv_cache import available_memory_bytes, kv_cache_bytes

        cfg = self.model.config
        need = kv_cache_bytes(num_layers=cfg.num_layers, batch_size=self.batch_size,
                              num_heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
                              tokens_per_frame=self.model.tokens_per_frame(*self.latent_size),
                              frames=self.max_frames, dtype=self.dtype)
        have = available_memory_bytes(self.device)
        if have is not None and need > 0.9 * have:
            raise CacheTooLarge(self.max_frames, need, have, self.device.type)

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self.cache.reset()
        self.decoder = self.autoencoder.stream_decoder(self.batch_size)
        self.frame = 0  # next latent frame index
        self.chunk_index = 0
        self.context = None
        self.prompt = ""
        # clean latents still visible to the window (for recache): sinks + the most recent frames
        ring = (self.window - self.sink) if self.window and self.window > 0 else self.max_frames
        self._recent: deque[torch.Tensor] = deque(maxlen=ring)
        self._sinks: list[torch.Tensor] = []
        self.generator = None
        self._pending: torch.Tensor | None = None  # the last chunk's latents while its cache pass waits (fused)

    @torch.no_grad()
    def cache_pending(self) -> None:
        """Run the waiting cache pass of the last chunk now (under the prompt it was made with), so the cache holds
        every generated frame. A no-op without ``fuse_cache_pass`` or when nothing waits."""
        if self._pending is not None:
            f = self._pending.shape[1]
            with timed_kernel_choice():
                cache_chunk(self.model, self._pending, self.context, kv_cache=self.cache, start_frame=self.frame - f)
            self._pending = None

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        states = self.text_encoder.encode([prompt]).states.to(self.device, self.dtype)
        return states.expand(self.batch_size, -1, -1).contiguous()

    def _remember(self, latents: torch.Tensor) -> None:
        for f in range(latents.shape[1]):
            frame = latents[:, f:f + 1]
            if self.frame + f < self.sink:
                self._sinks.append(frame)
            else:
                self._recent.append(frame)

    def next_chunk_size(self) -> int:
        cfg = self.model.config
        if cfg.independent_first_frame and self.frame == 0:
            return 1
        return cfg.num_frame_per_block

    @torch.no_grad()
    def start(self, prompt: str, seed: int = 0, prefix_video: torch.Tensor | None = None,
              prefix_latents: torch.Tensor | None = None) -> None:
        """Begin a new stream for ``prompt``. A prefix (pixels [B, F, 3, H, W] or latents [B, F', C, h, w]) is
        encoded and cached at t = 0 first, chunk by chunk, so generation continues from it."""
        self._reset_state()
        self.prompt, self.context = prompt, self._encode_prompt(prompt)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        if prefix_video is not None:
            prefix_latents = self.autoencoder.encode(prefix_video.to(self.device))
        if prefix_latents is not None:
            prefix_latents = prefix_latents.to(self.device, self.dtype)
            if tuple(prefix_latents.shape[-2:]) != self.latent_size:
                raise ValueError(f"prefix latents are {tuple(prefix_latents.shape[-2:])}, "
                                 f"the stream is {self.latent_size}")
            if prefix_latents.shape[0] != self.batch_size:
                prefix_latents = prefix_latents.expand(self.batch_size, *prefix_latents.shape[1:])
            self.decoder.decode_chunk(prefix_latents)  # warm a stateful decoder on the prefix
            self._prefill(prefix_latents, self.context)

    def _prefill(self, latents: torch.Tensor, context: torch.Tensor) -> None:
        """Cache clean latents at t = 0, chunk by chunk from ``self.frame`` on."""
        i = 0
        while i < latents.shape[1]:
            f = min(self.next_chunk_size(), latents.shape[1] - i)
            chunk = latents[:, i:i + f]
            with timed_kernel_choice():
                cache_chunk(self.model, chunk, context, kv_cache=self.cache, start_frame=self.frame)
            self._remember(chunk)
            self.frame += f
            i += f

    @torch.no_grad()
    def switch_prompt(self, prompt: str, recache: bool = False) -> None:
        """Use ``prompt`` from the next chunk on. Without ``recache`` only the cross-attention changes; with it the
        self-attention cache is rebuilt from the clean frames still in the window, under the new prompt."""
        if recache:
            self._pending = None  # the re-cache below rebuilds that chunk's K/V too, under the new prompt
        else:
            self.cache_pending()  # the finished chunk is cached under the prompt it was made with
        self.prompt, self.context = prompt, self._encode_prompt(prompt)
        if not recache or self.frame == 0:
            return
        kept_sinks = torch.cat(self._sinks, 1) if self._sinks else None
        recent = torch.cat(list(self._recent), 1) if self._recent else None
        end = self.frame
        self.cache.reset()
        self._sinks, self._recent = [], deque(maxlen=self._recent.maxlen)
        self.frame = 0
        if kept_sinks is not None:
            self._prefill(kept_sinks, self.context)
        if recent is not None:
            self.frame = end - recent.shape[1]
            self.cache.skip_to(self.frame)  # the frames before it are out of the window
            self._prefill(recent, self.context)
        assert self.frame == end

    @torch.no_grad()
    def next_chunk(self) -> Chunk:
        """Generate, cache and decode the next chunk (Algorithm 2, one iteration of its outer loop; with
        ``fuse_cache_pass`` the caching happens in the next call's first step)."""
        if self.context is None:
            raise RuntimeError("call start(prompt) before next_chunk()")
        t0 = time.perf_counter()
        f = self.next_chunk_size()
        h, w = self.latent_size
        c = self.model.config.in_channels
        noise = torch.randn((self.batch_size, f, c, h, w), generator=self.generator).to(self.device, self.dtype)
        with timed_kernel_choice():  # streaming may pick the faster of equivalent kernels (not bit-reproducible)
            x0, self._pending = generate_chunk(self.model, noise, self.steps, self.context, kv_cache=self.cache,
                                               start_frame=self.frame, pending=self._pending,
                                               fuse_cache_pass=self.fuse_cache_pass, generator=self.generator)
        self._remember(x0)
        frames = self.decoder.decode_chunk(x0)
        chunk = Chunk(self.chunk_index, self.frame, x0, frames[0] if self.batch_size == 1 else frames,
                      time.perf_counter() - t0, self.prompt)
        self.frame += f
        self.chunk_index += 1
        return chunk

    def stream(self, prompt: str, num_latent_frames: int | None = None, seed: int = 0,
               switches: dict[int, tuple[str, bool]] | None = None, **start_kwargs) -> Iterator[Chunk]:
        """Yield chunks until ``num_latent_frames`` new latent frames exist (forever if None). ``switches`` maps a
        chunk index to (new prompt, recache) applied before that chunk."""
        self.start(prompt, seed=seed, **start_kwargs)
        first = self.frame
        while num_latent_frames is None or self.frame - first < num_latent_frames:
            if switches and self.chunk_index in switches:
                self.switch_prompt(*switches[self.chunk_index])
            yield self.next_chunk()
