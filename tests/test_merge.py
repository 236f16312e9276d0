"""Merging result JSONs of a suite run in parts over disjoint question ranges."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from eval.common import SuiteError
from eval.merge import main, merge_parts
from eval.position import N, summarize


def _part(
    start: int, stop: int, acc: float, secs: float, chosen: str = "bm25+probe:best_last/top_k1"
) -> dict:
    return {
        "suite": "qa",
        "dataset": f"nq-open-oracle test split ({stop - start} questions, gold at a random slot of 20)",
        "questions": {"start": start, "stop": stop},
        "config": {
            "model": "m",
            "max_new_tokens": 24,
            "quick": False,
            "opts": {"start": str(start), "questions": str(stop)},
            "wall_seconds": 10.0,
            "dev_questions": 0,
            "dev_accuracy": {},
        },
        "systems": {
            "retriever-order": {"accuracy": acc, "seconds_per_query": secs, "gold_in_context": 1.0},
            "best-policy": {
                "accuracy": acc / 2,
                "seconds_per_query": 1.0,
                "gold_in_context": 0.5,
                "chosen": chosen,
            },
        },
        "machine": {"cpu": "x", "thread_env": {"OMP_NUM_THREADS": "1"}},
    }


def test_weighted_means_equal_one_run_over_all_questions() -> None:
    a = _part(0, 150, acc=0.2, secs=4.0)
    # The first part chose the policy on dev; its dev figures are kept.
    a["config"].update(dev_questions=40, dev_accuracy={"bm25+probe:best_last/top_k1": 0.35})
    a["config"]["opts"] = {"questions": "150"}  # as written before start= existed
    del a["questions"]
    b = _part(225, 300, acc=0.4, secs=8.0)
    c = _part(150, 225, acc=0.0, secs=2.0)
    m = merge_parts([("a.json", a), ("b.json", b), ("c.json", c)])
    assert m["questions"] == {"start": 0, "stop": 300}
    ro = m["systems"]["retriever-order"]
    assert ro["accuracy"] == pytest.approx((150 * 0.2 + 75 * 0.4 + 75 * 0.0) / 300)
    assert ro["seconds_per_query"] == pytest.approx((150 * 4 + 75 * 8 + 75 * 2) / 300)
    assert m["systems"]["best-policy"]["chosen"] == "bm25+probe:best_last/top_k1"
    assert m["config"]["dev_questions"] == 40 and m["config"]["dev_accuracy"]
    assert m["dataset"].startswith("nq-open-oracle test split (300 questions")
    assert [p["file"] for p in m["parts"]] == ["a.json", "c.json", "b.json"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["questions"].update(start=140), "overlaps"),
        (lambda p: p["questions"].update(start=160), "gap"),
        (lambda p: p["config"].update(max_new_tokens=32), "max_new_tokens"),
        (lambda p: p["systems"]["best-policy"].update(chosen="probe:best_last/top_k3"), "same policy"),
        (lambda p: p["systems"].pop("retriever-order"), "other systems"),
        (lambda p: p.update(suite="rerank"), "suites"),
    ],
)
def test_refuses_parts_that_are_not_one_experiment(change, message: str) -> None:
    a = _part(0, 150, 0.2, 4.0)
    b = _part(150, 300, 0.3, 4.0)
    change(b)
    with pytest.raises(SuiteError, match=message):
        merge_parts([("a.json", a), ("b.json", b)])


def test_refuses_a_single_part_and_an_unknown_range() -> None:
    a = _part(0, 150, 0.2, 4.0)
    with pytest.raises(SuiteError, match="at least two"):
        merge_parts([("a.json", a)])
    b = copy.deepcopy(a)
    del b["questions"]
    b["config"]["opts"] = {}
    with pytest.raises(SuiteError, match="not recorded"):
        merge_parts([("a.json", _part(150, 300, 0.2, 4.0)), ("b.json", b)])


def test_command_line_writes_the_merge_and_reports_refusals(tmp_path: Path, capsys) -> None:
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(_part(0, 100, 0.1, 1.0)))
    pb.write_text(json.dumps(_part(100, 300, 0.4, 1.0)))
    out = tmp_path / "merged.json"
    assert main([str(pb), str(pa), "--output", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["suite"] == "qa"
    assert merged["systems"]["retriever-order"]["accuracy"] == pytest.approx(0.3)
    assert main([str(pa), str(tmp_path / "missing.json"), "--output", str(out)]) == 2
    assert "part not found" in capsys.readouterr().err


def _position_part(start: int, ranks: dict[str, np.ndarray], secs: float) -> dict:
    """A position part built by the suite's own summary from (questions, slot) gold ranks."""
    stop = start + next(iter(ranks.values())).shape[0]
    systems = {
        name: {**summarize({p: list(r[:, p]) for p in range(N)}), "seconds_per_query": secs}
        for name, r in ranks.items()
    }
    systems["probe-curve"]["time_ratio_vs_raw"] = 1.0
    systems["probe-cv"] = {**systems["probe-raw"], "chosen": [f"pick-{start}"]}
    return {
        "suite": "position",
        "dataset": f"nq-open-oracle test split ({stop - start} questions x 20 gold slots, 19 BM25 "
        f"distractors), questions {start}-{stop - 1}",
        "questions": {"start": start, "stop": stop},
        "config": {"model": "m", "timing_lists": 1, "cv": {"folds": 3}, "opts": {}, "wall_seconds": 1.0},
        "systems": systems,
        "per_question": {
            "qids": [f"q{start + i}" for i in range(stop - start)],
            "gold_rank": {n: [" ".join(map(str, row)) for row in r] for n, r in ranks.items()},
        },
        "machine": {},
    }


