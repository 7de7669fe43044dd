"""Streaming generation: Algorithm 2 chunk by chunk, rolling cache, prompt switching, continuation, CLI."""

import json

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


@pytest.mark.parametrize("sampler", ["many-step", "bidirectional"])
def test_generate_cli_many_step_samplers(parts, tmp_path, capsys, sampler):
    model, _, _ = parts
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "y.mp4"
    assert main(["generate", "--prompt", "the digit 1 moves up", "--checkpoint", str(tmp_path / "m"), "--num-frames",
                 "6", "--sampler", sampler, "--num-steps", "4", "--text-len", "16", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["sampler"] == sampler and read_video(out).shape == (6, 64, 64, 3)
