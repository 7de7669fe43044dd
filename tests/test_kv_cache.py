"""KV-cache forwards against full masked forwards (acceptance c, d, e) and the cache's own behaviour."""

import pytest
import torch
from conftest import WAN_CONFIGS, make_model

from selfforcing.flow import blockwise_timesteps
from selfforcing.models import CausalWanModel
from selfforcing.models.attention import block_causal_frame_mask, block_sizes_for, teacher_forcing_frame_mask

CFG = WAN_CONFIGS["a"]
C, TXT = CFG["in_channels"], CFG["text_dim"]


def _data(frames, seed=0, h=4, w=6, b=2):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(b, frames, C, h, w, generator=g)
    noisy = torch.randn(b, frames, C, h, w, generator=g)
    t = (torch.rand(b, frames, generator=g) * 999 + 1)
    ctx = torch.randn(b, 5, TXT, generator=g)
    return clean, noisy, t, ctx


def _full_reference(model, clean, noisy, t, ctx, s, e):
    """Chunk [s, e) from a full block-causal forward: earlier frames clean at t=0, the chunk noisy at t."""
    seq = torch.cat([clean[:, :s], noisy[:, s:e]], 1)
    tt = torch.cat([torch.zeros(t.shape[0], s), t[:, s:e]], 1)
    return model(seq, tt, ctx, causal=True)[:, s:e]


def _stream(model, clean, noisy, t, ctx, cache, sizes):
    """Chunk by chunk: denoise the noisy chunk (3 passes, as a sampler would), then cache it clean at t=0."""
    outs, s = [], 0
    for n in sizes:
        e = s + n
        for _ in range(3):  # re-running the same chunk must overwrite, never accumulate
            out = model(noisy[:, s:e], t[:, s:e], ctx, kv_cache=cache, start_frame=s)
        outs.append(out)
        model(clean[:, s:e], torch.zeros(t.shape[0], n), ctx, kv_cache=cache, start_frame=s)
        s = e
    return outs


@pytest.mark.parametrize("block,independent_first,frame_emb", [(2, False, 0), (3, False, 0), (1, False, 0),
                                                                (2, True, 0), (2, False, 4), (1, True, 3)])
def test_chunkwise_cache_equals_full_block_causal_and_teacher_forcing(block, independent_first, frame_emb):
    """(c) every chunk through the cache == the full block-causal forward == the teacher-forcing layout (also with
    frame embeddings, fewer than the frames: the later frames share the last one)."""
    model = make_model(CFG, num_frame_per_block=block, independent_first_frame=independent_first,
                       num_frame_embeddings=frame_emb)
    frames = 3 * block + (1 if independent_first else 0)
    clean, noisy, t, ctx = _data(frames)
    sizes = block_sizes_for(frames, block, independent_first)
    t = blockwise_timesteps(t[:, : len(sizes)], sizes)  # one timestep per chunk, as a sampler uses
    with torch.no_grad():
        cache = model.new_kv_cache(2, 4, 6, max_frames=frames)
        outs = _stream(model, clean, noisy, t, ctx, cache, sizes)
        tf = model(noisy, t, ctx, clean_x=clean)
        s = 0
        for n, out in zip(sizes, outs):
            ref = _full_reference(model, clean, noisy, t, ctx, s, s + n)
            assert (out - ref).abs().max() <= 1e-5, (s, n)
            assert (tf[:, s:s + n] - ref).abs().max() <= 1e-5, (s, n)
            s += n
    assert cache.end_frame == frames


def _window_rule(q_end, j, window, sink):
    return j < q_end and (j >= q_end - (window - sink) or j < sink)


@pytest.mark.parametrize("window,sink,block,frame_emb", [(4, 0, 2, 0), (6, 2, 2, 0), (5, 1, 3, 0), (3, 1, 1, 0),
                                                         (6, 2, 2, 5)])
