"""Streaming generation: Algorithm 2 chunk by chunk, rolling cache, prompt switching, continuation, CLI."""

import json
import os

import pytest
import torch

from selfforcing import flow
from selfforcing.autoencoders import get_autoencoder
from selfforcing.cli import main
from selfforcing.inference import StreamingGenerator
from selfforcing.io import read_video
from selfforcing.models import CausalWanModel
from selfforcing.text import build_text_encoder

STEPS = flow.denoising_step_list([1000, 750, 500, 250], shift=5.0)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = CausalWanModel.from_preset("tiny", num_layers=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, get_autoencoder("moving-digits"), build_text_encoder("minilm", 16)


def _gen(parts, **kw):
    model, ae, text = parts
    return StreamingGenerator(model, ae, text, (16, 16), steps=STEPS, **kw)


def test_stream_is_algorithm_2_and_decodes_like_the_full_decode(parts):
    model, ae, text = parts
    gen = _gen(parts, max_frames=12)
    chunks = list(gen.stream("the digit 3 moves right", num_latent_frames=12, seed=4))
    assert [c.start_frame for c in chunks] == [0, 3, 6, 9] and all(c.frames.shape == (3, 3, 64, 64) for c in chunks)
    latents = torch.cat([c.latents for c in chunks], 1)
    # the same loop written out by hand, with the noise drawn in the same order
    g = torch.Generator().manual_seed(4)
    ctx = text.encode(["the digit 3 moves right"]).states
    cache = model.new_kv_cache(1, 16, 16, max_frames=12)
    outs = []
    with torch.no_grad():
        for s in range(0, 12, 3):
            x = torch.randn((1, 3, 8, 16, 16), generator=g)
            for j, tj in enumerate(STEPS.tolist()):
                t = torch.full((1, 3), tj)
                x0 = flow.flow_to_x0(model(x, t, ctx, kv_cache=cache, start_frame=s), x, t)
                if j + 1 < len(STEPS):
                    x = flow.add_noise(x0, torch.randn(x0.shape, generator=g), torch.full((1, 3), float(STEPS[j + 1])))
            outs.append(x0)
            model(x0, torch.zeros(1, 3), ctx, kv_cache=cache, start_frame=s)
    torch.testing.assert_close(latents, torch.cat(outs, 1))
    torch.testing.assert_close(torch.cat([c.frames for c in chunks]), ae.decode(latents)[0], atol=1e-5, rtol=0)


def test_rolling_stream_far_past_the_window(parts):
    gen = _gen(parts, window_frames=6, sink_frames=0)
    n = 0
    for chunk in gen.stream("the digit 1 moves left", num_latent_frames=60, seed=1):
        n += chunk.latents.shape[1]
        assert torch.isfinite(chunk.frames).all()
    assert n == 60 and gen.cache.capacity == 6 and gen.frame == 60


def test_prompt_switch_with_and_without_recache(parts):
    runs = {}
    for name, switches in (("none", None), ("switch", {3: ("the digit 7 moves down", False)}),
                           ("recache", {3: ("the digit 7 moves down", True)})):
        gen = _gen(parts, window_frames=9, sink_frames=0)
        runs[name] = [c.latents for c in gen.stream("the digit 2 moves up", num_latent_frames=15, seed=2,
                                                    switches=switches)]
    for c in range(3):  # before the switch nothing changes
        assert torch.equal(runs["none"][c], runs["switch"][c]) and torch.equal(runs["none"][c], runs["recache"][c])
    assert (runs["switch"][3] - runs["none"][3]).abs().max() > 1e-4
    assert (runs["recache"][3] - runs["switch"][3]).abs().max() > 1e-6


def test_recache_equals_a_fresh_stream_continuing_from_the_window(parts):
    """After a re-cache, the next chunk equals a new stream under the new prompt that starts from the window's
    clean frames as its prefix (RoPE is relative, so absolute frame offsets do not matter)."""
    gen = _gen(parts, window_frames=9, sink_frames=0)
    gen.start("the digit 2 moves up", seed=3)
    for _ in range(4):
        gen.next_chunk()
    window = torch.cat(list(gen._recent), 1)  # the clean frames the re-cache rewrites (9 = the window)
    assert window.shape[1] == 9
    state = gen.generator.get_state()
    gen.switch_prompt("the digit 4 moves right", recache=True)
    after = gen.next_chunk().latents

    fresh = _gen(parts, window_frames=9, sink_frames=0)
    fresh.start("the digit 4 moves right", seed=0, prefix_latents=window)
    fresh.generator.set_state(state)
    torch.testing.assert_close(fresh.next_chunk().latents, after, atol=1e-5, rtol=1e-5)


def test_continuation_starts_after_the_prefix(parts):
    model, ae, _ = parts
    from selfforcing.data.moving_digits import render_clip

    clip = render_clip("test", 0, num_frames=6)["video"][None]
    gen = _gen(parts, max_frames=12)
    chunks = list(gen.stream("the digit 0 moves right", num_latent_frames=6, seed=0, prefix_video=clip))
    assert [c.start_frame for c in chunks] == [6, 9] and gen.cache.end_frame == 12
    plain = list(_gen(parts, max_frames=12).stream("the digit 0 moves right", num_latent_frames=6, seed=0))
    assert (chunks[0].latents - plain[0].latents).abs().max() > 1e-4  # the prefix is seen


def test_generate_cli_writes_a_long_video(parts, tmp_path, capsys):
    model, _, _ = parts
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "x.mp4"
    assert main(["generate", "--prompt", "the digit 3 moves right", "--checkpoint", str(tmp_path / "m"),
                 "--num-frames", "96", "--window-frames", "12", "--sink-frames", "3", "--text-len", "16",
                 "--switch", "10:the digit 5 moves up", "--recache", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["frames"] == 96 and report["first_chunk_latency_s"] > 0 and report["fps"] > 0
    assert read_video(out).shape == (96, 64, 64, 3)


def test_generate_encodes_each_chunk_into_the_mp4_as_it_is_made(parts, tmp_path, capsys, monkeypatch):
    """``generate`` hands every chunk to the mp4 encoder before the next chunk is made (no video held in memory), and
    what it encodes is the stream API's video."""
    from selfforcing.io import Mp4Writer

    model, ae, text = parts
    model.save_pretrained(tmp_path / "m")
    events, written = [], []
    real_next, real_write = StreamingGenerator.next_chunk, Mp4Writer.write

    def next_chunk(self):
        events.append("chunk")
        return real_next(self)

    def write(self, video):
        events.append("write")
        written.append(video.clone())
        return real_write(self, video)

    monkeypatch.setattr(StreamingGenerator, "next_chunk", next_chunk)
    monkeypatch.setattr(Mp4Writer, "write", write)
    out = tmp_path / "x.mp4"
    assert main(["generate", "--prompt", "the digit 3 moves right", "--checkpoint", str(tmp_path / "m"),
                 "--num-frames", "31", "--window-frames", "6", "--text-len", "16", "--out", str(out)]) == 0
    assert events == ["chunk", "write"] * 11  # 31 frames: 11 chunks of 3 latent frames, the last one cut to 1 frame
    assert [len(w) for w in written] == [3] * 10 + [1]
    monkeypatch.setattr(StreamingGenerator, "next_chunk", real_next)
    gen = StreamingGenerator(model, ae, build_text_encoder("minilm", 16), (16, 16), steps=STEPS, window_frames=6)
    expected = torch.cat([c.frames for c in gen.stream("the digit 3 moves right", 31, seed=0)])[:31]
    torch.testing.assert_close(torch.cat(written), expected, atol=1e-4, rtol=0)
    assert read_video(out).shape == (31, 64, 64, 3)


@pytest.mark.parametrize("failure", [RuntimeError("chunk failed"), KeyboardInterrupt()])
def test_generate_that_fails_or_is_stopped_leaves_no_file(parts, tmp_path, capsys, monkeypatch, failure):
    """A run that fails (or is stopped with Ctrl-C) midway leaves no partial mp4 and no temp file; a video already at
    the path is left as it was."""
    model, _, _ = parts
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "videos" / "x.mp4"
    real_next, made = StreamingGenerator.next_chunk, []

    def next_chunk(self):
        if len(made) == 3:
            raise failure
        made.append(1)
        return real_next(self)

    monkeypatch.setattr(StreamingGenerator, "next_chunk", next_chunk)
    argv = ["generate", "--debug", "--prompt", "the digit 3 moves right", "--checkpoint", str(tmp_path / "m"),
            "--num-frames", "30", "--text-len", "16", "--out", str(out)]  # --debug: the error is raised, not printed
    with pytest.raises(type(failure)):
        main(argv)
    assert made == [1, 1, 1] and os.listdir(out.parent) == []  # no mp4, no .tmp-* file
    out.write_bytes(b"an older video")
    made.clear()
    with pytest.raises(type(failure)):
        main(argv)
    assert os.listdir(out.parent) == ["x.mp4"] and out.read_bytes() == b"an older video"


def test_generate_streams_through_a_window_of_the_training_length_by_default(parts, tmp_path, capsys):
    """A streaming checkpoint whose pipeline.json says it trained on 12 frames generates through a rolling cache of 12
    latent frames unless asked otherwise (the Self Forcing setting, and the server's); --window-frames 0 keeps the
    whole video; a checkpoint that does not record its length keeps the whole video too."""
    from selfforcing.pipeline import PipelineSpec

    model, _, _ = parts
    model.save_pretrained(tmp_path / "m")
    argv = ["generate", "--prompt", "the digit 3 moves right", "--checkpoint", str(tmp_path / "m"), "--num-frames",
            "30", "--text-len", "16", "--out", str(tmp_path / "x.mp4"), "--json"]

    def window(extra=()):
        assert main(argv + list(extra)) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["window_frames"]

    assert window() is None  # no pipeline.json: no recorded training length
    PipelineSpec(training_frames=12, text_len=16).save(str(tmp_path / "m"))
    assert window() == 12 and window(["--window-frames", "0"]) is None and window(["--window-frames", "9"]) == 9


@pytest.mark.parametrize("sampler", ["many-step", "bidirectional"])
def test_generate_cli_many_step_samplers(parts, tmp_path, capsys, sampler):
    model, _, _ = parts
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "y.mp4"
    assert main(["generate", "--prompt", "the digit 1 moves up", "--checkpoint", str(tmp_path / "m"), "--num-frames",
                 "6", "--sampler", sampler, "--num-steps", "4", "--text-len", "16", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["sampler"] == sampler and read_video(out).shape == (6, 64, 64, 3)


def test_cross_and_self_attention_caches_after_a_switch(parts):
    """After a switch the cross-attention cache holds the new prompt's K/V; with recache the self-attention cache
    equals one rebuilt from scratch (a fresh cache filled with the same clean frames under the new prompt)."""
    model, _, text = parts
    gen = _gen(parts, window_frames=9, sink_frames=0)
    gen.start("the digit 2 moves up", seed=5)
    for _ in range(4):
        gen.next_chunk()
    window = torch.cat(list(gen._recent), 1)  # frames [3, 12)
    gen.switch_prompt("the digit 6 moves left", recache=True)
    new_ctx = text.encode(["the digit 6 moves left"]).states
    ks, vs = model.cross_attention_kv(new_ctx)
    gen.next_chunk()  # the cross cache is filled by the next forward
    for layer in range(model.config.num_layers):
        torch.testing.assert_close(gen.cache.cross_k[layer], ks[layer])
        torch.testing.assert_close(gen.cache.cross_v[layer], vs[layer])
    # self-attention: rebuild by hand in a fresh rolling cache at the same absolute positions
    gen2 = _gen(parts, window_frames=9, sink_frames=0)
    gen2.start("the digit 2 moves up", seed=5)
    for _ in range(4):
        gen2.next_chunk()
    gen2.switch_prompt("the digit 6 moves left", recache=True)
    ref = model.new_kv_cache(1, 16, 16, window_frames=9)
    ref.skip_to(3)
    with torch.no_grad():
        for s in (3, 6, 9):
            model(window[:, s - 3:s], torch.zeros(1, 3), new_ctx, kv_cache=ref, start_frame=s)
    torch.testing.assert_close(gen2.cache.k, ref.k)
    torch.testing.assert_close(gen2.cache.v, ref.v)
    assert gen2.cache.end_frame == ref.end_frame == 12


def test_rolling_cache_memory_is_flat_over_10x_the_window(parts):
    gen = _gen(parts, window_frames=12, sink_frames=3)
    sizes = []
    for _chunk in gen.stream("the digit 9 moves right", num_latent_frames=120, seed=0):
        sizes.append((gen.cache.memory_bytes(), len(gen._recent) + len(gen._sinks)))
    assert len(set(sizes[4:])) == 1  # after the first window nothing grows
    assert gen.cache.k.shape[3] == 12 * 64  # [layers, B, H, window tokens, Dh]


def test_original_format_generator_ema_generates_the_same_frames(parts, tmp_path):
    """Random weights written in the original Wan key names under generator_ema (as the Self Forcing release
    ships them) load through the generate path and stream exactly the frames of the same weights loaded natively.
    (Compared as tensors: H.264 files of identical frames are not byte-reproducible with this libx264.)"""
    import selfforcing.models.presets as presets
    from selfforcing.models.state_dict_adapter import to_original_wan

    model, ae, text = parts
    model.save_pretrained(tmp_path / "native")
    original = {f"model.{k}": v for k, v in to_original_wan(model.state_dict()).items()}
    torch.save({"generator_ema": original, "generator": {k: torch.zeros_like(v) for k, v in original.items()}},
               tmp_path / "release.pt")
    presets.PRESETS["_tiny2"] = dict(presets.PRESETS["tiny"], num_layers=2)
    try:
        release = CausalWanModel.from_checkpoint(str(tmp_path / "release.pt"), preset="_tiny2", use_ema=True)
    finally:
        presets.PRESETS.pop("_tiny2")
    native = CausalWanModel.from_checkpoint(str(tmp_path / "native"))
    frames = {}
    for name, m in (("native", native), ("release", release)):
        gen = StreamingGenerator(m, ae, text, (16, 16), steps=STEPS, max_frames=9)
        frames[name] = torch.cat([c.frames for c in gen.stream("the digit 4 moves down", 9, seed=0)])
    assert torch.equal(frames["native"], frames["release"])


def test_bad_generate_input(parts, tmp_path):
    """The errors behind ``generate``'s one-line CLI errors, raised with --debug (the one-line form: tests/test_cli.py)."""
    from selfforcing.errors import UsageError
    from selfforcing.models.state_dict_adapter import load_checkpoint_file

    model, _, _ = parts
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "empty.txt").write_text("\n\n")

    def run(*argv):
        return main(["generate", "--debug", "--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "x.mp4"), *argv])

    with pytest.raises(ValueError, match="no prompts"):
        run("--prompts", str(tmp_path / "empty.txt"))
    with pytest.raises(UsageError, match="--num-frames must be >= 1"):
        run("--prompt", "a", "--num-frames", "0")
    with pytest.raises(ValueError, match="--prompt is empty"):
        run("--prompt", " \t ")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*bad.pt"):
        load_checkpoint_file(tmp_path / "bad.pt")
    torch.save({"generator": CausalWanModel.from_preset("tiny", num_layers=1).state_dict()}, tmp_path / "small.pt")
    with pytest.raises(ValueError, match="does not fit this model config"):
        main(["generate", "--debug", "--prompt", "a", "--checkpoint", str(tmp_path / "small.pt"),
              "--out", str(tmp_path / "x.mp4")])
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("window,sink", [(None, None), (9, 0), (12, 3)])
def test_fused_cache_pass_streams_the_same_video(parts, window, sink):
    """With ``fuse_cache_pass`` (the default) a chunk's cache pass runs inside the next chunk's first step. Across
    prompt switches with and without re-cache, and a rolling window with sinks, the video and (after
    ``cache_pending``) the cache equal the stream that runs every cache pass on its own, up to float rounding."""
    runs = {}
    for fuse in (False, True):
        gen = _gen(parts, window_frames=window, sink_frames=sink, max_frames=30, fuse_cache_pass=fuse)
        chunks = list(gen.stream("the digit 2 moves up", num_latent_frames=30, seed=1,
                                 switches={4: ("the digit 5 moves left", False), 7: ("the digit 1 moves down", True)}))
        assert (gen._pending is not None) == fuse  # the last chunk waits for a next step that never comes
        gen.cache_pending()
        runs[fuse] = torch.cat([c.latents for c in chunks], 1), gen.cache.k.clone(), gen.cache.v.clone()
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
