"""The C++ blocks (selfforcing/accel/cpu/native.py) compute the Python blocks' numbers, to float rounding, on every
path a cached CPU inference forward takes, run only where they are meant to, and fail safe: a bad setting is a clear
error, a failed build falls back to Python with a warning, an error inside C++ reaches Python as an exception. Their
two fused kernels are checked against torch's own ops directly."""

import pytest
import torch

from selfforcing.accel.cpu import native as native_blocks
from selfforcing.accel.cpu import timed_kernel_choice
from selfforcing.accel.cpu.ffn import onednn_linear_available
from selfforcing.models import CausalWanModel
from selfforcing.models.wan.presets import LAPTOP_ABSOLUTE_POSITIONS

# every test but the fallback's needs the extension; the fallback test runs whether or not it builds here
needs_build = pytest.mark.skipif(native_blocks.extension() is None, reason="the C++ extension did not build here")


def _count_calls(monkeypatch) -> list:
    calls = []
    real = native_blocks.run

    def counted(args):
        calls.append(args.kv_only)
        return real(args)

    monkeypatch.setattr(native_blocks, "run", counted)
    return calls


def _stream(model, *, fused: bool, cache, chunks: int, batch: int = 1, text_len: int = 16, skip_to: int | None = None):
    """Every output of a short stream (4 denoising steps per chunk, the cache pass fused or not) and the cache."""
    g = torch.Generator().manual_seed(0)
    c = model.config
    ctx = torch.randn(batch, text_len, c.text_dim, generator=g)
    outs, pending, start = [], None, 0
    with torch.no_grad(), timed_kernel_choice():
        for i in range(chunks):
            if skip_to is not None and i == 1:  # re-cached window: the chunk reads sinks + itself (a gathered view)
                start, pending = skip_to, None
                cache.skip_to(skip_to)
            x = torch.randn(batch, 3, c.in_channels, 16, 16, generator=g)
            for j, t in enumerate((1000.0, 750.0, 500.0, 250.0)):
                fuse = fused and j == 0 and pending is not None
                out = model(x, torch.full((batch, 3), t), ctx, kv_cache=cache, start_frame=start,
                            pending_x=pending if fuse else None)
                outs.append(out)
                x = out * 0.5 + x * 0.5  # any update that depends on the output
            if fused:
                pending = x
            else:
                assert model(x, torch.zeros(batch, 3), ctx, kv_cache=cache, start_frame=start, kv_only=True) is None
            start += 3
    return torch.stack(outs), cache


def _both(monkeypatch, make_model, make_cache, **kw):
    """The stream with the Python blocks and with the C++ blocks, on the same weights."""
    model = make_model()
    results = {}
    for setting in ("python", "native"):
        monkeypatch.setenv("SELFFORCING_CPU_BLOCKS", setting)
        results[setting] = _stream(model, cache=make_cache(model), **kw)
    return results["python"], results["native"]


@needs_build
@pytest.mark.parametrize("ffn", ["feature_major", "onednn"])
@pytest.mark.parametrize("fused", [True, False])
def test_native_blocks_equal_python_blocks_on_a_rolling_stream(monkeypatch, ffn, fused):
    """A rolling window with a sink that evicts frames while the stream runs, on a model with absolute embeddings (the
    frames past the table's 12 share its last): outputs and cache equal."""
    if ffn == "onednn" and not onednn_linear_available():
        pytest.skip("no oneDNN linear in this torch build")
    monkeypatch.setenv("SELFFORCING_CPU_FFN", ffn)
    calls = _count_calls(monkeypatch)
    torch.manual_seed(0)
    (out_py, cache_py), (out_c, cache_c) = _both(
        monkeypatch, lambda: CausalWanModel.from_preset("tiny", num_layers=3, **LAPTOP_ABSOLUTE_POSITIONS).eval(),
        lambda m: m.new_kv_cache(1, 16, 16, window_frames=7, sink_frames=1), fused=fused, chunks=5)
    assert len(calls) == 5 * 4 + (0 if fused else 5)  # every forward of the native run went through C++
    _assert_same((out_py, cache_py.k, cache_py.v), (out_c, cache_c.k, cache_c.v))


