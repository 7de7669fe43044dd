"""Analytic FLOP counts of the model's hot path, the machine's measured float32 matmul peak, and the allocator setting
that streaming relies on. (The CPU kernels themselves, their timed choice and the switches live in
:mod:`selfforcing.accel.cpu` and :mod:`selfforcing.models.wan.runtime`.)

FLOPs count multiply-adds as 2 and include every matmul (projections, attention scores and values, FFN,
patch embedding, head); elementwise work (norms, RoPE, modulation, softmax) is left out, as is customary.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import time

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = 32 << 20) -> bool:
    """Let glibc malloc keep freed memory for reuse instead of handing it back to the kernel. Returns True if set.

    Why: by default glibc unmaps freed blocks above 128 KB and trims the heap top, so a loop that allocates and
    frees the same activations every step (a chunk step: hundreds of tensors of a few MB) gets its pages from the
    kernel afresh each time: thousands of minor page faults per chunk step, each a zeroed page. With a 32 MB mmap
    threshold (glibc's upper bound) and a 1 GB trim threshold they come from the heap: a handful of faults per
    chunk step at the same peak RSS (the measurements: docs/performance.md). Process-wide and harmless on GPU; the
    ``selfforcing`` CLI calls it once. No-op off glibc or with SELFFORCING_KEEP_FREED_MEMORY=0."""
    if os.environ.get("SELFFORCING_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))


def _layer_flops(config, n: int, m: int, lt: int, cross_kv_cached: bool) -> int:
    """Matmul FLOPs of one transformer block: n query tokens, m self-attention keys, lt text tokens."""
    d = config.num_attention_heads * config.attention_head_dim
    return (
        2 * n * 3 * d * d  # q, k, v projections
        + 2 * 2 * n * m * d  # scores and values
        + 2 * n * d * d  # output projection
        + 2 * n * d * d  # cross-attention query
        + (0 if cross_kv_cached else 2 * 2 * lt * d * d)  # cross-attention K/V of the text
        + 2 * 2 * n * lt * d  # cross-attention scores and values
        + 2 * n * d * d  # cross-attention output
        + 2 * 2 * n * d * config.ffn_dim  # FFN
    )


def _patch_and_head_flops(config, n: int) -> tuple[int, int]:
    d = config.num_attention_heads * config.attention_head_dim
    pixels = config.patch_size[1] * config.patch_size[2]
    return 2 * n * config.in_channels * pixels * d, 2 * n * d * config.out_channels * pixels


def forward_flops(config, query_tokens: int, key_tokens: int, text_tokens: int, cross_kv_cached: bool = True) -> int:
    """Matmul FLOPs of one forward over ``query_tokens`` tokens attending to ``key_tokens`` self-attention keys
    (its own included) and ``text_tokens`` text tokens. With ``cross_kv_cached`` the text K/V projections are not
    recomputed (the cross-attention cache)."""
    patch, head = _patch_and_head_flops(config, query_tokens)
    return patch + config.num_layers * _layer_flops(config, query_tokens, key_tokens, text_tokens,
                                                    cross_kv_cached) + head


def cache_pass_flops(config, query_tokens: int, key_tokens: int, text_tokens: int) -> int:
    """Matmul FLOPs of a cache pass (``model(..., kv_only=True)``): every layer but the last in full, the last
    one only up to its K/V projections (2 x 2 n D^2), no output head: what the cache keeps, nothing more."""
    d = config.num_attention_heads * config.attention_head_dim
    patch, _ = _patch_and_head_flops(config, query_tokens)
    return (patch + (config.num_layers - 1) * _layer_flops(config, query_tokens, key_tokens, text_tokens, True)
            + 2 * 2 * query_tokens * d * d)


def chunk_step_flops(config, tokens_per_frame: int, chunk_frames: int, context_frames: int, text_tokens: int,
                     num_steps: int) -> int:
    """FLOPs of one autoregressive chunk step: ``num_steps`` denoising forwards of the chunk against
    ``context_frames`` cached frames, plus the cache pass of the clean chunk (Algorithm 2's inner loop)."""
    n = chunk_frames * tokens_per_frame
    m = n + context_frames * tokens_per_frame
    return num_steps * forward_flops(config, n, m, text_tokens) + cache_pass_flops(config, n, m, text_tokens)


def rolling_chunk_flops(config, tokens_per_frame: int, chunk_frames: int, window_frames: int, chunk_index: int,
                        text_tokens: int, num_steps: int) -> int:
    """Matmul FLOPs of chunk ``chunk_index`` of a rolling-KV stream as ``StreamingGenerator`` runs it (no sink frames):
    its ``num_steps`` denoising forwards against c_i = min(i K, W - K) cached frames, plus, from the second chunk on,
    the previous chunk's cache pass fused into its first step (against c_{i-1} frames). With K = ``chunk_frames`` and
    W = ``window_frames``; the stream's last cache pass is never run. Chunk W/K - 1 is the first whose steps attend to
    a full window; from chunk W/K on (its fused cache pass too) every chunk costs :func:`chunk_step_flops` with W - K
    context frames. The earlier ones cost less, which is why a video no longer than the window has a lower median
    per-chunk cost than a long one at any efficiency."""
    if chunk_index < 0 or window_frames < chunk_frames or window_frames % chunk_frames:
        raise ValueError(f"chunk {chunk_index} of a stream with a {window_frames}-frame window of "
                         f"{chunk_frames}-frame chunks: need chunk_index >= 0 and a window of whole chunks")
    n = chunk_frames * tokens_per_frame
    context = min(chunk_index * chunk_frames, window_frames - chunk_frames)
    flops = num_steps * forward_flops(config, n, n + context * tokens_per_frame, text_tokens)
    if chunk_index > 0:
        previous = min((chunk_index - 1) * chunk_frames, window_frames - chunk_frames)
        flops += cache_pass_flops(config, n, n + previous * tokens_per_frame, text_tokens)
    return flops


def matmul_peak_gflops(size: int | None = None, repeats: int = 20, dtype=None, device: str = "cpu",
                       warmup: int = 3) -> float:
    """Best observed matmul throughput (GFLOP/s) of ``size`` x ``size`` products in ``dtype`` on ``device``
    (default size: 1024 on CPU, 8192 on a GPU, large enough to reach the tensor-core peak)."""
    import torch

    dtype = dtype or torch.float32
    size = size or (1024 if str(device) == "cpu" else 8192)
    cuda = str(device) != "cpu"
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(warmup):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9
