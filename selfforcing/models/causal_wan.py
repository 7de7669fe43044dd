"""The Wan2.1 video DiT, made block-causal, with a KV cache: one module for every mode.

Modes of :meth:`CausalWanModel.forward` (latents are always [B, F, C, H, W]):

* bidirectional (``causal=False``): full attention over all frames, exactly
  ``diffusers.WanTransformer3DModel`` (the teacher, the DMD real/fake scores);
* block-causal (``causal=True``): frames in blocks of ``num_frame_per_block``; a block attends to
  itself and to earlier blocks (inside the rolling window with sinks, if configured);
* teacher forcing (``clean_x=...``): the clean frames and the noisy frames in one sequence, each noisy
  block attending to the clean blocks before it and to itself;
* KV cache (``kv_cache=...``): one chunk at a time, attending to the cached earlier frames; ``kv_only`` for a
  cache pass alone, ``pending_x`` to run the previous chunk's cache pass in the same forward (fused).

Every frame gets its own adaLN modulation from its own timestep ([B, F] timesteps). State-dict keys
and shapes are those of ``diffusers.WanTransformer3DModel`` with the same config, so weights move
between the two with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..perf import cpu_shortcuts_enabled, fastest_name, timed_choice_enabled
from .attention import (
    attention,
    block_causal_frame_mask,
    block_sizes_for,
    expand_frame_mask,
    teacher_forcing_frame_mask,
)
from . import native_blocks
from .kv_cache import ChunkPlan, KVCache
from .presets import preset_config
from .state_dict_adapter import load_checkpoint_file


# ---------------------------------------------------------------------------------------------- layers
@functools.lru_cache(maxsize=16)
def _unit_gain(shape: tuple[int, ...], device: str) -> torch.Tensor:
    return torch.ones(shape, device=device)


def _fp32_layer_norm(x: torch.Tensor, norm: nn.LayerNorm | nn.Identity) -> torch.Tensor:
    """LayerNorm computed in float32 (as Wan does), returned in float32.

    A norm without affine parameters gets an all-ones gain on CPU: torch's CPU LayerNorm kernel runs about 2.2x
    slower when both gain and bias are absent (98 vs 44 us for [384, 256], torch 2.13) and computes the very same
    values with a unit gain (bit-identical, tests/test_perf.py)."""
    if isinstance(norm, nn.Identity):
        return x.float()
    w = norm.weight.float() if norm.weight is not None else None
    b = norm.bias.float() if norm.bias is not None else None
    if w is None and b is None and _cpu_inference(x):
        w = _unit_gain(tuple(norm.normalized_shape), str(x.device))
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps)


def _cpu_inference(x: torch.Tensor) -> bool:
    """Whether the CPU inference shortcuts apply: float32 on CPU, no autograd, not being traced by torch.compile,
    not switched off (:func:`selfforcing.perf.plain_pytorch`)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and cpu_shortcuts_enabled())


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim/2)); t [N] -> [N, dim].

    Computed in float32 exactly as diffusers' ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class _MLP2(nn.Module):
    """Linear -> activation -> Linear, with diffusers' parameter names linear_1 / linear_2."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, act: nn.Module) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden)
        self.act = act
        self.linear_2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb [N, D], 6-way modulation [N, 6D]); text states [B, L, text_dim] -> [B, L, D]."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = _MLP2(freq_dim, dim, dim, nn.SiLU())
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = _MLP2(text_dim, dim, dim, nn.GELU(approximate="tanh"))
        self._time_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # see embed_time
        self._time_state: tuple = ()

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [N] -> (temb [N, D], the modulation [N, 6D]): temb = MLP(sinusoid(t)), modulation = W SiLU(temb) + b.

        Without autograd on CPU the result is kept per timestep vector (a small LRU, checked against the identity and
        version of every parameter it was computed with): a stream asks for the same few timesteps every chunk, and
        for a few timesteps these small matmuls are memory-bound, 0.5-1.5 ms per forward on a 2-core CPU."""
        cacheable = (t.device.type == "cpu" and t.numel() <= 4096 and not torch.is_grad_enabled()
                     and not torch.compiler.is_compiling())
        if cacheable:
            params = (self.time_embedder.linear_1.weight, self.time_embedder.linear_1.bias,
                      self.time_embedder.linear_2.weight, self.time_embedder.linear_2.bias, self.time_proj.weight,
                      self.time_proj.bias)
            # the parameters themselves are held (so their ids stay theirs) with where their data lives and their
            # in-place version: a replaced, moved, converted or updated parameter empties the cache
            state = tuple((p, p.data_ptr(), p._version, p.dtype) for p in params)
            if len(state) != len(self._time_state) or any(
                    a[0] is not b[0] or a[1:] != b[1:] for a, b in zip(state, self._time_state)):
                self._time_cache.clear()
                self._time_state = state
            key = (t.dtype, tuple(t.tolist()))
            hit = self._time_cache.pop(key, None)
            if hit is not None:
                self._time_cache[key] = hit  # most recently used last
                return hit
        sinus = timestep_sinusoid(t, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(sinus)
        out = temb, self.time_proj(self.act_fn(temb))
        if cacheable:
            if len(self._time_cache) >= 32:
                self._time_cache.pop(next(iter(self._time_cache)))
            self._time_cache[key] = out
        return out


_GELU_K = 2.0 * math.sqrt(2.0 / math.pi)


@functools.lru_cache(maxsize=4)
def _gelu_k(device: str) -> torch.Tensor:
    return torch.tensor(_GELU_K, device=device)


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, in place and without autograd: 0.5 x (1 + tanh(z)) = x sigmoid(2 z) with
    z = sqrt(2 / pi) (x + 0.044715 x^3), computed as x sigmoid(x (k + 0.044715 k x^2)), k = 2 sqrt(2 / pi): four
    passes over x (addcmul, mul, sigmoid, mul). On CPU about 2.1x faster than torch's tanh-GELU kernel (0.55 vs 1.18 ms
    for [1536, 384]; the seven-pass form it replaced took 0.70 ms) and equal to it to float rounding
    (tests/test_perf.py); elsewhere torch's kernel is used."""
    if not _cpu_inference(x):
        return torch._C._nn.gelu_(x, approximate="tanh")
    z = torch.addcmul(_gelu_k(str(x.device)), x, x, value=_GELU_K * 0.044715)
    return x.mul_(z.mul_(x).sigmoid_())


