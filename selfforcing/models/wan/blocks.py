"""The layers of the causal Wan DiT: time and text conditioning, RoPE, attention, feed-forward, the block.

Parameter names are those of ``diffusers.WanTransformer3DModel``. Without gradients on CPU some layers take plain
PyTorch shortcuts (in place, fewer passes over memory) that compute the same function to float rounding
(:func:`~selfforcing.models.wan.runtime.cpu_inference`); the feed-forward layer offers itself to an installed
accelerator (:mod:`selfforcing.models.wan.runtime`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...lru import LRUCache
from .attention import SelfAttention, attention
from .runtime import accelerator, cpu_inference, cpu_shortcuts_enabled


# ---------------------------------------------------------------------------------------------- norms
@functools.lru_cache(maxsize=16)
def _unit_gain(shape: tuple[int, ...], device: str) -> torch.Tensor:
    return torch.ones(shape, device=device)


def fp32_layer_norm(x: torch.Tensor, norm: nn.LayerNorm | nn.Identity) -> torch.Tensor:
    """LayerNorm computed in float32 (as Wan does), returned in float32.

    A norm without affine parameters gets an all-ones gain on CPU: torch's CPU LayerNorm kernel is slower when both
    gain and bias are absent (docs/performance.md) and computes the very same values with a unit gain (bit-identical,
    tests/test_perf.py)."""
    if isinstance(norm, nn.Identity):
        return x.float()
    w = norm.weight.float() if norm.weight is not None else None
    b = norm.bias.float() if norm.bias is not None else None
    if w is None and b is None and cpu_inference(x):
        w = _unit_gain(tuple(norm.normalized_shape), str(x.device))
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps)


def rms_norm_eps(norm: nn.RMSNorm, dtype: torch.dtype) -> float:
    """The eps that ``norm`` adds: its own, or (None) the dtype's machine epsilon, as torch's RMSNorm does."""
    return norm.eps if norm.eps is not None else torch.finfo(dtype).eps


def rms_normed(norm: nn.RMSNorm, y: torch.Tensor) -> torch.Tensor:
    """norm(y) = y / sqrt(mean(y^2, -1) + eps) * g for y [..., D], a fresh projection output that nothing else holds.

    For CPU inference in place, with one fused reduction: torch's RMSNorm runs about ten kernels on CPU (power,
    mean, add, rsqrt, two products, dtype conversions), a sizeable share of a small model's chunk step. Same
    function to float rounding (tests/test_perf.py)."""
    if not cpu_inference(y):
        return norm(y)
    eps = rms_norm_eps(norm, y.dtype)
    inv = torch.linalg.vector_norm(y, dim=-1, keepdim=True).square_().div_(y.shape[-1]).add_(eps).rsqrt_()
    y = y.mul_(inv)
    return y.mul_(norm.weight) if norm.weight is not None else y


def modulated_norm(x: torch.Tensor, norm, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift in float32 (in place on the fresh normalised tensor without autograd)."""
    h = fp32_layer_norm(x, norm)
    if torch.is_grad_enabled() or not cpu_shortcuts_enabled():
        return h * (1 + scale) + shift
    return torch.addcmul(shift, h, 1 + scale, out=h)


# ---------------------------------------------------------------------------------------------- conditioning
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
        self._time_cache: LRUCache[tuple, tuple[torch.Tensor, torch.Tensor]] = LRUCache(32)  # see embed_time
        self._time_state: tuple = ()

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [N] -> (temb [N, D], the modulation [N, 6D]): temb = MLP(sinusoid(t)), modulation = W SiLU(temb) + b.

        Without autograd on CPU the result is kept per timestep vector (a small LRU, checked against the identity and
        version of every parameter it was computed with): a stream asks for the same few timesteps every chunk, and
        for a few timesteps these small matmuls are memory-bound, a visible share of a small model's forward on CPU
        (docs/performance.md)."""
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
            hit = self._time_cache.get(key)
            if hit is not None:
                return hit
        sinus = timestep_sinusoid(t, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(sinus)
        out = temb, self.time_proj(self.act_fn(temb))
        if cacheable:
            self._time_cache.put(key, out)
        return out


# ---------------------------------------------------------------------------------------------- feed-forward
_GELU_K = 2.0 * math.sqrt(2.0 / math.pi)


@functools.lru_cache(maxsize=4)
def _gelu_k(device: str) -> torch.Tensor:
    return torch.tensor(_GELU_K, device=device)


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, in place and without autograd: 0.5 x (1 + tanh(z)) = x sigmoid(2 z) with
    z = sqrt(2 / pi) (x + 0.044715 x^3), computed as x sigmoid(x (k + 0.044715 k x^2)), k = 2 sqrt(2 / pi): four
    passes over x (addcmul, mul, sigmoid, mul). On CPU faster than torch's tanh-GELU kernel (docs/performance.md)
    and equal to it to float rounding (tests/test_perf.py); elsewhere torch's kernel runs (out of place)."""
    if not cpu_inference(x):
        return F.gelu(x, approximate="tanh")
    z = torch.addcmul(_gelu_k(str(x.device)), x, x, value=_GELU_K * 0.044715)
    return x.mul_(z.mul_(x).sigmoid_())


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
        """[..., D] -> [..., D]: W2 gelu(W1 x + b1) + b2. CPU inference offers it to an installed accelerator first,
        else runs :meth:`forward_feature_major`."""
        if not cpu_inference(x):
            return self.net[2](self.net[0](x))
        acc = accelerator()
        out = NotImplemented if acc is None else acc.feed_forward(self, x)
        return self.forward_feature_major(x) if out is NotImplemented else out

    def forward_feature_major(self, x: torch.Tensor) -> torch.Tensor:
        """The same FFN computed on transposed activations, h^T = W1 x^T + b1 (a [ffn_dim, N] matrix), because CPU
        BLAS runs W1 [ffn_dim, D] @ x^T [D, N] faster than x [N, D] @ W1^T for the chunk-sized N of streaming (a few
        hundred tokens; benchmarks/results/chunk_step_small.json). Each output element is the same dot product, so
        the result equals the token-major path (tests/test_perf.py). The output is a transposed view [..., D]
        (stride 1 along the tokens); callers treat it like any tensor. No autograd."""
        up, down = self.net[0].proj, self.net[2]
        xt = x.reshape(-1, x.shape[-1]).t()  # [D, N] view
        h = torch.addmm(up.bias[:, None], up.weight, xt)  # [ffn_dim, N]
        h = gelu_tanh_(h)
        yt = torch.addmm(down.bias[:, None], down.weight, h)  # [D, N]
        return yt.t().view(*x.shape[:-1], yt.shape[0])