def _assert_same(expected: tuple, actual: tuple) -> None:
    """Equal to float rounding through a whole stream (the C++ fuses the q/k norm with RoPE, and the feature-major
    FFN's bias with its GELU). Outputs and keys are O(1): a wrong op, eps, gain or order is off by far more."""
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-5)


@needs_build
def test_native_blocks_equal_python_blocks_with_a_caption_layout(monkeypatch):
    """A caption layout adds a different map to each sample's tokens ([B, N, D]) for the frames it covers (6 of the 9
    streamed here): outputs and cache equal."""
    monkeypatch.setenv("SELFFORCING_CPU_FFN", "feature_major")
    calls = _count_calls(monkeypatch)
    torch.manual_seed(2)

    def model():
        m = CausalWanModel.from_preset("tiny", num_layers=2, caption_layout_rank=4,
                                       caption_layout_size=(6, 8, 8)).eval()
        torch.nn.init.normal_(m.caption_layout_vectors)  # trained: not the zero start
        return m

    (out_py, cache_py), (out_c, cache_c) = _both(
        monkeypatch, model, lambda m: m.new_kv_cache(2, 16, 16, max_frames=9), fused=True, chunks=3, batch=2)
    assert calls
    _assert_same((out_py, cache_py.k, cache_py.v), (out_c, cache_c.k, cache_c.v))


@needs_build
def test_native_blocks_equal_python_blocks_without_cross_norm_long_text_batch_and_gathered_reads(monkeypatch):
    """No norm before cross-attention, 80 text tokens (SDPA instead of the short-key path), batch 2, and a chunk
    after skip_to (its keys gathered through read_index)."""
    monkeypatch.setenv("SELFFORCING_CPU_FFN", "feature_major")
    calls = _count_calls(monkeypatch)
    torch.manual_seed(1)

    def model():
        return CausalWanModel.from_preset("tiny", num_layers=2, cross_attn_norm=False).eval()

    (out_py, cache_py), (out_c, cache_c) = _both(
        monkeypatch, model, lambda m: m.new_kv_cache(2, 16, 16, window_frames=7, sink_frames=1), fused=True,
        chunks=3, batch=2, text_len=80, skip_to=9)
    assert calls
    _assert_same((out_py, cache_py.k, cache_py.v), (out_c, cache_c.k, cache_c.v))


@needs_build
def test_native_blocks_run_only_in_streaming_inference(monkeypatch):
    """Not outside timed_kernel_choice (training keeps its path), not with gradients, not with
    SELFFORCING_CPU_BLOCKS=python; a bad setting names the variable."""
    calls = _count_calls(monkeypatch)
    model = CausalWanModel.from_preset("tiny", num_layers=1).eval()
    x, t, ctx = torch.randn(1, 3, 8, 16, 16), torch.full((1, 3), 500.0), torch.randn(1, 16, 384)
    with torch.no_grad():
        model(x, t, ctx, kv_cache=model.new_kv_cache(1, 16, 16, max_frames=3))  # a training rollout's cache pass
    model(x, t, ctx, kv_cache=model.new_kv_cache(1, 16, 16, max_frames=3))  # with gradients
    monkeypatch.setenv("SELFFORCING_CPU_BLOCKS", "python")
    with torch.no_grad(), timed_kernel_choice():
        model(x, t, ctx, kv_cache=model.new_kv_cache(1, 16, 16, max_frames=3))
    assert calls == []
    monkeypatch.setenv("SELFFORCING_CPU_BLOCKS", "auto")
    with torch.no_grad(), timed_kernel_choice():
        model(x, t, ctx, kv_cache=model.new_kv_cache(1, 16, 16, max_frames=3))
    assert len(calls) == 1
    monkeypatch.setenv("SELFFORCING_CPU_BLOCKS", "fast")
    with pytest.raises(ValueError, match="SELFFORCING_CPU_BLOCKS='fast'"), torch.no_grad(), timed_kernel_choice():
        model(x, t, ctx, kv_cache=model.new_kv_cache(1, 16, 16, max_frames=3))


