import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from PIL import Image

from selfforcing.cli import main
from selfforcing.io import read_video


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "selfforcing.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("presets", "demo"):
        assert name in out.stdout


def test_presets_json(capsys):
    assert main(["presets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["presets"]}
    assert 1.40e9 < rows["wan2.1-t2v-1.3b"]["parameters"] < 1.43e9
    assert rows["tiny"]["parameters"] < rows["small"]["parameters"]


def test_demo_streams_the_shipped_model(capsys, tmp_path):
    out, sheet = tmp_path / "demo.mp4", tmp_path / "demo.png"
    assert main(["demo", "--num-frames", "15", "--out", str(out), "--sheet", str(sheet)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["frames"] == 15 and report["first_chunk_latency_s"] > 0 and report["fps"] > 0
    assert read_video(out).shape == (15, 64, 64, 3)
    assert Image.open(sheet).size[0] > 64


@pytest.mark.parametrize("fuse", [True, False])
def test_bench_chunk_counts_the_same_work_fused_or_not(capsys, fuse):
    """``bench chunk`` times S denoising steps + one cache pass per chunk, fused (the default, as streaming runs)
    or not, against the FLOPs of the separate passes either way, and reports both peak fractions (and, with
    ``--compare-plain``, the same step in plain PyTorch beside it)."""
    from selfforcing.models import CausalWanModel
    from selfforcing.perf import chunk_step_flops

    args = ["bench", "chunk", "--preset", "tiny", "--repeats", "2", "--json"]
    args += ["--compare-plain"] if fuse else ["--no-fuse-cache-pass"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = CausalWanModel.from_preset("tiny").config
    assert out["fused_cache_pass"] is fuse and out["repeats"] == 2
    assert out["gflop"] == chunk_step_flops(config, 64, 3, 9, out["text_len"], 4) / 1e9
    assert 0 < out["fraction_of_peak"] < 1.5 and 0 < out["fraction_of_local_peak"] < 1.5
    assert out["achieved_gflops"] == pytest.approx(out["gflop"] / out["seconds"])
    if fuse:  # --compare-plain: the plain-PyTorch stream timed beside ours
        assert out["plain_seconds"] > 0
        assert out["speedup_over_plain"] == pytest.approx(out["plain_seconds"] / out["seconds"])
        assert out["plain_fraction_of_peak"] == pytest.approx(out["fraction_of_peak"] / out["speedup_over_plain"])
    else:
        assert "plain_seconds" not in out


def test_bench_stream_json_schema(capsys):
    """The benchmark runs every strategy and reports what the performance issue asks for (no timing asserted)."""
    assert main(["bench", "stream", "--preset", "tiny", "--lengths", "1,2", "--train-frames", "6", "--repeats", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = out["rows"]
    assert {r["strategy"] for r in rows} == {"rolling_kv", "recompute", "sliding_window"}
    assert {r["length"] for r in rows} == {1, 2}
    for r in rows:
        assert r["chunk_latency_s"] > 0 and r["first_chunk_latency_s"] > 0 and r["fps"] > 0
        # 2 rounds; per round the 1x video streams 4 times, the 2x one twice: 16 chunks of 3 frames pooled for each
        assert (r["streams"], r["chunks"], r["repeats"]) == ({1: 8, 2: 4}[r["length"]], 16, 2)
        assert r["chunk_latency_p10_s"] <= r["chunk_latency_s"] <= r["chunk_latency_p90_s"]
        assert r["full_window_chunk_latency_s"] > 0  # 6-frame window, 3-frame chunks: from the second chunk on
    from selfforcing.benchmark import streams_per_round

    assert [streams_per_round(m) for m in (1, 2, 3, 4, 5, 10)] == [4, 2, 2, 1, 1, 1]  # >= 4 training lengths a round
    assert out["ratios"]["rolling_kv_full_window_x2_over_x1"] > 0
    by = {(r["strategy"], r["length"]): r["chunk_latency_s"] for r in rows}
    for name in ("recompute", "sliding_window"):  # each strategy against the rolling cache at the longest length
        assert out["ratios"][f"{name}_x2_over_rolling_kv_x2"] == pytest.approx(by[(name, 2)] / by[("rolling_kv", 2)])
    assert "rolling_kv_x2_over_rolling_kv_x2" not in out["ratios"]  # 1 by construction: not a measurement
    # the work of the median chunk: x1 = chunks 0 and 1 (no context; 3 frames + the fused cache pass), x2 adds two
    # full-window chunks, so its median is the mean of chunk 1 and a full-window chunk
    from selfforcing.models.presets import preset_config
    from selfforcing.perf import rolling_chunk_flops

    config = SimpleNamespace(**preset_config("tiny"))
    work = [rolling_chunk_flops(config, 64, 3, 6, i, out["text_len"], 4) / 1e9 for i in range(3)]
    rolling = {r["length"]: r for r in rows if r["strategy"] == "rolling_kv"}
    assert rolling[1]["chunk_gflop_median"] == pytest.approx((work[0] + work[1]) / 2)
    assert rolling[2]["chunk_gflop_median"] == pytest.approx((work[1] + work[2]) / 2)
    assert out["ratios"]["rolling_kv_flops_x2_over_x1"] == pytest.approx(
        rolling[2]["chunk_gflop_median"] / rolling[1]["chunk_gflop_median"])
    per_flop = [rolling[m]["chunk_latency_s"] / rolling[m]["chunk_gflop_median"] for m in (1, 2)]
    assert out["ratios"]["rolling_kv_seconds_per_flop_x2_over_x1"] == pytest.approx(per_flop[1] / per_flop[0])
    # without --json: one line per row (with the work of the median chunk for the rolling cache), then the ratios
    assert main(["bench", "stream", "--preset", "tiny", "--lengths", "1,2", "--train-frames", "6", "--repeats", "1",
                 "--strategies", "rolling_kv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["rolling_kv", "x1"], ["rolling_kv", "x2"]]
    assert all("full window" in line and line.endswith("GFLOP") for line in lines[:2])
    assert {line.split(":")[0] for line in lines[2:]} == {"rolling_kv_x2_over_x1",
                                                          "rolling_kv_full_window_x2_over_x1",
                                                          "rolling_kv_flops_x2_over_x1",
                                                          "rolling_kv_seconds_per_flop_x2_over_x1"}


# ------------------------------------------------------------------------------------------------ user errors
def _bad_inputs(tmp_path):
    """(argv, words the one error line must hold) for each mistake a user can make, with the files it needs."""
    from selfforcing.models import CausalWanModel

    model = CausalWanModel.from_preset("tiny", num_layers=1)
    model.save_pretrained(tmp_path / "good")
    (tmp_path / "broken_json").mkdir()
    (tmp_path / "broken_json" / "config.json").write_text('{"_class_name": "CausalWanModel",\n')
    (tmp_path / "half_export").mkdir()  # an export killed after config.json
    (tmp_path / "half_export" / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00" * 512)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: teacher\nmax_steps: 2\nout_dir: {tmp_path / 'run'}\ntensorboard: false\n"
                      "data: {kind: random, latent_shape: [3, 8, 4, 4], text_len: 4}\n")
    (tmp_path / "broken.yaml").write_text("method: [teacher\n")
    unwritable = "/sys/x.mp4" if os.geteuid() == 0 else str(_read_only_dir(tmp_path) / "x.mp4")
    out = ["--out", str(tmp_path / "o" / "x.mp4")]
    gen = ["generate", "--num-frames", "3"]
    return [
        (gen + ["--num-frames", "1000000", "--window-frames", "0"] + out, ["KV cache over the whole video", "GB"]),
        (gen + ["--out", str(tmp_path / "a_file" / "x.mp4")], ["a_file is a file, not a folder"]),
        (gen + ["--out", unwritable], ["cannot write", "does not take new files"]),
        (gen + ["--out", str(tmp_path)], ["is a folder, expected a file path"]),
        (gen + ["--checkpoint", str(tmp_path / "empty.pt")] + out, ["empty.pt", "empty (0 bytes)"]),
        (gen + ["--checkpoint", str(tmp_path / "broken_json")] + out, ["broken_json/config.json: not valid JSON"]),
        (gen + ["--checkpoint", str(tmp_path / "half_export")] + out, ["half_export", "no weights"]),
        (gen + ["--checkpoint", str(tmp_path / "missing")] + out, ["checkpoint not found", "missing"]),
        (gen + ["--prompt", "   "] + out, ["--prompt is empty", "unconditional"]),
        (gen + ["--prompt", ""] + out, ["--prompt is empty"]),
        (gen + ["--prompts", str(tmp_path / "nope.txt")] + out, ["prompt file not found", "nope.txt"]),
        (gen + ["--num-frames", "0"] + out, ["--num-frames must be >= 1"]),
        (gen + ["--switch", "two:x"] + out, ["--switch must be CHUNK:PROMPT"]),
        (gen + ["--switch", "2: "] + out, ["--switch must be CHUNK:PROMPT"]),
        (gen + ["--init-video", str(tmp_path / "corrupt.mp4")] + out, ["cannot decode video", "corrupt.mp4"]),
        (["train", "--config", str(tmp_path / "nope.yaml")], ["config file not found", "nope.yaml"]),
        (["train", "--config", str(recipe), "log_every=0"], ["recipe.yaml", "log_every must be >= 1"]),
        (["train", "--config", str(recipe), "checkpoint_every=-1"], ["recipe.yaml", "checkpoint_every must be >= 0"]),
        (["train", "--config", str(recipe), "lr=1"], ["unknown config key lr"]),
        (["train", "--config", str(tmp_path / "broken.yaml")], ["broken.yaml: not valid YAML"]),
        (["data", "encode", "--dataset", "video-folder", "--out", str(tmp_path / "s")], ["needs --path"]),
        (["data", "encode", "--dataset", "video-folder", "--path", str(tmp_path / "none"), "--out",
          str(tmp_path / "s")], ["video folder not found"]),
        (gen + ["--num-frames", "many"] + out, ["--num-frames", "invalid int value"]),  # argparse's own errors
        (["generate", "--prompt", "a"], ["the following arguments are required: --out"]),
    ]


def _read_only_dir(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o500, exist_ok=True)
    return folder


def test_every_user_error_is_one_line_with_status_2(tmp_path, capsys):
    """Each bad input of issue 26 through the CLI: exit status 2, one line on stderr naming the problem (file or key
    and reason), no traceback, and no output file."""
    failures = []
    for argv, words in _bad_inputs(tmp_path):
        try:
            status = main(argv)
        except SystemExit as exit_:  # argparse reports usage errors by exiting
            status = exit_.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        ok = (status == 2 and len(lines) == 1 and lines[0].startswith(f"selfforcing {argv[0]}")
              and all(w in lines[0] for w in words) and "Traceback" not in err)
        if not ok:
            failures.append((argv, status, err))
    assert not failures, failures
    assert not (tmp_path / "o").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_debug_shows_the_traceback(tmp_path):
    """Run as a program: a user's error is one line and status 2; with --debug (anywhere on the line) the traceback."""
    (tmp_path / "empty.pt").write_bytes(b"")
    argv = [sys.executable, "-m", "selfforcing.cli", "generate", "--checkpoint", str(tmp_path / "empty.pt"),
            "--out", str(tmp_path / "x.mp4")]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.splitlines() == [f"selfforcing generate: cannot read checkpoint {tmp_path / 'empty.pt'}: "
                                         f"the file is empty (0 bytes)"]
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ValueError: cannot read checkpoint" in debug.stderr
