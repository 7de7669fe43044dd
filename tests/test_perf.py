"""Performance work keeps the numbers: the analytic FLOP count agrees with torch's own FLOP counter, the inference
fast path of the model equals its autograd path, and the stream benchmark's strategies are real alternatives that
produce the same frames as the rolling KV cache wherever their contexts are identical."""

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from selfforcing.benchmark import STRATEGIES, new_stream_state
from selfforcing.models import CausalWanModel
from selfforcing.models.wan.runtime import cpu_inference, cpu_shortcuts_enabled, plain_pytorch
from selfforcing.perf import cache_pass_flops, chunk_step_flops, forward_flops, rolling_chunk_flops


def test_forward_flops_match_torch_flop_counter():
    # the model without an accelerator runs the FFN through BLAS, which torch's FLOP counter sees (oneDNN's op not)
    torch.manual_seed(0)
    model = CausalWanModel.from_preset("tiny", num_layers=2).eval()
    cache = model.new_kv_cache(1, 16, 16, max_frames=12)
    ctx = torch.randn(1, 16, 384)
    with torch.no_grad():
        for s in (0, 3):  # fill 6 frames (the cross-attention cache is filled on the way)
            model(torch.randn(1, 3, 8, 16, 16), torch.zeros(1, 3), ctx, kv_cache=cache, start_frame=s)
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, 8, 16, 16), torch.full((1, 3), 500.0), ctx, kv_cache=cache, start_frame=6)
    model.condition_embedder._time_cache.clear()  # t = 0 was embedded above: count its MLPs below, as at t = 500
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    expected = forward_flops(model.config, 3 * 64, 9 * 64, 16)
    d, layers, n = 128, 2, 3 * 64
    attention = layers * (2 * 2 * n * (9 * 64) * d + 2 * 2 * n * 16 * d)  # scores + values, self and cross
    time_embedding = 2 * 3 * (256 * 128 + 128 * 128 + 128 * 6 * 128)  # per-frame MLPs, not in the analytic count
    # torch counts the linear layers (as addmm) exactly; its counter does not see the CPU SDPA kernel, so the
    # attention part is the closed form above
    assert counts["aten.addmm"] == expected - attention + time_embedding
    # the cache pass of the same chunk (a re-run at t = 0): the last layer stops after its K/V, no head
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        assert model(torch.randn(1, 3, 8, 16, 16), torch.zeros(1, 3), ctx, kv_cache=cache, start_frame=6,
                     kv_only=True) is None
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    cache_pass = cache_pass_flops(model.config, 3 * 64, 9 * 64, 16)
    assert counts["aten.addmm"] == cache_pass - attention // layers + time_embedding
    assert chunk_step_flops(model.config, 64, 3, 6, 16, 4) == 4 * expected + cache_pass


def test_rolling_chunk_flops_grow_while_the_window_fills_then_stay_flat():
    """Chunk 0 is its denoising forwards alone; every later chunk adds the previous chunk's fused cache pass; from the
    chunk after the first that attends to a full window on, every chunk costs what `bench chunk` counts for one."""
    config = CausalWanModel.from_preset("tiny", num_layers=2).config
    work = [rolling_chunk_flops(config, 64, 3, 12, i, 16, 4) for i in range(8)]
    assert work[0] == 4 * forward_flops(config, 3 * 64, 3 * 64, 16)
    assert work[1] == 4 * forward_flops(config, 3 * 64, 6 * 64, 16) + cache_pass_flops(config, 3 * 64, 3 * 64, 16)
    assert work[0] < work[1] < work[2] < work[3] < work[4]  # chunk 3 attends to 9 frames, its cache pass to 6
    assert work[4:] == [chunk_step_flops(config, 64, 3, 9, 16, 4)] * 4
    with pytest.raises(ValueError, match="window of whole chunks"):
        rolling_chunk_flops(config, 64, 3, 10, 0, 16, 4)


