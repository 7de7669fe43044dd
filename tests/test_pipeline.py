"""The pipeline spec: a trained generator carries how it is sampled, and `generate` follows it."""

import json

import pytest
import torch

from selfforcing import flow
from selfforcing.cli import main
from selfforcing.config import build_config
from selfforcing.io import read_video
from selfforcing.models import CausalWanModel
from selfforcing.pipeline import (DEFAULT_MODEL, SHIPPED_MODELS, PipelineSpec, load_streaming_generator,
                                  resolve_checkpoint, sample_many_step)
from selfforcing.training.config import TrainConfig
from selfforcing.training.trainer import train


def test_spec_round_trip_and_bad_files(tmp_path):
    spec = PipelineSpec(method="causvid", shift=3.0, latent_size=(8, 12), denoising_steps=(1000, 500), text_len=16)
    spec.save(tmp_path)
    assert PipelineSpec.load(tmp_path) == spec
    assert PipelineSpec.load(tmp_path / "nothing-here") == PipelineSpec()  # no spec: the defaults
    torch.testing.assert_close(spec.warped_steps(), flow.denoising_step_list([1000, 500], shift=3.0))

    data = json.loads((tmp_path / "pipeline.json").read_text())
    (tmp_path / "pipeline.json").write_text(json.dumps({**data, "steps_typo": 4}))
    with pytest.raises(ValueError, match="unknown keys.*steps_typo"):
        PipelineSpec.load(tmp_path)
    (tmp_path / "pipeline.json").write_text(json.dumps({**data, "format": "something-else"}))
    with pytest.raises(ValueError, match="not a selfforcing-pipeline-v1 file"):
        PipelineSpec.load(tmp_path)
    (tmp_path / "pipeline.json").write_text("{truncated")
    with pytest.raises(ValueError, match="not a readable pipeline spec"):
        PipelineSpec.load(tmp_path)
    with pytest.raises(ValueError, match="unknown sampler"):
        PipelineSpec(sampler="magic")


def test_clip_settings_follow_the_recorded_dataset():
    """The real clips a model is compared with are drawn as its training clips were (JSON gives lists, render_clip
    wants a tuple); a spec without a dataset gets Moving-Digits' defaults, the same as render_clip's own."""
    import inspect

    from selfforcing.data.moving_digits import digit_pool, render_clip

    spec = PipelineSpec(dataset={"kind": "moving-digits", "num_digits": [1, 1], "images_per_digit": 4, "size": 64})
    assert spec.clip_settings() == {"num_digits": (1, 1), "images_per_digit": 4}
    defaults = {k: v.default for k, v in inspect.signature(render_clip).parameters.items()}
    assert PipelineSpec().clip_settings() == {"num_digits": defaults["num_digits"],
                                              "images_per_digit": defaults["images_per_digit"]}
    clip = render_clip("test", 0, num_frames=1, **spec.clip_settings())
    pool = digit_pool("test", 4)
    assert len(clip["labels"]) == 1 and int(clip["image_indices"][0]) in pool[int(clip["labels"][0])].tolist()


def test_unknown_model_names_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a path nor a shipped model"):
        resolve_checkpoint("no-such-model")
    assert resolve_checkpoint(tmp_path) == str(tmp_path)
    assert DEFAULT_MODEL in SHIPPED_MODELS


@pytest.mark.parametrize("method,sampler", [("teacher", "bidirectional"), ("self_forcing", "few-step")])
def test_trained_generator_carries_its_recipe(tmp_path, method, sampler):
    cfg = build_config(TrainConfig, dict(
        method=method, max_steps=1, batch_size=2, out_dir=str(tmp_path / "run"), checkpoint_every=0,
        tensorboard=False, timestep_shift=2.5, generator={"preset": "tiny", "overrides": {"num_layers": 1}},
        data={"kind": "random", "latent_shape": [6, 8, 4, 6], "text_len": 4, "num_digits": [1, 1],
              "images_per_digit": 2},
        rollout={"denoising_steps": [1000, 600, 300]}, dm={"critic_updates_per_generator_update": 1}))
    train(cfg, progress=False)
    spec = PipelineSpec.load(tmp_path / "run" / "final")
    assert (spec.method, spec.sampler, spec.shift, spec.latent_size) == (method, sampler, 2.5, (4, 6))
    assert spec.denoising_steps == (1000.0, 600.0, 300.0) and spec.text_len == 4
    assert spec.extra["trained_steps"] == 1
    assert spec.dataset == {"kind": "random", "num_digits": [1, 1], "images_per_digit": 2, "size": 64}