def test_a_failed_build_warns_once_and_the_python_blocks_run(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def broken_load(**kwargs):
        raise OSError("no C++ compiler (simulated)")

    monkeypatch.setattr(native_blocks, "_STATE", {})
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    model = CausalWanModel.from_preset("tiny", num_layers=1).eval()
    x, t, ctx = torch.randn(1, 3, 8, 16, 16), torch.full((1, 3), 500.0), torch.randn(1, 16, 384)
    with torch.no_grad():
        expected = model(x, t, ctx, kv_cache=model.new_kv_cache(1, 16, 16, max_frames=3))
        with pytest.warns(RuntimeWarning, match="no C.. compiler"), timed_kernel_choice():
            out = model(x, t, ctx, kv_cache=model.new_kv_cache(1, 16, 16, max_frames=3))
        with timed_kernel_choice():  # warned once: no second warning (pytest turns warnings into errors if asked)
            model(x, t, ctx, kv_cache=model.new_kv_cache(1, 16, 16, max_frames=3))
    assert torch.allclose(out, expected, atol=1e-5)  # the Python blocks ran (FFN kernel may differ: rounding only)
    assert isinstance(native_blocks.build_error(), OSError)
    monkeypatch.setenv("SELFFORCING_CPU_BLOCKS", "native")  # asked for explicitly: an error, not a fallback
    with pytest.raises(RuntimeError, match="native, but the C.. blocks could not be built: no C.. compiler"), \
            torch.no_grad(), timed_kernel_choice():
        model(x, t, ctx, kv_cache=model.new_kv_cache(1, 16, 16, max_frames=3))


@needs_build
def test_an_error_inside_the_cpp_blocks_is_a_python_exception():
    """A malformed call fails with a message that names the problem, not a crash (the GIL is released inside); the
    arguments cross by name, so a missing one is named too."""
    from dataclasses import replace
    from types import SimpleNamespace

    ext = native_blocks.extension()
    empty = torch.empty(0, dtype=torch.long)
    z = torch.zeros(1)
    args = native_blocks.NativeForward(
        latents=[torch.zeros(1, 1, 2, 4, 4)], patch_weight=torch.zeros(8, 8), patch_bias=torch.zeros(8), patch_h=2,
        patch_w=2, positions=torch.empty(0), e=torch.zeros(1, 1, 6, 8), temb=torch.zeros(1, 1, 8),
        rope=torch.zeros(4, 2, 2), weights=[z] * 5, text_k=[], text_v=[], cache_k=z, cache_v=z, slots=empty, visible=0, read_index=empty, pending_slots=empty,
        pending_visible=0, pending_read_index=empty, kv_only=False, heads=2, ln_eps=1e-6, rms_eps=1e-6, short_keys=64,
        cross_norm=True, ffn_onednn=False, head_table=torch.zeros(1, 2, 8), proj_weight=torch.zeros(4, 8),
        proj_bias=torch.zeros(4), head_eps=1e-6, key_ends=empty)
    with pytest.raises(RuntimeError, match="tensors per block"):
        ext.run_forward(args)
    # one block's worth of weights, no cache, but a cache pass asked for
    cacheless_pass = replace(args, weights=[z] * ext.weights_per_block, text_k=[z], text_v=[z],
                             cache_k=torch.empty(0), cache_v=torch.empty(0), kv_only=True)
    with pytest.raises(RuntimeError, match="without a KV cache has no finished chunk to fuse and no cache pass"):
        ext.run_forward(cacheless_pass)
    with pytest.raises(RuntimeError, match="one or two latent chunks"):
        ext.run_forward(replace(args, latents=[torch.zeros(1, 1, 2, 4, 4)] * 3))
    with pytest.raises(RuntimeError, match="divisible by the patch size"):
        ext.run_forward(replace(args, latents=[torch.zeros(1, 1, 2, 5, 4)]))
    with pytest.raises(AttributeError, match="rms_eps"):
        ext.run_forward(SimpleNamespace(**{k: v for k, v in vars(args).items() if k != "rms_eps"}))


@needs_build
def test_fused_bias_gelu_equals_torch_gelu_and_checks_its_input():
    """The feature-major FFN's one-pass bias + tanh-GELU: within 1e-6 of torch's GELU(tanh) from -60 to 60 (the
    rational tanh saturates correctly), in place, parallel over rows with any thread count; a bad input is an error
    that says what it must be, and the extension shares torch's OpenMP runtime rather than loading a second one."""
    ext = native_blocks.extension()
    g = torch.Generator().manual_seed(0)
    h = torch.cat([torch.linspace(-60, 60, 1536 * 7).view(1536, 7), torch.randn(1536, 185, generator=g) * 4], 1)
    h = h.contiguous()
    bias = torch.randn(1536, generator=g)
    expected = torch.nn.functional.gelu(h + bias[:, None], approximate="tanh")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = h.clone()
        assert ext.bias_gelu_tanh_(out, bias).data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 * max(1.0, float(expected.abs().max()) / 60))
    with pytest.raises(RuntimeError, match="contiguous float32 CPU matrix"):
        ext.bias_gelu_tanh_(h.t(), bias)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        ext.bias_gelu_tanh_(h.clone(), bias[:10])
    with open("/proc/self/maps") as fh:
        gomp = {line.split()[-1] for line in fh if "libgomp" in line}
    assert len(gomp) <= 1, gomp


