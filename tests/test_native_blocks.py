"""The C++ blocks (selfforcing/models/native_blocks.py) compute the Python blocks' numbers, to float rounding, on every
path a cached CPU inference forward takes, run only where they are meant to, and fail safe: a bad setting is a clear
error, a failed build falls back to Python with a warning, an error inside C++ reaches Python as an exception. Their
two fused kernels are checked against torch's own ops directly."""

import pytest
import torch

from selfforcing.models import CausalWanModel, native_blocks
from selfforcing.models.causal_wan import onednn_linear_available
from selfforcing.perf import timed_kernel_choice

pytestmark = pytest.mark.skipif(native_blocks.extension() is None, reason="the C++ extension did not build here")


def _count_calls(monkeypatch) -> list:
    calls = []
    real = native_blocks.run_blocks

    def counted(*args, **kwargs):
        calls.append(kwargs.get("kv_only", args[7] if len(args) > 7 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(native_blocks, "run_blocks", counted)
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


@pytest.mark.parametrize("ffn", ["feature_major", "onednn"])
@pytest.mark.parametrize("fused", [True, False])
def test_native_blocks_equal_python_blocks_on_a_rolling_stream(monkeypatch, ffn, fused):
    """A rolling window with a sink that evicts frames while the stream runs: outputs and cache bit for bit."""
    if ffn == "onednn" and not onednn_linear_available():
        pytest.skip("no oneDNN linear in this torch build")
    monkeypatch.setenv("SELFFORCING_CPU_FFN", ffn)
    calls = _count_calls(monkeypatch)
    torch.manual_seed(0)
    (out_py, cache_py), (out_c, cache_c) = _both(
        monkeypatch, lambda: CausalWanModel.from_preset("tiny", num_layers=3).eval(),
        lambda m: m.new_kv_cache(1, 16, 16, window_frames=7, sink_frames=1), fused=fused, chunks=5)
    assert len(calls) == 5 * 4 + (0 if fused else 5)  # every forward of the native run went through C++
    _assert_same((out_py, cache_py.k, cache_py.v), (out_c, cache_c.k, cache_c.v))


def _assert_same(expected: tuple, actual: tuple) -> None:
    """Equal to float rounding through a whole stream (the C++ fuses the q/k norm with RoPE, and the feature-major
    FFN's bias with its GELU). Outputs and keys are O(1): a wrong op, eps, gain or order is off by far more."""
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-5)


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


def test_an_error_inside_the_cpp_blocks_is_a_python_exception():
    """A malformed call fails with a message that names the problem, not a crash (the GIL is released inside)."""
    ext = native_blocks.extension()
    empty = torch.empty(0, dtype=torch.long)
    with pytest.raises(RuntimeError, match="tensors per block"):
        ext.run_blocks(torch.zeros(1, 64, 8), torch.zeros(1, 1, 6, 8), torch.zeros(64, 2, 2), [torch.zeros(1)] * 5,
                       [], [], torch.zeros(1), torch.zeros(1), empty, 0, empty, empty, 0, empty, 64, False, 2, 1e-6,
                       1e-6, torch.ones(8), 64, True, False)


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


def test_fused_rms_rope_equals_the_python_norm_and_rotation():
    """rms_rope_ = _rms_normed then apply_rope_cis (batch 2, 3 heads, a gain or none, a table or none), in place."""
    from selfforcing.models.causal_wan import _rms_normed, apply_rope_cis

    ext = native_blocks.extension()
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=g) + 0.5)
        y = torch.randn(2, 40, 96, generator=g) * 3
        cs = torch.randn(40, 16, 2, generator=g)
        for gain, table in ((norm.weight, cs), (norm.weight, None), (None, cs)):
            ref = torch.nn.RMSNorm(96, eps=1e-6, elementwise_affine=gain is not None)
            if gain is not None:
                ref.weight.copy_(gain)
            expected = _rms_normed(ref, y.clone())
            if table is not None:
                expected = apply_rope_cis(expected.unflatten(2, (3, 32)), table).flatten(2)
            out = y.clone()
            ext.rms_rope_(out, torch.empty(0) if gain is None else gain, torch.empty(0) if table is None else table,
                          1e-6)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="RoPE table must be"):
            ext.rms_rope_(y.clone(), norm.weight, torch.randn(7, 16, 2), 1e-6)


def test_fused_layer_norm_modulation_equals_the_python_one():
    """layer_norm_modulate = _modulated_norm of a LayerNorm without gain or bias (batch 2, per-frame scale and shift
    taken as the strided views the block passes), a new tensor; a bad shape is an error that says so."""
    from selfforcing.models.causal_wan import _modulated_norm

    ext = native_blocks.extension()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 64, generator=g) * 2 + 0.5
    mod = torch.randn(2, 3, 6, 1, 64, generator=g)
    shift, scale = mod[:, :, 0], mod[:, :, 1]  # [2, 3, 1, 64] views with the stride of the 6 vectors
    norm = torch.nn.LayerNorm(64, eps=1e-6, elementwise_affine=False)
    with torch.no_grad():
        expected = _modulated_norm(x, norm, scale, shift)
        out = ext.layer_norm_modulate(x, scale, shift, 1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.data_ptr() != x.data_ptr()
    with pytest.raises(RuntimeError, match=r"scale and shift must be \[B, F, 1, D\]"):
        ext.layer_norm_modulate(x, scale[:, :2], shift[:, :2], 1e-6)


def test_native_blocks_see_a_replaced_parameter(monkeypatch):
    """The C++ blocks keep the parameter list between forwards; a parameter replaced by a new tensor (a load with
    assign=True, say) is used from the next forward on, as the Python blocks use it."""
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
