"""Native blocks: a CPU inference forward, from the patch embedding to the output head, run by C++.

Why. The small preset's chunk step is ~3,500 short torch ops. Run from Python, each one pays the interpreter,
module calls and argument parsing on top of the kernel; on this project's 2-core VM that was 30-70 ms of a
250-450 ms step (README, Performance). ``csrc/native_blocks.cpp`` runs the same products (BLAS, oneDNN, SDPA) in the
same order from C++ with the GIL released, and fuses everything between them into one pass over the rows each time:
the adaLN LayerNorm with its modulation, each projection's bias with the pass that first reads its output (the q/k
RMSNorm with the RoPE rotation, the cache write of v, the residual updates), each residual update with the norm that
follows it, the feature-major FFN's bias with its tanh-GELU, and the attention over a prompt's few text tokens in
registers. The result equals the Python blocks to float rounding (tests/test_native_blocks.py). The time embedding
(cached per timestep), the RoPE table (cached), the cache plan and the sampler stay in Python.

Built with torch's extension builder (``torch.utils.cpp_extension.load``, the machine's C++ compiler) at the first
use in a process, about a minute on a 2-core machine, and cached under :func:`build_directory` for later processes
(``make install`` builds it). If it cannot be built, a warning says why once and the Python blocks run.

Where. Like the timed FFN choice, only within :func:`selfforcing.perf.timed_kernel_choice` (streaming inference,
the benchmarks), for a float32 CPU forward without gradients, against a KV cache (streaming) or without one,
bidirectional or block-causal (``bench stream``'s recompute and sliding-window strategies); a local attention
window, sinks in a cache-less mask, teacher forcing and hidden-layer taps stay in Python. Training keeps the path it
has always taken, bit for bit. ``SELFFORCING_CPU_BLOCKS`` = ``auto`` (default: native when it builds) | ``native``
| ``python``.

The C++ mirrors ``CausalWanBlock.forward`` on that path op for op; a change to one must be made to the other, and
the equality test fails if they drift apart.
"""

from __future__ import annotations

import functools
import operator
import os
import threading
import warnings

import torch

BLOCKS_ENV = "SELFFORCING_CPU_BLOCKS"
BLOCKS_SETTINGS = ("auto", "native", "python")
SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "native_blocks.cpp")
# -fno-trapping-math lets the fused GELU loop vectorise (no -ffast-math: GCC < 13 would link crtfastmath.o and flush
# denormals to zero for the whole process); -fopenmp makes at::parallel_for parallel, on the libgomp.so.1 that torch
# has already loaded (same soname, so the loader binds the extension to it)
_CFLAGS = ["-O3", "-fno-trapping-math", "-fopenmp"]
_LOCK = threading.Lock()
_STATE: dict = {}


def blocks_setting() -> str:
    """``SELFFORCING_CPU_BLOCKS``; a bad value is a ValueError that names the variable."""
    value = os.environ.get(BLOCKS_ENV, "auto")
    if value not in BLOCKS_SETTINGS:
        raise ValueError(f"{BLOCKS_ENV}={value!r}: expected one of {', '.join(BLOCKS_SETTINGS)}")
    return value


