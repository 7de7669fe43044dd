"""Attention masks at frame granularity, and the attention call itself.

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

import torch
import torch.nn.functional as F


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on [B, N, H, Dh] tensors (mask: Bool [Nq, Nk], True = attend); [B, Nq, H, Dh].

    softmax(q k^T / sqrt(Dh)) v through ``scaled_dot_product_attention`` (SDPA with a boolean mask
    works forward and backward on CPU, unlike flex attention).
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
