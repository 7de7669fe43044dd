"""Attention masks at frame granularity, and the attention call itself.

The second half holds the ways a self-attention layer sees its keys (:class:`SelfAttention`): a whole sequence under a
mask, a chunk against the KV cache, or a chunk against a snapshot of the cache (with gradients).

Every causal rule in the project is stated once, here, at the level of latent frames; the token-level
boolean masks used by full (cache-free) forwards are the frame masks expanded by the number of tokens
per frame. The KV-cache path (``kv_cache.py``) keeps exactly the frames these masks make visible, and
the tests check that the two agree.

Visibility rule. Frames are grouped in blocks (chunks) of ``block_size`` frames (optionally with the
first frame alone). A query frame in the block [s, e) may see a key frame j when

    j < e                                             (causal at block granularity), and
    window <= 0  or  j >= e - (window - sink)  or  j < sink      (rolling window with sink frames).

So ``window`` counts all frames a chunk may attend to, its own included, and ``sink`` of them are the
first frames of the video, never evicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import ChunkPlan, KVCache
from .runtime import cpu_inference


def block_sizes_for(num_frames: int, block_size: int, independent_first_frame: bool = False) -> list[int]:
    """Split ``num_frames`` latent frames into causal blocks: [K, K, ...] or [1, K, K, ...].

    Raises ValueError when the block size does not divide the frames that must be blocked.
    """
    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    if num_frames < 1:
        raise ValueError(f"need at least one frame, got {num_frames}")
    head = [1] if independent_first_frame else []
    rest = num_frames - len(head)
    if rest % block_size != 0:
        what = f"{num_frames} - 1 (independent first frame)" if head else f"{num_frames}"
        raise ValueError(
            f"{what} latent frames cannot be split into blocks of num_frame_per_block={block_size}; "
            f"expected a multiple of {block_size}"
            + (" plus one" if head else "")
        )
    return head + [block_size] * (rest // block_size)


def block_ends(block_sizes: list[int], device=None) -> torch.Tensor:
    """For every frame, the (exclusive) end frame index of its block; LongTensor [F]."""
    sizes = torch.as_tensor(block_sizes, device=device)
    ends = torch.cumsum(sizes, 0)
    return ends.repeat_interleave(sizes)


def block_starts(block_sizes: list[int], device=None) -> torch.Tensor:
    """For every frame, the start frame index of its block; LongTensor [F]."""
    sizes = torch.as_tensor(block_sizes, device=device)
    return (torch.cumsum(sizes, 0) - sizes).repeat_interleave(sizes)


def window_visible(block_end: torch.Tensor, key_frame: torch.Tensor, window: int, sink: int) -> torch.Tensor:
    """The rolling-window half of the visibility rule (broadcasting): j >= e - (window - sink) or j < sink."""
    if window is None or window <= 0:
        return torch.ones(torch.broadcast_shapes(block_end.shape, key_frame.shape), dtype=torch.bool,
                          device=block_end.device)
    return (key_frame >= block_end - (window - sink)) | (key_frame < sink)


def block_causal_frame_mask(
    block_sizes: list[int], window: int = -1, sink: int = 0, device=None
) -> torch.Tensor:
    """Frame-level block-causal mask with optional rolling window and sinks; Bool [F, F] (query, key)."""
    ends = block_ends(block_sizes, device)[:, None]
    keys = torch.arange(int(sum(block_sizes)), device=device)[None, :]
    return (keys < ends) & window_visible(ends, keys, window, sink)


def teacher_forcing_frame_mask(
    block_sizes: list[int], window: int = -1, sink: int = 0, device=None
) -> torch.Tensor:
    """Frame mask for the teacher-forcing layout [clean F frames | noisy F frames]; Bool [2F, 2F].

    Clean queries attend block-causally to clean keys (as the cache is filled). A noisy query in block
    [s, e) attends to the clean frames j < s (inside the window) and to the noisy frames of its own
    block, i.e. exactly what the KV cache holds when that block is denoised.
    """
    n = int(sum(block_sizes))
    ends = block_ends(block_sizes, device)[:, None]
    starts = block_starts(block_sizes, device)[:, None]
    keys = torch.arange(n, device=device)[None, :]
    in_window = window_visible(ends, keys, window, sink)
    clean_clean = (keys < ends) & in_window
    noisy_clean = (keys < starts) & in_window
    noisy_noisy = (keys >= starts) & (keys < ends) & in_window
    mask = torch.zeros(2 * n, 2 * n, dtype=torch.bool, device=device)
    mask[:n, :n] = clean_clean
    mask[n:, :n] = noisy_clean
    mask[n:, n:] = noisy_noisy
    return mask


def expand_frame_mask(frame_mask: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Token-level mask from a frame-level one: every frame becomes ``tokens_per_frame`` rows/cols."""
    return frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


_CUDA_MASKED = "sdpa"  # kernel for masked attention on CUDA: "sdpa" or "flex" (see set_cuda_masked_attention)
_FLEX: dict = {}  # the compiled flex_attention and the block mask of the last token mask seen


