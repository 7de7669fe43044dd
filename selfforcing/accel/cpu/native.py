"""Native blocks: a CPU inference forward, from the patch embedding to the output head, run by C++.

Why. The small preset's chunk step is thousands of short torch ops. Run from Python, each one pays the interpreter,
module calls and argument parsing on top of the kernel; on this project's 2-core VM that was a sizeable share of a
chunk step (docs/performance.md). ``csrc/native_blocks.cpp`` runs the same products (BLAS, oneDNN, SDPA) in the
same order from C++ with the GIL released, and fuses everything between them into one pass over the rows each time:
the adaLN LayerNorm with its modulation, each projection's bias with the pass that first reads its output (the q/k
RMSNorm with the RoPE rotation, the cache write of v, the residual updates), each residual update with the norm that
follows it, the feature-major FFN's bias with its tanh-GELU, and the attention over a prompt's few text tokens in
registers. The result equals the Python blocks to float rounding (tests/test_native_blocks.py). The time embedding
(cached per timestep), the RoPE table (cached), the cache plan and the sampler stay in Python.

Built with torch's extension builder (``torch.utils.cpp_extension.load``, the machine's C++ compiler) at the first
use in a process (a C++ compile), and cached under :func:`build_directory` for later processes
(``make install`` builds it). If it cannot be built, a warning says why once and the Python blocks run.

Where. Like the timed FFN choice, only while the CPU accelerator is installed
(:func:`selfforcing.accel.cpu.timed_kernel_choice`: streaming inference, the benchmarks), for a float32 CPU forward
without gradients, against a KV cache (streaming) or without one,
bidirectional or block-causal (``bench stream``'s recompute and sliding-window strategies); a local attention
window, sinks in a cache-less mask, teacher forcing and hidden-layer taps stay in Python. Training keeps the path it
has always taken, bit for bit. ``SELFFORCING_CPU_BLOCKS`` = ``auto`` (default: native when it builds) | ``native``
| ``python``.

The arguments cross as one :class:`NativeForward`, read by name. The C++ mirrors ``CausalWanBlock.forward`` on that
path op for op; a change to one must be made to the other, and
the equality test fails if they drift apart.
"""

from __future__ import annotations

import functools
import operator
import os
import threading
import warnings
from dataclasses import dataclass

import torch

from ...models.wan.attention import SHORT_KEYS, CachedAttention, FullAttention, prefix_key_ends
from ...models.wan.blocks import rms_norm_eps
from . import ffn as ffn_kernels

BLOCKS_ENV = "SELFFORCING_CPU_BLOCKS"
BLOCKS_SETTINGS = ("auto", "native", "python")
SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "native_blocks.cpp")
# -fno-trapping-math lets the fused GELU loop vectorise (no -ffast-math: GCC < 13 would link crtfastmath.o and flush
# denormals to zero for the whole process); -fopenmp makes at::parallel_for parallel, on the libgomp.so.1 that torch
# has already loaded (same soname, so the loader binds the extension to it)
_CFLAGS = ["-O3", "-fno-trapping-math", "-fopenmp"]
EXTENSION_NAME = "selfforcing_cpu_blocks"
_LOCK = threading.Lock()
_STATE: dict = {}


def blocks_setting() -> str:
    """``SELFFORCING_CPU_BLOCKS``; a bad value is a ValueError that names the variable."""
    value = os.environ.get(BLOCKS_ENV, "auto")
    if value not in BLOCKS_SETTINGS:
        raise ValueError(f"{BLOCKS_ENV}={value!r}: expected one of {', '.join(BLOCKS_SETTINGS)}")
    return value


