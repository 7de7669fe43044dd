"""The trainer: every method runs, resume after SIGKILL is exact, and 2-rank DDP / FSDP2 equal 1 rank."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from selfforcing.config import build_config
from selfforcing.training.config import TrainConfig
from selfforcing.training.trainer import train

HERE = os.path.dirname(__file__)
TINY = {"preset": "tiny", "overrides": {"num_layers": 2}}
RANDOM_DATA = {"kind": "random", "latent_shape": [6, 8, 4, 4], "text_len": 4}


def _tiny_model(**overrides):
    from selfforcing.models import CausalWanModel, preset_config

    torch.manual_seed(0)
    return CausalWanModel(**preset_config("tiny", num_layers=2, **overrides))


def _cfg(tmp_path, **kw):
    d = dict(max_steps=3, batch_size=2, out_dir=str(tmp_path / "run"), checkpoint_every=0, tensorboard=False,
             generator=TINY, data=RANDOM_DATA, dm={"critic_updates_per_generator_update": 2})
    d.update(kw)
    return build_config(TrainConfig, d)


@pytest.mark.parametrize("method,extra", [
    ("teacher", {}), ("diffusion_forcing", {}), ("teacher_forcing", {"context_noise": 50.0}), ("ode_init", {}),
    ("causvid", {}), ("self_forcing", {}), ("self_forcing", {"dm": {"loss": "sid"}}),
    ("self_forcing", {"dm": {"loss": "gan", "r1_weight": 1.0}}),
    ("self_forcing", {"rollout": {"num_rollout_frames": 9, "supervised_frames": 6, "same_step_across_blocks": False}}),
    ("self_forcing", {"rollout": {"num_rollout_frames": 12, "supervised_frames": 6, "supervised_window": "random"},
                      "generator": {"preset": "tiny", "overrides": {"num_layers": 2, "local_attn_size": 6,
                                                                    "sink_size": 3}}}),
    ("self_forcing", {"rollout": {"last_step_only": True, "context_noise": 20.0},
                      "generator": {"preset": "tiny", "overrides": {"num_layers": 2, "independent_first_frame": True}},
                      "data": {"kind": "random", "latent_shape": [7, 8, 4, 4], "text_len": 4}}),
])
def test_every_method_runs_with_finite_losses(tmp_path, method, extra):
    extra = dict(extra)
    if "dm" in extra:
        extra["dm"] = {"critic_updates_per_generator_update": 2, **extra["dm"]}
    state = train(_cfg(tmp_path, method=method, **extra), progress=False, resume=False)
    assert state.step == 3
    losses = {k: v for h in state.history for k, v in h.items() if k.endswith("loss")}
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    if method in ("causvid", "self_forcing"):
        assert "generator_loss" in losses and "critic_loss" in losses
    if extra.get("rollout", {}).get("last_step_only"):  # blocks [1, 3, 3], always exiting at the last step
        assert state.method.exit_history and all(e == [3, 3, 3] for e in state.method.exit_history)


def test_random_supervised_windows_cover_the_stream_and_roll_the_cache(tmp_path, monkeypatch):
    """"random" windows start at every chunk boundary that leaves room for N frames (and at no other frame), the
    rollout stops at the window's end, and the rollout's cache is the stream's rolling window."""
    from selfforcing.config import ConfigError
    from selfforcing.training import methods
    from selfforcing.training.rng import BatchRNG

    rollout = {"num_rollout_frames": 12, "supervised_frames": 6, "supervised_window": "random"}
    cfg = _cfg(tmp_path, method="self_forcing", rollout=rollout)
    gen = _tiny_model(local_attn_size=6, sink_size=3)  # the stream's cache: 6 frames, 3 of them sinks
    method = methods.SelfForcing(cfg, gen, teacher=gen, critic=gen)
    torch.manual_seed(0)
    windows = {method.supervised_window(12) for _ in range(60)}
    assert windows == {(6, 6), (9, 6), (12, 6)}  # chunks of 3: starts 0, 3 and 6
    seen, caches = [], []
    real_rollout = methods.rollout_with_kv_cache

    def spy(model, noise, *args, kv_cache=None, grad_from_frame=None, **kw):
        seen.append((noise.shape[1], grad_from_frame))
        return real_rollout(model, noise, *args, kv_cache=kv_cache, grad_from_frame=grad_from_frame, **kw)

    monkeypatch.setattr(methods, "rollout_with_kv_cache", spy)
    real_new_cache = gen.new_kv_cache

    def new_cache(*args, **kw):
        cache = real_new_cache(*args, **kw)
        caches.append((cache.rolling, cache.capacity, cache.sink_frames))
        return cache

    monkeypatch.setattr(gen, "new_kv_cache", new_cache)
    batch = {"context": torch.randn(2, 4, gen.config.text_dim), "rng": BatchRNG([0, 1])}
    for _ in range(12):
        video, _ = method.generate(batch, with_grad=False)
        assert video.shape[1] == 6
    assert {n for n, _ in seen} == {6, 9, 12} and all(g == n - 6 for n, g in seen)
    assert set(caches) == {(True, 6, 3)}
    for bad, match in [({"supervised_window": "middle"}, "supervised_window"), ({"num_rollout_frames": 3}, "exceeds"),
                       ({"supervised_frames": 0}, "supervised_frames")]:
        with pytest.raises(ConfigError, match=match):
            _cfg(tmp_path, method="self_forcing", rollout={**rollout, **bad})


