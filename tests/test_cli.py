import json
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
    from selfforcing.commands.bench import streams_per_round

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