@needs_build
def test_fused_rms_rope_equals_the_python_bias_norm_and_rotation():
    """rms_rope_ = the projection's bias, _rms_normed, then apply_rope_cis (batch 2, 3 heads, with or without each of
    bias, gain and table), in place."""
    from selfforcing.models.wan.blocks import apply_rope_cis, rms_normed

    ext = native_blocks.extension()
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=g) + 0.5)
        y = torch.randn(2, 40, 96, generator=g) * 3
        bias = torch.randn(96, generator=g)
        cs = torch.randn(40, 16, 2, generator=g)
        for b, gain, table in ((bias, norm.weight, cs), (None, norm.weight, None), (bias, None, cs), (None, None, cs)):
            ref = torch.nn.RMSNorm(96, eps=1e-6, elementwise_affine=gain is not None)
            if gain is not None:
                ref.weight.copy_(gain)
            expected = rms_normed(ref, y.clone() if b is None else y + b)
            if table is not None:
                expected = apply_rope_cis(expected.unflatten(2, (3, 32)), table).flatten(2)
            out = y.clone()
            assert ext.rms_rope_(out, _opt(b), _opt(gain), _opt(table), 1e-6).data_ptr() == out.data_ptr()
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="RoPE table must be"):
            ext.rms_rope_(y.clone(), bias, norm.weight, torch.randn(7, 16, 2), 1e-6)
        with pytest.raises(RuntimeError, match="bias must be"):
            ext.rms_rope_(y.clone(), bias[:5], norm.weight, cs, 1e-6)


def _opt(t):
    return torch.empty(0) if t is None else t