# ---------------------------------------------------------------------------------------------- RoPE
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
        # (start, frames, repeats, h, w, device) -> cos/sin table, a small LRU
        self._tables: dict[tuple, torch.Tensor] = {}
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


# ---------------------------------------------------------------------------------------------- attention, block
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
        k = rms_normed(self.norm_k, self.to_k(ctx)).unflatten(2, (self.heads, -1))
        v = self.to_v(ctx).unflatten(2, (self.heads, -1))
        return k, v

    def project_qkv(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated, normalised q, k and v of the tokens [B, N, D]; three [B, N, H, Dh]. (On CPU three matmuls
        against the separate weights are as fast as one against concatenated ones, and need no extra copy.)"""
        q = rms_normed(self.norm_q, self.to_q(x)).unflatten(2, (self.heads, -1))
        k, v = self.project_kv(x)
        return apply_rope_cis(q, rope), apply_rope_cis(k, rope), v

    def self_attention(self, x: torch.Tensor, rope: torch.Tensor, how: SelfAttention) -> torch.Tensor:
        """rope: the cos/sin table of the tokens (:meth:`WanRotaryEmbedding.table`)."""
        q, k, v = self.project_qkv(x, rope)
        return self.to_out[0](how.attend(q, k, v).flatten(2))

    def cross_attention(self, x: torch.Tensor, ctx: torch.Tensor | None, slot=None) -> torch.Tensor:
        """Attend to the text: K/V from ``slot`` (the cross-attention cache of this layer) when it holds
        them, else projected from ``ctx`` (and stored in the slot, if any)."""
        q = rms_normed(self.norm_q, self.to_q(x)).unflatten(2, (self.heads, -1))
        kv = slot.get() if slot is not None else None
        if kv is None:
            kv = self.project_kv(ctx)
            if slot is not None:
                slot.set(kv)
        k, v = kv
        return self.to_out[0](attention(q, k.to(q.dtype), v.to(q.dtype)).flatten(2))


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

        ``kv_only`` (a cache pass through the last block, ``how`` a cached attention): write the chunk's
        self-attention K/V into the cache, fill the cross-attention slot if it is empty, and return None; the
        rest of the block would only feed an output that the cache pass discards."""
        b, n, d = x.shape
        nf = e.shape[1]
        mod = (self.scale_shift_table[None] + e.float()).unsqueeze(3)  # [B, F, 6, 1, D]
        shift, scale, gate, c_shift, c_scale, c_gate = mod.unbind(2)  # each [B, F, 1, D]
        xf = x.view(b, nf, n // nf, d)
        if kv_only:
            h = modulated_norm(xf, self.norm1, scale, shift).type_as(x).view(b, n, d)
            k, v = self.attn1.project_kv(h)
            how.store(apply_rope_cis(k, rope), v)
            if cross_slot is not None and cross_slot.get() is None:
                cross_slot.set(self.attn2.project_kv(ctx))
            return None
        # without autograd and in float32 the residual stream is updated in place (a fresh tensor after the
        # first update, so the block's input is never modified); the values are the same either way
        inplace = not torch.is_grad_enabled() and x.dtype == torch.float32 and cpu_shortcuts_enabled()

        h = modulated_norm(xf, self.norm1, scale, shift).type_as(x)
        a = self.attn1.self_attention(h.view(b, n, d), rope, how)
        tpf = n // nf
        drop = nf - a.shape[1] // tpf  # frames of a finished chunk that only wrote their K/V (fused cache pass)
        if drop:
            xf, nf, n = xf[:, drop:], nf - drop, a.shape[1]
            gate, c_shift, c_scale, c_gate = (m[:, drop:] for m in (gate, c_shift, c_scale, c_gate))
        a = a.view(b, nf, tpf, d)
        xf = torch.addcmul(xf, a, gate) if inplace else (xf.float() + a * gate).type_as(x)

        h = fp32_layer_norm(xf, self.norm2).type_as(x).view(b, n, d)
        c = self.attn2.cross_attention(h, ctx, cross_slot).view(b, nf, n // nf, d)
        xf = xf.add_(c) if inplace else xf + c

        h = modulated_norm(xf, self.norm3, c_scale, c_shift).type_as(x)
        f = self.ffn(h)
        xf = xf.addcmul_(f, c_gate) if inplace else (xf.float() + f.float() * c_gate).type_as(x)
        return xf.view(b, n, d)