def _write_recipe(path, out_dir, steps_every=2):
    recipe = dict(method="self_forcing", batch_size=2, out_dir=str(out_dir), checkpoint_every=steps_every,
                  keep_checkpoints=2, tensorboard=False, generator=TINY, data=RANDOM_DATA, ema_weight=0.9,
                  ema_start_step=1, dm={"critic_updates_per_generator_update": 2},
                  generator_optim={"lr": 1e-3}, critic_optim={"lr": 1e-3})
    path.write_text(yaml.safe_dump(recipe))
    return path


def _train_cmd(recipe, steps):
    return [sys.executable, "-m", "selfforcing.cli", "train", "--config", str(recipe), "--max-steps", str(steps),
            "--no-progress"]


def _final(out_dir, step):
    return torch.load(os.path.join(out_dir, "checkpoints", f"step_{step:06d}.pt"), weights_only=False)


def test_resume_after_sigkill_equals_straight_run(tmp_path):
    """(d) N steps, SIGKILL (at whatever point the process is in), resume to 2N == 2N steps straight."""
    straight = _write_recipe(tmp_path / "straight.yaml", tmp_path / "straight")
    subprocess.run(_train_cmd(straight, 8), check=True, capture_output=True, timeout=300)

    killed = _write_recipe(tmp_path / "killed.yaml", tmp_path / "killed")
    proc = subprocess.Popen(_train_cmd(killed, 8), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if marker.exists() and marker.read_text().strip() >= "step_000004":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = marker.read_text().strip()
    assert latest.startswith("step_") and latest >= "step_000004"
    subprocess.run(_train_cmd(killed, 8), check=True, capture_output=True, timeout=300)

    a, b = _final(tmp_path / "straight", 8), _final(tmp_path / "killed", 8)
    assert a["step"] == b["step"] == 8
    for group in ("models",):
        for name in a[group]:
            for k in a[group][name]:
                assert torch.equal(a[group][name][k], b[group][name][k]), (name, k)
    for k in a["generator_ema"]:
        assert torch.equal(a["generator_ema"][k], b["generator_ema"][k]), k
    # only the newest checkpoints are kept, and no temp file is left behind
    left = sorted(os.listdir(tmp_path / "killed" / "checkpoints"))
    assert left == ["latest", "step_000006.pt", "step_000008.pt"], left


def _final_complete(folder) -> bool:
    """A finished export: EMA weights, the raw weights beside them, and both pipeline specs."""
    need = ["config.json", "diffusion_pytorch_model.safetensors", "pipeline.json", "raw/config.json",
            "raw/diffusion_pytorch_model.safetensors", "raw/pipeline.json"]
    return all(os.path.isfile(os.path.join(folder, n)) for n in need)


def _temp_files(root) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if n.startswith(".tmp-")]