def _tiny_folder(path, spec: PipelineSpec | None):
    torch.manual_seed(0)
    model = CausalWanModel.from_preset("tiny", num_layers=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    if spec is not None:
        spec.save(path)
    return path


def test_generate_follows_the_spec_like_explicit_flags(tmp_path, capsys):
    """A folder whose pipeline.json says shift 2 and three steps samples exactly what a spec-less folder samples
    when the same settings are given on the command line."""
    with_spec = _tiny_folder(tmp_path / "a", PipelineSpec(shift=2.0, denoising_steps=(1000, 700, 300), text_len=16,
                                                          default_prompt="the digit 4 moves down"))
    bare = _tiny_folder(tmp_path / "b", None)
    assert main(["generate", "--checkpoint", str(with_spec), "--num-frames", "12", "--out", str(tmp_path / "a.mp4"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["prompt"] == "the digit 4 moves down"  # the spec's default prompt
    assert main(["generate", "--checkpoint", str(bare), "--num-frames", "12", "--shift", "2", "--steps",
                 "1000,700,300", "--text-len", "16", "--prompt", "the digit 4 moves down",
                 "--out", str(tmp_path / "b.mp4")]) == 0
    # libx264 is not bit-reproducible across runs: the decoded frames agree up to codec noise
    a, b = (torch.as_tensor(read_video(tmp_path / n)).float() for n in ("a.mp4", "b.mp4"))
    assert a.shape == b.shape == (12, 64, 64, 3) and (a - b).abs().mean() < 1.0
    # the library path agrees with the command line on the latents themselves
    gen_a, spec = load_streaming_generator(with_spec)
    gen_b, _ = load_streaming_generator(bare, shift=2.0, denoising_steps=(1000, 700, 300), text_len=16)
    a = torch.cat([c.latents for c in gen_a.stream(spec.default_prompt, 6, seed=3)], 1)
    b = torch.cat([c.latents for c in gen_b.stream(spec.default_prompt, 6, seed=3)], 1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert gen_a.steps == flow.denoising_step_list([1000, 700, 300], shift=2.0).tolist()


def test_streaming_refuses_a_many_step_model_unless_forced(tmp_path):
    """A teacher (bidirectional) or teacher-forcing (many-step) checkpoint streamed with the few-step KV-cache sampler
    gives noise without a word; the streaming API says which sampler the checkpoint needs instead, and streams it
    when the caller asks for the few-step sampler explicitly."""
    for sampler in ("bidirectional", "many-step"):
        folder = _tiny_folder(tmp_path / sampler, PipelineSpec(sampler=sampler, text_len=16))
        with pytest.raises(ValueError, match=f"is a {sampler} model.*selfforcing generate"):
            load_streaming_generator(folder)
        gen, spec = load_streaming_generator(folder, sampler="few-step")
        assert spec.sampler == "few-step"
        assert sum(c.latents.shape[1] for c in gen.stream("the digit 1 moves up", 3)) == 3
    with pytest.raises(ValueError, match="needs a many-step sampler"):
        sample_many_step(gen.model, gen.autoencoder, gen.text_encoder, spec, "the digit 1 moves up", 3)


def test_the_shipped_model_makes_digit_like_video():
    """The default model is a real trained, text-conditioned generator. On 8 captions drawn as its training clips were
    (from its pipeline.json), 12 frames each: the shipped digit classifier confidently reads a digit in a good share
    of its frames and the prompt's digit in at least a quarter (chance: a tenth of the confident share), where the same
    network with random weights gives none; and in the classifier's feature space its frames lie much closer to real
    clips than the random network's do. Measured for this model: 45% / 35% against 0% / 0%, Frechet distance 0.45x
    the random network's (62 against 137). The model shipped before it: 44% / 35%, 0.62x (it drew a stray bar above
    the digit); the one before that: 45% / 19%, 0.41x (README "Results")."""
    import os

    from selfforcing.data.moving_digits import render_clip
    from selfforcing.eval.metrics import frame_features, frechet_distance, one_digit_reads

    folder = resolve_checkpoint(None)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert size < 50e6
    gen, spec = load_streaming_generator()
    assert spec.sampler == "few-step" and spec.training_frames == 12 and spec.shift == 3.0

    clips = spec.clip_settings()
    drawn = [render_clip("test", i, num_frames=1, **clips) for i in range(8)]
    wanted = torch.tensor([int(c["labels"][0]) for c in drawn]).repeat_interleave(12)

    def videos(generator):
        return torch.stack([torch.cat([c.frames for c in generator.stream(d["caption"], 12, seed=i)])
                            for i, d in enumerate(drawn)])

    def digit_rates(batch):
        reads = one_digit_reads(batch.flatten(0, 1), wanted)
        return float(reads["confident"].float().mean()), float(reads["captioned"].float().mean())

    real = frame_features(torch.stack([render_clip("test", 100 + i, num_frames=12, **clips)["video"]
                                       for i in range(32)]))
    real = real.flatten(0, 1)
    shipped = videos(gen)
    torch.manual_seed(0)
    gen.model = CausalWanModel.from_config(gen.model.config).eval()  # the same architecture, random weights
    random = videos(gen)
    confident, captioned = digit_rates(shipped)
    confident_random, captioned_random = digit_rates(random)
    assert confident > 0.3 and captioned > 0.25, (confident, captioned)
    assert confident_random < 0.05 and captioned_random < 0.05, (confident_random, captioned_random)
    fd_shipped, fd_random = (frechet_distance(frame_features(v).flatten(0, 1), real) for v in (shipped, random))
    assert fd_shipped < 0.6 * fd_random, (fd_shipped, fd_random)
