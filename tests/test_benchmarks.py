"""The benchmark tools that carry logic of their own: chunk_ab's variant parsing and its interleaved runs, and
rolling_bound's summary of repeated stream runs."""


import pytest
from benchmark_loader import load_benchmark


def test_chunk_ab_parses_variants_and_names_a_malformed_one():
    ab = load_benchmark("chunk_ab")
    assert ab.parse_variant("A=1, B=x=y") == {"A": "1", "B": "x=y"}
    assert ab.parse_variant("") == {} and ab.variant_name({}) == "defaults"
    with pytest.raises(ValueError, match="'SELFFORCING_CPU_FFN' is not NAME=VALUE"):
        ab.parse_variant("SELFFORCING_CPU_FFN")


def test_chunk_ab_runs_each_variant_in_its_own_environment():
    """One round of two FFN settings on the tiny preset: each run reports the setting of its own variant (the
    environment reaches the fresh process) and the summary compares the two."""
    ab = load_benchmark("chunk_ab")
    variants = [{"SELFFORCING_CPU_FFN": "feature_major"}, {"SELFFORCING_CPU_FFN": "auto"}]
    result = ab.ab(variants, rounds=1, repeats=2,
                   extra=["--preset", "tiny", "--context-frames", "3", "--threads", "1", "--text-len", "4"])
    names = ["SELFFORCING_CPU_FFN=feature_major", "SELFFORCING_CPU_FFN=auto"]
    assert list(result["runs"]) == names
    for name, env in zip(names, variants):
        (run,) = result["runs"][name]
        assert run["cpu_ffn"]["setting"] == env["SELFFORCING_CPU_FFN"] and run["seconds"] > 0
    assert result["runs"][names[0]][0]["cpu_ffn"]["chosen"] == {}  # a fixed kernel times nothing
    assert set(result["runs"][names[1]][0]["cpu_ffn"]["chosen"].values()) <= {"onednn", "feature_major"}
    assert result["summary"][names[0]]["ratio_to_first"] == 1.0
    assert sum(s["rounds_won"] for s in result["summary"].values()) == 1


def test_rolling_bound_summarises_its_runs():
    """Two short runs of the rolling bound's protocol (x1 vs x2, a 6-frame window): the summary's counts and extremes
    are those of the per-run ratios, the work ratio is the analytic one of `bench stream`, and the cost-per-FLOP
    ratio of each run times the work ratio gives back its latency ratio."""
    rb = load_benchmark("rolling_bound")
    result = rb.rolling_bound("tiny", runs=2, bound=1.15, lengths=(1, 2), log=lambda line: None, train_frames=6,
                              repeats=1)
    runs, summary = result["per_run"], result["summary"]
    assert len(runs) == 2 and summary["lengths"] == [1, 2]
    for key, bound_key in (("all_chunks_x2_over_x1", "all_chunks_passes"),
                           ("full_window_x2_over_x1", "full_window_passes")):
        values = [r[key] for r in runs]
        assert summary[bound_key] == sum(v <= 1.15 for v in values)
        assert (summary[key]["min"], summary[key]["max"]) == (min(values), max(values))
    # x1 of a 6-frame window: chunks 0 and 1; x2 adds two full-window chunks (see test_cli's bench stream test)
    from types import SimpleNamespace

    from selfforcing.models.presets import preset_config
    from selfforcing.perf import rolling_chunk_flops

    work = [rolling_chunk_flops(SimpleNamespace(**preset_config("tiny")), 64, 3, 6, i, 16, 4) for i in range(3)]
    assert summary["flops_x2_over_x1"] == pytest.approx((work[1] + work[2]) / (work[0] + work[1]))
    assert summary["seconds_per_flop_ratio_needed"] == pytest.approx(1.15 / summary["flops_x2_over_x1"])
    for r in runs:
        assert r["seconds_per_flop_x2_over_x1"] * r["flops_x2_over_x1"] == pytest.approx(r["all_chunks_x2_over_x1"])


def test_generate_memory_streams_a_long_video_and_stops_a_endless_one(tmp_path):
    """benchmarks/generate_memory.py, short: part 1 reads RSS after every chunk of a real `generate` run; part 2
    stops `generate --num-frames 1000000` with Ctrl-C: status 130, one line, no mp4 and no temp file left, and
    its memory is the size of a rolling window's (a cache for 10^6 frames would need hundreds of GB)."""
    bench = load_benchmark("generate_memory")
    long = bench.measure_generate(60, str(tmp_path))
    assert long["chunks"] == 20 and long["window_pixel_frames"] == 12 and len(long["rss_mb_per_chunk"]) == 20
    assert long["rss_mb_max_after_first_window"] >= long["rss_mb_after_first_window"] > 0
    (tmp_path / "stop").mkdir()
    stop = bench.measure_stop(3.0, str(tmp_path / "stop"))
    assert stop["exit_status"] == 130 and stop["stderr"] == ["selfforcing generate: stopped"]
    assert stop["files_left"] == [] and stop["samples"] >= 5
    assert stop["rss_mb_max"] < 4096


def test_direction_overfit_fits_its_clips_and_reports_the_swap_gap(tmp_path, monkeypatch, capsys):
    """benchmarks/direction_overfit.py on a 4-record store and a small random model: one probe per step, the ideal
    gap is ||m_up - m_down||^2 of the picked clips, and the loss on the clips falls while it fits them."""
    import json
    import sys

    import torch
    from conftest import WAN_CONFIGS, make_model

    from selfforcing.data.store import Store, StoreWriter

    cfg = WAN_CONFIGS["a"]
    g = torch.Generator().manual_seed(0)
    with StoreWriter(str(tmp_path / "store")) as w:
        for k, d in enumerate(["up", "down", "up", "left", "down"]):
            w.add({"latents": torch.randn(3, cfg["in_channels"], 4, 6, generator=g) + (k % 2),
                   "context": torch.randn(5, cfg["text_dim"], generator=g)}, {"caption": f"the digit 3 moves {d}"})
    make_model(cfg).save_pretrained(tmp_path / "m")
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["direction_overfit", str(tmp_path / "m"), "--store", str(tmp_path / "store"),
                                      "--clips-per-direction", "2", "--steps", "30", "--every", "15", "--lr", "3e-3",
                                      "--out", str(out)])
    load_benchmark("direction_overfit").main()
    result = json.loads(out.read_text())
    store = Store(str(tmp_path / "store"))
    lat = [store.get(i, ("latents",))["latents"] for i in (0, 2, 1, 4)]
    ideal = float(((lat[0] + lat[1]) / 2 - (lat[2] + lat[3]) / 2).pow(2).mean())
    assert result["ideal_gap"] == round(ideal, 5) and result["clips"] == 4
    assert [p["step"] for p in result["probes"]] == [0, 15, 30]
    assert result["probes"][-1]["loss_true"] < result["probes"][0]["loss_true"]
    assert "ideal_gap" in capsys.readouterr().out
    assert result["caption_layout_rank"] == 0
    # --caption-layout adds one, sized to the clips (3 frames of a 2x3 token grid), to the loaded model: its first
    # probe is the plain model's (the layout's vectors start at zero)
    monkeypatch.setattr(sys, "argv", sys.argv[:-2] + ["--steps", "1", "--every", "1", "--caption-layout", "2",
                                                      "--out", str(out)])
    load_benchmark("direction_overfit").main()
    layout = json.loads(out.read_text())
    assert layout["caption_layout_rank"] == 2 and layout["probes"][0] == {**result["probes"][0],
                                                                          "seconds": layout["probes"][0]["seconds"]}