def build_directory() -> str:
    """Where the compiled extension is cached: ``$SELFFORCING_BUILD_DIR`` or ``~/.cache/selfforcing``, one folder per
    torch version."""
    root = os.environ.get("SELFFORCING_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "selfforcing")
    return os.path.join(root, "torch-" + torch.__version__.replace("+", "-"))


def extension(verbose: bool = False):
    """The compiled extension (built at the first call in a process if it is not cached), or None if it cannot be
    built: then a RuntimeWarning names the error, once, and :func:`build_error` returns it."""
    with _LOCK:
        if "module" not in _STATE:
            try:
                from torch.utils.cpp_extension import load

                path = build_directory()
                os.makedirs(path, exist_ok=True)
                _STATE["module"] = load(name="selfforcing_native_blocks", sources=[SOURCE], extra_cflags=_CFLAGS,
                                        extra_ldflags=["-fopenmp"], build_directory=path, verbose=verbose)
            except Exception as err:  # noqa: BLE001 - whatever failed, the Python blocks still run
                _STATE["module"], _STATE["error"] = None, err
                warnings.warn(f"native blocks are off, the Python blocks run: building {SOURCE} failed "
                              f"({type(err).__name__}: {str(err).strip()[-500:]})", RuntimeWarning, stacklevel=2)
        return _STATE["module"]


def build_error() -> BaseException | None:
    """Why :func:`extension` returned None (None if it built or was not tried)."""
    return _STATE.get("error")


def available() -> bool:
    """Whether the setting allows native blocks and the extension is built (building it if needed). With
    ``SELFFORCING_CPU_BLOCKS=native`` a failed build is a RuntimeError that says why (``auto`` warns and falls back)."""
    setting = blocks_setting()
    if setting == "python":
        return False
    built = extension() is not None
    if not built and setting == "native":
        raise RuntimeError(f"{BLOCKS_ENV}=native, but the C++ blocks could not be built: {build_error()}")
    return built


def ffn_uses_onednn(ffn, rows: int) -> bool:
    """Which FFN kernel the C++ blocks run for ``rows`` tokens: oneDNN's (True) or the feature-major one with the
    fused bias + GELU, chosen as the Python FFN chooses (:meth:`FeedForward.cpu_kernel`: ``SELFFORCING_CPU_FFN``, or
    under ``auto`` the faster of the two C++ FFNs, timed on random tokens at the first call of each shape, key
    ``native_ffn``)."""
    ext, up, down = extension(), ffn.net[0].proj, ffn.net[2]
    candidates = {name: (lambda h, o=(name == "onednn"): ext.feed_forward(h, up.weight, up.bias, down.weight,
                                                                           down.bias, o))
                  for name in ffn._paths()}  # oneDNN only where this torch build has it
    return ffn.cpu_kernel(_probe(rows, up.in_features), candidates, "native_ffn") == "onednn"


@functools.lru_cache(maxsize=16)
def _probe(rows: int, dim: int) -> torch.Tensor:
    """Random tokens [rows, dim] to time the FFN kernels on (made once per shape; only the shape is used as a key)."""
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))


def _layer_slots(block) -> list[tuple[torch.nn.Module, str] | None]:
    """Where one block's parameters live, (module, name), in the order of ``enum W`` in native_blocks.cpp (None:
    a LayerNorm the block does not have)."""
    a1, a2, ffn = block.attn1, block.attn2, block.ffn
    norm2 = block.norm2 if isinstance(block.norm2, torch.nn.LayerNorm) else None
    return [
        (block, "scale_shift_table"),
        (a1.to_q, "weight"), (a1.to_q, "bias"), (a1.to_k, "weight"), (a1.to_k, "bias"), (a1.to_v, "weight"),
        (a1.to_v, "bias"), (a1.to_out[0], "weight"), (a1.to_out[0], "bias"), (a1.norm_q, "weight"),
        (a1.norm_k, "weight"), None if norm2 is None else (norm2, "weight"), None if norm2 is None else (norm2, "bias"),
        (a2.to_q, "weight"), (a2.to_q, "bias"), (a2.to_out[0], "weight"), (a2.to_out[0], "bias"),
        (a2.norm_q, "weight"),
        (ffn.net[0].proj, "weight"), (ffn.net[0].proj, "bias"), (ffn.net[2], "weight"), (ffn.net[2], "bias"),
    ]


# the attention projections whose weights C++ also reads transposed (enum W: Q_T .. CO_T), by position in a block's
# _layer_slots
_TRANSPOSED = (1, 3, 5, 7, 13, 15)


def _tile_gemm_pays(w: torch.Tensor) -> bool:
    """Whether C++ runs the projection with weight ``w`` [out, in] through its register-tile GEMM (on a transposed
    copy): output width a multiple of 16, and an input width up to 512, where the tile's panel of the weight stays
    in L1 and it beat MKL (117 vs 101 GFLOP/s at 256; at 1536 it lost, 87 vs 116): so the small presets' projections,
    not Wan's, whose weights are then not copied either."""
    return w.shape[0] % 16 == 0 and w.shape[1] <= 512


