"""The KV cache of the causal Wan model: preallocated per-layer buffers, rolling eviction with sinks.

Layout. One buffer per kind, ``k`` and ``v`` of shape [num_layers, B, H, capacity * T, Dh] (head-major), where
T is the number of tokens per latent frame; reads hand out [B, N, H, Dh] views of it (the model's token-major
convention) whose per-head key rows are contiguous, the layout attention kernels read fastest (SDPA on CPU
included: docs/performance.md). Keys are stored after RoPE, so a cached key keeps the absolute
position of its frame and nothing is ever re-rotated.

Slots. With no rolling window the frame j lives in slot j, and a chunk that would end past
``capacity`` frames is an error. With a window of L frames and S sinks, capacity = L: frames
j < S stay in slots 0..S-1 forever, and every other frame lives in the ring slot
S + (j - S) mod (L - S). Writing a chunk [s, e) therefore overwrites exactly the frames that the
visibility rule of ``attention.py`` (j >= e - (L - S) or j < S) evicts for that chunk: eviction
costs nothing and no cached tensor is ever copied or shifted. Attention over the cache is
order-free (the positions are in the rotated keys), so the ring order does not matter.

Writes. A forward on frames [s, e) with gradients off writes the chunk's K/V into its slots and
then attends over the filled slots (a view, no copy). Re-running the same chunk (the next denoising
step, or the clean pass at t = 0 that Algorithm 1 and 2 use to cache a finished chunk) overwrites the
same slots, so a finished chunk is cached from the last pass only. A forward with gradients on never
writes: it reads a snapshot of the earlier frames (:meth:`KVCache.snapshot_context`) and attends to
``cat(snapshot, own K/V)``, so the cache holds no autograd history (the paper's gradient truncation)
and gradient checkpointing recomputes with the same numbers it used in the forward.

The cross-attention cache holds each layer's text K/V for one prompt; it is replaced when the
model is called with another context tensor (prompt switching) or by :meth:`KVCache.reset_cross`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kv_cache_bytes(*, num_layers: int, batch_size: int, num_heads: int, head_dim: int, tokens_per_frame: int,
                   frames: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the self-attention buffers of a cache holding ``frames`` latent frames: K and V, each
    num_layers x batch_size x num_heads x (frames * tokens_per_frame) x head_dim elements of ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * batch_size * num_heads * frames * tokens_per_frame * head_dim * itemsize


def available_memory_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory a new allocation can take on ``device``: free device memory on CUDA (plus what PyTorch's allocator
    holds unused), MemAvailable of /proc/meminfo on CPU; None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class ChunkPlan:
    """Where a chunk of frames [start, start + num_frames) goes and what it may see."""

    start: int
    num_frames: int
    slot_index: torch.Tensor  # Long [num_frames * T]: token slots the chunk writes
    context_index: torch.Tensor  # Long [N_ctx * T]: token slots of the earlier visible frames
    visible_tokens: int  # filled prefix of the buffer once the chunk is written
    read_index: torch.Tensor | None = None  # slots to attend when the filled prefix is not exactly them


class KVCache:
    """Per-layer self-attention K/V for a stream of latent frames, plus the cross-attention K/V.

    Args:
        num_layers, num_heads, head_dim: from the model config.
        batch_size: B of every forward that uses this cache.
        tokens_per_frame: T = (H / p_h) * (W / p_w) for the latent size in use.
        max_frames: capacity without a rolling window (the longest video the cache can hold).
        window_frames: L > 0 turns on the rolling window (capacity L, ``max_frames`` ignored).
        sink_frames: S first frames kept forever inside the window (0 <= S < L).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        max_frames: int | None = None,
        window_frames: int = -1,
        sink_frames: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.rolling = window_frames is not None and window_frames > 0
        if self.rolling:
            if not 0 <= sink_frames < window_frames:
                raise ValueError(f"need 0 <= sink_frames < window_frames, got {sink_frames}, {window_frames}")
            capacity = window_frames
        else:
            if max_frames is None or max_frames < 1:
                raise ValueError("a KV cache without a rolling window needs max_frames >= 1")
            if sink_frames:
                raise ValueError("sink_frames needs a rolling window (window_frames > 0)")
            capacity = max_frames
        if tokens_per_frame < 1 or batch_size < 1:
            raise ValueError(f"bad cache geometry: tokens_per_frame={tokens_per_frame}, batch_size={batch_size}")
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.tokens_per_frame = tokens_per_frame
        self.capacity = capacity
        self.window_frames = window_frames if self.rolling else -1
        self.sink_frames = sink_frames
        shape = (num_layers, batch_size, num_heads, capacity * tokens_per_frame, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cross_k: list[torch.Tensor] | None = None
        self.cross_v: list[torch.Tensor] | None = None
        self._cross_key: tuple | None = None
        self.reset()

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> KVCache:
        """Forget every cached frame and the prompt (buffers are kept, not reallocated)."""
        self.end_frame = 0  # frames [0, end_frame) have been written
        self.valid_from = 0  # frames in [sink_frames, valid_from) were skipped (see skip_to) and are never read
        self.last_start: int | None = None  # start of the most recently written chunk
        self.last_num_frames = 0
        self._last_plan: ChunkPlan | None = None
        self.reset_cross()
        return self

    def reset_cross(self) -> None:
        """Drop the cross-attention K/V; the next forward recomputes them from its context."""
        self.cross_k = self.cross_v = None
        self._cross_key = None

    def detach(self) -> KVCache:
        """Make sure no cached tensor carries autograd history (writes already store detached K/V)."""
        self.k = self.k.detach()
        self.v = self.v.detach()
        if self.cross_k is not None:
            self.cross_k = [None if t is None else t.detach() for t in self.cross_k]
            self.cross_v = [None if t is None else t.detach() for t in self.cross_v]
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def ring_frames(self) -> int:
        return self.capacity - self.sink_frames

    def slot_of_frame(self, frame: int) -> int:
        """Buffer slot (in frames) of absolute frame index ``frame``."""
        if not self.rolling or frame < self.sink_frames:
            return frame
        return self.sink_frames + (frame - self.sink_frames) % self.ring_frames

    def visible_frames(self, start: int, num_frames: int) -> list[int]:
        """Absolute indices of the earlier frames a chunk [start, start + n) attends to (the rule of
        ``attention.py``), oldest first."""
        # computed from interval ends, not by scanning [0, start): planning a chunk costs O(window), not O(length)
        end = start + num_frames
        sinks = list(range(min(self.sink_frames, start)))
        lo = max(self.valid_from, self.sink_frames, end - self.ring_frames if self.rolling else 0)
        return sinks + list(range(lo, start))

    # ------------------------------------------------------------------ planning a chunk
    def plan(self, start: int, num_frames: int, tokens_per_frame: int, batch_size: int) -> ChunkPlan:
        """Validate a chunk [start, start + num_frames) against the cache and say where it goes.

        A chunk either continues the stream (start == end_frame) or re-runs the last chunk
        (start == its start, same length). Anything else is an error that names the frames.
        """
        if tokens_per_frame != self.tokens_per_frame:
            raise ValueError(
                f"KV cache was made for {self.tokens_per_frame} tokens per frame, "
                f"the input has {tokens_per_frame} (latent height/width changed?)"
            )
        if batch_size != self.batch_size:
            raise ValueError(f"KV cache was made for batch size {self.batch_size}, the input has {batch_size}")
        if num_frames < 1:
            raise ValueError("a chunk needs at least one frame")
        rerun = self.last_start is not None and start == self.last_start
        if rerun and num_frames != self.last_num_frames:
            raise ValueError(
                f"re-running the chunk at frame {start} with {num_frames} frames, "
                f"but it was written with {self.last_num_frames}"
            )
        if not rerun and start != self.end_frame:
            raise ValueError(
                f"chunk starts at frame {start}, but the cache holds frames [0, {self.end_frame}): "
                f"expected start_frame={self.end_frame} (next chunk)"
                + (f" or {self.last_start} (re-run of the last chunk)" if self.last_start is not None else "")
            )
        if rerun and self._last_plan is not None:
            return self._last_plan  # the denoising steps and the cache pass of a chunk share its plan
        end = start + num_frames
        if not self.rolling and end > self.capacity:
            raise ValueError(
                f"KV cache too small: it holds {self.capacity} frames and has no rolling window, "
                f"but the chunk ends at frame {end}; allocate max_frames >= {end} or set a window"
            )
        if self.rolling and num_frames > self.ring_frames:
            raise ValueError(
                f"chunk of {num_frames} frames does not fit the rolling part of the window "
                f"({self.capacity} frames - {self.sink_frames} sinks)"
            )
        t = tokens_per_frame
        device = self.device
        offs = torch.arange(t, device=device)
        slots = torch.as_tensor([self.slot_of_frame(j) for j in range(start, end)], device=device)
        ctx_slots = torch.as_tensor([self.slot_of_frame(j) for j in self.visible_frames(start, num_frames)],
                                    device=device, dtype=torch.long)
        slot_index = (slots[:, None] * t + offs).reshape(-1)
        context_index = (ctx_slots[:, None] * t + offs).reshape(-1)
        visible = min(end, self.capacity)
        read_index = None
        if len(ctx_slots) + num_frames != visible:  # skipped frames leave stale slots in the prefix: gather
            read_index = torch.cat([context_index, slot_index])
        return ChunkPlan(start=start, num_frames=num_frames, slot_index=slot_index, context_index=context_index,
                         visible_tokens=visible * t, read_index=read_index)

    def skip_to(self, frame: int) -> None:
        """Continue the stream at ``frame`` >= end_frame without writing the frames in between (the sinks stay).

        Used to re-cache a rolling window: after ``reset`` the sinks are written, then the stream skips to the
        oldest frame still in the window. Skipped frames are never attended (their slots may hold stale K/V)."""
        if frame < self.end_frame:
            raise ValueError(f"cannot skip back to frame {frame}: "
                             f"the cache already holds frames up to {self.end_frame}")
        if not self.rolling and frame > self.capacity:
            raise ValueError(f"cannot skip to frame {frame}: the cache holds {self.capacity} frames")
        self.end_frame, self.last_start, self.last_num_frames = frame, None, 0
        self._last_plan = None
        self.valid_from = max(self.valid_from, frame)

    def commit(self, plan: ChunkPlan) -> None:
        """Record that the chunk's K/V were written (called once per forward that writes)."""
        self.end_frame = max(self.end_frame, plan.start + plan.num_frames)
        self.last_start = plan.start
        self.last_num_frames = plan.num_frames
        self._last_plan = plan

    # ------------------------------------------------------------------ per-layer access
    def write(self, layer: int, plan: ChunkPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the chunk's K/V [B, n*T, H, Dh] into its slots."""
        self.k[layer].index_copy_(2, plan.slot_index, k.detach().to(self.dtype).transpose(1, 2))
        self.v[layer].index_copy_(2, plan.slot_index, v.detach().to(self.dtype).transpose(1, 2))

    def write_and_view(
        self, layer: int, plan: ChunkPlan, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the chunk's K/V [B, n*T, H, Dh] into its slots; return the filled buffer as [B, N, H, Dh] views."""
        self.write(layer, plan, k, v)
        if plan.read_index is not None:
            return (self.k[layer].index_select(2, plan.read_index).transpose(1, 2),
                    self.v[layer].index_select(2, plan.read_index).transpose(1, 2))
        n = plan.visible_tokens
        return self.k[layer, :, :, :n].transpose(1, 2), self.v[layer, :, :, :n].transpose(1, 2)

    def snapshot_context(self, plan: ChunkPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, a copy of the K/V of the earlier frames the chunk sees; [B, N_ctx*T, H, Dh] each."""
        idx = plan.context_index
        return [(self.k[i].index_select(2, idx).transpose(1, 2), self.v[i].index_select(2, idx).transpose(1, 2))
                for i in range(self.num_layers)]

    # ------------------------------------------------------------------ cross-attention cache
    def cross_matches(self, context: torch.Tensor) -> bool:
        """True when the cached cross-attention K/V were computed from this very context tensor."""
        return self._cross_key is not None and self._cross_key == _tensor_key(context)

    def set_cross(self, context: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
        """Store every layer's cross-attention K/V [B, L, H, Dh] of ``context`` at once."""
        self.cross_k = [t.detach() for t in ks]
        self.cross_v = [t.detach() for t in vs]
        self._cross_key = _tensor_key(context)

    def begin_cross(self, context: torch.Tensor) -> None:
        """Start caching the cross-attention K/V of ``context``; each layer fills its slot when it runs."""
        self.cross_k = [None] * self.num_layers
        self.cross_v = [None] * self.num_layers
        self._cross_key = _tensor_key(context)

    def cross_slot(self, layer: int) -> _CrossSlot:
        return _CrossSlot(self, layer)

    def memory_bytes(self) -> int:
        """Bytes held by the self-attention buffers."""
        return self.k.numel() * self.k.element_size() * 2


class _CrossSlot:
    """One layer's entry of the cross-attention cache: get() -> (K, V) or None; set((K, V))."""

    __slots__ = ("cache", "layer")

    def __init__(self, cache: KVCache, layer: int) -> None:
        self.cache, self.layer = cache, layer

    def get(self):
        k = self.cache.cross_k[self.layer] if self.cache.cross_k is not None else None
        return None if k is None else (k, self.cache.cross_v[self.layer])

    def set(self, kv) -> None:
        self.cache.cross_k[self.layer] = kv[0].detach()
        self.cache.cross_v[self.layer] = kv[1].detach()


def _tensor_key(t: torch.Tensor) -> tuple:
    # identity + in-place version: a new prompt tensor, or an edited one, invalidates the cache
    return (id(t), t.data_ptr(), t._version, tuple(t.shape))