def test_rolling_cache_equals_sliding_window_with_sinks(window, sink, block, frame_emb):
    """(d) window L with S sinks, chunk by chunk over >= 4L frames == full forward with the window+sink mask."""
    frames = block * (-(-4 * window // block) + 1)
    model = make_model(CFG, num_frame_per_block=block, local_attn_size=window, sink_size=sink,
                       num_frame_embeddings=frame_emb)
    # the mask the full forward uses is the rule stated in attention.py, checked element by element
    sizes = block_sizes_for(frames, block)
    fm = block_causal_frame_mask(sizes, window, sink)
    ends = [sum(sizes[: i // block + 1]) for i in range(frames)]
    expected = torch.tensor([[_window_rule(ends[i], j, window, sink) for j in range(frames)] for i in range(frames)])
    assert torch.equal(fm, expected)
    assert int(fm[-1].sum()) == window  # the last chunk sees exactly L frames: S sinks + L - S recent

    clean, noisy, t, ctx = _data(frames, seed=1, b=1)
    with torch.no_grad():
        cache = model.new_kv_cache(1, 4, 6)
        assert cache.capacity == window  # the buffer never grows past the window
        outs = _stream(model, clean, noisy, t, ctx, cache, sizes)
        for c, out in enumerate(outs):
            s = c * block
            ref = _full_reference(model, clean, noisy, t, ctx, s, s + block)
            assert (out - ref).abs().max() <= 1e-5, c
        # the window matters: a global-attention model disagrees on the last chunk
        glob = make_model(CFG, num_frame_per_block=block, num_frame_embeddings=frame_emb)
        ref_global = _full_reference(glob, clean, noisy, t, ctx, frames - block, frames)
        assert (outs[-1] - ref_global).abs().max() > 1e-4


def test_causality_perturbing_a_frame_never_changes_earlier_chunks():
    """(e) full and cached: changing frame j changes nothing before j's block."""
    block, frames = 2, 8
    model = make_model(CFG, num_frame_per_block=block)
    clean, noisy, t, ctx = _data(frames, seed=2)
    with torch.no_grad():
        base_full = model(noisy, t, ctx)
        base_stream = _stream(model, clean, noisy, t, ctx, model.new_kv_cache(2, 4, 6, max_frames=frames), [block] * 4)
        for j in range(frames):
            noisy2, clean2 = noisy.clone(), clean.clone()
            noisy2[:, j] += 3.0
            clean2[:, j] += 3.0
            first_changed = (j // block) * block
            full = model(noisy2, t, ctx)
            assert torch.equal(full[:, :first_changed], base_full[:, :first_changed]), j
            assert (full[:, first_changed:first_changed + block] - base_full[:, first_changed:first_changed + block]).abs().max() > 1e-4
            stream = _stream(model, clean2, noisy2, t, ctx, model.new_kv_cache(2, 4, 6, max_frames=frames), [block] * 4)
            for c in range(j // block):
                assert torch.equal(stream[c], base_stream[c]), (j, c)


def test_teacher_forcing_mask_shape_of_visibility():
    m = teacher_forcing_frame_mask([2, 2, 2])
    n = 6
    # noisy block 1 (frames 2,3) sees clean 0,1 and noisy 2,3 only
    assert m[n + 2].tolist() == [True, True, False, False, False, False, False, False, True, True, False, False]
    # clean queries never see noisy keys
    assert not bool(m[:n, n:].any())


def test_rope_positions_are_unbounded_10000_frame_stream():
    """A rolling stream past latent frame 10,000 works, and its last chunk equals a full forward of the window
    run at the same absolute positions (no RoPE table to run off: rope_max_seq_len is 1024)."""
    cfg = dict(CFG, num_layers=1)
    block, window = 10, 20
    model = make_model(cfg, num_frame_per_block=block, local_attn_size=window)
    g = torch.Generator().manual_seed(3)
    ctx = torch.randn(1, 2, TXT, generator=g)
    chunk = torch.randn(1, block, C, 2, 2, generator=g)
    cache = model.new_kv_cache(1, 2, 2)
    n_chunks = 1001  # frames [0, 10010)
    with torch.no_grad():
        for c in range(n_chunks - 1):
            model(chunk, torch.zeros(1, block), ctx, kv_cache=cache, start_frame=c * block)
        s = (n_chunks - 1) * block
        t = torch.full((1, block), 700.0)
        last = model(chunk, t, ctx, kv_cache=cache, start_frame=s)
        seq = torch.cat([chunk, chunk], 1)
        tt = torch.cat([torch.zeros(1, block), t], 1)
        ref = model(seq, tt, ctx, start_frame=s - block)[:, block:]
    assert s + block > 10000 and cache.end_frame == s + block
    assert (last - ref).abs().max() <= 1e-5
    # the temporal angles at frame 10,005 are exactly pos * theta^(-2i/d_t), computed in float64
    cos, _ = model.rope(torch.tensor([10005]), 1, 1)
    d_t = model.rope.t_dim
    inv = 1.0 / (10000.0 ** (torch.arange(0, d_t, 2, dtype=torch.float64) / d_t))
    torch.testing.assert_close(cos[0, : d_t // 2], torch.cos(10005 * inv).float())


def test_cross_attention_cache_is_reused_and_replaced_on_prompt_switch():
    model = make_model(CFG, num_frame_per_block=2)
    clean, noisy, t, ctx = _data(4, seed=4)
    ctx2 = torch.randn_like(ctx)
    with torch.no_grad():
        cache = model.new_kv_cache(2, 4, 6, max_frames=4)
        model(noisy[:, :2], t[:, :2], ctx, kv_cache=cache, start_frame=0)
        first = cache.cross_k[0]
        model(clean[:, :2], torch.zeros(2, 2), ctx, kv_cache=cache, start_frame=0)
        assert cache.cross_k[0] is first  # same prompt: not recomputed
        out2 = model(noisy[:, 2:], t[:, 2:], ctx2, kv_cache=cache, start_frame=2)  # switch the prompt
        assert cache.cross_k[0] is not first
        # with the switch, chunk 2 sees the clean chunk 1 computed under the OLD prompt, cross-attends the new
        seq = torch.cat([clean[:, :2], noisy[:, 2:]], 1)
        tt = torch.cat([torch.zeros(2, 2), t[:, 2:]], 1)
        mixed = model(seq, tt, ctx2)[:, 2:]  # full forward under the new prompt also re-encodes chunk 0
        assert (out2 - mixed).abs().max() > 1e-6
        cache.reset()
        assert cache.end_frame == 0 and cache.cross_k is None


def test_gradient_path_snapshots_the_cache_and_writes_nothing():
    """With gradients the chunk reads a snapshot: the cache carries no autograd history, later writes to the
    ring buffer cannot change the backward (checkpointed or not), and the forward equals the no-grad one."""
    block, window = 2, 4
    grads = []
    for checkpointing in (False, True):
        model = make_model(CFG, num_frame_per_block=block, local_attn_size=window)
        if checkpointing:
            model.enable_gradient_checkpointing()
        clean, noisy, t, ctx = _data(10, seed=5, b=1)
        cache = model.new_kv_cache(1, 4, 6)
        with torch.no_grad():
            for c in range(2):
                model(clean[:, 2 * c:2 * c + 2], torch.zeros(1, 2), ctx, kv_cache=cache, start_frame=2 * c)
            ref = model(noisy[:, 4:6], t[:, 4:6], ctx, kv_cache=cache, start_frame=4)
        before = cache.k.clone()
        out = model(noisy[:, 4:6] + 1.0, t[:, 4:6], ctx, kv_cache=cache, start_frame=4)  # a re-run of chunk 2
        assert out.requires_grad and torch.equal(cache.k, before)  # nothing written
        with torch.no_grad():
            ref = model(noisy[:, 4:6] + 1.0, t[:, 4:6], ctx, kv_cache=cache, start_frame=4)
        assert cache.k.grad_fn is None and not cache.k.requires_grad
        assert (out - ref).abs().max() <= 1e-6
        with torch.no_grad():  # keep streaming: these writes overwrite ring slots the snapshot came from
            for c in range(2, 5):
                model(clean[:, 2 * c:2 * c + 2], torch.zeros(1, 2), ctx, kv_cache=cache, start_frame=2 * c)
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_planning_a_chunk_does_not_scan_the_whole_stream():
    """The visible frames of a chunk far into a stream come from interval ends (an O(length) scan would not
    finish here): sinks plus the last L - S frames."""
    from selfforcing.models import KVCache

    cache = KVCache(num_layers=1, batch_size=1, num_heads=1, head_dim=4, tokens_per_frame=1, window_frames=9,
                    sink_frames=3)
    start = 10**12
    assert cache.visible_frames(start, 3) == [0, 1, 2] + list(range(start - 3, start))
    glob = KVCache(num_layers=1, batch_size=1, num_heads=1, head_dim=4, tokens_per_frame=1, max_frames=8)
    assert glob.visible_frames(5, 3) == [0, 1, 2, 3, 4]


def test_kv_only_cache_pass_writes_the_same_cache_as_a_full_forward():
    """The cache pass of a sampler (``kv_only``: the last block stops after its K/V, no head) leaves the cache
    exactly as the full forward does, the cross-attention K/V of a prompt first seen in that pass included."""
    model = make_model(CFG, num_frame_per_block=2)
    clean, noisy, t, ctx = _data(6, seed=5)
    with torch.no_grad():
        full = model.new_kv_cache(2, 4, 6, window_frames=4)
        lean = model.new_kv_cache(2, 4, 6, window_frames=4)
        outs = {}
        for name, cache, kv_only in (("full", full, False), ("lean", lean, True)):
            for s in (0, 2, 4):  # the prompt is first seen by a cache pass (chunk 0), like a prefilled stream
                ret = model(clean[:, s:s + 2], torch.zeros(2, 2), ctx, kv_cache=cache, start_frame=s,
                            kv_only=kv_only)
                assert (ret is None) == kv_only
            outs[name] = model(noisy[:, 4:6], t[:, 4:6], ctx, kv_cache=cache, start_frame=4)
        assert torch.equal(full.k, lean.k) and torch.equal(full.v, lean.v)
        assert all(torch.equal(a, b) for a, b in zip(full.cross_k + full.cross_v, lean.cross_k + lean.cross_v))
        assert (full.end_frame, full.last_start) == (lean.end_frame, lean.last_start) == (6, 4)
        torch.testing.assert_close(outs["lean"], outs["full"], atol=0, rtol=0)
        with pytest.raises(ValueError, match="kv_only"):
            model(clean[:, :2], torch.zeros(2, 2), ctx, kv_only=True)  # nothing to write into


@pytest.mark.parametrize("window,sink,block,independent_first", [
    (-1, 0, 2, False),  # global cache
    (4, 0, 2, False),  # the next chunk's write evicts frames the finished chunk still attends to
    (5, 1, 2, False),  # sinks
    (-1, 0, 2, True),  # a 1-frame first chunk fused with a 2-frame chunk
])
def test_fused_cache_pass_equals_the_cache_pass_then_the_step(window, sink, block, independent_first):
    """``pending_x``: chunk i's cache pass inside chunk i+1's first step (one forward over both chunks' tokens)
    gives chunk i+1 the output, and the cache the K/V, of the two separate passes (to float rounding), chunk after
    chunk; the cache's bookkeeping is the same too, so the next steps re-run chunk i+1 as usual."""
    model = make_model(CFG, num_frame_per_block=block, independent_first_frame=independent_first,
                       local_attn_size=window, sink_size=sink)
    clean, noisy, t, ctx = _data(9 if independent_first else 8, seed=6)
    sizes = block_sizes_for(clean.shape[1], block, independent_first)

    def cache():
        return model.new_kv_cache(2, 4, 6, max_frames=clean.shape[1], window_frames=window, sink_frames=sink)

    sep, fused = cache(), cache()
    with torch.no_grad():
        s = 0
        for i, n in enumerate(sizes):
            e = s + n
            if i:
                p = s - sizes[i - 1]
                model(clean[:, p:s], torch.zeros(2, s - p), ctx, kv_cache=sep, start_frame=p, kv_only=True)
            want = model(noisy[:, s:e], t[:, s:e], ctx, kv_cache=sep, start_frame=s)
            got = model(noisy[:, s:e], t[:, s:e], ctx, kv_cache=fused, start_frame=s,
                        pending_x=clean[:, s - sizes[i - 1]:s] if i else None)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(fused.k, sep.k, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(fused.v, sep.v, atol=2e-5, rtol=1e-5)
            assert (fused.end_frame, fused.last_start) == (sep.end_frame, sep.last_start) == (e, s)
            again = model(noisy[:, s:e], t[:, s:e] / 2, ctx, kv_cache=fused, start_frame=s)  # the next step
            torch.testing.assert_close(again, model(noisy[:, s:e], t[:, s:e] / 2, ctx, kv_cache=sep, start_frame=s),
                                       atol=2e-5, rtol=1e-5)
            s = e


def test_fused_cache_pass_rejects_what_it_cannot_do():
    model = make_model(CFG, num_frame_per_block=2)
    clean, noisy, t, ctx = _data(4, seed=7)
    cache = model.new_kv_cache(2, 4, 6, max_frames=4)
    with torch.no_grad():
        model(noisy[:, :2], t[:, :2], ctx, kv_cache=cache, start_frame=0)
        with pytest.raises(ValueError, match="pending_x"):  # a finished chunk cannot end before frame 0
            model(noisy[:, :2], t[:, :2], ctx, kv_cache=cache, start_frame=0, pending_x=clean[:, :2])
        with pytest.raises(ValueError, match="pending_x"):  # another latent size
            model(noisy[:, 2:4], t[:, 2:4], ctx, kv_cache=cache, start_frame=2, pending_x=clean[:, :2, :, :2])
        with pytest.raises(ValueError, match="pending_x"):
            model(noisy[:, 2:4], t[:, 2:4], ctx, start_frame=2, pending_x=clean[:, :2])  # no cache
    with pytest.raises(ValueError, match="pending_x"):  # the gradient path never writes the cache
        model(noisy[:, 2:4], t[:, 2:4], ctx, kv_cache=cache, start_frame=2, pending_x=clean[:, :2])


def test_absolute_embeddings_give_the_frame_and_place_and_start_as_the_plain_model():
    """Absolute embeddings: weights saved without them load into a model with them and give the same function (the
    tables are zero-filled); with trained tables, frame f is told apart from frame 0 (frames >= K share E[K-1]) and a
    token's place in the grid is told apart from its mirror image. Without them, positions are relative: a clip's
    output does not depend on where it starts."""
    plain = make_model(CFG)
    fe = make_model(CFG, num_frame_embeddings=4, spatial_embedding_grid=(2, 3))
    zeroed = make_model(CFG, num_frame_embeddings=4, spatial_embedding_grid=(2, 3))
    zeroed.load_weights(plain.state_dict())
    assert not zeroed.frame_embedding.any() and not zeroed.spatial_embedding.any()
    clean, noisy, t, ctx = _data(6, seed=3)
    with torch.no_grad():
        for causal in (True, False):
            assert torch.equal(plain(noisy, t, ctx, causal=causal), zeroed(noisy, t, ctx, causal=causal))
        assert (plain(noisy, t, ctx, causal=False, start_frame=7) - plain(noisy, t, ctx, causal=False)).abs().max() < 1e-5
        one, t1 = noisy[:, :1], t[:, :1]
        at = {f: fe(one, t1, ctx, causal=False, start_frame=f) for f in (0, 1, 3, 9)}
        assert (at[0] - at[1]).abs().max() > 1e-3 and (at[1] - at[3]).abs().max() > 1e-3
        assert (at[3] - at[9]).abs().max() < 1e-5  # clamped to the last embedding
        # one frame, constant over space: every token is alike, so with relative positions only the output is the
        # same everywhere (no way to tell left from right or the edge from the centre); with spatial embeddings not
        flat = one.mean((3, 4), keepdim=True).expand_as(one).contiguous()
        out_plain, out_fe = plain(flat, t1, ctx, causal=False), fe(flat, t1, ctx, causal=False)
        pw = CFG["patch_size"][2]  # one token to the right
        assert (out_plain - out_plain.roll(pw, -1)).abs().max() < 1e-5
        assert (out_fe - out_fe.roll(pw, -1)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="num_frame_embeddings"):
        make_model(CFG, num_frame_embeddings=-1)
    with pytest.raises(ValueError, match="token grid"):
        fe(torch.randn(1, 3, C, 6, 6), torch.rand(1) * 999, ctx[:1], causal=False)  # a 3x3 grid, the table's 2x3


def test_caption_layout_starts_as_the_plain_model_and_moves_tokens_by_caption_for_its_first_frames(tmp_path):
    """The caption layout (``caption_layout_rank``): weights saved without it load (from a state dict, and from a
    save_pretrained folder with the option given as an override) into the same function, since its vectors start at
    zero; once trained, it changes the output by caption, only for noisy frames f < K (a chunk from frame K on, or
    clean frames, equal the plain model's), and a stream through the KV cache equals the full block-causal forward."""
    layout = dict(caption_layout_rank=3, caption_layout_size=(4, 2, 3))
    plain = make_model(CFG)
    fresh = CausalWanModel(**CFG, **layout).eval()  # as built: zero vectors (make_model would perturb them)
    fresh.load_weights(plain.state_dict())
    assert not fresh.caption_layout_vectors.any() and fresh.caption_layout_maps.std() > 0.1
    plain.save_pretrained(tmp_path / "plain")
    from_folder = CausalWanModel.from_checkpoint(str(tmp_path / "plain"), **layout)
    assert from_folder.config.caption_layout_rank == 3 and not from_folder.caption_layout_vectors.any()
    clean, noisy, t, ctx = _data(6, seed=4)
    other = torch.randn_like(ctx)
    trained = make_model(CFG, **layout)
    trained.load_weights({**plain.state_dict(), **{k: v for k, v in trained.state_dict().items()
                                                   if k.startswith("caption_layout")}})
    with torch.no_grad():
        for causal in (True, False):
            want = plain(noisy, t, ctx, causal=causal)
            assert torch.equal(fresh(noisy, t, ctx, causal=causal), want)
            torch.testing.assert_close(from_folder(noisy, t, ctx, causal=causal), want)
        moved = trained(noisy, t, ctx, causal=False)
        assert (moved - plain(noisy, t, ctx, causal=False)).abs().max() > 1e-2
        moved_other = trained(noisy, t, other, causal=False) - plain(noisy, t, other, causal=False)
        assert (moved - plain(noisy, t, ctx, causal=False) - moved_other).abs().max() > 1e-3  # chosen by the caption
        clean_t = torch.zeros_like(t)  # sigma = 0: no prior on a clean frame
        assert torch.equal(trained(clean, clean_t, ctx, causal=False), plain(clean, clean_t, ctx, causal=False))
        late = noisy[:, :2], t[:, :2]  # frames 4-5: past the maps' 4 frames
        assert torch.equal(trained(*late, ctx, causal=False, start_frame=4), plain(*late, ctx, causal=False,
                                                                                   start_frame=4))
        cache = trained.new_kv_cache(2, 4, 6, max_frames=6)
        outs = _stream(trained, clean, noisy, t, ctx, cache, [3, 3])
        for (s, e), out in zip([(0, 3), (3, 6)], outs):
            torch.testing.assert_close(out, _full_reference(trained, clean, noisy, t, ctx, s, e), rtol=1e-4, atol=1e-5)
    for bad in (dict(caption_layout_rank=2), dict(caption_layout_rank=-1, caption_layout_size=(4, 2, 3)),
                dict(caption_layout_rank=2, caption_layout_size=(4, 0, 3))):
        with pytest.raises(ValueError, match="caption_layout"):
            make_model(CFG, **bad)
    with pytest.raises(ValueError, match="caption layout maps"):
        trained(torch.randn(1, 3, C, 6, 6), torch.rand(1) * 999, ctx[:1], causal=False)  # a 3x3 grid, the maps' 2x3