def _params(model) -> list[torch.Tensor]:
    """All blocks' parameters, flat, an absent one as an empty tensor, and per block the attention projections'
    weights transposed to [in, out] (``enum W`` in native_blocks.cpp: its register-tile GEMM reads them so). Kept
    between forwards and checked against the modules' own parameter slots: by identity (a replaced parameter, as by a
    load with ``assign=True``, is picked up) and, for the transposed copies, by in-place version (an optimizer step or
    a ``load_state_dict`` into the parameters makes new copies). One C-level pass of lookups, ~20 us for 6 blocks;
    walking ``parameters()`` took 0.44 ms per forward."""
    cached = getattr(model, "_native_block_params", None)
    if cached is not None:
        dicts, names, found, copied, versions, flat = cached
        if (all(map(operator.is_, map(dict.get, dicts, names), found))
                and list(map(operator.attrgetter("_version"), copied)) == versions):
            return flat
    empty = torch.empty(0)
    per_block = [_layer_slots(blk) for blk in model.blocks]
    slots = [slot for blk_slots in per_block for slot in blk_slots if slot is not None]
    dicts, names = [m._parameters for m, _ in slots], [name for _, name in slots]
    found = [d.get(name) for d, name in zip(dicts, names)]
    flat, copied = [], []
    for blk_slots in per_block:
        tensors = [None if slot is None else slot[0]._parameters.get(slot[1]) for slot in blk_slots]
        flat += [empty if t is None else t for t in tensors]
        for i in _TRANSPOSED:
            w = tensors[i]
            copied.append(w)
            flat.append(w.detach().t().contiguous() if _tile_gemm_pays(w) else empty)
    versions = [w._version for w in copied]
    model._native_block_params = (dicts, names, found, copied, versions, flat)
    return flat


def run_forward(model, latents: list, e: torch.Tensor, temb: torch.Tensor, rope: torch.Tensor, hows: list,
                text_kv: list, kv_only: bool, ffn_onednn: bool) -> torch.Tensor | None:
    """``model``'s forward from the patch embedding on, as ``CausalWanModel.forward`` runs it on a no-grad forward:
    ``latents`` the chunks [B, f, C, H, W] in sequence order (a fused finished chunk first), ``hows`` the per-block
    attention, the same for every block: a :class:`~selfforcing.models.causal_wan.CachedAttention` (cache, plan and
    fused finished chunk) or a :class:`~selfforcing.models.causal_wan.FullAttention` without a mask or with its
    ``key_ends`` (a cache-less forward over the whole sequence), ``text_kv`` each block's text (K, V) [B, L, H, Dh],
    ``e`` [B, F, 6, D] the blocks' modulation and ``temb`` [B, F, D] the head's, of all frames, ``rope``
    [F*T, Dh/2, 2] the RoPE table, ``ffn_onednn`` which FFN kernel. Returns the flow prediction v [B, f, C_out, H, W]
    of the last chunk, or None for ``kv_only``."""
    from .attention import _SHORT_KEYS
    from .causal_wan import CachedAttention, rms_norm_eps

    how = hows[0]
    empty = torch.empty(0, dtype=torch.long)
    if isinstance(how, CachedAttention):
        cache, plan, pending = how.cache, how.plan, how.pending
        cache_k, cache_v, key_ends = cache.k, cache.v, empty
    else:
        cache_k = cache_v = torch.empty(0)
        plan = pending = None
        key_ends = empty if how.key_ends is None else how.key_ends
    if any(kv is None for kv in text_kv):
        raise RuntimeError("native blocks need every block's cross-attention K/V cached first")
    blk = model.blocks[0]
    eps = rms_norm_eps(blk.attn1.norm_q, torch.float32)
    patch = model.patch_embedding

    def opt(t):
        return empty if t is None else t

    return extension().run_forward(
        latents, patch.weight.flatten(1), patch.bias, model.config.patch_size[1], model.config.patch_size[2],
        e.float(), temb.float(), rope, _params(model), [k for k, _ in text_kv], [v for _, v in text_kv], cache_k,
        cache_v, empty if plan is None else plan.slot_index, 0 if plan is None else plan.visible_tokens,
        empty if plan is None else opt(plan.read_index),
        empty if pending is None else pending.slot_index, 0 if pending is None else pending.visible_tokens,
        empty if pending is None else opt(pending.read_index), kv_only, blk.attn1.heads, blk.norm1.eps, eps,
        _SHORT_KEYS, isinstance(blk.norm2, torch.nn.LayerNorm), ffn_onednn, model.scale_shift_table,
        model.proj_out.weight, model.proj_out.bias, model.norm_out.eps, key_ends)


def main() -> int:
    """Build the extension now, if it is not cached (``make install`` runs this)."""
    ext = extension(verbose=False)
    if ext is None:
        print(f"native blocks: not built ({build_error()}); the Python blocks will run")
        return 0
    print(f"native blocks: built in {build_directory()}")
    return 0