def _run_and_kill(cmd, out_dir, rng, watch: str | None, env) -> str:
    """Start ``cmd``; SIGKILL it as soon as a ``.tmp-`` entry whose name contains ``watch`` appears in the run (a
    write in progress), or at a random moment when ``watch`` is None. Returns how it ended."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + (rng.uniform(3.0, 9.0) if watch is None else 120.0)
    ckpt = os.path.join(out_dir, "checkpoints")
    while proc.poll() is None and time.monotonic() < deadline:
        if watch is not None and any(n.startswith(".tmp-") and watch in n
                                     for d in (out_dir, ckpt) if os.path.isdir(d) for n in os.listdir(d)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return f"killed during {watch}"
        time.sleep(0.0005 if watch else 0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return "killed"
    assert proc.returncode == 0
    return "finished"


@pytest.mark.slow
def test_random_kills_during_training_checkpoints_and_export_resume_exactly(tmp_path):
    """SIGKILL at random moments, in the middle of a checkpoint write and in the middle of the export of final/;
    resume each time. The run ends with the parameters of a straight run, no temp file survives, final/ is complete
    or absent after every kill, and metrics.jsonl holds each step once."""
    import json
    import random

    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1")
    steps = 6
    straight = _write_recipe(tmp_path / "straight.yaml", tmp_path / "straight", steps_every=1)
    subprocess.run(_train_cmd(straight, steps), check=True, capture_output=True, timeout=300, env=env)
    out = tmp_path / "killed"
    recipe = _write_recipe(tmp_path / "killed.yaml", out, steps_every=1)
    cmd = _train_cmd(recipe, steps)
    rng = random.Random(26)
    ends = []
    for watch in ("step_", None, "final", "final", "final", "final"):
        if watch == "final" and any(e == "killed during final" for e in ends):
            break  # the export was interrupted once: enough
        ends.append(_run_and_kill(cmd, str(out), rng, watch, env))
        assert not os.path.exists(out / "final") or _final_complete(out / "final"), ends
    assert "killed during final" in ends, ends  # the export really was cut short (a finished run re-exports)
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, env=env)  # resume to the end

    assert _temp_files(out) == []
    assert _final_complete(out / "final")
    for sub in ("diffusion_pytorch_model.safetensors", "raw/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "straight" / "final" / sub), load_file(out / "final" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    a, b = _final(tmp_path / "straight", steps), _final(out, steps)
    for name in a["models"]:
        assert all(torch.equal(a["models"][name][k], b["models"][name][k]) for k in a["models"][name]), name
    logged = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert logged == sorted(set(logged)) and logged[-1] == steps


def test_resume_skips_a_corrupt_checkpoint_with_a_warning(tmp_path):
    """The newest checkpoint truncated (or empty): resume warns, naming it and the reason, and continues from the
    one before; metrics.jsonl is cut back to that step, including a line the kill left half-written."""
    import json

    from selfforcing.training.checkpoint import CheckpointWarning

    cfg = _cfg(tmp_path, method="teacher", max_steps=4, checkpoint_every=1, keep_checkpoints=3, log_every=1)
    straight = [p.detach().clone() for p in train(cfg, progress=False, resume=False).models["generator"].parameters()]
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["latest", "step_000002.pt", "step_000003.pt", "step_000004.pt"]
    newest = ckpt / "step_000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    (ckpt / "step_000003.pt").write_bytes(b"")  # empty
    (ckpt / ".tmp-abc-step_000005.pt").write_bytes(b"half")  # a write that was killed
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')  # a line cut short
    with pytest.warns(CheckpointWarning) as record:
        state = train(cfg, max_steps=2, progress=False, resume=True)
    messages = [str(w.message) for w in record]
    assert any("step_000004.pt" in m and "cannot be read" in m for m in messages), messages
    assert any("step_000003.pt" in m and "empty" in m for m in messages), messages
    assert state.step == 2 and not (ckpt / ".tmp-abc-step_000005.pt").exists()
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    state = train(cfg, progress=False, resume=True)  # on to the end: the same weights as the straight run
    assert state.step == 4
    assert all(torch.equal(a, b) for a, b in zip(straight, state.models["generator"].parameters()))
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_torchrun_ddp_and_fsdp2_equal_one_rank(tmp_path):
    """(b) the exit steps are the same on both ranks; (c) 2-rank DDP and FSDP2 (gloo, CPU) give the parameters of
    1 rank with the same global batch after k steps (1e-5)."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    worker = os.path.join(HERE, "dist_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for tag, parallel, extra in (("ddp", "ddp", []), ("fsdp", "fsdp2", []), ("fsdp_sharded", "fsdp2", ["sharded"])):
        r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", worker, str(tmp_path), tag, parallel, "1", "3", *extra],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    subprocess.run([sys.executable, worker, str(tmp_path), "single", "none", "2", "3"], check=True, timeout=300, env=env)
    single = torch.load(tmp_path / "single.rank0.pt", weights_only=False)
    for tag in ("ddp", "fsdp", "fsdp_sharded"):  # the last: saved sharded at step 2, resumed to 3
        r0 = torch.load(tmp_path / f"{tag}.rank0.pt", weights_only=False)
        r1 = torch.load(tmp_path / f"{tag}.rank1.pt", weights_only=False)
        assert r0["exits"] == r1["exits"] == single["exits"][-len(r0["exits"]):]
        if tag != "fsdp_sharded":
            assert r0["exits"] == single["exits"] and len({tuple(e) for e in r0["exits"]}) > 1  # drawn, not constant
        for name, sd in single["weights"].items():
            for k, v in sd.items():
                torch.testing.assert_close(r0["weights"][name][k], v, atol=1e-5, rtol=0, msg=f"{tag} {name} {k}")