def _forward_all_modes(model, grad: bool):
    """Outputs of every forward mode (full causal, bidirectional, teacher forcing, KV-cache stream) of one model."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 9, 8, 16, 16, generator=g)
    clean = torch.randn(1, 9, 8, 16, 16, generator=g)
    t = torch.rand(1, 9, generator=g) * 1000
    ctx = torch.randn(1, 16, 384, generator=g)
    outs = []
    with torch.set_grad_enabled(grad):
        outs += [model(x, t, ctx), model(x, t, ctx, causal=False), model(x, t, ctx, clean_x=clean)]
        cache = model.new_kv_cache(1, 16, 16)
        for s in range(0, 9, 3):
            for step_t in (900.0, 0.0):  # a denoising step (cache write), then the cache pass (re-run)
                out = model(x[:, s:s + 3], torch.full((1, 3), step_t), ctx, kv_cache=cache, start_frame=s)
                outs.append(out)
                if grad:  # the gradient path writes nothing: fill the cache as the no-grad path would
                    with torch.no_grad():
                        model(x[:, s:s + 3], torch.full((1, 3), step_t), ctx, kv_cache=cache, start_frame=s)
    return [o.detach() for o in outs]


def test_inference_fast_path_equals_the_autograd_path():
    """Without autograd the model updates the residual stream in place, runs the CPU shortcuts (the FFN through
    oneDNN or on feature-major activations, the in-place RMSNorm, matmul attention over the text) and shares RoPE
    tables and chunk plans; the outputs must stay those of the differentiable path (rolling window + sinks)."""
    torch.manual_seed(0)
    model = CausalWanModel.from_preset("tiny", num_layers=3, local_attn_size=6, sink_size=3).eval()
    fast = _forward_all_modes(model, grad=False)
    slow = _forward_all_modes(model, grad=True)
    with plain_pytorch(), torch.no_grad():  # the baseline of `bench chunk --compare-plain`: shortcuts switched off
        assert not cpu_inference(torch.ones(2)) and not cpu_shortcuts_enabled()
        plain = _forward_all_modes(model, grad=False)
    assert cpu_shortcuts_enabled()
    assert len(fast) == len(slow) == len(plain) == 9
    for a, b, c in zip(fast, slow, plain):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(c, b, atol=2e-6, rtol=1e-5)


def _stream(model, strategy: str, chunks: int, window: int = 12, steps=(1000.0, 750.0, 500.0, 250.0)):
    g = torch.Generator().manual_seed(7)
    noise = [torch.randn(1, 3, 8, 16, 16, generator=g) for _ in range(chunks)]
    ctx = torch.randn(1, 16, 384, generator=g)
    state = new_stream_state(model, 1, (16, 16), window)
    gen = torch.Generator().manual_seed(11)  # the re-noising between denoising steps
    with torch.no_grad():
        return [STRATEGIES[strategy](model, state, n, list(steps), ctx, 3 * i, gen) for i, n in enumerate(noise)]


def test_recompute_strategies_equal_the_rolling_cache_while_the_window_fills():
    """Recomputing the context (in every denoising forward, or once per chunk into a fresh cache) sees exactly what
    the rolling KV cache holds until the first eviction, so the frames agree; after it they differ, because the
    recomputed context frames are re-encoded seeing only the window."""
    torch.manual_seed(0)
    model = CausalWanModel.from_preset("tiny", num_layers=2).eval()
    rolling = _stream(model, "rolling_kv", 6)
    for name in ("recompute", "recompute_kv"):
        other = _stream(model, name, 6)
        for c in range(4):  # frames [0, 12): the first window
            torch.testing.assert_close(other[c], rolling[c], atol=1e-5, rtol=1e-5)
        assert (other[5] - rolling[5]).abs().max() > 1e-4  # 50x the tolerance above (random weights)
    sliding = _stream(model, "sliding_window", 2)  # a bidirectional model over the window: a different video
    assert sliding[0].shape == rolling[0].shape and (sliding[1] - rolling[1]).abs().max() > 1e-3


def test_cpu_inference_kernels_equal_torch_reference():
    """The CPU inference shortcuts compute the same functions as torch's kernels: the sigmoid-form tanh-GELU, the
    matmul attention for short key sequences (text), the feature-major and oneDNN FFNs, the in-place RMSNorm."""
    import torch.nn.functional as F

    from selfforcing.accel.cpu import timed_kernel_choice
    from selfforcing.accel.cpu.ffn import FFN_SETTINGS, forward_onednn, onednn_linear_available
    from selfforcing.models.wan.attention import SHORT_KEYS, attention
    from selfforcing.models.wan.blocks import FeedForward, fp32_layer_norm, gelu_tanh_, rms_normed

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 6
    with torch.no_grad():  # the shortcuts run without autograd only
        torch.testing.assert_close(gelu_tanh_(x.clone()), F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-5)
        assert gelu_tanh_(torch.tensor([-1e4, 0.0, 1e4])).tolist() == [0.0, 0.0, 1e4]  # no overflow at the tails
    q = torch.randn(2, 40, 4, 16, generator=g)
    for keys in (1, 16, SHORT_KEYS, SHORT_KEYS + 1):
        k, v = torch.randn(2, keys, 4, 16, generator=g), torch.randn(2, keys, 4, 16, generator=g)
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        with torch.no_grad():
            torch.testing.assert_close(attention(q, k, v), ref, atol=1e-6, rtol=1e-5)
    qb, kb, vb = (t.bfloat16() for t in (q, k[:, :16], v[:, :16]))  # [B, N, H, Dh], 16 keys: the shortcut's range
    with torch.no_grad():  # half precision keeps SDPA's float accumulation: the shortcut is float32 only
        assert torch.equal(attention(qb, kb, vb), F.scaled_dot_product_attention(
            qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)).transpose(1, 2))
    ffn = FeedForward(32, 96)
    h = torch.randn(2, 3, 7, 32, generator=g)
    slow = ffn.net[2](F.gelu(ffn.net[0].proj(h), approximate="tanh"))
    with torch.no_grad():
        paths = {"forward": ffn(h), "feature_major": ffn.forward_feature_major(h)}
        if onednn_linear_available():  # x86 builds of torch; elsewhere the accelerator takes the feature-major path
            paths["onednn"] = forward_onednn(ffn, h)
        for setting in FFN_SETTINGS:  # SELFFORCING_CPU_FFN: each choice of the accelerator computes the same FFN
            with pytest.MonkeyPatch.context() as mp, timed_kernel_choice():
                mp.setenv("SELFFORCING_CPU_FFN", setting)
                paths[f"forward[{setting}]"] = ffn(h)
    for name, fast in paths.items():
        assert fast.shape == h.shape, name
        torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5, msg=name)
    plain = torch.nn.LayerNorm(32, 1e-6, elementwise_affine=False)  # given a unit gain on CPU: the same bits
    with torch.no_grad():
        assert torch.equal(fp32_layer_norm(h, plain), F.layer_norm(h, (32,), eps=1e-6))
    norm = torch.nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        y = torch.randn(2, 9, 32, generator=g) * 3
        torch.testing.assert_close(rms_normed(norm, y.clone()), norm(y), atol=1e-6, rtol=1e-5)


def test_fastest_name_times_once_and_keeps_the_faster_implementation():
    """fastest_name times every candidate on the first call of a key and only looks the winner up from then on; the
    FFN times its kernels only inside timed_kernel_choice (streaming), never in training; SELFFORCING_CPU_FFN must
    name a known FFN kernel."""
    from selfforcing.accel.cpu import chosen_paths, fastest_name, timed_kernel_choice
    from selfforcing.models.wan.blocks import FeedForward

    calls = {"slow": 0, "fast": 0}

    def slow(x):
        calls["slow"] += 1
        time.sleep(0.003)
        return x + 1

    def fast(x):
        calls["fast"] += 1
        return x + 1

    key = ("test", "slow-vs-fast")
    assert fastest_name(key, {"fast": fast, "slow": slow}, (1,)) == "fast"
    assert calls["fast"] == calls["slow"] >= 4  # timed over interleaved rounds
    before = dict(calls)
    assert fastest_name(key, {"fast": fast, "slow": slow}, (2,)) == "fast"
    assert calls == before  # no timing on later calls
    assert chosen_paths()[key] == "fast"
    assert fastest_name(("test", "slow first"), {"slow": slow, "fast": fast}, (1,)) == "fast"  # not the first listed
    n = calls["slow"]
    assert fastest_name(("test", "alone"), {"only": slow}, (0,)) == "only" and calls["slow"] == n  # no timing

    ffn, h = FeedForward(8, 16), torch.randn(5, 8)
    shape_keys = lambda: [k for k in chosen_paths() if k[:4] == ("cpu_ffn", 5, 8, 16)]  # noqa: E731
    with torch.no_grad():
        ffn(h)  # outside streaming (a training rollout, say) the kernel is fixed: nothing is timed
        assert shape_keys() == []
        with timed_kernel_choice():  # as StreamingGenerator runs the model
            ffn(h)
        assert len(shape_keys()) == 1

    with pytest.MonkeyPatch.context() as mp, torch.no_grad(), timed_kernel_choice():
        mp.setenv("SELFFORCING_CPU_FFN", "mkl")
        with pytest.raises(ValueError, match="SELFFORCING_CPU_FFN='mkl'"):
            FeedForward(8, 16)(torch.randn(3, 8))


def test_time_embedding_cache_returns_what_the_layers_compute_and_follows_the_weights():
    """Without autograd on CPU, ConditionEmbedder.embed_time keeps its result per timestep vector. A repeated call
    returns the same numbers as the layers compute; an in-place update of a weight (an optimizer step, a
    load_state_dict), a replaced parameter and a dtype conversion each give fresh numbers; with autograd nothing is
    cached (the result has a graph)."""
    model = CausalWanModel.from_preset("tiny", num_layers=1).eval()
    ce = model.condition_embedder
    t = torch.tensor([1000.0, 1000.0, 500.0])

    def computed():
        from selfforcing.models.wan.blocks import timestep_sinusoid

        with torch.no_grad():
            temb = ce.time_embedder(timestep_sinusoid(t, ce.freq_dim).to(ce.time_proj.weight.dtype))
            return temb, ce.time_proj(ce.act_fn(temb))

    def check():
        with torch.no_grad():
            first, again = ce.embed_time(t), ce.embed_time(t)
        assert again[0] is first[0] and again[1] is first[1]  # the second call was served from the cache
        for got, want in zip(again, computed()):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        return again

    before = check()
    with torch.no_grad():
        ce.time_proj.weight.mul_(2.0)  # in place
    after = check()
    assert not torch.allclose(after[1], before[1])
    ce.time_embedder.linear_1.weight = torch.nn.Parameter(torch.randn_like(ce.time_embedder.linear_1.weight))
    replaced = check()
    assert not torch.allclose(replaced[0], after[0])
    model.double()
    assert check()[0].dtype == torch.float64
    model.float()
    grad = ce.embed_time(t)
    assert grad[0].requires_grad and grad[0] is not ce.embed_time(t)[0]


def test_rope_tables_built_from_per_frame_tables_equal_the_whole_range():
    """WanRotaryEmbedding.table assembles a range from cached per-frame tables (a stream's chunk, its fused cache pass
    and the next chunk share frames); each is bit for bit the table of the whole range computed at once, for
    overlapping ranges, repeated ranges (teacher forcing) and far positions."""
    from selfforcing.models.wan.blocks import WanRotaryEmbedding

    rope = WanRotaryEmbedding(64)
    for start, frames, repeats in ((0, 3, 1), (3, 6, 1), (6, 3, 1), (2, 3, 2), (100_000, 3, 1), (3, 6, 1)):
        whole = torch.arange(start, start + frames).repeat(repeats)
        expected = torch.stack(rope.forward(whole, 8, 6), -1)
        got = rope.table(start, frames, 8, 6, "cpu", repeats=repeats)
        assert got.shape == (repeats * frames * 48, 32, 2) and torch.equal(got, expected)
