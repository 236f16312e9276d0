"""Fusion weights: the fit (model-free), the shipped weights, the reranker's use of them, unscored lists,
``first_stage: order``, the cascade, a random-weight model that must earn no trust, and the adaptive
second prompt order."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pytest

from calibration.fusion import (
    SIGNALS,
    FusionWeights,
    LabelledList,
    check_weights,
    cut_margin,
    fit_fusion,
    fit_second_order,
    fuse,
    ranked,
    standardise,
)


def _synthetic(n_lists: int, seed: int) -> list[LabelledList]:
    """Lists where ``dense`` tracks relevance, ``bm25`` weakly, and ``probe`` is noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_lists):
        labels = np.zeros(20)
        labels[rng.integers(20)] = 1
        out.append(
            LabelledList(
                {
                    "dense": labels * 1.5 + rng.normal(size=20),
                    "bm25": labels * 0.5 + rng.normal(size=20),
                    "probe": rng.normal(size=20),
                    "first_stage": None,
                },
                labels,
            )
        )
    return out


def test_fit_weights_a_signal_by_its_information_and_drops_noise():
    fit = fit_fusion(_synthetic(150, 0), n_bootstrap=100)
    assert fit.weights["dense"] > fit.weights["bm25"] > 0
    assert fit.weights["probe"] == 0.0, "a noise signal's interval reaches 0: dropped"
    lo, hi = fit.ci["probe"]
    assert lo <= 0 <= hi
    assert fit.ci["dense"][0] > 0
    assert "first_stage" not in fit.weights, "a signal no list has gets no weight at all"
    # Round trip through the curve JSON's block.
    again = FusionWeights.from_json(json.loads(json.dumps(fit.to_json())))
    assert again.weights == pytest.approx(fit.weights, abs=1e-6)


def test_fit_refuses_lists_without_contrast():
    same = [LabelledList({"dense": np.arange(5.0)}, np.ones(5))]
    with pytest.raises(ValueError, match="both relevant and non-relevant"):
        fit_fusion(same)


def test_fuse_skips_flat_and_missing_signals():
    s = {"probe": np.array([1.0, 2.0, 3.0]), "bm25": np.zeros(3), "dense": None}
    assert np.allclose(fuse(s, {"probe": 2.0, "bm25": 5.0, "dense": 1.0}, 3), 2 * standardise(s["probe"]))
    with pytest.raises(ValueError, match="unknown signal 'cosine'"):
        check_weights({"cosine": 1.0})
    with pytest.raises(ValueError, match="finite"):
        check_weights({"probe": float("nan")})


def test_shipped_curves_carry_weights_with_their_data():
    from rerank.config import load_config
    from rerank.engines.attention import resolve_curve_path

    cfg = load_config("default")
    assert cfg.probe.fusion == "fitted"
    for name in cfg.calibration.curves:
        d = json.loads(resolve_curve_path(name).read_text())
        fusion = FusionWeights.from_json(d["fusion"])
        assert set(fusion.weights) <= set(SIGNALS)
        assert "NQ-open dev" in fusion.meta["data"] and "DL19" not in fusion.meta["data"]
        assert fusion.meta["lists_by_kind"]["hard"] > 0 and fusion.meta["lists_by_kind"]["retrieved"] > 0
        assert fusion.weights["dense"] > 0, "the encoder earns weight on the calibration lists"


def test_second_order_margin_is_the_smallest_that_meets_the_agreement():
    """Lists where the second reading swaps the 3rd and 4th candidates: the fitted margin reads the
    second order on exactly as many of them as the agreement target needs, the closest calls first."""
    w = {"probe": 0.5, "dense": 1.0}
    pairs = []
    gaps = np.linspace(0.02, 1.0, 20)
    for gap in gaps:
        dense = np.array([4.0, 3.0, 2.0, 2.0 - gap, 0.0, -1.0, -2.0, -3.0])
        one = np.zeros(8)  # the first order alone: flat, so the dense order decides (3rd before 4th)
        both = np.zeros(8)
        both[3] = 2.0 * gap + 1.0  # both orders lift the 4th candidate over the 3rd
        pairs.append(({"dense": dense}, one, both))
    for gap in gaps[:10]:  # lists the second reading does not change
        pairs.append(({"dense": np.arange(8.0)[::-1] + gap}, np.zeros(8), np.zeros(8)))
    rule = fit_second_order(pairs, w, k=3, agreement=0.9)
    assert rule is not None and rule["k"] == 3 and rule["lists"] == 30
    # 30 lists at 90%: 3 may stay wrong, so the 17 smallest margins of the 20 changed lists are read.
    margins = sorted(cut_margin(fuse({**c, "probe": o}, w, 8), 3, 0.5) for c, o, _ in pairs[:20])
    assert margins[16] < rule["margin"] <= margins[17]
    assert rule["kept_same_adaptive"] >= 0.9
    assert rule["kept_same_first_order_only"] == pytest.approx(1 / 3, abs=1e-4)
    assert fit_second_order(pairs, {"probe": 0.0, "dense": 1.0}) is None, "an unread probe needs no rule"
    assert cut_margin(np.array([3.0, 2.0, 1.0]), 3, 1.0) == float("inf"), "every candidate kept"
    assert ranked(np.array([1.0, 2.0, 2.0])) == [1, 2, 0]
    block = FusionWeights(w, second_order=rule).to_json()
    assert FusionWeights.from_json(json.loads(json.dumps(block))).second_order == rule
    with pytest.raises(ValueError, match="second_order.margin"):
        FusionWeights.from_json({**block, "second_order": {"k": 3, "margin": -1}})