def set_cuda_masked_attention(kind: str) -> None:
    """Choose the kernel for *masked* attention on CUDA: ``"sdpa"`` (boolean mask, memory-efficient kernel) or
    ``"flex"`` (torch's compiled flex attention with a block-sparse mask: fully masked 128x128 tiles are skipped).
    Unmasked attention (the KV-cache path, bidirectional forwards) always uses SDPA, which picks flash kernels
    for bf16 on CUDA. CPU is never affected: flex attention has no CPU backward."""
    global _CUDA_MASKED
    if kind not in ("sdpa", "flex"):
        raise ValueError(f"unknown masked-attention kernel {kind!r}; choose sdpa or flex")
    _CUDA_MASKED = kind


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """flex attention on [B, H, N, Dh] tensors with a boolean token mask [Nq, Nk] (CUDA only)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    cached = _FLEX.get("mask")
    if cached is None or cached[0] is not mask:  # one block mask per forward: every layer shares the token mask
        dense = mask

        def mask_mod(b, h, q_idx, kv_idx):
            return dense[q_idx, kv_idx]

        block = create_block_mask(mask_mod, None, None, mask.shape[0], mask.shape[1], device=q.device)
        _FLEX["mask"] = cached = (mask, block)
    return _FLEX["fn"](q, k, v, block_mask=cached[1])


# Up to this many keys (the text of cross-attention), CPU inference attends with two batched matmuls and a softmax:
# SDPA's flash kernel for CPU tiles the keys and costs more when there are only a few dozen of them
# (docs/performance.md).
SHORT_KEYS = 64


def _short_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for [B, N, H, Dh] q and [B, L, H, Dh] k, v with small L; [B, N, H, Dh]."""
    scores = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)).mul_(q.shape[-1] ** -0.5)  # [B, H, N, L]
    return torch.matmul(torch.softmax(scores, -1), v.transpose(1, 2)).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on [B, N, H, Dh] tensors (mask: Bool [Nq, Nk], True = attend); [B, Nq, H, Dh].

    softmax(q k^T / sqrt(Dh)) v through ``scaled_dot_product_attention`` (SDPA with a boolean mask
    works forward and backward on CPU, unlike flex attention). On CUDA a mask may go to flex attention instead
    (:func:`set_cuda_masked_attention`).
    """
    # float32 only: the explicit softmax of a bf16 / fp16 product would round where SDPA accumulates in float
    if mask is None and k.shape[1] <= SHORT_KEYS and cpu_inference(q):
        return _short_key_attention(q, k, v)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is not None and q.is_cuda and _CUDA_MASKED == "flex":
        return _flex_attention(q, k, v, mask).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def prefix_key_ends(frame_mask: torch.Tensor, tokens_per_frame: int) -> torch.Tensor | None:
    """The token-level key prefix lengths [F*T] of a frame mask [F, F] whose every row is a prefix (frame f sees
    frames [0, e_f)): e_f * T for each of frame f's T tokens; None if some row is not a prefix (a local window,
    sinks)."""
    ends = frame_mask.sum(1)
    prefix = torch.arange(frame_mask.shape[1], device=frame_mask.device)[None, :] < ends[:, None]
    if not torch.equal(prefix, frame_mask):
        return None
    return (ends * tokens_per_frame).repeat_interleave(tokens_per_frame)


# ---------------------------------------------------------------------------------------------- how a layer attends
class SelfAttention:
    """How one self-attention layer sees its keys. ``attend`` takes the rotated q, k, v [B, N, H, Dh] of the layer's
    tokens and returns the attention output [B, N', H, Dh] (N' < N when a fused finished chunk only writes its K/V);
    ``store`` writes k, v without attending (the last block of a cache pass)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        raise ValueError(f"{type(self).__name__} has no cache to write K/V into (kv_only needs a kv_cache)")


@dataclass
class FullAttention(SelfAttention):
    """Attend within the given sequence under a boolean token mask (None = everything). ``frame_mask`` [F, F] and
    ``tokens_per_frame``: the frame mask it was expanded from (for kernels that take key prefixes instead of masks,
    :func:`prefix_key_ends`)."""

    mask: torch.Tensor | None = None
    frame_mask: torch.Tensor | None = None
    tokens_per_frame: int = 0

    def attend(self, q, k, v):
        return attention(q, k, v, self.mask)


@dataclass
class CachedAttention(SelfAttention):
    """Write the chunk's K/V into the cache and attend over the filled cache (no gradients).

    With ``pending`` the tokens are [finished chunk | chunk]: the finished chunk's K/V are written first and its
    queries attend over its own view of the cache, then the chunk's (whose write may evict frames the finished
    chunk still sees in a rolling window, hence the order). ``pending_queries=False`` (the last block): the finished
    chunk only writes its K/V and gets no attention output."""

    cache: KVCache
    plan: ChunkPlan
    layer: int
    pending: ChunkPlan | None = None
    pending_queries: bool = True

    def attend(self, q, k, v):
        if self.pending is None:
            return self._attend_one(self.plan, q, k, v)
        n = self.pending.slot_index.numel()
        first = self._attend_one(self.pending, q[:, :n], k[:, :n], v[:, :n], queries=self.pending_queries)
        rest = self._attend_one(self.plan, q[:, n:], k[:, n:], v[:, n:])
        return rest if first is None else torch.cat([first, rest], 1)

    def store(self, k, v):
        self.cache.write(self.layer, self.plan, k, v)

    def _attend_one(self, plan: ChunkPlan, q, k, v, queries: bool = True) -> torch.Tensor | None:
        k_all, v_all = self.cache.write_and_view(self.layer, plan, k, v)
        if not queries:
            return None
        if k_all.dtype != q.dtype and torch.is_autocast_enabled(q.device.type):
            q = q.to(k_all.dtype)  # mixed precision: attend in the cache's precision, never copy the cache
        return attention(q, k_all.to(q.dtype), v_all.to(q.dtype))


@dataclass
class ContextAttention(SelfAttention):
    """Attend over a snapshot of earlier frames' K/V plus the chunk's own (the gradient path of a cached forward)."""

    k: torch.Tensor
    v: torch.Tensor

    def attend(self, q, k, v):
        return attention(q, torch.cat([self.k.to(k.dtype), k], 1), torch.cat([self.v.to(v.dtype), v], 1))