def _modulation(batch=2, frames=3, d=64, seed=0):
    """A block's scale_shift_table [1, 6, D], e [B, F, 6, D], and the six [B, F, 1, D] vectors the block unbinds."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(1, 6, d, generator=g) / d**0.5
    e = torch.randn(batch, frames, 6, d, generator=g)
    return table, e, (table[None] + e).unsqueeze(3).unbind(2)


@needs_build
def test_fused_modulated_norm_equals_the_python_one():
    """modulated_norm = _modulated_norm of a LayerNorm without gain or bias, with the shift and scale of frames f0..
    taken from the block's table and e (batch 2; before the attention and before the FFN), a new tensor; a bad shape
    is an error that says so."""
    from selfforcing.models.wan.blocks import modulated_norm

    ext = native_blocks.extension()
    x = torch.randn(2, 3, 40, 64, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    table, e, (shift, scale, _, c_shift, c_scale, _) = _modulation(frames=4)
    norm = torch.nn.LayerNorm(64, eps=1e-6, elementwise_affine=False)
    with torch.no_grad():
        for j, f0, sh, sc in ((0, 0, shift[:, :3], scale[:, :3]), (3, 1, c_shift[:, 1:], c_scale[:, 1:])):
            expected = modulated_norm(x, norm, sc, sh)
            out = ext.modulated_norm(x, table, e, j, f0, 1e-6)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            assert out.data_ptr() != x.data_ptr()
    with pytest.raises(RuntimeError, match=r"must match e \[B"):
        ext.modulated_norm(x, table, e, 0, 2, 1e-6)
    with pytest.raises(RuntimeError, match=r"e must be a contiguous \[B, F, 6, D\]"):
        ext.modulated_norm(x, table, e[:, :, :5], 0, 0, 1e-6)


@needs_build
@pytest.mark.parametrize("t", [40, 37])
def test_fused_residual_updates_equal_the_python_block_steps(t):
    """The three residual updates of CausalWanBlock.forward with their norms: after the self-attention (a fused
    finished chunk's frame dropped, with and without the cross-attention norm), after the cross-attention, and after
    the FFN (its output row-major with bias, or feature-major with the bias added in the update; 37 tokens per frame
    leave rows outside the 8 x 8 tiles of the AVX2 form)."""
    from selfforcing.models.wan.blocks import fp32_layer_norm, modulated_norm

    ext = native_blocks.extension()
    g = torch.Generator().manual_seed(2)
    b, nf, d, drop = 2, 3, 64, 1
    table, e, (_, _, gate, c_shift, c_scale, c_gate) = _modulation(frames=nf + drop)
    x = torch.randn(b, nf + drop, t, d, generator=g)
    a, c, f = (torch.randn(b, nf * t, d, generator=g) for _ in range(3))
    ob, cb, fb = (torch.randn(d, generator=g) for _ in range(3))
    norm2 = torch.nn.LayerNorm(d, eps=1e-6)
    with torch.no_grad():
        norm2.weight.copy_(torch.rand(d, generator=g) + 0.5)
        norm2.bias.copy_(torch.randn(d, generator=g))
        y_ref = x[:, drop:] + (a + ob).view(b, nf, t, d) * gate[:, drop:]
        for use_norm in (True, False):
            y, h = ext.gate_residual_norm(x, a, ob, table, e, drop, use_norm, norm2.weight, norm2.bias, 1e-6)
            torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
            expected_h = fp32_layer_norm(y_ref, norm2) if use_norm else y_ref
            torch.testing.assert_close(h, expected_h, rtol=1e-5, atol=1e-5)
        norm3 = torch.nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        y2_ref = y_ref + (c + cb).view(b, nf, t, d)
        h3 = ext.residual_modulated_norm_(y, c, cb, table, e, drop, 1e-6)
        torch.testing.assert_close(y, y2_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h3, modulated_norm(y2_ref, norm3, c_scale[:, drop:], c_shift[:, drop:]),
                                   rtol=1e-5, atol=1e-5)
        y3_ref = y2_ref + (f + fb).view(b, nf, t, d) * c_gate[:, drop:]
        row_major = ext.gate_residual_ffn_(y.clone(), (f + fb).view(-1, d), False, torch.empty(0), table, e, drop)
        feature_major = ext.gate_residual_ffn_(y.clone(), f.view(-1, d).t().contiguous(), True, fb, table, e, drop)
        for out in (row_major, feature_major):
            torch.testing.assert_close(out, y3_ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="must be \\[rows, D\\]"):
        ext.gate_residual_ffn_(y, f.view(-1, d).t(), False, fb, table, e, drop)
    with pytest.raises(RuntimeError, match="row-major f carries its bias"):  # it would otherwise be ignored
        ext.gate_residual_ffn_(y, f.view(-1, d), False, fb, table, e, drop)


@needs_build
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("keys", [1, 13, 16, 64])
def test_short_attention_equals_the_explicit_softmax(keys, portable):
    """short_attention = attention._short_key_attention for q a strided view (as the projections give it), 1 to 64
    keys (a partial tile of 16 among them) and 50 queries (a partial tile of 4), scores large enough that the
    softmax's max shift matters, in the AVX2 and the portable form; more than 64 keys is an error."""
    from selfforcing.models.attention import _short_key_attention

    g = torch.Generator().manual_seed(keys)
    q = (torch.randn(2, 50, 3 * 32 + 8, generator=g) * 4)[..., :96].unflatten(2, (3, 32))
    k, v = (torch.randn(2, keys, 3, 32, generator=g) * 2 for _ in range(2))
    ext = native_blocks.extension()
    torch.testing.assert_close(ext.short_attention(q, k, v, portable=portable), _short_key_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="1 <= L <= 64"):
        ext.short_attention(q, torch.randn(2, 65, 3, 32), torch.randn(2, 65, 3, 32))


@needs_build
def test_write_kv_equals_the_cache_write():
    """write_kv = KVCache.write (index_copy_ of the transposed K and V into the slots) with the value bias added, for
    rows narrowed out of a bigger projection; a slot out of range is an error, and nothing is written."""
    g = torch.Generator().manual_seed(3)
    cache_k, cache_v = torch.zeros(2, 2, 3, 20, 16), torch.zeros(2, 2, 3, 20, 16)
    k, v = (torch.randn(2, 12, 3, 16, generator=g) for _ in range(2))
    vb = torch.randn(48, generator=g)
    slots = torch.tensor([7, 3, 19, 0, 11])
    ext = native_blocks.extension()
    ext.write_kv(cache_k, cache_v, 1, slots, k.narrow(1, 4, 5), v.narrow(1, 4, 5), vb)
    expected_k, expected_v = torch.zeros_like(cache_k), torch.zeros_like(cache_v)
    expected_k[1].index_copy_(2, slots, k[:, 4:9].transpose(1, 2))
    expected_v[1].index_copy_(2, slots, (v[:, 4:9] + vb.view(3, 16)).transpose(1, 2))
    assert torch.equal(cache_k, expected_k)
    torch.testing.assert_close(cache_v, expected_v, rtol=0, atol=0)
    before = cache_k.clone()
    with pytest.raises(RuntimeError, match="slot 20 out of range"):
        ext.write_kv(cache_k, cache_v, 0, torch.tensor([1, 2, 20, 4, 5]), k[:, :5], v[:, :5], vb)
    assert torch.equal(cache_k, before)


@needs_build
def test_native_blocks_see_a_replaced_or_updated_parameter(monkeypatch):
    """The C++ blocks keep the parameter list (and transposed copies of the attention projections) between forwards;
    a parameter replaced by a new tensor (a load with assign=True, say) or updated in place is used from the next
    forward on, as the Python blocks use it."""
    model = CausalWanModel.from_preset("tiny", num_layers=2).eval()
    x, t, ctx = torch.randn(1, 3, 8, 16, 16), torch.full((1, 3), 500.0), torch.randn(1, 16, 384)

    def forward(setting):
        monkeypatch.setenv("SELFFORCING_CPU_BLOCKS", setting)
        with torch.no_grad(), timed_kernel_choice():
            return model(x, t, ctx, kv_cache=model.new_kv_cache(1, 16, 16, max_frames=3))

    before = forward("native")
    model.blocks[1].ffn.net[2].weight = torch.nn.Parameter(torch.randn(128, 512) * 0.05)
    after = forward("native")
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, forward("python"), rtol=1e-5, atol=2e-5)
    # an in-place update of a projection whose weight C++ also keeps transposed (an optimizer step, a load_state_dict)
    with torch.no_grad():
        for lin in (model.blocks[0].attn1.to_v, model.blocks[1].attn2.to_out[0]):
            lin.weight.copy_(torch.randn_like(lin.weight) * 0.1)
    updated = forward("native")
    assert not torch.allclose(updated, after, atol=1e-3)
    torch.testing.assert_close(updated, forward("python"), rtol=1e-5, atol=2e-5)