def _linear_pointwise(*args):
    return torch.ops.mkldnn._linear_pointwise(*args)


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's fused linear + pointwise op for float32 CPU tensors (x86 builds do;
    others fall back to BLAS). Probed once by running it on a tiny input."""
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        out = _linear_pointwise(x, w, torch.zeros(4), "gelu", [], "tanh")
        return tuple(out.shape) == (2, 4)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


CPU_FFN_SETTINGS = ("auto", "onednn", "feature_major")


def cpu_ffn_setting() -> str:
    """SELFFORCING_CPU_FFN: which kernel runs the FFN in CPU float32 inference. ``auto`` (the default): the faster
    one, timed at the first call of each shape, inside :func:`selfforcing.perf.timed_kernel_choice` (streaming
    inference), and oneDNN elsewhere (training rollouts stay bit-reproducible). ``onednn`` falls back to
    ``feature_major`` on builds without oneDNN."""
    value = os.environ.get("SELFFORCING_CPU_FFN", "auto")
    if value not in CPU_FFN_SETTINGS:
        raise ValueError(f"SELFFORCING_CPU_FFN={value!r}: expected one of {', '.join(CPU_FFN_SETTINGS)}")
    return value


class _GELUProj(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.gelu(self.proj(x), approximate="tanh")
        return gelu_tanh_(self.proj(x))


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear, named net.0.proj / net.2 as in diffusers."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, ffn_dim), nn.Dropout(0.0), nn.Linear(ffn_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D]: W2 gelu(W1 x + b1) + b2."""
        if _cpu_inference(x):
            return self._forward_cpu_inference(x)
        return self.net[2](self.net[0](x))

    def _forward_cpu_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Within :func:`selfforcing.perf.timed_kernel_choice` the faster of :meth:`_forward_onednn` and
        :meth:`_forward_feature_major` for this shape and thread count, timed once per process
        (:func:`selfforcing.perf.fastest_name`): which one wins changes with the state of a shared machine (README,
        Performance). Elsewhere oneDNN. ``SELFFORCING_CPU_FFN=onednn|feature_major`` fixes the choice."""
        paths = self._paths()
        return paths[self.cpu_kernel(x, paths)](x)

    def _paths(self) -> dict:
        paths = {"onednn": self._forward_onednn, "feature_major": self._forward_feature_major}
        if not onednn_linear_available():
            del paths["onednn"]
        return paths

    def cpu_kernel(self, x: torch.Tensor, paths: dict | None = None, kind: str = "cpu_ffn") -> str:
        """The kernel that CPU float32 inference runs on ``x`` [..., D]: ``onednn`` or ``feature_major`` (see
        :meth:`_forward_cpu_inference`; timed at the first call of a shape within timed_kernel_choice). ``paths``:
        the implementations to time, by those names (default: this module's; the C++ blocks pass theirs, under
        another ``kind`` of key)."""
        paths = self._paths() if paths is None else paths
        setting = cpu_ffn_setting()
        if setting == "auto" and not timed_choice_enabled():
            setting = "onednn"
        if setting != "auto":
            return setting if setting in paths else "feature_major"
        key = (kind, x.numel() // x.shape[-1], self.net[0].proj.in_features, self.net[0].proj.out_features,
               torch.get_num_threads())
        return fastest_name(key, paths, (x,))

    def _forward_onednn(self, x: torch.Tensor) -> torch.Tensor:
        """The same FFN through oneDNN's matmul with the tanh-GELU fused into the first product (the activation is
        applied to each output tile while it is still in cache, instead of 7 passes over the [N, ffn_dim] hidden
        state): about 13% less time than :meth:`_forward_feature_major` for the small preset's chunk of 192 tokens,
        the same function to float rounding (tests/test_perf.py)."""
        up, down = self.net[0].proj, self.net[2]
        h = _linear_pointwise(x.reshape(-1, x.shape[-1]), up.weight, up.bias, "gelu", [], "tanh")
        return _linear_pointwise(h, down.weight, down.bias, "none", [], "").view(*x.shape[:-1], down.out_features)

    def _forward_feature_major(self, x: torch.Tensor) -> torch.Tensor:
        """The same FFN computed on transposed activations, h^T = W1 x^T + b1 (a [ffn_dim, N] matrix), because CPU
        BLAS runs W1 [ffn_dim, D] @ x^T [D, N] about 1.2-1.5x faster than x [N, D] @ W1^T for the chunk-sized N of
        streaming (a few hundred tokens; measured in benchmarks/results/chunk_step_small.json). Each output element
        is the same dot product, so the result equals the token-major path (tests/test_perf.py). The output is a
        transposed view [..., D] (stride 1 along the tokens); callers treat it like any tensor."""
        up, down = self.net[0].proj, self.net[2]
        xt = x.reshape(-1, x.shape[-1]).t()  # [D, N] view
        h = torch.addmm(up.bias[:, None], up.weight, xt)  # [ffn_dim, N]
        h = gelu_tanh_(h)
        yt = torch.addmm(down.bias[:, None], down.weight, h)  # [D, N]
        return yt.t().view(*x.shape[:-1], yt.shape[0])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the head dim: x [B, N, H, Dh], cos/sin [N, Dh/2] -> [B, N, H, Dh]."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


def apply_rope_cis(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` with the table cs = stack([cos, sin], -1) [N, Dh/2, 2] (:meth:`WanRotaryEmbedding.table`).

    In eager mode one complex multiply, (a + ib)(c + is) = (ac - bs) + i(as + bc): the same products and sums as
    :func:`apply_rope`, in one kernel. Under torch.compile the real form, which inductor fuses (it has no complex
    code generation)."""
    if torch.compiler.is_compiling():
        return apply_rope(x, cs[..., 0], cs[..., 1])
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.view_as_complex(cs)[None, :, None, :]).flatten(-2).type_as(x)


