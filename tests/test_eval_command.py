"""`selfforcing eval` and selfforcing.eval (evaluate, specs, runner, aggregate, report): end to end on tiny random
checkpoints, resume, the GT-cache path against the library samplers, the fast Frechet distance against the metrics
library, bad input."""

import json
import os

import numpy as np
import pytest
import torch

from selfforcing.cli import main
from selfforcing.eval import evaluate as ev
from selfforcing.models import CausalWanModel
from selfforcing.sampling import sample_causal_many_step, sample_few_step
from selfforcing.training.rng import BatchRNG

TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=64)


def _tiny(seed: int) -> CausalWanModel:
    torch.manual_seed(seed)
    return CausalWanModel.from_preset("tiny", **TINY).eval()


def _args(out, *checkpoints, extra=()):
    args = ["eval", "--prompts", "2", "--num-samples", "2", "--lengths", "1,2", "--train-frames", "6",
            "--num-real", "4", "--bootstrap", "20", "--num-steps", "2", "--batch-size", "2", "--out", str(out),
            "--quiet", "--device", "cpu"]
    for c in checkpoints:
        args += ["--checkpoint", c]
    return args + list(extra)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    _tiny(0).save_pretrained(root / "sf")
    _tiny(1).save_pretrained(root / "tf")
    return root


@pytest.fixture(scope="module")
def first_run(run_dir):
    checkpoints = (f"sf={run_dir / 'sf'}", f"tf={run_dir / 'tf'}:many-step")
    calls = []
    orig = ev.Evaluator.generate

    def counting(self, *a, **k):
        calls.append(a[2] if len(a) > 2 else k.get("length"))
        return orig(self, *a, **k)

    ev.Evaluator.generate = counting
    try:
        assert main(_args(run_dir / "out", *checkpoints)) == 0
    finally:
        ev.Evaluator.generate = orig
    return run_dir / "out", checkpoints, calls


def test_end_to_end_writes_json_png_md(first_run):
    out, _, calls = first_run
    assert len(calls) == 2 * 2 * 2  # 2 methods x 2 lengths x (own rollout + GT cache), one batch each
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    for method in ("real", "sf", "tf"):
        for length in (1, 2):
            got = {r["metric"] for r in rows if r["method"] == method and r["length"] == length}
            assert {"fd", "adherence", "flip_rate", "contrast_drift", "drift_slope"} <= got
            if method != "real":
                assert {"fd_gt_cache", "fd_gap", "adherence_gap"} <= got
    for r in rows:
        assert set(r) >= {"method", "length", "metric", "mean", "ci", "n"} and r["n"] == 2
    fd = [r for r in rows if r["metric"] == "fd" and r["method"] == "sf" and r["length"] == 2][0]
    assert fd["mean"] > 0 and fd["ci"][0] <= fd["ci"][1]
    slope = [r for r in rows if r["metric"] == "fd_slope" and r["method"] == "sf" and r["length"] == 2][0]
    assert slope["mean"] is not None  # two windows at length 2
    curve = [c for c in res["curves"] if c["metric"] == "fd" and c["method"] == "tf" and c["length"] == 2
             and c["context"] == "gt_cache"][0]
    assert len(curve["mean"]) == 2 and curve["frames"] == [2.5, 8.5]
    for rel in res["plots"] + res["previews"]:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plots/fd_x2.png" in res["plots"]
    report = (out / "report.md").read_text()
    assert "| sf |" in report and "| tf |" in report and "| real |" in report
    assert "GT KV cache" in report and "x2" in report