@needs_build
@pytest.mark.parametrize("batch,queries,keys", [(1, 192, 768), (2, 50, 65), (1, 1, 2048), (1, 7, 3000)])
def test_window_attention_equals_sdpa(batch, queries, keys):
    """window_attention = torch's SDPA for queries as the projection's strided view and keys / values as the
    transposed views of a head-major cache buffer: a full block of 48 queries and a partial one, windows whose length
    is not a multiple of the 6-key tile, and past 2048 keys (where SDPA itself runs)."""
    g = torch.Generator().manual_seed(keys)
    q = (torch.randn(batch, queries, 4 * 32 + 8, generator=g) * 2)[..., :128].unflatten(2, (4, 32))
    k, v = (torch.randn(batch, 4, keys + 5, 32, generator=g)[:, :, :keys].transpose(1, 2) for _ in range(2))
    expected = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2)).transpose(1, 2)
    ext = native_blocks.extension()
    out = ext.window_attention(q, k, v)
    assert out.is_contiguous() and out.shape == q.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ext.window_attention(q, k, v, sdpa=True), expected, rtol=0, atol=0)


@needs_build
@pytest.mark.parametrize("sdpa", [False, True])
def test_window_attention_with_key_prefixes_equals_masked_sdpa(sdpa):
    """With key_ends, query i attends to keys [0, key_ends[i]) only: torch's SDPA under the same boolean mask, for
    block-causal prefixes whose blocks (108 tokens) do not align with the 48-query blocks, plus one single-query
    block; out-of-range or mis-shaped prefixes are errors that say so."""
    g = torch.Generator().manual_seed(5)
    n, heads, dh = 325, 2, 64
    q, k, v = (torch.randn(1, n, heads, dh, generator=g) * 2 for _ in range(3))
    ends = torch.tensor([108] * 108 + [216] * 108 + [324] * 108 + [325])
    mask = torch.arange(n)[None, :] < ends[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
    ext = native_blocks.extension()
    out = ext.window_attention(q, k, v, sdpa=sdpa, key_ends=ends)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    unmasked = ext.window_attention(q, k, v, sdpa=sdpa)
    assert (out[:, :108] - unmasked[:, :108]).abs().max() > 0.1  # the prefix really limits the keys
    with pytest.raises(RuntimeError, match=r"key_ends entry must lie in \[1, M\]"):
        ext.window_attention(q, k, v, key_ends=ends + 1)
    with pytest.raises(RuntimeError, match="key_ends must be an int64 CPU tensor"):
        ext.window_attention(q, k, v, key_ends=ends[:-1])


@needs_build
@pytest.mark.parametrize("latent,frames,batch,kw", [(16, 12, 1, {}), (12, 9, 2, {"cross_attn_norm": False}),
                                                     (12, 7, 1, {"independent_first_frame": True})])
@needs_build
def test_native_blocks_equal_python_blocks_without_a_cache(monkeypatch, latent, frames, batch, kw):
    """A cache-less no-grad forward (what `bench stream`'s recompute and sliding_window strategies run over
    [context | chunk] at every step) takes the C++ blocks, block-causal through key prefixes or bidirectional, and
    equals the Python blocks: 64 tokens per frame; 36 (blocks of 108 tokens across the 48-query tiles) with batch 2,
    80 text tokens and no cross-attention norm; an independent first frame (blocks of 1, 3, 3 frames)."""
    calls = _count_calls(monkeypatch)
    torch.manual_seed(0)
    model = CausalWanModel.from_preset("tiny", num_layers=2, spatial_embedding_grid=(latent // 2,) * 2, **kw).eval()
    with torch.no_grad():  # gains that make attention sharp enough for the mask to matter
        for blk in model.blocks:
            blk.attn1.norm_q.weight.mul_(3.0)
            blk.attn1.norm_k.weight.mul_(3.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, frames, 8, latent, latent, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000
    ctx = torch.randn(batch, 16 if batch == 1 else 80, 384, generator=g)
    out = {}
    for setting in ("python", "native"):
        monkeypatch.setenv("SELFFORCING_CPU_BLOCKS", setting)
        with torch.no_grad(), timed_kernel_choice():
            out[setting] = [model(x, t, ctx, causal=causal, start_frame=3) for causal in (True, False)]
    assert len(calls) == 2
    for py, c in zip(out["python"], out["native"]):
        torch.testing.assert_close(c, py, rtol=1e-5, atol=2e-5)
    assert (out["native"][0] - out["native"][1]).abs().max() > 1e-2  # block-causal differs from bidirectional


@needs_build
def test_native_blocks_leave_other_masks_and_taps_to_python(monkeypatch):
    """A local attention window (not a prefix mask), teacher forcing, hidden-layer taps and gradients stay on the
    Python blocks."""
    calls = _count_calls(monkeypatch)
    model = CausalWanModel.from_preset("tiny", num_layers=2, local_attn_size=6).eval()
    x, t, ctx = torch.randn(1, 9, 8, 16, 16), torch.full((1, 9), 500.0), torch.randn(1, 16, 384)
    with torch.no_grad(), timed_kernel_choice():
        model(x, t, ctx)
        model(x, t, ctx, clean_x=x)
        model(x, t, ctx, causal=False, output_hidden_layers=(0,))
    with timed_kernel_choice():
        model(x, t, ctx, causal=False)
    assert calls == []
    with torch.no_grad(), timed_kernel_choice():
        model(x, t, ctx, causal=False)
    assert len(calls) == 1


@needs_build
@pytest.mark.parametrize("rows", [1, 7, 192, 384])
def test_linear_t_equals_the_matmul(rows):
    """linear_t = x @ w^T through the transposed weight (6-row tiles and a remainder), and the matmul itself where the
    output width is not a multiple of 16 or no transposed weight is given."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 96, generator=g), torch.randn(64, 96, generator=g)
    ext = native_blocks.extension()
    torch.testing.assert_close(ext.linear_t(x, w, w.t().contiguous()), x @ w.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ext.linear_t(x, w, torch.empty(0)), torch.mm(x, w.t()))
    w40 = torch.randn(40, 96, generator=g)
    assert torch.equal(ext.linear_t(x, w40, w40.t().contiguous()), torch.mm(x, w40.t()))


@needs_build
def test_stage_timer_accounts_for_a_forward_only_while_on():
    """profile_sections(True) makes the C++ forward add each stage's wall time (what profile_chunk.py reports); off,
    nothing is added; the stages of one forward sum to no more than its wall time."""
    import time

    ext = native_blocks.extension()
    model = CausalWanModel.from_preset("tiny", num_layers=2).eval()
    x, t, ctx = torch.randn(1, 3, 8, 16, 16), torch.full((1, 3), 500.0), torch.randn(1, 16, 384)

    def forward():
        with torch.no_grad(), timed_kernel_choice():
            model(x, t, ctx, kv_cache=model.new_kv_cache(1, 16, 16, max_frames=3))

    forward()  # the kernel choice's timings happen here, outside the measured forward
    ext.section_seconds(reset=True)
    forward()
    assert not any(ext.section_seconds().values())
    ext.profile_sections(True)
    try:
        t0 = time.perf_counter()
        forward()
        wall = time.perf_counter() - t0
    finally:
        ext.profile_sections(False)
    stages = ext.section_seconds(reset=True)
    for name in ("q/k/v projections", "self-attention", "cross-attention", "FFN up", "FFN down", "head"):
        assert stages[name] > 0, name
    assert 0 < sum(stages.values()) <= wall


@needs_build
def test_transposed_weight_copies_only_where_the_tile_gemm_runs():
    """The register-tile GEMM (and so a transposed copy of a projection's weight) only for input widths up to 512,
    where it beat MKL: the small presets' projections get copies, a wider model's (Wan-like) none, so its memory is
    not doubled; positions in the flat list follow enum W (22 parameters, then the 6 copies, per block)."""
    small = CausalWanModel.from_preset("tiny", num_layers=1).eval()
    wide = CausalWanModel.from_preset("tiny", num_layers=1, num_attention_heads=12, attention_head_dim=64).eval()
    for model, copies in ((small, 6), (wide, 0)):
        flat = native_blocks._params(model)
        assert len(flat) == 28 == native_blocks.extension().weights_per_block  # the C++ side reads the same layout
        assert sum(t.numel() > 0 for t in flat[22:]) == copies
    q = small.blocks[0].attn1.to_q.weight
    assert torch.equal(native_blocks._params(small)[22], q.t())