def build_directory() -> str:
    """Where the compiled extension is cached: under ``$SELFFORCING_BUILD_DIR`` or ``~/.cache/selfforcing``, one folder
    per torch version and extension."""
    root = os.environ.get("SELFFORCING_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "selfforcing")
    return os.path.join(root, "torch-" + torch.__version__.replace("+", "-"), EXTENSION_NAME)


def extension(verbose: bool = False):
    """The compiled extension (built at the first call in a process if it is not cached), or None if it cannot be
    built: then a RuntimeWarning names the error, once, and :func:`build_error` returns it."""
    with _LOCK:
        if "module" not in _STATE:
            try:
                from torch.utils.cpp_extension import load

                path = build_directory()
                os.makedirs(path, exist_ok=True)
                _STATE["module"] = load(name=EXTENSION_NAME, sources=[SOURCE], extra_cflags=_CFLAGS,
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
    in L1 and it beat MKL (at Wan's widths it lost; the measurements are in docs/performance.md): so the small presets'
    projections, not Wan's, whose weights are then not copied either."""
    return w.shape[0] % 16 == 0 and w.shape[1] <= 512


def _params(model) -> list[torch.Tensor]:
    """All blocks' parameters, flat, an absent one as an empty tensor, and per block the attention projections'
    weights transposed to [in, out] (``enum W`` in native_blocks.cpp: its register-tile GEMM reads them so). Kept
    between forwards and checked against the modules' own parameter slots: by identity (a replaced parameter, as by a
    load with ``assign=True``, is picked up) and, for the transposed copies, by in-place version (an optimizer step or
    a ``load_state_dict`` into the parameters makes new copies). One C-level pass of lookups, far cheaper
    than walking ``parameters()`` every forward (docs/performance.md)."""
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


@dataclass
class NativeForward:
    """The arguments of the C++ ``run_forward``, by name (it reads these attributes): a no-grad forward from the
    patch embedding on. ``latents``: the chunks [B, f, C, H, W] in sequence order (a fused finished chunk first);
    ``positions`` [N, D] (absolute embeddings) or [B, N, D] (with a caption layout) added to the tokens (empty: none);
    ``e`` [B, F, 6, D] the blocks' modulation and ``temb`` [B, F, D] the head's, of all frames; ``rope`` [F*T, Dh/2, 2];
    ``weights``: every block's parameters, flat (:func:`_params`); ``text_k`` / ``text_v``: each block's text K/V
    [B, L, H, Dh]; the cache buffers with the chunk's plan (``slots``, ``visible``, ``read_index``) and the fused
    finished chunk's (``pending_*``), all empty for a cache-less forward, which may give ``key_ends`` (query i sees
    keys [0, key_ends[i])); ``ffn_onednn``: which FFN kernel."""

    latents: list
    patch_weight: torch.Tensor
    patch_bias: torch.Tensor
    patch_h: int
    patch_w: int
    positions: torch.Tensor
    e: torch.Tensor
    temb: torch.Tensor
    rope: torch.Tensor
    weights: list
    text_k: list
    text_v: list
    cache_k: torch.Tensor
    cache_v: torch.Tensor
    slots: torch.Tensor
    visible: int
    read_index: torch.Tensor
    pending_slots: torch.Tensor
    pending_visible: int
    pending_read_index: torch.Tensor
    kv_only: bool
    heads: int
    ln_eps: float
    rms_eps: float
    short_keys: int
    cross_norm: bool
    ffn_onednn: bool
    head_table: torch.Tensor
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor
    head_eps: float
    key_ends: torch.Tensor


_NONE = torch.empty(0, dtype=torch.long)


def _attention_fields(plan) -> dict | None:
    """The attention half of :class:`NativeForward`, or None where C++ cannot attend that way. A cached forward
    without gradients against a float32 cache: the buffers and plans. A cache-less forward: nothing, or the key
    prefixes of a block-causal mask (not of a local window or sinks, nor of teacher forcing's mask)."""
    how = plan.attn[0]
    if isinstance(how, CachedAttention):
        if how.cache.dtype != torch.float32:
            return None
        chunk, pending = how.plan, how.pending
        return dict(cache_k=how.cache.k, cache_v=how.cache.v, slots=chunk.slot_index, visible=chunk.visible_tokens,
                    read_index=_index(chunk.read_index), pending_slots=_NONE if pending is None else pending.slot_index,
                    pending_visible=0 if pending is None else pending.visible_tokens,
                    pending_read_index=_NONE if pending is None else _index(pending.read_index), key_ends=_NONE)
    if not isinstance(how, FullAttention):  # a cached forward with gradients
        return None
    ends = _NONE
    if how.mask is not None:
        ends = None if how.frame_mask is None else prefix_key_ends(how.frame_mask, how.tokens_per_frame)
        if ends is None:
            return None
    return dict(cache_k=torch.empty(0), cache_v=torch.empty(0), slots=_NONE, visible=0, read_index=_NONE,
                pending_slots=_NONE, pending_visible=0, pending_read_index=_NONE, key_ends=ends)


def _index(t: torch.Tensor | None) -> torch.Tensor:
    return _NONE if t is None else t


def _model_supported(model, plan) -> bool:
    """A float32 model without autocast, no hidden-layer taps, no teacher forcing; then the setting and the build
    decide (:func:`available`)."""
    return (plan.taps is None and not plan.teacher_forcing and model.proj_out.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and available())


def _text_kv(model, plan) -> list:
    """Every block's text (K, V): this forward's, or the cross-attention cache's (filled first for a new prompt)."""
    if plan.kv_cache is None:
        return [blk.attn2.project_kv(plan.ctx) for blk in model.blocks]
    for blk, slot in zip(model.blocks, plan.cross):
        if slot.get() is None:
            slot.set(blk.attn2.project_kv(plan.ctx))
    return [slot.get() for slot in plan.cross]


@functools.lru_cache(maxsize=16)
def _probe(rows: int, dim: int) -> torch.Tensor:
    """Random tokens [rows, dim] to time the FFN kernels on (made once per shape; only the shape is used as a key)."""
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))


def ffn_uses_onednn(ffn, rows: int) -> bool:
    """Which FFN kernel the C++ blocks run for ``rows`` tokens: oneDNN's (True) or the feature-major one with the
    fused bias + GELU, chosen as the Python FFN's is (:func:`selfforcing.accel.cpu.ffn.choose`, the C++ kernels timed
    on random tokens under the key ``native_ffn``)."""
    ext, up, down = extension(), ffn.net[0].proj, ffn.net[2]
    candidates = {name: (lambda h, o=(name == "onednn"): ext.feed_forward(h, up.weight, up.bias, down.weight,
                                                                           down.bias, o))
                  for name in ffn_kernels.kernels(ffn)}
    return ffn_kernels.choose(ffn, _probe(rows, up.in_features), candidates, "native_ffn") == "onednn"


def forward(model, plan) -> torch.Tensor | None:
    """``model``'s planned no-grad forward (:class:`~selfforcing.models.wan.model.ForwardPlan`) from the patch
    embedding on, in C++: the flow prediction v [B, f, C_out, H, W] of the last chunk, or None for ``kv_only``;
    NotImplemented where C++ does not run it."""
    fields = _attention_fields(plan)
    if fields is None or not _model_supported(model, plan):
        return NotImplemented
    text_kv = _text_kv(model, plan)
    blk, patch = model.blocks[0], model.patch_embedding
    rows = plan.e.shape[0] * plan.e.shape[1] * plan.tokens_per_frame
    args = NativeForward(
        latents=plan.latents, patch_weight=patch.weight.flatten(1), patch_bias=patch.bias,
        patch_h=model.config.patch_size[1], patch_w=model.config.patch_size[2],
        positions=torch.empty(0) if plan.positions is None else plan.positions.float().contiguous(), e=plan.e.float(),
        temb=plan.temb.float(), rope=plan.rope, weights=_params(model), text_k=[k for k, _ in text_kv],
        text_v=[v for _, v in text_kv], kv_only=plan.kv_only, heads=blk.attn1.heads, ln_eps=blk.norm1.eps,
        rms_eps=rms_norm_eps(blk.attn1.norm_q, torch.float32), short_keys=SHORT_KEYS,
        cross_norm=isinstance(blk.norm2, torch.nn.LayerNorm), ffn_onednn=ffn_uses_onednn(blk.ffn, rows),
        head_table=model.scale_shift_table, proj_weight=model.proj_out.weight, proj_bias=model.proj_out.bias,
        head_eps=model.norm_out.eps, **fields)
    return run(args)


def run(args: NativeForward) -> torch.Tensor | None:
    """Run :class:`NativeForward` in C++ (the GIL released); None for ``kv_only``."""
    out = extension().run_forward(args)
    return None if args.kv_only else out


def main() -> int:
    """Build the extension now, if it is not cached (``make install`` runs this)."""
    ext = extension(verbose=False)
    if ext is None:
        print(f"native blocks: not built ({build_error()}); the Python blocks will run")
        return 0
    print(f"native blocks: built in {build_directory()}")
    return 0