class WanRotaryEmbedding(nn.Module):
    """3-D RoPE of Wan: the head dim is split into time / height / width parts, theta = 10000.

    Angles are computed from the absolute frame index on demand (float64, then float32), so there is no
    table to run off the end of: a stream of any length gets exact positions.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.h_dim = self.w_dim = 2 * (head_dim // 6)
        self.t_dim = head_dim - 2 * self.h_dim
        self.theta = theta
        self._spatial: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tables: dict[tuple, torch.Tensor] = {}  # (start, frames, repeats, h, w, device) -> cos/sin table, a small LRU
        self._frame_tables: dict[tuple, torch.Tensor] = {}  # (frame, h, w, device) -> one frame's table, a small LRU

    def _inv_freq(self, dim: int, device) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))

    def _angles(self, pos: torch.Tensor, dim: int) -> torch.Tensor:
        return pos.to(torch.float64)[:, None] * self._inv_freq(dim, pos.device)[None, :]

    def forward(self, frames: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [len(frames) * height * width, head_dim / 2] (float32), tokens frame-major."""
        device = frames.device
        key = (height, width, str(device))
        if key not in self._spatial:  # height/width angles depend only on the latent size: compute once
            ah = self._angles(torch.arange(height, device=device), self.h_dim)
            aw = self._angles(torch.arange(width, device=device), self.w_dim)
            hw = torch.cat(
                [ah[:, None, :].expand(height, width, -1), aw[None, :, :].expand(height, width, -1)], dim=-1
            ).reshape(height * width, -1)
            self._spatial[key] = hw
        hw = self._spatial[key]
        at = self._angles(frames, self.t_dim)  # [F, t_dim/2]
        n_f, n_s = at.shape[0], hw.shape[0]
        ang = torch.cat([at[:, None, :].expand(n_f, n_s, -1), hw[None].expand(n_f, n_s, -1)], dim=-1)
        ang = ang.reshape(n_f * n_s, -1)
        return ang.cos().float(), ang.sin().float()

    def table(self, start: int, num_frames: int, height: int, width: int, device, repeats: int = 1) -> torch.Tensor:
        """stack([cos, sin], -1) for the frames [start, start + num_frames), the range repeated ``repeats`` times
        (teacher forcing places two copies); float32 [repeats * num_frames * height * width, head_dim / 2, 2].

        Cached: the denoising steps and the cache pass of a chunk share one table, and so do all layers."""
        key = (start, num_frames, repeats, height, width, str(device))
        table = self._tables.pop(key, None)
        if table is None:
            # from per-frame tables (each frame's angles are computed on their own, so the values are those of the
            # whole range at once): a stream's chunk, its fused cache pass and the next chunk share frames
            per_frame = [self._frame_table(f, height, width, device) for f in range(start, start + num_frames)]
            table = torch.cat(per_frame * repeats)
            if len(self._tables) >= 16:
                self._tables.pop(next(iter(self._tables)))
        self._tables[key] = table  # most recently used last
        return table

    def _frame_table(self, frame: int, height: int, width: int, device) -> torch.Tensor:
        """stack([cos, sin], -1) of one frame, [height * width, head_dim / 2, 2], from a small LRU. A missing frame
        is computed with the next 15 in one call (a stream asks for them next)."""
        key = (frame, height, width, str(device))
        table = self._frame_tables.pop(key, None)
        if table is None:
            ahead = 16
            tables = torch.stack(self.forward(torch.arange(frame, frame + ahead, device=device), height, width), -1)
            for i, t in enumerate(tables.view(ahead, height * width, *tables.shape[1:])):
                self._frame_tables[(frame + i, height, width, str(device))] = t
            while len(self._frame_tables) > 64:
                self._frame_tables.pop(next(iter(self._frame_tables)))
            table = self._frame_tables.pop(key)
        self._frame_tables[key] = table
        return table


# ---------------------------------------------------------------------------------------------- attention
@dataclass
class FullAttention:
    """Attend within the given sequence, under a boolean token mask (None = everything). ``key_ends`` [N] (int64,
    optional): the same mask as a prefix length per query token (query i sees keys [0, key_ends[i])), given when
    the mask is of that form (block-causal without a local window), for kernels that take prefixes, not masks."""

    mask: torch.Tensor | None
    key_ends: torch.Tensor | None = None


def prefix_key_ends(frame_mask: torch.Tensor, tokens_per_frame: int) -> torch.Tensor | None:
    """The token-level key prefix lengths [F*T] of a frame mask [F, F] whose every row is a prefix (frame f sees
    frames [0, e_f)): e_f * T for each of frame f's T tokens; None if some row is not a prefix (a local window,
    sinks)."""
    ends = frame_mask.sum(1)
    prefix = torch.arange(frame_mask.shape[1], device=frame_mask.device)[None, :] < ends[:, None]
    if not torch.equal(prefix, frame_mask):
        return None
    return (ends * tokens_per_frame).repeat_interleave(tokens_per_frame)