def test_position_parts_merge_to_the_summary_of_all_their_questions() -> None:
    rng = np.random.default_rng(0)
    ranks = {
        "probe-raw": rng.integers(1, 4, (30, N)),
        "probe-curve": rng.integers(1, 3, (30, N)),
    }
    a = _position_part(100, {k: v[:12] for k, v in ranks.items()}, secs=2.0)
    b = _position_part(112, {k: v[12:] for k, v in ranks.items()}, secs=4.0)
    b["systems"]["probe-curve"]["seconds_per_query"] = 3.0
    m = merge_parts([("b.json", b), ("a.json", a)])
    for name, r in ranks.items():
        whole = summarize({p: list(r[:, p]) for p in range(N)})
        got = m["systems"][name]
        assert {k: got[k] for k in whole} == whole  # spread and null recomputed, not averaged
    assert "probe-cv" not in m["systems"] and "probe-cv" in m["left_out"]
    assert m["systems"]["probe-raw"]["seconds_per_query"] == pytest.approx((12 * 2 + 18 * 4) / 30)
    curve = m["systems"]["probe-curve"]
    assert curve["time_ratio_vs_raw"] == pytest.approx(
        curve["seconds_per_query"] / m["systems"]["probe-raw"]["seconds_per_query"], abs=1e-4
    )
    assert m["dataset"].startswith("nq-open-oracle test split (30 questions")
    assert m["dataset"].endswith("questions 100-129")
    assert len(m["per_question"]["qids"]) == 30

    # A part written without per-question ranks: the spread comes from the merged bins, no null.
    del a["per_question"]
    m = merge_parts([("a.json", a), ("b.json", b)])
    raw = m["systems"]["probe-raw"]
    bins = [raw[f"recall@1@bin{i}"] for i in range(1, 6)]
    assert raw["bin_spread"] == pytest.approx(max(bins) - min(bins), abs=1e-4)
    assert raw["recall@1"] == pytest.approx(float((ranks["probe-raw"] == 1).mean()), abs=1e-4)
    assert "bin_spread_null_p95" not in raw and "per_question" not in m


def test_an_untimed_position_part_leaves_the_seconds_to_the_timed_ones() -> None:
    rng = np.random.default_rng(1)
    ranks = {"probe-raw": rng.integers(1, 4, (10, N)), "probe-curve": rng.integers(1, 3, (10, N))}
    # An untimed part (timing_lists=0, a run that only filled a store) first, so it is the reference.
    a = _position_part(0, {k: v[:6] for k, v in ranks.items()}, secs=0.0)
    for s in a["systems"].values():
        s.pop("seconds_per_query")
        s.pop("time_ratio_vs_raw", None)
    a["config"]["timing_lists"] = 0
    b = _position_part(6, {k: v[6:] for k, v in ranks.items()}, secs=4.0)
    b["systems"]["probe-curve"]["seconds_per_query"] = 3.0
    m = merge_parts([("a.json", a), ("b.json", b)])
    assert m["systems"]["probe-raw"]["seconds_per_query"] == 4.0
    assert m["systems"]["probe-curve"]["time_ratio_vs_raw"] == 0.75
    whole = summarize({p: list(ranks["probe-raw"][:, p]) for p in range(N)})
    assert m["systems"]["probe-raw"]["recall@1"] == whole["recall@1"]
    # Two untimed parts: no seconds at all, and no NaN in their place.
    b = copy.deepcopy(a)
    b.update(questions={"start": 6, "stop": 10})
    m = merge_parts([("a.json", a), ("b.json", b)])
    assert all("seconds_per_query" not in s for s in m["systems"].values())