def test_logs_tensorboard_and_metrics(tmp_path):
    cfg = _cfg(tmp_path, method="diffusion_forcing", tensorboard=True, log_every=1)
    train(cfg, progress=False, resume=False)
    import json

    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("loss" in r for r in rows)
    events = os.listdir(tmp_path / "run" / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)
    assert os.path.isfile(tmp_path / "run" / "config.yaml")
    assert os.path.isfile(tmp_path / "run" / "final" / "config.json")  # exported generator


def test_log_lines_average_every_step_since_the_last_one(tmp_path):
    """With the generator updated every 2nd step and a line every 3rd, every line still carries the generator's
    loss, and each metric is the mean of the steps since the previous line (checked against the step history)."""
    import json

    cfg = _cfg(tmp_path, method="self_forcing", max_steps=6, log_every=3, tensorboard=False,
               dm={"critic_updates_per_generator_update": 2})
    state = train(cfg, progress=False, resume=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [3, 6]
    for row, lo in zip(rows, (1, 4)):
        steps = [h for h in state.history if lo <= h["step"] < lo + 3]
        for key in ("generator_loss", "critic_loss", "seconds_per_step"):
            values = [h[key] for h in steps if key in h]
            assert values and row[key] == pytest.approx(sum(values) / len(values))


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    """batch 1 x 2 accumulated micro-batches == batch 2: the same samples, the same update."""
    a = train(_cfg(tmp_path / "a", method="teacher", batch_size=2, grad_accum=1), progress=False, resume=False)
    b = train(_cfg(tmp_path / "b", method="teacher", batch_size=1, grad_accum=2), progress=False, resume=False)
    for (k, p), q in zip(a.method.generator.state_dict().items(), b.method.generator.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=k)
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], rel=1e-5)


def test_resume_into_a_differently_built_network_is_a_clear_error(tmp_path):
    """A checkpoint records each network's architecture: resuming it with other heads (same weight shapes, so the
    weights would load silently) names the difference instead; the checkpoint stays on disk untouched."""
    cfg = _cfg(tmp_path, max_steps=2, checkpoint_every=2, method="teacher")
    train(cfg, progress=False, resume=False)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002.pt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["architectures"]["generator"]
    assert saved["num_layers"] == 2 and saved["num_attention_heads"] == 2
    before = ckpt.read_bytes()
    other = _cfg(tmp_path, max_steps=4, checkpoint_every=2, method="teacher",
                 generator={"preset": "tiny", "overrides": {"num_layers": 2, "num_attention_heads": 4,
                                                            "attention_head_dim": 32}})
    with pytest.raises(ValueError, match=r"num_attention_heads: checkpoint 2 vs now 4"):
        train(other, progress=False, resume=True)
    assert ckpt.read_bytes() == before
    # the stream policy (rolling window, sinks) is not the architecture: a run may change it when it resumes
    rolled = _cfg(tmp_path, max_steps=4, checkpoint_every=2, method="teacher",
                  generator={"preset": "tiny", "overrides": {"num_layers": 2, "local_attn_size": 6, "sink_size": 3}})
    assert train(rolled, progress=False, resume=True).step == 4


