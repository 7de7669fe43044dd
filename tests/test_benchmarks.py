"""The benchmark tools that carry logic of their own: chunk_ab's variant parsing and its interleaved runs."""

import importlib.util
import os

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chunk_ab_parses_variants_and_names_a_malformed_one():
    ab = _load("chunk_ab")
    assert ab.parse_variant("A=1, B=x=y") == {"A": "1", "B": "x=y"}
    assert ab.parse_variant("") == {} and ab.variant_name({}) == "defaults"
    with pytest.raises(ValueError, match="'SELFFORCING_CPU_FFN' is not NAME=VALUE"):
        ab.parse_variant("SELFFORCING_CPU_FFN")


def test_chunk_ab_runs_each_variant_in_its_own_environment():
    """One round of two FFN settings on the tiny preset: each run reports the setting of its own variant (the
    environment reaches the fresh process) and the summary compares the two."""
    ab = _load("chunk_ab")
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
