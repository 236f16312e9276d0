"""Every benchmark suite runs in quick mode through ``python -m eval`` and writes the JSON contract.

Figures of quick runs are too noisy to assert on; these tests check that each suite runs end to end
on the real model and data, reports the systems its issue asks for, and keeps metrics in range.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from eval.__main__ import main
from eval.common import QUICK_PASSAGE_TOKENS, write_json
from eval.heads import DEFAULT_WEIGHTS
from eval.merge import merge_parts
from eval.position import FUSED

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(suite: str, data_dir: Path, tmp_path: Path, *opts: str) -> dict:
    out = tmp_path / f"{suite}.json"
    args = [suite, "--quick", "--data-dir", str(data_dir), "--output", str(out)]
    for o in opts:
        args += ["--opt", o]
    assert main(args) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert {"suite", "dataset", "config", "systems", "machine"} <= set(result)
    assert result["suite"] == suite
    assert result["config"]["quick"] is True
    return result


def _in_unit_range(systems: dict, metric: str) -> None:
    for name, s in systems.items():
        if metric in s:
            assert 0.0 <= s[metric] <= 1.0 and not math.isnan(s[metric]), (name, metric, s[metric])


def test_shortlists_suite_with_a_candidate_curve_and_scifact(data_dir: Path, tmp_path: Path) -> None:
    from retrievers.dense import resolve_encoder_dtype

    # The shipped curve for this CPU's dtype as the candidate (bf16 where the CPU has it, else fp32).
    name = (
        "smollm2-135m-nacal.json"
        if resolve_encoder_dtype("auto") == "bfloat16"
        else "smollm2-135m-nacal-fp32.json"
    )
    curve = REPO / "calibration" / "curves" / name
    opts = ["questions=2", "dl19_queries=2", "scifact=3", "systems=default,candidate", f"curve={curve}"]
    res = _run("shortlists", data_dir, tmp_path, *opts)
    systems = res["systems"]
    assert "beir-scifact test, BM25 top-5 of 3 queries" in res["dataset"]
    default, cand = systems["default"], systems["candidate"]
    for metric in ("recall@1@3", "bin_spread@5", "dl19_rotation_stable", "scifact_ndcg@10"):
        _in_unit_range(systems, metric)
    if res["config"]["dtype"] == "bfloat16":
        # The same curve: the candidate must read exactly as the default does.
        for key in ("per_slot@3", "per_slot@5", "dl19_ndcg@5", "scifact_ndcg@10", "scifact_ndcg@10_unfused"):
            assert cand[key] == default[key], key
        assert cand["scifact_minus_default"] == 0.0 and cand["scifact_minus_default_ci95"] == [0.0, 0.0]
    assert 0 <= systems["bm25-scifact"]["scifact_ndcg@10"] <= 1
    assert main(["shortlists", "--quick", "--data-dir", str(data_dir), "--opt", "systems=candidate"]) == 2


def test_relevance_suite_compares_each_variant_with_its_reference(data_dir: Path, tmp_path: Path) -> None:
    systems = "default,orders4,orders4-early,cf,cf-topm8,cf-query-rows"
    res = _run("relevance", data_dir, tmp_path, "scifact=3", f"systems={systems}", "nq=1", "nq_length=4")
    sys_ = res["systems"]
    _in_unit_range(sys_, "scifact_ndcg@10")
    _in_unit_range(sys_, "nq_dev_recall@1@4")
    assert sys_["default"]["prompts_per_query"] == 2 and sys_["orders4"]["prompts_per_query"] == 4
    assert 2 <= sys_["orders4-early"]["prompts_per_query"] <= 4
    for name, ref in (("orders4", "default"), ("cf-topm8", "cf"), ("cf-query-rows", "cf")):
        lo, hi = sys_[name][f"scifact_minus_{ref}_ci95"]
        assert lo <= sys_[name][f"scifact_minus_{ref}"] <= hi
    assert res["config"]["references"]["cf-topm8"] == "cf"
    # A variant without its reference system is refused, as is an unknown one.
    assert main(["relevance", "--quick", "--data-dir", str(data_dir), "--opt", "systems=orders3"]) == 2
    assert main(["relevance", "--quick", "--data-dir", str(data_dir), "--opt", "systems=best"]) == 2


def test_rerank_suite(data_dir: Path, tmp_path: Path) -> None:
    r = _run("rerank", data_dir, tmp_path)
    sys_ = r["systems"]
    for name in (
        "bm25",
        "position-prior@20",
        "probe-raw@20",
        "probe-nacal@20",
        "probe-cv@20",
        "probe-default@20",
    ):
        assert name in sys_, name
    _in_unit_range(sys_, "ndcg@10")
    _in_unit_range(sys_, "mrr@10")
    assert r["config"]["passage_max_tokens"] == QUICK_PASSAGE_TOKENS
    assert r["config"]["default_config"]["probe"]["passage_max_tokens"] == QUICK_PASSAGE_TOKENS
    # The position-prior control in best-last windows of BM25 order is BM25's own order at depth 20.
    assert sys_["position-prior@20"]["ndcg@10"] == pytest.approx(sys_["bm25"]["ndcg@10"])
    # The same systems on the pipeline's hybrid first stage, each also compared with that first stage.
    assert r["config"]["first_stages"] == ["bm25", "hybrid"]
    for name in (
        "hybrid",
        "position-prior@20-hybrid",
        "probe-raw@20-hybrid",
        "probe-nacal@20-hybrid",
        "probe-default-alone@20-hybrid",
        "probe-default@20-hybrid",
        "probe-default-alone@20",
    ):
        assert name in sys_, name
        assert (name == "hybrid") or 0.0 <= sys_[name][
            "p_vs_hybrid" if "hybrid" in name else "p_vs_bm25"
        ] <= 1.0
    assert sys_["position-prior@20-hybrid"]["ndcg@10"] == pytest.approx(sys_["hybrid"]["ndcg@10"])
    assert sys_["position-prior@20-hybrid"]["p_vs_hybrid"] == 1.0
    # Baselines run on a query subset in quick mode; identity is BM25's order on those queries.
    for name in ("icr-reference@20", "listwise@20", "pointwise@20", "identity@20", "shuffle@20"):
        s = sys_[name]
        assert s["queries"] >= 1 and s["seconds_per_query"] >= 0 and 0.0 <= s["p_vs_bm25"] <= 1.0, name
    assert sys_["identity@20"]["ndcg@10"] == pytest.approx(
        sys_["identity@20"]["bm25_ndcg@10_same_queries"], abs=1e-4
    )
    lw = sys_["listwise@20"]
    assert 0 <= lw["parse_failures"] <= lw["windows"] and lw["windows"] >= 1


def test_position_suite(data_dir: Path, tmp_path: Path, smol_model, monkeypatch: pytest.MonkeyPatch) -> None:
    r = _run("position", data_dir, tmp_path, "questions=3", "timing_lists=1", "fresh_from=2")
    sys_ = r["systems"]
    assert set(sys_) == {
        "probe-raw",
        "probe-nacal",
        "probe-curve",
        "probe-curve+nacal",
        FUSED,
        "bm25",
        "probe-cv",
    }
    from eval.common import fixed_fusion
    from rerank.config import load_config

    cfg = load_config(REPO / "configs" / "default.yaml")
    # The suite measures the fixed fusion it was defined with (the default fuses fitted weights).
    assert r["config"]["first_stage_weight"] == fixed_fusion(cfg.probe).first_stage_weight > 0
    # Nested CV: one pick per fold (3 folds of one question), each a kind/band/form of the grid.
    assert len(sys_["probe-cv"]["chosen"]) == 3
    assert all(len(c.split("/")) == 3 for c in sys_["probe-cv"]["chosen"])
    assert r["fresh"]["questions"] == 1 and set(r["fresh"]["systems"]) == set(sys_)
    for s in sys_.values():
        assert len([k for k in s if k.startswith("recall@1@pos")]) == 20
        assert len([k for k in s if k.startswith("recall@1@bin")]) == 5
    _in_unit_range(sys_, "recall@1")
    _in_unit_range(sys_, "mrr")
    assert sys_["probe-curve"]["seconds_per_query"] > 0
    # The fused system is what the shipped reranker returns for the same list when the first stage gives
    # it BM25 scores: rerank each question's list with the gold passage at slot 10 (given worst first, so
    # that the reversed prompt order puts every passage in the sweep's slot). The sweep reads one prompt
    # per list, so the reranker is held to the default's first prompt order.
    from eval.nq import load_nq
    from rerank.engines import AttentionReranker
    from retrievers.bm25 import BM25Retriever
    from retrievers.records import Hit

    slot = 9
    # A quick sweep cuts passages short; the reranker reads them with the same budget.
    assert r["config"]["probe"]["passage_max_tokens"] == QUICK_PASSAGE_TOKENS
    probe = fixed_fusion(cfg.probe).model_copy(
        update={"passage_max_tokens": QUICK_PASSAGE_TOKENS, "prompt_order": "reversed"}
    )
    rr = AttentionReranker(smol_model, probe, cfg.calibration)
    tops = []
    for it in load_nq(data_dir)[0][:3]:
        passages = it.with_gold_at(slot, 20)
        bm = BM25Retriever(backend="bm25s")
        bm.index(passages, show_progress=False)
        scored = list(zip(passages, bm.scores(it.question), strict=True))[::-1]
        hits = [Hit(passage=p, score=float(x), rank=k + 1) for k, (p, x) in enumerate(scored)]
        ranked = rr.rerank(it.question, hits)
        assert [i.prompt_position for i in ranked.items if i.passage.id == it.gold.id] == [slot]
        assert ranked.info["first_stage"] == "scores"
        tops.append(ranked.items[0].passage.id == it.gold.id)
    assert sys_[FUSED][f"recall@1@pos{slot + 1}"] == pytest.approx(sum(tops) / 3, abs=1e-3)
    assert sys_[FUSED]["timed_as"] == "probe-curve+nacal"
    # A part over the last question reads its passes from the cache and reports exactly what the full
    # run reported for that question alone; probe-cv, which needs 3 questions, is left out.
    part = _run("position", data_dir, tmp_path, "start=2", "questions=3", "timing_lists=1")
    assert part["questions"] == {"start": 2, "stop": 3}
    assert set(part["systems"]) == set(sys_) - {"probe-cv"}
    for name, fig in r["fresh"]["systems"].items():
        if name != "probe-cv":
            assert {k: part["systems"][name][k] for k in fig} == fig, name
    # cv=0 leaves probe-cv out and changes no other figure, also when the scores go through a store
    # (filled by a run over two questions, then one more added).
    store = f"store={tmp_path / 'pos'}"
    _run("position", data_dir, tmp_path, "questions=2", "timing_lists=1", "cv=0", store)
    no_cv = _run("position", data_dir, tmp_path, "questions=3", "timing_lists=1", "cv=0", store)
    assert set(no_cv["systems"]) == set(sys_) - {"probe-cv"} and no_cv["config"]["cv"]["variants"] == 0
    for name, fig in no_cv["systems"].items():
        want = {k: v for k, v in sys_[name].items() if k != "seconds_per_query" and "time" not in k}
        assert {k: fig[k] for k in want} == want, name
    for kind in ("raw", "nacal"):
        with np.load(tmp_path / f"pos-{kind}.npz") as z:
            assert z["qids"].tolist() == sorted(r["per_question"]["qids"])
            assert z["scores"].shape == (3, 20, 20)
    # Every question is in the store now: a run makes no pass and reports the same ranks.
    import rerank.fitting

    def no_pass(*a: object, **k: object) -> None:
        raise AssertionError("a stored question was probed again")

    monkeypatch.setattr(rerank.fitting, "collect", no_pass)
    # timing_lists=0 (a run that only fills or reads a store) leaves the timing keys out, not NaN.
    again = _run("position", data_dir, tmp_path, "questions=3", "timing_lists=0", "cv=0", store)
    assert again["per_question"] == no_cv["per_question"]
    assert not any("seconds" in k or "time" in k for s in again["systems"].values() for k in s)
    monkeypatch.undo()
    # Merged with a part over the first two questions, it gives the full run's figures, the bin spread's
    # position-blind null included (recomputed from the parts' per-question ranks, not averaged).
    first = _run("position", data_dir, tmp_path, "start=0", "questions=2", "timing_lists=1")
    merged = merge_parts([("part.json", part), ("first.json", first)])
    assert merged["per_question"]["qids"] == r["per_question"]["qids"]
    for name, fig in merged["systems"].items():
        want = {k: v for k, v in sys_[name].items() if k != "seconds_per_query" and "time" not in k}
        assert {k: fig[k] for k in want} == want, name
    args = ["position", "--quick", "--data-dir", str(data_dir), "--output", str(tmp_path / "bad.json")]
    assert main([*args, "--opt", "start=3", "--opt", "questions=3"]) == 2
    assert main([*args, "--opt", "start=1", "--opt", "fresh_from=1"]) == 2
    assert main([*args, "--opt", "questions=3", "--opt", store]) == 2  # a store needs cv=0
    assert not (tmp_path / "bad.json").exists()


def test_qa_suite(data_dir: Path, tmp_path: Path) -> None:
    r = _run("qa", data_dir, tmp_path, "questions=1", "dev_questions=1", "max_new_tokens=8")
    sys_ = r["systems"]
    for name in (
        "closed-book",
        "gold-only",
        "retriever-order",
        "score",
        "best_last",
        "top5-pruned",
        "bm25-best_last",
        "bm25+probe-best_last",
        "best-policy",
        "best-policy-bm25",
        "bias_aligned",  # needs the shipped raw curve of the model's dtype
    ):
        assert name in sys_, name
    _in_unit_range(sys_, "accuracy")
    # The probe and the generator read the quick run's short passages.
    assert r["config"]["probe"]["passage_max_tokens"] == QUICK_PASSAGE_TOKENS
    # The BM25 control applies the very order and prune the dev questions chose for the probe.
    ranking, policy = sys_["best-policy"]["chosen"].split(":")
    assert ranking in ("probe", "bm25+probe")
    assert sys_["best-policy-bm25"]["chosen"] == f"bm25:{policy}"
    assert sys_["bm25-best_last"]["gold_in_context"] == 1.0
    assert sys_["gold-only"]["gold_in_context"] == 1.0
    assert sys_["closed-book"]["gold_in_context"] == 0.0


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (["start=3"], "start=3 must be at least 0 and below questions=3"),
        (["policy=probe:best_last/top_k4"], "unknown policy='probe:best_last/top_k4'"),
    ],
)
def test_qa_suite_refuses_a_bad_part(data_dir: Path, tmp_path: Path, capsys, opts, message) -> None:
    args = ["qa", "--quick", "--data-dir", str(data_dir), "--output", str(tmp_path / "qa.json")]
    for o in opts:
        args += ["--opt", o]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "qa.json").exists()


def test_heads_suite(data_dir: Path, tmp_path: Path) -> None:
    r = _run("heads", data_dir, tmp_path, "queries=5")
    assert r["config"]["passage_max_tokens"] == QUICK_PASSAGE_TOKENS
    choice = r["choice"]
    assert 1 <= len(choice["head_set"]) == choice["k"]
    assert all(0 <= layer < 30 and 0 <= head < 9 for layer, head in choice["head_set"])
    # The default's fusion weight is chosen for each first stage, on that stage's own top-20.
    weights = choice["default_first_stage_weight_by_first_stage"]
    assert set(weights) == {"bm25", "hybrid"} and choice["default_first_stage_weight"] == weights["hybrid"]
    assert choice["default_score"]["prompt_order"] == "both"
    for stage, sfx in (("bm25", ""), ("hybrid", "-hybrid")):
        figures = {w: r["systems"][f"default-w{w:g}{sfx}"]["ndcg@10"] for w in DEFAULT_WEIGHTS}
        assert figures[weights[stage]] == max(figures.values())
    assert 0.0 <= r["systems"]["hybrid"]["ndcg@10"] <= 1.0 and "QUICK SUBSET" in r["dataset"]


def test_heads_suite_reads_the_default_as_the_reranker_does(data_dir: Path, smol_model) -> None:
    """The weight grid is only evidence for the reranker if the suite scores lists as the reranker does."""
    from eval.heads import default_scores
    from eval.scifact_stats import scifact_passes, scifact_windows
    from rerank.config import load_config
    from rerank.engines import AttentionReranker
    from rerank.engines.base import prompt_orders
    from rerank.probe.calibrators import ScoreSettings

    cfg = load_config(REPO / "configs" / "default.yaml")
    assert prompt_orders(cfg.probe) == ("reversed", "retriever")
    probe = cfg.probe.model_copy(
        update={"passage_max_tokens": QUICK_PASSAGE_TOKENS, "first_stage_weight": 0.0, "fusion": "fixed"}
    )
    rr = AttentionReranker(smol_model, probe, cfg.calibration)
    qs, _ = scifact_windows(data_dir, 2)
    qs = [{**q, "passages": q["passages"][:5], "first_stage": q["first_stage"][:5]} for q in qs]
    last = probe.layer_range[1]
    by_order = {
        o: scifact_passes(smol_model, qs, QUICK_PASSAGE_TOKENS, o, last) for o in prompt_orders(probe)
    }
    suite = default_scores(qs, by_order, rr, ScoreSettings.of(probe))
    for q in qs:
        ranked = rr.rerank(q["query"], q["passages"])
        got = {it.passage.id: it.score for it in ranked.items}
        np.testing.assert_allclose([got[p.id] for p in q["passages"]], suite[q["qid"]], atol=1e-3)
    assert not np.allclose(suite[qs[0]["qid"]], 0.0)


def test_heads_suite_refuses_an_unknown_first_stage(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "heads.json"
    args = ["heads", "--quick", "--data-dir", str(data_dir), "--output", str(out)]
    assert main([*args, "--opt", "first_stages=bm25,splade"]) == 2
    assert "first_stages" in capsys.readouterr().err and not out.exists()


def test_report_suite(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parent.parent / "docs" / "results"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nSTALE-SUMMARY\n<!-- results:end -->\ntail\n")
    out = tmp_path / "results.md"
    assert (
        main(
            [
                "report",
                "--output",
                str(tmp_path / "r.json"),
                "--opt",
                f"inputs={src}",
                "--opt",
                f"out={out}",
                "--opt",
                f"readme={readme}",
            ]
        )
        == 0
    )
    text = out.read_text()
    assert "## retrieval" in text and "| bm25-bm25s |" in text
    new = readme.read_text()
    assert "STALE-SUMMARY" not in new and new.endswith("tail\n") and "**retrieval**" in new


def test_rerank_reuses_baseline_rows_only_from_the_same_run(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from eval.common import SuiteError
    from eval.rerank import reuse_baselines

    model = SimpleNamespace(model_id="smol", dtype="bfloat16")
    row = {"ndcg@10": 0.5, "mrr@10": 0.8, "seconds_per_query": 12.0, "p_vs_bm25": 0.6}
    old = {
        "suite": "rerank",
        "config": {"model": "smol", "dtype": "bfloat16", "baseline_queries": 43, "quick": False},
        "systems": {"listwise@20": row},
    }
    f = tmp_path / "rerank.json"
    f.write_text(json.dumps(old))
    got = reuse_baselines({"baselines_from": str(f)}, ["listwise"], [20], 43, model)
    assert got == {"listwise@20": {**row, "measured_in": "rerank.json"}}
    assert reuse_baselines({}, ["listwise"], [20], 43, model) == {}
    with pytest.raises(SuiteError, match="baseline_queries"):
        reuse_baselines({"baselines_from": str(f)}, ["listwise"], [20], 1, model)
    with pytest.raises(SuiteError, match="passage_max_tokens"):  # the old run read 300-token passages
        reuse_baselines({"baselines_from": str(f)}, ["listwise"], [20], 43, model, 48)
    with pytest.raises(SuiteError, match="no listwise@100"):
        reuse_baselines({"baselines_from": str(f)}, ["listwise"], [100], 43, model)
    old["config"]["quick"] = True
    f.write_text(json.dumps(old))
    with pytest.raises(SuiteError, match="quick"):
        reuse_baselines({"baselines_from": str(f)}, ["listwise"], [20], 43, model)


def test_dl19_hybrid_first_stage_follows_the_retriever_config(data_dir: Path) -> None:
    import numpy as np

    from eval.rerank import hybrid_pool, load_dl19
    from retrievers.config import RetrieverConfig
    from retrievers.dense import DenseRetriever, load_encoder

    queries, _ = load_dl19(data_dir)
    q = queries[0]
    bm25_of = dict(zip((p.id for p in q["passages"]), q["bm25"], strict=True))
    # All weight on BM25 keeps DL19's BM25 order; all weight on the dense half gives the encoder's
    # cosine order; either way the candidates and their BM25 scores travel together.
    (only_bm25,) = hybrid_pool([q], RetrieverConfig(weights=(1.0, 0.0)))
    (only_dense,) = hybrid_pool([q], RetrieverConfig(weights=(0.0, 1.0)))
    (equal,) = hybrid_pool([q], RetrieverConfig())
    for h in (only_bm25, only_dense, equal):
        assert sorted(p.id for p in h["passages"]) == sorted(p.id for p in q["passages"])
        assert h["bm25"] == [bm25_of[p.id] for p in h["passages"]]
        assert all(a >= b for a, b in zip(h["first_stage"], h["first_stage"][1:], strict=False))
    assert [p.id for p in only_bm25["passages"]] == [p.id for p in q["passages"]]
    # Encoded as the retriever encodes (its dtype: bf16 autocast where the CPU has native bf16).
    dense = DenseRetriever(load_encoder(), encoder_name="embedded", dtype=RetrieverConfig().encoder_dtype)
    cos = dense.encode([p.text for p in q["passages"]]) @ dense.encode([q["query"]])[0]
    expected = [q["passages"][i].id for i in np.argsort(-cos, kind="stable")]
    got = [p.id for p in only_dense["passages"]]
    # Cosines equal to float precision may swap; the ranking must agree elsewhere.
    assert sum(a != b for a, b in zip(got, expected, strict=True)) <= 2
    assert [p.id for p in equal["passages"]] not in ([p.id for p in q["passages"]], got)


def test_results_are_strict_json_with_non_finite_numbers_as_null(tmp_path: Path, caplog) -> None:
    data = {"systems": {"a": {"recall@1": 0.5, "seconds_per_query": float("nan")}}, "xs": [1.0, float("inf")]}
    path = write_json(tmp_path / "r.json", data)

    def refuse(token: str) -> None:
        raise ValueError(token)

    got = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    assert got == {"systems": {"a": {"recall@1": 0.5, "seconds_per_query": None}}, "xs": [1.0, None]}
    assert "systems.a.seconds_per_query, xs[1]" in caplog.text
    assert data["xs"][1] == float("inf")  # the caller's object is left as it was