@pytest.mark.slow
def test_adaptive_second_order_reads_it_only_where_the_kept_set_is_close(smol_model: Any):
    """Two shipped calibration lists, one far from its top-3 cut after the first order and one close to
    it: the first is read once, the second twice, and each ranking is the fusion of what was read."""
    from calibration.lists import fusion_lists, load_calibration_items
    from rerank import Pipeline
    from rerank.engines.attention import merge_orders, trace_probes
    from rerank.engines.signals import cheap_signals

    pipe = Pipeline(Pipeline.from_config("default", generator=None).config, model=smol_model)
    rr = pipe.reranker
    rule = rr.curve.fusion.second_order
    assert rr.cfg.second_order == "adaptive" and rule["k"] == 3 and 0 < rule["second_order_rate"] < 1
    lists = fusion_lists(load_calibration_items(), n_hard=60, n_retrieved=0)
    reads = {}
    for lst in (lists[3], lists[4]):
        with trace_probes() as traces:
            out = rr.rerank(lst.question, list(lst.passages))
        reads[lst.qid] = out.info["prompts"]
        assert out.info["second_order"]["read"] == out.info["prompts"] - 1
        sig, _, _ = cheap_signals(
            lst.question, list(lst.passages), None, None, ("bm25", "dense"), dense=rr.dense
        )
        pos = {p.id: i for i, p in enumerate(lst.passages)}
        per_order = []
        for tr in traces:
            cal = np.zeros(len(pos))
            cal[[pos[p.id] for p in tr.passages]] = tr.calibrated
            per_order.append(cal)
        w = rr.fusion_weights()
        first = fuse({**sig, "probe": per_order[0]}, w, len(pos))
        assert (cut_margin(first, 3, w["probe"]) < rule["margin"]) == (len(traces) == 2)
        expect = fuse({**sig, "probe": merge_orders(per_order)}, w, len(pos))
        got = {it.passage.id: it.score for it in out.items}
        assert np.allclose([got[p.id] for p in lst.passages], expect)
    assert sorted(reads.values()) == [1, 2], f"both branches on the shipped lists: {reads}"


@pytest.fixture(scope="module")
def default_pipe(smol_model: Any) -> Any:
    from rerank import Pipeline

    return Pipeline(Pipeline.from_config("default", generator=None).config, model=smol_model)


CAPITALS = [
    "Berlin is the capital of Germany.",
    "Paris is the capital of France.",
    "The Eiffel Tower is in Paris.",
]


@pytest.mark.slow
def test_readme_curl_example_puts_paris_first_in_every_order(default_pipe: Any):
    """README's example: whichever order the three documents come in, Paris's sentence ranks first."""
    for perm in itertools.permutations(range(3)):
        docs = [CAPITALS[i] for i in perm]
        ranked = default_pipe.rerank("What is the capital of France?", docs)
        assert docs[int(ranked.items[0].passage.id)] == CAPITALS[1], f"order {perm}: {ranked.ids}"
        assert ranked.info["first_stage"] == "none"
        assert set(ranked.info["weights"]) <= set(SIGNALS)


@pytest.mark.slow
def test_final_score_is_the_weighted_sum_of_the_reported_signals(default_pipe: Any, demo_passages: Any):
    """What the evaluation suite recomputes offline is what the reranker returns."""
    from rerank.records import Hit

    ps = demo_passages[:8]
    hits = [Hit(passage=p, score=10.0 - i, rank=i + 1) for i, p in enumerate(ps)]
    ranked = default_pipe.rerank("How do plants turn sunlight into sugar?", hits)
    w = ranked.info["weights"]
    assert ranked.info["first_stage"] == ("scores" if "first_stage" in w else "none")
    assert ranked.info["signals"]["dense"] == "encoded" and ranked.info["signals"]["bm25"] == "in-list"
    names = list(ranked.items[0].signals)
    signals = {k: np.array([it.signals[k] for it in ranked.items]) for k in names}
    assert np.allclose(fuse(signals, w, len(ps)), [it.score for it in ranked.items])
    assert [it.rank for it in ranked.items] == list(range(1, 9))