def test_a_checkpoint_from_before_an_option_existed_reads_it_as_its_default():
    """A checkpoint whose recorded architecture lacks a field (written before the option existed) was built with the
    option's default: it resumes into a model at that default, and is refused by one that sets the option."""
    from selfforcing.models import CausalWanModel
    from selfforcing.training.checkpoint import architectures_of, check_architectures

    model = CausalWanModel.from_preset("tiny", num_layers=1)
    old = architectures_of({"generator": model})
    for field in ("caption_layout_rank", "num_frame_embeddings"):
        del old["generator"][field]
    check_architectures("old.pt", old, {"generator": model})  # both at their defaults (0): no error
    layout = CausalWanModel.from_preset("tiny", num_layers=1, caption_layout_rank=4, caption_layout_size=(12, 8, 8))
    with pytest.raises(ValueError, match=r"caption_layout_rank: checkpoint 0 vs now 4"):
        check_architectures("old.pt", old, {"generator": layout})


def test_init_from_another_runs_state_equals_resuming_it(tmp_path):
    """A stage started with init_from = another run's checkpoints carries on exactly as resuming that run would (same
    weights after the same steps); a path without a checkpoint is a clear error."""
    kw = dict(method="self_forcing", checkpoint_every=2)
    straight = train(_cfg(tmp_path, max_steps=4, **kw), progress=False, resume=False)
    train(_cfg(tmp_path, max_steps=2, out_dir=str(tmp_path / "first"), **kw), progress=False, resume=False)
    second = train(_cfg(tmp_path, max_steps=4, out_dir=str(tmp_path / "second"), init_from=str(tmp_path / "first"),
                        **kw), progress=False)
    assert second.step == 4 and second.history[0]["step"] == 3
    for name, model in straight.models.items():
        for (k, a), b in zip(model.state_dict().items(), second.models[name].state_dict().values()):
            assert torch.equal(a, b), (name, k)
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        train(_cfg(tmp_path, max_steps=4, out_dir=str(tmp_path / "third"), init_from=str(tmp_path / "nowhere"), **kw),
              progress=False)


def test_init_from_a_run_skips_its_corrupt_newest_checkpoint(tmp_path):
    """init_from a run folder loads its newest checkpoint that reads back intact, as resume does (a truncated newest
    one is skipped with a warning naming it); a run whose checkpoints are all corrupt is an error naming it, and its
    files stay as they were."""
    from selfforcing.training.checkpoint import CheckpointWarning, CorruptCheckpoint

    kw = dict(method="teacher", checkpoint_every=2)
    train(_cfg(tmp_path, max_steps=4, out_dir=str(tmp_path / "first"), **kw), progress=False, resume=False)
    ckpts = tmp_path / "first" / "checkpoints"
    newest, older = ckpts / "step_000004.pt", ckpts / "step_000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a write cut short
    with pytest.warns(CheckpointWarning, match="step_000004.pt"):
        second = train(_cfg(tmp_path, max_steps=3, out_dir=str(tmp_path / "second"), init_from=str(tmp_path / "first"),
                            **kw), progress=False)
    assert second.history[0]["step"] == 3  # carried on from step 2
    older.write_bytes(b"")
    with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpoint, match="none of its 2 checkpoints"):
        train(_cfg(tmp_path, max_steps=3, out_dir=str(tmp_path / "third"), init_from=str(tmp_path / "first"), **kw),
              progress=False)
    assert newest.stat().st_size == 1000 and older.stat().st_size == 0