def test_resume_skips_finished_work(first_run, monkeypatch):
    out, checkpoints, _ = first_run
    files = sorted(p for p in (out / "cache").rglob("seed*.pt"))
    assert len(files) == 3 * 2 * 2  # (real, sf, tf) x 2 lengths x 2 seeds
    before = {p: p.stat().st_mtime_ns for p in files}
    calls = []
    orig = ev.Evaluator.generate
    monkeypatch.setattr(ev.Evaluator, "generate", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    monkeypatch.setattr(ev.Evaluator, "_load_model", lambda self, m: pytest.fail("no model should load"))
    assert main(_args(out, *checkpoints)) == 0
    assert calls == [] and {p: p.stat().st_mtime_ns for p in files} == before
    # a lost result (a crash before it was written) is the only thing redone
    lost = out / "cache" / "sf" / "L2" / "seed1.pt"
    lost.unlink()
    monkeypatch.undo()
    monkeypatch.setattr(ev.Evaluator, "generate", lambda self, *a, **k: calls.append(a[2]) or orig(self, *a, **k))
    assert main(_args(out, *checkpoints)) == 0
    assert calls == [2, 2] and lost.is_file()  # own rollout + GT cache of one sample
    assert all(p.stat().st_mtime_ns == before[p] for p in files if p != lost)


def test_cached_results_follow_the_weights_not_their_path(first_run, tmp_path, monkeypatch):
    """The cache is keyed by the checkpoints' content: the same folders copied elsewhere (new paths, new mtimes)
    regenerate nothing; new weights under one of those paths regenerate that method's samples and no others."""
    import shutil

    out, checkpoints, _ = first_run
    shutil.copytree(out, tmp_path / "out")
    moved = []
    for spec in checkpoints:
        name, rest = spec.split("=", 1)
        src, _, sampler = rest.partition(":")
        dst = tmp_path / "moved" / name
        dst.mkdir(parents=True)
        for f in os.listdir(src):
            shutil.copyfile(os.path.join(src, f), dst / f)  # new mtimes
        moved.append(f"{name}={dst}" + (f":{sampler}" if sampler else ""))
    calls = []
    orig = ev.Evaluator.generate
    monkeypatch.setattr(ev.Evaluator, "generate", lambda self, *a, **k: calls.append(a[1].name) or orig(self, *a, **k))
    assert main(_args(tmp_path / "out", *moved)) == 0
    assert calls == []
    _tiny(5).save_pretrained(tmp_path / "moved" / "sf")  # retrained in place
    assert main(_args(tmp_path / "out", *moved)) == 0
    assert calls and set(calls) == {"sf"}


@pytest.mark.parametrize("kv_window", [None, 6])
def test_gt_cache_fed_own_rollout_reproduces_it(kv_window):
    """The GT-cache loops, fed the model's own rollout as 'ground truth', must give back that rollout: the two
    code paths (library samplers vs the teacher-forced-context loops) agree, also with a rolling window."""
    model = _tiny(2)
    noise = torch.randn(2, 9, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx, null = torch.randn(2, 5, 384), torch.zeros(2, 5, 384)
    steps = [1000.0, 750.0, 500.0]
    own = sample_few_step(model, noise, ctx, steps, generator=BatchRNG([3, 4]), window_frames=kv_window)
    again = sample_few_step(model, noise, ctx, steps, generator=BatchRNG([3, 4]), window_frames=kv_window,
                            cached_latents=own)
    torch.testing.assert_close(again, own, atol=1e-5, rtol=1e-5)
    kw = dict(block_sizes=model.block_sizes(9), null_context=null, num_steps=3, shift=3.0, guidance_scale=2.0,
              window_frames=kv_window)
    own = sample_causal_many_step(model, noise, ctx, **kw)
    torch.testing.assert_close(sample_causal_many_step(model, noise, ctx, cached_latents=own, **kw), own,
                               atol=1e-5, rtol=1e-5)
    # and real context differs from own context after the first chunk (the first chunk sees no context)
    other = sample_causal_many_step(model, noise, ctx, cached_latents=torch.randn_like(own), **kw)
    torch.testing.assert_close(other[:, :3], own[:, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other[:, 3:], own[:, 3:], atol=1e-3)


def test_window_fd_equals_metrics_frechet_distance():
    from selfforcing.eval.aggregate import _WindowFD
    from selfforcing.eval.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 8, 5, generator=g, dtype=torch.float64)
    gen = torch.randn(4, 8, 5, generator=g, dtype=torch.float64) * 1.5 + 0.3
    wins = [(0, 4), (4, 8)]
    fd = _WindowFD(ref, wins)
    counts = np.array([[1.0, 1, 1, 1], [2, 0, 1, 1]])
    got = fd.curves(gen, counts)
    for r, idx in enumerate([[0, 1, 2, 3], [0, 0, 2, 3]]):
        for j, (s, e) in enumerate(wins):
            want = frechet_distance(gen[idx, s:e].reshape(-1, 5), ref[:, s:e].reshape(-1, 5))
            assert got[r, j] == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_batched_samples_equal_single_samples(run_dir, tmp_path):
    """Batching several seeds together changes nothing: sample i depends on its seed and prompt only."""
    spec = ev.MethodSpec("sf", str(run_dir / "sf"))
    e = ev.Evaluator([spec], ev.EvalSettings(out_dir=str(tmp_path), num_prompts=2, num_samples=2, train_frames=6))
    model = e._load_model(spec)
    both = e.generate(model, spec, 1, [0, 1])
    one = e.generate(model, spec, 1, [1])
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-5)


def test_parse_inputs():
    spec = ev.parse_checkpoint_arg("tf=runs/tiny/teacher_forcing/final:many-step")
    assert (spec.name, spec.checkpoint, spec.sampler) == ("tf", "runs/tiny/teacher_forcing/final", "many-step")
    assert ev.parse_checkpoint_arg("sf=runs/x/final").sampler == "few-step"
    assert ev.parse_lengths("1, 5,10") == [1, 5, 10]
    for bad in ("sf", "=path", "sf=", "sf=path:warp-speed"):
        with pytest.raises(ValueError):
            ev.parse_checkpoint_arg(bad)
    for bad in ("0", "1,-2", "a", ""):
        with pytest.raises(ValueError):
            ev.parse_lengths(bad)


def test_method_spec_file(tmp_path):
    (tmp_path / "m.yaml").write_text("methods:\n  - {name: tf, checkpoint: ck, sampler: many-step, num_steps: 8}\n")
    [m] = ev.load_method_specs(str(tmp_path / "m.yaml"))
    assert m.checkpoint == str(tmp_path / "ck") and m.num_steps == 8
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x", "checkpoint": "c", "stepz": 3}]))
    with pytest.raises(ValueError, match="unknown keys"):
        ev.load_method_specs(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint", "sf=/no/such/checkpoint"], "checkpoint not found"),
    (["--checkpoint", "no-equals-sign"], "NAME=PATH"),
    (["--checkpoint", "sf=/tmp:warp"], "unknown sampler"),
    (["--checkpoint", "sf=/tmp", "--lengths", "0"], "lengths"),
    (["--checkpoint", "sf=/tmp", "--checkpoint", "sf=/tmp"], "unique"),
    (["--checkpoint", "real=/tmp"], "reserved"),
    (["--checkpoint", "sf=/tmp", "--prompts", "no_such_prompts.txt"], "prompt file"),
    ([], "at least one method"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, extra, message):
    args = ["eval", "--out", str(tmp_path / "o"), "--quiet", "--device", "cpu"] + extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfforcing eval: ") and message in err[0]
    assert not os.path.exists(tmp_path / "o" / "results.json")


def test_prompt_file_and_bidirectional_sliding_window(run_dir, tmp_path):
    """Prompts from a file: no GT-cache runs (noted); the bidirectional teacher extends past its training
    length with the sliding window; both land in the results."""
    methods = [ev.MethodSpec("sf", str(run_dir / "sf")), ev.MethodSpec("teacher", str(run_dir / "tf"), "bidirectional")]
    settings = ev.EvalSettings(out_dir=str(tmp_path), lengths=[2], num_samples=2, train_frames=6, num_real=4,
                               prompts=["the digit 3 moves up", "the digit 7 moves left"], bootstrap=5, num_steps=2,
                               real_baseline=False)
    res = ev.evaluate(methods, settings)
    metrics = {(r["method"], r["metric"]) for r in res["rows"]}
    assert ("teacher", "fd") in metrics and ("sf", "fd") in metrics
    assert not any(m.endswith("_gap") for _, m in metrics)
    assert any("prompts came from a file" in n for n in res["notes"])
    assert any("sliding window" in n for n in res["notes"])
    curve = [c for c in res["curves"] if c["method"] == "teacher" and c["metric"] == "fd"][0]
    assert len(curve["mean"]) == 2  # 12 frames in windows of 6


def test_the_shift_comes_from_the_trained_folder(tmp_path):
    """A folder's pipeline.json (written by the trainer) sets the sampler's shift; an explicit shift wins."""
    from selfforcing.pipeline import PipelineSpec

    _tiny(0).save_pretrained(tmp_path / "m")
    PipelineSpec(shift=2.5).save(tmp_path / "m")
    settings = ev.EvalSettings(out_dir=str(tmp_path / "out"))
    evaluator = ev.Evaluator([ev.parse_checkpoint_arg(f"m={tmp_path / 'm'}")], settings)
    assert evaluator._shift(evaluator.methods[0]) == 2.5
    evaluator.methods[0].shift = 4.0
    assert evaluator._shift(evaluator.methods[0]) == 4.0


def test_real_clips_follow_the_training_data_in_pipeline_json(tmp_path):
    """The real reference clips are drawn like the checkpoint's training clips (digits per clip, digit pool), as
    its pipeline.json records them; flags override; without a spec the dataset defaults hold."""
    from selfforcing.data.moving_digits import split_indices
    from selfforcing.eval.specs import real_clip_settings
    from selfforcing.pipeline import PipelineSpec

    _tiny(0).save_pretrained(tmp_path / "m")
    PipelineSpec(dataset={"kind": "moving-digits", "num_digits": [1, 1], "images_per_digit": 1, "size": 64}).save(
        tmp_path / "m")
    _tiny(0).save_pretrained(tmp_path / "plain")
    assert real_clip_settings(str(tmp_path / "m")) == ((1, 1), 1)
    assert real_clip_settings(str(tmp_path / "plain")) == ((1, 2), None)
    assert real_clip_settings(str(tmp_path / "m"), num_digits=(2, 3), images_per_digit=4) == ((2, 3), 4)
    with pytest.raises(SystemExit) as info:  # an argparse error: usage status 2
        main(["eval", "--out", str(tmp_path / "o"), "--checkpoint", f"m={tmp_path / 'm'}", "--num-digits", "x"])
    assert info.value.code == 2
    assert not os.path.exists(tmp_path / "o")

    settings = ev.EvalSettings(out_dir=str(tmp_path / "out"), num_digits=(1, 1), images_per_digit=1)
    evaluator = ev.Evaluator([ev.parse_checkpoint_arg(f"m={tmp_path / 'm'}")], settings)
    firsts = {int(v[0]) for v in split_indices("train").values()}
    for i in range(6):
        clip = evaluator._clip(i, 2)
        assert len(clip["labels"]) == 1 and int(clip["image_indices"][0]) in firsts