@pytest.mark.slow
def test_first_stage_order_and_weight_overrides(smol_model: Any, demo_passages: Any):
    from rerank import Pipeline

    ps = demo_passages[:6]
    pipe = Pipeline.from_config(
        "default", generator=None, probe={"first_stage": "order", "weights": {"first_stage": 1.0}}
    )
    pipe._model = smol_model
    ranked = pipe.rerank("anything", ps)
    # Only the given order is weighted: the list comes back as it was sent, and no probe pass ran.
    assert ranked.ids == [p.id for p in ps]
    assert ranked.info["first_stage"] == "order" and ranked.info["prompts"] == 0
    assert ranked.info["weights"] == {"first_stage": 1.0}
    with pytest.raises(ValueError, match="unknown signal"):
        Pipeline.from_config("default", probe={"weights": {"cosine": 1}})


@pytest.mark.slow
def test_cascade_probes_only_the_best_window(smol_model: Any, demo_passages: Any):
    from rerank import Pipeline

    pipe = Pipeline.from_config(
        "default", generator=None, probe={"cascade": True, "window_size": 5, "passage_max_tokens": 48}
    )
    pipe._model = smol_model
    ranked = pipe.rerank("How do bees tell each other where the flowers are?", demo_passages[:12])
    assert ranked.info["cascade"] == {"probed": 5, "of": 12}
    assert "probe" in ranked.info["weights"]
    assert ranked.info["windows"] == 1 and ranked.info["prompts"] == 1 + ranked.info["second_order"]["read"]
    probed = [it for it in ranked.items if it.prompt_position is not None]
    assert len(probed) == 5 and [it.rank for it in probed] == [1, 2, 3, 4, 5]
    scores = [it.score for it in ranked.items]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.slow
def test_a_random_weight_model_earns_no_probe_weight(tiny_llama: Any):
    """The fit gives a random-weight model's attention a weight within 0.1 of 0 on the shipped lists."""
    from calibration.lists import load_calibration_items
    from rerank.config import CalibrationConfig, ProbeConfig
    from rerank.engines import AttentionReranker
    from rerank.fitting import fit_fusion_for

    rr = AttentionReranker(
        tiny_llama,
        ProbeConfig(prompt_order="both", passage_max_tokens=48),
        CalibrationConfig(name="content-free"),
    )
    items = load_calibration_items()[-80:]
    fusion = fit_fusion_for(rr, items, n_hard=80, n_retrieved=0, show_progress=False)
    assert abs(fusion.weights["probe"]) <= 0.1
    assert fusion.weights["dense"] > 0.1, "the real encoder still earns its weight"


def test_fusion_lists_of_both_kinds_from_the_shipped_questions():
    from calibration.lists import fusion_lists, has_answer, load_calibration_items
    from retrievers.bm25 import BM25Retriever

    items = load_calibration_items()[-60:]
    pool = {p.id: p for it in items for p in (it.gold, *it.distractors)}
    bm25 = BM25Retriever()
    bm25.index(list(pool.values()), show_progress=False)
    lists = fusion_lists(items, n_hard=10, n_retrieved=10, retriever=bm25)
    hard = [lst for lst in lists if lst.source == "hard"]
    got = [lst for lst in lists if lst.source == "retrieved"]
    assert len(hard) == 10 and all(sum(lst.labels) == 1 and lst.first_stage is None for lst in hard)
    assert len({lst.labels.index(1) for lst in hard}) > 3, "the gold passage sits at seeded random slots"
    assert len(got) == 10 and not {lst.qid for lst in hard} & {lst.qid for lst in got}
    for lst in got:
        assert 0 < sum(lst.labels) < len(lst.labels)
        assert list(lst.first_stage) == sorted(lst.first_stage, reverse=True)
    assert has_answer("It opened in The Hague in 1899.", ["the hague"])
    assert not has_answer("Hagues", ["Hague"])


@pytest.mark.slow
def test_an_interrupted_rerank_stops_at_a_window_boundary(smol_model: Any, demo_passages: Any):
    import threading

    from rerank import Pipeline
    from rerank.interrupt import Interrupted, interruptible

    pipe = Pipeline.from_config("default", generator=None, probe={"cascade": False, "window_size": 4})
    pipe._model = smol_model
    stop = threading.Event()
    stop.set()
    with interruptible(stop), pytest.raises(Interrupted):
        pipe.rerank("How do bees tell each other where the flowers are?", demo_passages[:8])
    ranked = pipe.rerank("How do bees tell each other where the flowers are?", demo_passages[:8])
    assert ranked.info["windows"] == 2, "outside the block nothing stops it"