def test_learning_rate_factor_is_warmup_stable_decay():
    """Warmup rises linearly to 1, holds until the decay starts, then falls to min_lr_ratio at max_steps
    (cosine through the midpoint (1 + r) / 2, linear likewise); the default is the paper's constant rate."""
    from selfforcing.training.config import OptimConfig
    from selfforcing.training.trainer import learning_rate_factor as f

    assert [f(s, OptimConfig(), 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    o = OptimConfig(warmup_steps=4, decay="cosine", decay_start_step=20, min_lr_ratio=0.1)
    assert [f(s, o, 120) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(19, o, 120) == 1.0 and f(20, o, 120) == 1.0
    assert f(70, o, 120) == pytest.approx(0.55) and f(120, o, 120) == pytest.approx(0.1)
    assert f(500, o, 120) == pytest.approx(0.1)  # past the recipe's end it stays at the floor
    values = [f(s, o, 120) for s in range(20, 121)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    lin = OptimConfig(decay="linear", warmup_steps=10)  # the decay starts after the warmup
    assert f(10, lin, 110) == 1.0 and f(60, lin, 110) == pytest.approx(0.5) and f(110, lin, 110) == 0.0
    with pytest.raises(ValueError, match="unknown learning-rate decay 'step'"):
        OptimConfig(decay="step")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        OptimConfig(min_lr_ratio=1.5)


def test_scheduled_learning_rate_is_applied_and_resumes_exactly(tmp_path):
    """Each step's AdamW update uses lr * factor(step) of the recipe's max_steps, for the generator and the critic;
    a run stopped at step 3 and resumed equals a straight 6-step run, because the schedule is a function of the step."""
    from selfforcing.training.trainer import learning_rate_factor

    sched = {"lr": 1e-3, "warmup_steps": 2, "decay": "cosine", "decay_start_step": 3, "min_lr_ratio": 0.2}
    kw = dict(method="self_forcing", max_steps=6, checkpoint_every=3, generator_optim=sched,
              critic_optim={**sched, "lr": 2e-3}, dm={"critic_updates_per_generator_update": 2})
    straight = train(_cfg(tmp_path / "a", **kw), progress=False, resume=False)
    cfg = _cfg(tmp_path / "a", **kw).generator_optim
    for h in straight.history:
        name = "generator" if "generator_lr" in h else "critic"
        want = (1e-3 if name == "generator" else 2e-3) * learning_rate_factor(h["step"] - 1, cfg, 6)
        assert h[f"{name}_lr"] == pytest.approx(want)
    assert {h["step"] for h in straight.history if "critic_lr" in h} and \
        {h["step"] for h in straight.history if "generator_lr" in h}
    train(_cfg(tmp_path / "b", **kw), max_steps=3, progress=False, resume=False)
    resumed = train(_cfg(tmp_path / "b", **kw), progress=False, resume=True)
    for (k, p), q in zip(straight.method.generator.state_dict().items(), resumed.method.generator.state_dict().values()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=k)


def test_lr_multipliers_give_named_parameters_their_own_rate(tmp_path):
    """generator_optim.lr_multipliers: parameters whose name starts with a key train at lr * value (a caption layout
    added to a trained teacher at 5x), every other at lr; one teacher step moves them by that much more (AdamW's first
    step is lr * sign(g) per element, weight decay aside); a key matching no parameter and a non-positive value are
    errors."""
    from selfforcing.config import ConfigError
    from selfforcing.models import CausalWanModel
    from selfforcing.training.trainer import parameter_groups

    layout = {"caption_layout_rank": 2, "caption_layout_size": [3, 8, 8]}
    model = CausalWanModel.from_preset("tiny", num_layers=1, **layout)
    groups = parameter_groups(model, {"caption_layout": 5.0})
    assert [g["lr_multiplier"] for g in groups] == [1.0, 5.0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for n, p in model.named_parameters()
                                                    if n.startswith("caption_layout")}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="captionlayout"):
        parameter_groups(model, {"captionlayout": 5.0})
    with pytest.raises(ValueError, match="lr_multipliers.caption_layout"):
        _cfg(tmp_path, generator_optim={"lr_multipliers": {"caption_layout": 0}})
    gen = {"preset": "tiny", "overrides": {"num_layers": 2, **layout}}
    kw = dict(method="teacher", max_steps=1, checkpoint_every=0, generator=gen)
    moved = {}
    for mult in (1.0, 5.0):
        torch.manual_seed(0)
        start = CausalWanModel.from_preset("tiny", num_layers=2, **layout).state_dict()
        state = train(_cfg(tmp_path / str(mult), generator_optim={"lr": 1e-3, "weight_decay": 0.0,
                                                                  "lr_multipliers": {"caption_layout": mult}}, **kw),
                      progress=False, resume=False)
        after = state.method.generator.state_dict()
        moved[mult] = {k: float((after[k] - start[k]).abs().max()) for k in ("caption_layout_vectors", "proj_out.weight")}
    assert moved[1.0]["caption_layout_vectors"] == pytest.approx(1e-3, rel=1e-3)  # the only part with a gradient yet
    assert moved[5.0]["caption_layout_vectors"] == pytest.approx(5e-3, rel=1e-3)
    assert moved[5.0]["proj_out.weight"] == pytest.approx(moved[1.0]["proj_out.weight"], rel=1e-3)


def _joint_cfg(tmp_path, **kw):
    d = dict(method="teacher", max_steps=2, batch_size=2, out_dir=str(tmp_path), checkpoint_every=0,
             tensorboard=False, generator=TINY, timestep_shift=3.0,
             data={"kind": "moving-digits", "num_frames": 3, "num_digits": [1, 1], "images_per_digit": 4,
                   "text_len": 8, "embedding_cache": str(tmp_path.parent / "text_cache")})
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return build_config(TrainConfig, d)


def test_image_video_joint_training_adds_weighted_single_frame_loss(tmp_path):
    """data.image_batch_size single frames ride beside the clips: [Bi, 1, C, h, w] latents with their own captions and
    random streams, so the clip half of every step is untouched (weight 0 == no images, bit for bit), and a positive
    weight changes the update and logs image_loss."""
    from selfforcing.training.data import build_batch_source

    cfg = _joint_cfg(tmp_path / "a", data={"image_batch_size": 3})
    batch = build_batch_source(cfg, 384, torch.device("cpu")).batch(0, 0, 0)
    assert batch["latents"].shape == (2, 3, 8, 16, 16) and batch["image_latents"].shape == (3, 1, 8, 16, 16)
    assert batch["image_context"].shape == (3, 8, 384) and len(batch["image_rng"]) == 3
    assert not torch.equal(batch["image_latents"][:2, 0], batch["latents"][:, 0])  # other clips, not clip frames
    plain = train(_joint_cfg(tmp_path / "b"), progress=False, resume=False)
    zero = train(_joint_cfg(tmp_path / "c", data={"image_batch_size": 3, "image_loss_weight": 0.0}), progress=False,
                 resume=False)
    joint = train(_joint_cfg(tmp_path / "d", data={"image_batch_size": 3}), progress=False, resume=False)
    for k, p in plain.method.generator.state_dict().items():
        torch.testing.assert_close(zero.method.generator.state_dict()[k], p, atol=0, rtol=0, msg=k)
    assert [h["loss"] for h in zero.history] == [h["loss"] for h in plain.history]
    assert all("image_loss" in h and h["image_loss"] > 0 for h in joint.history)
    moved = [k for k, p in plain.method.generator.state_dict().items()
             if not torch.equal(joint.method.generator.state_dict()[k], p)]
    assert moved


def test_joint_training_and_timestep_sampling_are_validated(tmp_path):
    with pytest.raises(ValueError, match="needs method=teacher and data.kind moving-digits or store"):
        _cfg(tmp_path, method="self_forcing", data={**RANDOM_DATA, "image_batch_size": 4})
    with pytest.raises(ValueError, match="timestep_sampling must be uniform or logit_normal"):
        _cfg(tmp_path, timestep_sampling="beta")
    with pytest.raises(ValueError, match="image_batch_size and data.image_loss_weight must be >= 0"):
        _joint_cfg(tmp_path, data={"image_batch_size": -1})


def test_logit_normal_sampling_changes_only_the_flow_losses_timesteps(tmp_path):
    """The recipe's timestep distribution reaches the teacher's flow loss (other draws, other update), from the same
    uniform streams (so the first loss of a uniform run and of a logit-normal one differ only through t)."""
    a = train(_cfg(tmp_path / "a", method="teacher"), progress=False, resume=False)
    b = train(_cfg(tmp_path / "b", method="teacher", timestep_sampling="logit_normal"), progress=False, resume=False)
    assert a.history[0]["loss"] != b.history[0]["loss"]
    c = train(_cfg(tmp_path / "c", method="teacher", timestep_sampling="logit_normal"), progress=False, resume=False)
    assert [h["loss"] for h in b.history] == [h["loss"] for h in c.history]