@dataclass
class CachedAttention:
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [B, N, H, Dh] of the tokens -> attention output [B, N', H, Dh] (N' = N, or the chunk's only)."""
        if self.pending is None:
            return self._attend_one(self.plan, q, k, v)
        n = self.pending.slot_index.numel()
        first = self._attend_one(self.pending, q[:, :n], k[:, :n], v[:, :n], queries=self.pending_queries)
        rest = self._attend_one(self.plan, q[:, n:], k[:, n:], v[:, n:])
        return rest if first is None else torch.cat([first, rest], 1)

    def _attend_one(self, plan: ChunkPlan, q, k, v, queries: bool = True) -> torch.Tensor | None:
        k_all, v_all = self.cache.write_and_view(self.layer, plan, k, v)
        if not queries:
            return None
        if k_all.dtype != q.dtype and torch.is_autocast_enabled(q.device.type):
            q = q.to(k_all.dtype)  # mixed precision: attend in the cache's precision, never copy the cache
        return attention(q, k_all.to(q.dtype), v_all.to(q.dtype))


@dataclass
class ContextAttention:
    """Attend over a snapshot of earlier frames' K/V plus the chunk's own (the gradient path)."""

    k: torch.Tensor
    v: torch.Tensor


def rms_norm_eps(norm: nn.RMSNorm, dtype: torch.dtype) -> float:
    """The eps that ``norm`` adds: its own, or (None) the dtype's machine epsilon, as torch's RMSNorm does."""
    return norm.eps if norm.eps is not None else torch.finfo(dtype).eps


def _rms_normed(norm: nn.RMSNorm, y: torch.Tensor) -> torch.Tensor:
    """norm(y) = y / sqrt(mean(y^2, -1) + eps) * g for y [..., D], a fresh projection output that nothing else holds.

    For CPU inference in place, with one fused reduction: torch's RMSNorm runs about ten kernels on CPU (power,
    mean, add, rsqrt, two products, dtype conversions), a sizeable share of a small model's chunk step. Same
    function to float rounding (tests/test_perf.py)."""
    if not _cpu_inference(y):
        return norm(y)
    eps = rms_norm_eps(norm, y.dtype)
    inv = torch.linalg.vector_norm(y, dim=-1, keepdim=True).square_().div_(y.shape[-1]).add_(eps).rsqrt_()
    y = y.mul_(inv)
    return y.mul_(norm.weight) if norm.weight is not None else y


class WanAttention(nn.Module):
    """Self- or cross-attention with q/k RMSNorm across heads; diffusers' parameter names."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def project_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of a key sequence [B, L, D] -> two [B, L, H, Dh]."""
        k = _rms_normed(self.norm_k, self.to_k(ctx)).unflatten(2, (self.heads, -1))
        v = self.to_v(ctx).unflatten(2, (self.heads, -1))
        return k, v

    def project_qkv(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated, normalised q, k and v of the tokens [B, N, D]; three [B, N, H, Dh]. (On CPU three matmuls
        against the separate weights are as fast as one against concatenated ones, and need no extra copy.)"""
        q = _rms_normed(self.norm_q, self.to_q(x)).unflatten(2, (self.heads, -1))
        k, v = self.project_kv(x)
        return apply_rope_cis(q, rope), apply_rope_cis(k, rope), v

    def self_attention(self, x: torch.Tensor, rope: torch.Tensor, how) -> torch.Tensor:
        """rope: the cos/sin table of the tokens (:meth:`WanRotaryEmbedding.table`)."""
        q, k, v = self.project_qkv(x, rope)
        if isinstance(how, FullAttention):
            out = attention(q, k, v, how.mask)
        elif isinstance(how, CachedAttention):
            out = how.attend(q, k, v)
        else:
            out = attention(q, torch.cat([how.k.to(k.dtype), k], 1), torch.cat([how.v.to(v.dtype), v], 1))
        return self.to_out[0](out.flatten(2))

    def cross_attention(self, x: torch.Tensor, ctx: torch.Tensor | None, slot=None) -> torch.Tensor:
        """Attend to the text: K/V from ``slot`` (the cross-attention cache of this layer) when it holds
        them, else projected from ``ctx`` (and stored in the slot, if any)."""
        q = _rms_normed(self.norm_q, self.to_q(x)).unflatten(2, (self.heads, -1))
        kv = slot.get() if slot is not None else None
        if kv is None:
            kv = self.project_kv(ctx)
            if slot is not None:
                slot.set(kv)
        k, v = kv
        return self.to_out[0](attention(q, k.to(q.dtype), v.to(q.dtype)).flatten(2))


def _modulated_norm(x: torch.Tensor, norm, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift in float32 (in place on the fresh normalised tensor without autograd)."""
    h = _fp32_layer_norm(x, norm)
    if torch.is_grad_enabled() or not cpu_shortcuts_enabled():
        return h * (1 + scale) + shift
    return torch.addcmul(shift, h, 1 + scale, out=h)


class CausalWanBlock(nn.Module):
    """One Wan transformer block with per-frame adaLN modulation (6 vectors per frame)."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, cross_attn_norm: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, heads, eps)
        self.attn2 = WanAttention(dim, heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, ffn_dim)
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e, rope, how, ctx, cross_slot=None, kv_only: bool = False):
        """x [B, F*T, D]; e [B, F, 6, D] (float32 modulation); rope: cos/sin [F*T, Dh/2, 2]; ctx [B, L, D].

        ``kv_only`` (a cache pass through the last block, ``how`` a :class:`CachedAttention`): write the chunk's
        self-attention K/V into the cache, fill the cross-attention slot if it is empty, and return None; the
        rest of the block would only feed an output that the cache pass discards."""
        b, n, d = x.shape
        nf = e.shape[1]
        mod = (self.scale_shift_table[None] + e.float()).unsqueeze(3)  # [B, F, 6, 1, D]
        shift, scale, gate, c_shift, c_scale, c_gate = mod.unbind(2)  # each [B, F, 1, D]
        xf = x.view(b, nf, n // nf, d)
        if kv_only:
            h = _modulated_norm(xf, self.norm1, scale, shift).type_as(x).view(b, n, d)
            k, v = self.attn1.project_kv(h)
            how.cache.write(how.layer, how.plan, apply_rope_cis(k, rope), v)
            if cross_slot is not None and cross_slot.get() is None:
                cross_slot.set(self.attn2.project_kv(ctx))
            return None
        # without autograd and in float32 the residual stream is updated in place (a fresh tensor after the
        # first update, so the block's input is never modified); the values are the same either way
        inplace = not torch.is_grad_enabled() and x.dtype == torch.float32 and cpu_shortcuts_enabled()

        h = _modulated_norm(xf, self.norm1, scale, shift).type_as(x)
        a = self.attn1.self_attention(h.view(b, n, d), rope, how)
        tpf = n // nf
        drop = nf - a.shape[1] // tpf  # frames of a finished chunk that only wrote their K/V (fused cache pass)
        if drop:
            xf, nf, n = xf[:, drop:], nf - drop, a.shape[1]
            gate, c_shift, c_scale, c_gate = (m[:, drop:] for m in (gate, c_shift, c_scale, c_gate))
        a = a.view(b, nf, tpf, d)
        xf = torch.addcmul(xf, a, gate) if inplace else (xf.float() + a * gate).type_as(x)

        h = _fp32_layer_norm(xf, self.norm2).type_as(x).view(b, n, d)
        c = self.attn2.cross_attention(h, ctx, cross_slot).view(b, nf, n // nf, d)
        xf = xf.add_(c) if inplace else xf + c

        h = _modulated_norm(xf, self.norm3, c_scale, c_shift).type_as(x)
        f = self.ffn(h)
        xf = xf.addcmul_(f, c_gate) if inplace else (xf.float() + f.float() * c_gate).type_as(x)
        return xf.view(b, n, d)


# ---------------------------------------------------------------------------------------------- model
class CausalWanModel(ModelMixin, ConfigMixin):
    r"""Block-causal Wan2.1 DiT with per-frame timesteps and a KV cache.

    Config fields are those of ``diffusers.WanTransformer3DModel`` plus the causal ones:
    ``num_frame_per_block`` (K, frames per chunk), ``local_attn_size`` (attention window L in latent
    frames, -1 = unbounded), ``sink_size`` (S frames at the start of the video kept in the window) and
    ``independent_first_frame`` (blocks [1, K, K, ...]).

    Shapes: latents ``x`` [B, F, C, H, W]; ``timestep`` [B] (shared by all frames) or [B, F] in
    [0, 1000]; ``context`` [B, L, text_dim]; output: the flow prediction v = eps - x0, [B, F, C_out, H, W].
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["CausalWanBlock"]
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 12,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 8960,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_max_seq_len: int = 1024,
        num_frame_per_block: int = 3,
        local_attn_size: int = -1,
        sink_size: int = 0,
        independent_first_frame: bool = False,
    ) -> None:
        super().__init__()
        patch_size = tuple(patch_size)
        if len(patch_size) != 3 or patch_size[0] != 1:
            raise ValueError(f"patch_size must be (1, p_h, p_w) (one latent frame per token row), got {patch_size}")
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"only qk_norm='rms_norm_across_heads' (Wan2.1) is supported, got {qk_norm!r}")
        if num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be >= 1, got {num_frame_per_block}")
        if local_attn_size > 0 and not 0 <= sink_size < local_attn_size:
            raise ValueError(f"need 0 <= sink_size < local_attn_size, got {sink_size}, {local_attn_size}")
        if local_attn_size > 0 and local_attn_size - sink_size < num_frame_per_block:
            raise ValueError(
                f"the attention window minus sinks ({local_attn_size} - {sink_size}) must hold a whole block "
                f"of {num_frame_per_block} frames"
            )
        if local_attn_size <= 0 and sink_size:
            raise ValueError("sink_size needs a rolling window (local_attn_size > 0)")
        dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels

        self.rope = WanRotaryEmbedding(attention_head_dim)
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.condition_embedder = ConditionEmbedder(dim, freq_dim, text_dim)
        self.blocks = nn.ModuleList(
            [CausalWanBlock(dim, ffn_dim, num_attention_heads, cross_attn_norm, eps) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_preset(cls, name: str, **overrides) -> CausalWanModel:
        """Build a randomly initialised model from a named preset (see ``presets.py``)."""
        return cls(**preset_config(name, **overrides))

    @classmethod
    def from_checkpoint(
        cls, path: str, *, preset: str | None = None, use_ema: bool = False, **overrides
    ) -> CausalWanModel:
        """Load weights from a ``save_pretrained`` directory, or from a checkpoint file in any format of
        ``state_dict_adapter`` (native, original Wan / CausVid / Self Forcing, wrapped or not); a file
        needs ``preset`` (plus ``overrides``) to say which architecture it holds."""
        import os

        import json

        if os.path.isdir(path):
            cfg_path = os.path.join(path, "config.json")
            if os.path.isfile(cfg_path):
                try:
                    with open(cfg_path, encoding="utf-8") as fh:
                        config = json.load(fh)
                except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                    raise ValueError(f"{cfg_path}: not valid JSON ({err})") from None
                if isinstance(config, dict) and "_class_name" in config:  # a diffusers folder (ours or Wan's)
                    return cls._from_pretrained_folder(path, **overrides)
            # an original Wan2.1 release folder: weights in (sharded) safetensors, original key names
            shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not shards:
                raise FileNotFoundError(f"{path}: neither a diffusers config.json nor *.safetensors weights")
            files = [os.path.join(path, f) for f in shards]
        else:
            files = [path]
        if preset is None:
            raise ValueError(f"loading {path} needs preset=... (it holds weights, not a diffusers config)")
        model = cls.from_preset(preset, **overrides)
        state = {}
        for f in files:
            state.update(load_checkpoint_file(f, use_ema=use_ema))
        model.load_weights(state, source=path)
        return model

    @classmethod
    def _from_pretrained_folder(cls, path: str, **overrides) -> CausalWanModel:
        """``from_pretrained`` of a diffusers folder; a folder without weights (an export cut short) or with
        unreadable ones is a ValueError naming the folder."""
        import os

        names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
        if not any(os.path.isfile(os.path.join(path, n)) for n in names):
            raise ValueError(f"{path}: has config.json but no weights (diffusion_pytorch_model.safetensors): an "
                             f"incomplete save_pretrained folder")
        try:
            return cls.from_pretrained(path, **overrides)
        except (OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path}: cannot load the save_pretrained folder ({' '.join(str(err).split())})") from err

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load of a native state dict; mismatches raise ValueError naming the keys and shapes."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        wrong = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{source} does not fit this model config: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)}), wrong shapes {wrong[:5]} ({len(wrong)})"
            )
        self.load_state_dict(state_dict, strict=True)

    @property
    def dim(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (latent_height // ph) * (latent_width // pw)

    def new_kv_cache(
        self,
        batch_size: int,
        latent_height: int,
        latent_width: int,
        *,
        max_frames: int | None = None,
        window_frames: int | None = None,
        sink_frames: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache sized for this model; window/sinks default to the config's local_attn_size/sink_size."""
        window = self.config.local_attn_size if window_frames is None else window_frames
        sink = self.config.sink_size if sink_frames is None else sink_frames
        p = next(self.parameters())
        return KVCache(
            num_layers=self.config.num_layers,
            batch_size=batch_size,
            num_heads=self.config.num_attention_heads,
            head_dim=self.config.attention_head_dim,
            tokens_per_frame=self.tokens_per_frame(latent_height, latent_width),
            max_frames=max_frames,
            window_frames=window,
            sink_frames=sink if window and window > 0 else 0,
            dtype=dtype or p.dtype,
            device=device or p.device,
        )

    def block_sizes(self, num_frames: int) -> list[int]:
        """Causal block layout of a ``num_frames`` clip (ValueError if K does not divide it)."""
        return block_sizes_for(num_frames, self.config.num_frame_per_block, self.config.independent_first_frame)

    # ------------------------------------------------------------------ pieces of the forward
    def _check_latents(self, x: torch.Tensor, name: str = "x") -> None:
        c = self.config
        if x.ndim != 5:
            raise ValueError(f"{name} must be latents [B, F, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[2] != c.in_channels:
            raise ValueError(f"{name} has {x.shape[2]} latent channels, the model expects in_channels={c.in_channels}")
        _, ph, pw = c.patch_size
        if x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent size {tuple(x.shape[3:])} is not divisible by the patch size {(ph, pw)}")

    @staticmethod
    def _frame_timesteps(timestep: torch.Tensor, b: int, f: int, name: str = "timestep") -> torch.Tensor:
        t = torch.as_tensor(timestep)
        if t.ndim == 1 and t.shape[0] == b:
            return t[:, None].expand(b, f)
        if t.ndim == 2 and tuple(t.shape) == (b, f):
            return t
        raise ValueError(f"{name} must be [B]=[{b}] or [B, F]=[{b}, {f}], got shape {tuple(t.shape)}")

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F, C, H, W] -> tokens [B, F*h*w, D] (the Conv3d patch embedding as one matmul)."""
        b, f, c, hh, ww = x.shape
        _, ph, pw = self.config.patch_size
        w = self.patch_embedding.weight
        x = x.reshape(b, f, c, hh // ph, ph, ww // pw, pw).permute(0, 1, 3, 5, 2, 4, 6)
        x = x.reshape(b, f * (hh // ph) * (ww // pw), c * ph * pw)
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1), self.patch_embedding.bias)

    def _unpatchify(self, tokens: torch.Tensor, f: int, hh: int, ww: int) -> torch.Tensor:
        """Head output [B, F*h*w, p_h*p_w*C] -> [B, F, C, H, W]."""
        _, ph, pw = self.config.patch_size
        b = tokens.shape[0]
        h, w = hh // ph, ww // pw
        x = tokens.reshape(b, f, h, w, ph, pw, -1).permute(0, 1, 6, 2, 4, 3, 5)
        return x.reshape(b, f, -1, hh, ww)

    def _tracks_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def encode_context(self, context: torch.Tensor) -> torch.Tensor:
        """Text states [B, L, text_dim] -> the model's text embedding [B, L, D]."""
        return self.condition_embedder.text_embedder(context.to(self.proj_out.weight.dtype))

    def cross_attention_kv(self, context: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer cross-attention K/V of a prompt (what the cross-attention cache stores)."""
        ctx = self.encode_context(context)
        kvs = [blk.attn2.project_kv(ctx) for blk in self.blocks]
        return [k for k, _ in kvs], [v for _, v in kvs]

    def _native_blocks(self, x: torch.Tensor, hows: list) -> bool:
        """Whether C++ runs this forward (:mod:`selfforcing.models.native_blocks`): a float32 CPU forward without
        gradients of a float32 model, within :func:`selfforcing.perf.timed_kernel_choice`, unless
        ``SELFFORCING_CPU_BLOCKS=python`` or the extension cannot be built; either against a float32 KV cache or
        without one, attending bidirectionally or block-causally (a prefix mask: no local window, no sinks)."""
        how = hows[0]
        if isinstance(how, CachedAttention):
            supported = how.cache.dtype == torch.float32
        elif isinstance(how, FullAttention):
            supported = how.mask is None or how.key_ends is not None
        else:  # ContextAttention: a cached forward with gradients
            supported = False
        return (supported and timed_choice_enabled() and _cpu_inference(x)
                and self.proj_out.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and native_blocks.available())

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        causal: bool = True,
        kv_cache: KVCache | None = None,
        start_frame: int = 0,
        clean_x: torch.Tensor | None = None,
        clean_timestep: torch.Tensor | None = None,
        output_hidden_layers: tuple[int, ...] | None = None,
        kv_only: bool = False,
        pending_x: torch.Tensor | None = None,
        pending_timestep: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]] | None:
        r"""Flow prediction v for latents ``x``.

        Args:
            x: latents [B, F, C, H, W] (with ``kv_cache``: the F frames of one chunk).
            timestep: [B] or [B, F], t in [0, 1000]; each frame is modulated by its own t.
            context: text states [B, L, text_dim] (zero-padded, attended without a mask, as Wan does).
            causal: block-causal attention (True) or full bidirectional attention (False).
            kv_cache: process ``x`` as the chunk of frames [start_frame, start_frame + F) against the
                cached earlier frames. Without gradients the chunk's K/V are written into the cache
                (re-running the same chunk overwrites them); with gradients nothing is written.
            start_frame: absolute index of the first frame of ``x`` (sets its RoPE position).
            clean_x: teacher forcing: clean latents [B, F, C, H, W] placed before ``x`` in one sequence;
                noisy block i sees the clean blocks < i and itself. Only the noisy half is returned.
            clean_timestep: [B] or [B, F] timesteps of ``clean_x`` (default 0).
            output_hidden_layers: also return the hidden tokens [B, N, D] after these blocks (0-based;
                negative counts from the end), e.g. for a discriminator head on the critic's features.
            kv_only: with ``kv_cache`` and no gradients, only write the chunk's K/V (the cache pass of Algorithms
                1 and 2, whose prediction is discarded): the last block stops after its K/V projection, the
                head is skipped, and None is returned. The cache ends up exactly as after a full forward.
            pending_x: with ``kv_cache`` and no gradients, a finished chunk [B, F', C, H, W] (frames
                [start_frame - F', start_frame)) whose cache pass runs fused with this forward: its tokens go first
                in one sequence, write their K/V (as ``kv_only`` would) and are attended by ``x``. One pass over
                both chunks' tokens costs less than two on CPU (bigger matmuls, half the per-layer overhead); the
                cache and the output equal the two separate passes up to float rounding. Same context for both.
            pending_timestep: [B] or [B, F'] timesteps of ``pending_x`` (default 0: the clean chunk).

        Returns:
            v = eps - x0 predicted for ``x``: [B, F, C_out, H, W] (and {layer: tokens} if asked).
        """
        cfg = self.config
        self._check_latents(x)
        b, nf, _, hh, ww = x.shape
        t = self._frame_timesteps(timestep, b, nf)
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"context must be text states [B, L, text_dim]=[{b}, L, {cfg.text_dim}], got {tuple(context.shape)}"
            )
        if start_frame < 0:
            raise ValueError(f"start_frame must be >= 0, got {start_frame}")
        if kv_cache is not None and not causal:
            raise ValueError("a KV cache needs causal=True (bidirectional attention sees future frames)")
        if kv_only and (kv_cache is None or output_hidden_layers or self._tracks_grad(x)):
            raise ValueError("kv_only (a cache pass) needs a kv_cache, no gradients and no output_hidden_layers")
        if pending_x is not None and (kv_cache is None or kv_only or output_hidden_layers or self._tracks_grad(x)):
            raise ValueError("pending_x (a fused cache pass) needs a kv_cache, no gradients, no kv_only and no "
                             "output_hidden_layers")
        if clean_x is not None and (kv_cache is not None or not causal):
            raise ValueError("teacher forcing (clean_x) is a full causal forward: no kv_cache, causal=True")

        device = x.device
        _, ph, pw = cfg.patch_size
        h, w = hh // ph, ww // pw
        tpf = h * w
        latents = [x]  # every chunk of latents in sequence order, patch-embedded below (by C++ on its path)
        tracking = self._tracks_grad(x)

        # ---- how the self-attention of every layer sees its keys
        plan = pending = None
        n_pending = 0
        if pending_x is not None:
            self._check_latents(pending_x, "pending_x")
            n_pending = pending_x.shape[1]
            if pending_x.shape[0] != b or pending_x.shape[3:] != x.shape[3:] or n_pending > start_frame:
                raise ValueError(f"pending_x {tuple(pending_x.shape)} must be a finished chunk of the same batch and "
                                 f"latent size as x {tuple(x.shape)} ending at start_frame={start_frame}")
            pt = torch.zeros(b, n_pending, device=t.device, dtype=t.dtype) if pending_timestep is None else \
                self._frame_timesteps(pending_timestep, b, n_pending, "pending_timestep")
            pending = kv_cache.plan(start_frame - n_pending, n_pending, tpf, b)
            kv_cache.commit(pending)  # the chunk below continues the stream after the finished one
            latents.insert(0, pending_x)
            t = torch.cat([pt.to(t.dtype), t], dim=1)
        if kv_cache is not None:
            plan = kv_cache.plan(start_frame, nf, tpf, b)
            if tracking:
                snap = kv_cache.snapshot_context(plan)
                hows = [ContextAttention(k, v) for k, v in snap]
            else:
                last = cfg.num_layers - 1
                hows = [CachedAttention(kv_cache, plan, i, pending, pending_queries=i < last)
                        for i in range(cfg.num_layers)]
        elif clean_x is not None:
            self._check_latents(clean_x, "clean_x")
            if clean_x.shape != x.shape:
                raise ValueError(f"clean_x shape {tuple(clean_x.shape)} != x shape {tuple(x.shape)}")
            ct = torch.zeros_like(t) if clean_timestep is None else self._frame_timesteps(
                clean_timestep, b, nf, "clean_timestep")
            latents.insert(0, clean_x)
            t = torch.cat([ct, t], dim=1)
            # both halves get identical positions (the RoPE table repeats the frames twice)
            fmask = teacher_forcing_frame_mask(self.block_sizes(nf), cfg.local_attn_size, cfg.sink_size, device)
            hows = [FullAttention(expand_frame_mask(fmask, tpf))] * cfg.num_layers
        elif causal:
            fmask = block_causal_frame_mask(self.block_sizes(nf), cfg.local_attn_size, cfg.sink_size, device)
            mask = None if bool(fmask.all()) else expand_frame_mask(fmask, tpf)
            # the prefix form is for the C++ blocks (CPU inference under timed_kernel_choice) only: elsewhere it would
            # be wasted work, a device sync, or a graph break under torch.compile
            native = mask is not None and timed_choice_enabled() and _cpu_inference(x)
            ends = prefix_key_ends(fmask, tpf) if native else None
            hows = [FullAttention(mask, ends)] * cfg.num_layers
        else:
            hows = [FullAttention(None)] * cfg.num_layers

        # ---- conditioning: per-frame modulation, text (cross-attention K/V cached per prompt)
        n_all = t.shape[1]
        temb, proj = self.condition_embedder.embed_time(t.reshape(-1))
        temb = temb.view(b, n_all, -1)
        e = proj.view(b, n_all, 6, -1)
        cross = [None] * cfg.num_layers
        ctx = None
        if kv_cache is not None and not tracking:
            # each block fills its own slot inside its forward (so sharded parameters are gathered there)
            if not kv_cache.cross_matches(context):
                kv_cache.begin_cross(context)
                ctx = self.encode_context(context)
            cross = [kv_cache.cross_slot(i) for i in range(cfg.num_layers)]
        else:
            ctx = self.encode_context(context)
        rope = self.rope.table(start_frame - n_pending, n_pending + nf, h, w, device,
                               repeats=2 if clean_x is not None else 1)

        # ---- transformer blocks
        ckpt = torch.is_grad_enabled() and self.gradient_checkpointing
        taps = {i % cfg.num_layers for i in (output_hidden_layers or ())}
        hidden = {}
        if output_hidden_layers is None and clean_x is None and self._native_blocks(x, hows):
            if kv_cache is None:  # this forward's text K/V
                text_kv = [blk.attn2.project_kv(ctx) for blk in self.blocks]
            else:
                for blk, ckv in zip(self.blocks, cross):  # the text K/V of a new prompt, which the C++ blocks read
                    if ckv.get() is None:
                        ckv.set(blk.attn2.project_kv(ctx))
                text_kv = [ckv.get() for ckv in cross]
            onednn = native_blocks.ffn_uses_onednn(self.blocks[0].ffn, b * n_all * tpf)
            out = native_blocks.run_forward(self, latents, e, temb, rope, hows, text_kv, kv_only, onednn)
            if plan is not None:
                kv_cache.commit(plan)
            return out
        tokens = self._patchify(x) if len(latents) == 1 else torch.cat([self._patchify(lat) for lat in latents],
                                                                        dim=1)
        for i, (blk, how, ckv) in enumerate(zip(self.blocks, hows, cross)):
            if kv_only and i == cfg.num_layers - 1:
                blk(tokens, e, rope, how, ctx, ckv, kv_only=True)
            elif ckpt:
                tokens = self._gradient_checkpointing_func(blk, tokens, e, rope, how, ctx, ckv)
            else:
                tokens = blk(tokens, e, rope, how, ctx, ckv)
            if i in taps:
                hidden[i] = tokens
        if plan is not None and not tracking:
            kv_cache.commit(plan)
        if kv_only:
            return None
        if n_pending:  # the last block kept only this chunk's tokens
            temb, n_all = temb[:, n_pending:], n_all - n_pending

        # ---- head: per-frame shift/scale, projection, unpatchify
        mod = (self.scale_shift_table[None] + temb[:, :, None, :].float()).unsqueeze(3)  # [B, F, 2, 1, D]
        shift, scale = mod.unbind(2)
        tf = tokens.view(b, n_all, tpf, -1)
        out = (_fp32_layer_norm(tf, self.norm_out) * (1 + scale) + shift).type_as(tokens)
        out = self.proj_out(out)
        if clean_x is not None:
            out = out[:, nf:]
        out = self._unpatchify(out.reshape(b, nf * tpf, -1), nf, hh, ww)
        return (out, hidden) if output_hidden_layers is not None else out
