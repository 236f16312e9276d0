"""Baseline rerankers (rerank/baselines.py) on the real embedded SmolLM2 and real DL19 passages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from samples import PASSAGES, QUERY

from rerank.config import CalibrationConfig, ModelConfig, PipelineConfig, ProbeConfig
from rerank.engines import PROBE_ENGINES, AttentionReranker, build_reranker
from rerank.engines.controls import ShuffleReranker
from rerank.engines.icr_reference import ICRReferenceReranker, icr_filter_sum
from rerank.engines.listwise import ListwiseReranker, parse_permutation, sliding_windows
from rerank.engines.pointwise import PointwiseReranker
from rerank.records import Hit, Passage

BASELINES = ("icr-reference", "listwise", "pointwise", "shuffle")


@pytest.fixture(scope="module")
def smol32():
    """fp32 twin of the session model, for comparisons that bf16 rounding would blur."""
    from rerank.probe.model import load_model

    return load_model(ModelConfig(dtype="float32"))


# -- registry and options ---------------------------------------------------------------------------


def test_registry_names_every_baseline_and_lists_choices_on_unknown():
    for name in (*BASELINES, "identity", "attention"):
        assert name in PROBE_ENGINES
    with pytest.raises(KeyError) as exc:
        PROBE_ENGINES.get("rankgpt")
    msg = str(exc.value)
    assert "unknown probe engine 'rankgpt'" in msg
    for name in PROBE_ENGINES.names():
        assert name in msg


def test_build_reranker_by_name_without_a_model_for_controls():
    rr = build_reranker(PipelineConfig(probe=ProbeConfig(engine="shuffle")))
    assert isinstance(rr, ShuffleReranker)
    assert rr.rerank(QUERY, PASSAGES).info["seed"] == 0


def test_unknown_and_invalid_options_are_refused(smol_model):
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) 'sed' for the 'shuffle' reranker; it accepts: seed"
    ):
        ShuffleReranker(None, sed=1)
    with pytest.raises(ValueError, match="it accepts: step, tokens_per_passage, window"):
        ListwiseReranker(smol_model, windows=20)
    with pytest.raises(ValueError, match="it accepts: batch_size"):
        PointwiseReranker(smol_model, batch=4)
    with pytest.raises(ValueError, match="it accepts: max_attention_gib"):
        ICRReferenceReranker(smol_model, layers=(0, 3))
    with pytest.raises(ValueError, match="'seed'.*integer >= 0"):
        ShuffleReranker(None, seed=-1)
    with pytest.raises(ValueError, match="'batch_size'.*integer >= 1"):
        PointwiseReranker(smol_model, batch_size=0)
    with pytest.raises(ValueError, match="must not exceed 'window'"):
        ListwiseReranker(smol_model, window=4, step=5)
    with pytest.raises(ValueError, match="max_attention_gib"):
        ICRReferenceReranker(smol_model, max_attention_gib=0)
    with pytest.raises(ValueError, match="needs a loaded model"):
        PointwiseReranker(None)


@pytest.mark.parametrize("name", BASELINES)
def test_empty_list_and_duplicate_ids(smol_model, name):
    rr = PROBE_ENGINES.get(name)(smol_model)
    empty = rr.rerank(QUERY, [])
    assert len(empty) == 0 and empty.info["seconds"] == 0.0
    with pytest.raises(ValueError, match="duplicate passage ids"):
        rr.rerank(QUERY, [PASSAGES[0], PASSAGES[1], PASSAGES[0]])


# -- listwise: parsing and windows ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n", "order", "counts", "status"),
    [
        ("[2] > [1] > [3]", 3, (1, 0, 2), (3, 0, 0, 0), "ok"),
        ("[1]>[3]>[2]", 3, (0, 2, 1), (3, 0, 0, 0), "ok"),
        ("3, 1, 2", 3, (2, 0, 1), (3, 0, 0, 0), "ok"),
        ("Ranking: [02] > [01] > [3]", 3, (1, 0, 2), (3, 0, 0, 0), "ok"),
        ("[3] > [1]", 3, (2, 0, 1), (2, 0, 0, 1), "repaired"),
        ("[2] > [2] > [1] > [3] > [1]", 3, (1, 0, 2), (3, 0, 2, 0), "repaired"),
        ("[4] > [0] > [2]", 3, (1, 0, 2), (1, 2, 0, 2), "repaired"),
        ("[1] > [2] > [3] > [4]", 3, (0, 1, 2), (3, 1, 0, 0), "repaired"),
        ("[1] > [2] > [", 3, (0, 1, 2), (2, 0, 0, 1), "repaired"),
        ("[10] > [2]", 12, (9, 1, 0, 2, 3, 4, 5, 6, 7, 8, 10, 11), (2, 0, 0, 10), "repaired"),
        ("2 > 1 > 3", 3, (1, 0, 2), (3, 0, 0, 0), "ok"),
        # Copied passage text is not a ranking, even though it holds numbers.
        (
            "1. The Eiffel Tower was built in 1889.\n2. Photosynthesis",
            4,
            (0, 1, 2, 3),
            (0, 0, 0, 4),
            "failed",
        ),
        ("Passage [3] mentions 1889; [1] does not", 3, (2, 0, 1), (2, 0, 0, 1), "repaired"),
        ("", 3, (0, 1, 2), (0, 0, 0, 3), "failed"),
        ("I cannot rank these passages.", 2, (0, 1), (0, 0, 0, 2), "failed"),
        ("[0] > [5] > [123456789012345678901234567890]", 4, (0, 1, 2, 3), (0, 3, 0, 4), "failed"),
        ("[\u0663] > [\u0661]", 3, (0, 1, 2), (0, 0, 0, 3), "failed"),  # only ASCII digits count
        ("[1]", 0, (), (0, 1, 0, 0), "repaired"),
    ],
)
def test_parse_permutation_exact(text, n, order, counts, status):
    p = parse_permutation(text, n)
    assert p.order == order
    assert sorted(p.order) == list(range(n))
    assert (p.found, p.out_of_range, p.duplicates, p.missing) == counts
    assert (p.failed, p.repaired) == (status == "failed", status == "repaired")


def test_parse_permutation_rejects_negative_n():
    with pytest.raises(ValueError, match="n must be >= 0"):
        parse_permutation("[1]", -1)


def test_sliding_windows_bottom_to_top():
    assert sliding_windows(100, 20, 10) == [(s, s + 20) for s in range(80, -1, -10)]
    assert sliding_windows(20, 20, 10) == [(0, 20)]
    assert sliding_windows(25, 20, 10) == [(5, 25), (0, 15)]
    assert sliding_windows(5, 20, 10) == [(0, 5)]
    assert sliding_windows(0, 20, 10) == []
    with pytest.raises(ValueError, match="step <= window"):
        sliding_windows(10, 4, 5)
    with pytest.raises(ValueError, match="window >= 1"):
        sliding_windows(10, 0, 1)


def test_listwise_returns_a_permutation_with_counters(smol_model):
    rr = ListwiseReranker(smol_model, window=3, step=2)
    old = smol_model.model.config._attn_implementation
    ranked = rr.rerank(QUERY, PASSAGES)
    assert smol_model.model.config._attn_implementation == old
    assert sorted(ranked.ids) == sorted(p.id for p in PASSAGES)
    assert [it.score for it in ranked.items] == [4.0, 3.0, 2.0, 1.0]
    info = ranked.info
    assert info["windows"] == 2  # [1, 4) then [0, 3)
    for key in ("parse_failures", "repaired", "out_of_range", "duplicates", "missing"):
        assert 0 <= info[key]
    assert info["parse_failures"] + info["repaired"] <= info["windows"]
    assert 0 < info["generated_tokens"] <= 2 * (6 * 3 + 10)
    assert info["seconds"] > 0
    # Greedy decoding: the same input gives the same ranking.
    assert rr.rerank(QUERY, PASSAGES).ids == ranked.ids


# -- shuffle ----------------------------------------------------------------------------------------


def test_shuffle_is_a_seeded_permutation_per_query():
    ps = [Passage(id=f"d{i}", text=f"passage {i}") for i in range(20)]
    a = ShuffleReranker(None).rerank("what is a lobster", ps)
    b = ShuffleReranker(None, seed=0).rerank("what is a lobster", ps)
    assert a.ids == b.ids
    assert sorted(a.ids) == sorted(p.id for p in ps)
    assert a.ids != [p.id for p in ps]
    assert [it.score for it in a.items] == [float(20 - r) for r in range(20)]
    assert ShuffleReranker(None, seed=1).rerank("what is a lobster", ps).ids != a.ids
    assert ShuffleReranker(None).rerank("what is a crab", ps).ids != a.ids
    # The order depends on the query text and seed, not on the object or call count.
    again = ShuffleReranker(None)
    again.rerank("something else", ps)
    assert again.rerank("what is a lobster", ps).ids == a.ids
    assert a.top_k(3).ids == ShuffleReranker(None).rerank("what is a lobster", ps, top_k=3).ids


# -- pointwise --------------------------------------------------------------------------------------


def test_pointwise_answer_tokens_and_probabilities(smol_model):
    rr = PointwiseReranker(smol_model)
    tok = smol_model.tokenizer
    assert tok.decode([rr.yes_id]).strip() == "Yes" and tok.decode([rr.no_id]).strip() == "No"
    ranked = rr.rerank(QUERY, PASSAGES)
    p = np.array([it.score for it in ranked.items])
    assert np.all((p >= 0) & (p <= 1))
    assert [it.raw_score for it in ranked.items] == list(p)
    assert ranked.ids[0] == "python"
    assert ranked.info["forwards"] == 1 and ranked.info["prompts"] == 4


@pytest.mark.parametrize(("dtype", "atol"), [("bfloat16", 0.03), ("float32", 1e-5)])
def test_pointwise_batched_equals_one_at_a_time(smol_model, smol32, dtype, atol):
    # bf16 hidden states differ by a few units in the last place between padded and unpadded shapes,
    # which moves P(Yes) by up to ~0.015; in fp32 padding is exact up to rounding.
    if dtype == "bfloat16" and smol_model.dtype != "bfloat16":
        pytest.skip("the default model is not bf16 on this CPU")
    m = smol_model if dtype == "bfloat16" else smol32
    single = PointwiseReranker(m, batch_size=1)
    p1, n1 = single.p_yes(QUERY, PASSAGES)
    p4, n4 = PointwiseReranker(m, batch_size=4).p_yes(QUERY, PASSAGES)
    p3, n3 = PointwiseReranker(m, batch_size=3).p_yes(QUERY, PASSAGES)
    assert (n1, n4, n3) == (4, 1, 2)
    np.testing.assert_allclose(p4, p1, atol=atol)
    np.testing.assert_allclose(p3, p1, atol=atol)


# -- icr-reference ----------------------------------------------------------------------------------


def _straightforward_icr(model, passages_in_prompt_order):
    """ICR token scores from rerank.probe.reference_rows (eager attention, every layer and head)."""
    from rerank.probe.capture import reference_rows
    from rerank.probe.prompt import NA_QUERY, build_prompt

    def tok_scores(q):
        pr = build_prompt(model.tokenizer, q, passages_in_prompt_order)
        rows = reference_rows(model, pr.input_ids, pr.query_len)
        return pr, sum(r.sum(dim=0).double().numpy() for r in rows.values())

    pr, q = tok_scores(QUERY)
    _, na = tok_scores(NA_QUERY)
    p = pr.prefix_len
    diff = q[:p] - na[:p]
    body = np.concatenate([diff[s:e] for s, e in pr.spans])
    cut = body.mean() - 2 * body.std()
    return np.array([diff[s:e][diff[s:e] >= cut].sum() for s, e in pr.spans])


def test_icr_reference_scores_come_from_eager_attentions(smol_model):
    old = smol_model.model.config._attn_implementation
    ranked = ICRReferenceReranker(smol_model).rerank(QUERY, PASSAGES)
    assert smol_model.model.config._attn_implementation == old
    by_id = {it.passage.id: it for it in ranked.items}
    # Reversed prompt order: the first candidate sits last, next to the query.
    assert [by_id[p.id].prompt_position for p in PASSAGES] == [3, 2, 1, 0]
    expect = _straightforward_icr(smol_model, PASSAGES[::-1])[::-1]  # back to candidate order
    got = np.array([by_id[p.id].calibrated_score for p in PASSAGES])
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
    assert ranked.ids[0] == "python"
    assert ranked.info["windows"] == 1 and ranked.info["forwards"] == 2
    assert ranked.info["attention_gib"] > 0


def test_icr_filter_drops_tokens_below_mean_minus_two_std():
    tok = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -20.0, 5.0, 7.0])
    # Passage tokens 0..9 and 10..11; the -20 token is below mean - 2 std and is dropped.
    np.testing.assert_allclose(icr_filter_sum(tok, [(0, 10), (10, 12)]), [9.0, 12.0])


def test_icr_reference_equals_attention_reranker_in_fp32(smol_model, smol32):
    # AttentionReranker with every layer and head, the icr aggregation and the N/A difference computes
    # the same quantity through its own route (sdpa prefill, fp32 query rows, N/A pass reusing the KV
    # cache). In fp32 the two agree to rounding.
    probe = ProbeConfig(aggregation="icr", nacal_form="difference")
    cal = CalibrationConfig(name="content-free")

    def both(m):
        ref = ICRReferenceReranker(m, probe).rerank(QUERY, PASSAGES)
        att = AttentionReranker(m, probe, cal).rerank(QUERY, PASSAGES)
        ra = {it.passage.id: it for it in ref.items}
        at = {it.passage.id: it for it in att.items}
        fields = ("calibrated_score", "raw_score", "score")
        return (
            ref.ids,
            att.ids,
            {f: np.array([getattr(ra[p.id], f) for p in PASSAGES]) for f in fields},
            {f: np.array([getattr(at[p.id], f) for p in PASSAGES]) for f in fields},
        )

    ids_ref, ids_att, a, b = both(smol32)
    assert ids_ref == ids_att
    for f in a:
        np.testing.assert_allclose(a[f], b[f], rtol=1e-4, atol=1e-5)
    # In bf16 the routes round differently (eager bf16 weights vs fp32 rows over sdpa hidden states):
    # calibrated scores differ by several percent, but still rank alike on this easy list.
    ids_ref, ids_att, a, b = both(smol_model)
    assert ids_ref[0] == ids_att[0] == "python"
    assert np.corrcoef(a["calibrated_score"], b["calibrated_score"])[0, 1] > 0.95


def test_icr_reference_windows_are_zscored(smol_model):
    ranked = ICRReferenceReranker(smol_model, ProbeConfig(window_size=2)).rerank(
        QUERY, [*PASSAGES, Passage(id="tea", text="Green tea is made from unoxidised leaves.")]
    )
    assert ranked.info["windows"] == 3 and ranked.info["forwards"] == 6
    by_id = {it.passage.id: it for it in ranked.items}
    for pair in (("eiffel", "photo"), ("python", "vaccine")):
        z = sorted(by_id[i].score for i in pair)
        np.testing.assert_allclose(z, [-1.0, 1.0])
        hi = max(pair, key=lambda i: by_id[i].calibrated_score)
        assert by_id[hi].score == pytest.approx(1.0)
    # A window of one passage standardises to the window average.
    assert by_id["tea"].score == 0.0 and by_id["tea"].prompt_position == 0


def test_icr_reference_memory_guard_names_the_fix_and_restores_the_kernel(smol_model):
    old = smol_model.model.config._attn_implementation
    rr = ICRReferenceReranker(smol_model, ProbeConfig(window_size=4), max_attention_gib=1e-4)
    with pytest.raises(ValueError, match=r"GiB of attention weights.*lower probe.window_size \(now 4\)"):
        rr.rerank(QUERY, PASSAGES)
    assert smol_model.model.config._attn_implementation == old
    n, width = 300, torch.empty(0, dtype=getattr(torch, smol_model.dtype)).element_size()  # bf16 2, fp32 4
    assert rr.attention_bytes(n) == smol_model.num_layers * smol_model.num_heads * n * n * width


# -- every baseline on real DL19 candidates --------------------------------------------------------


def _dl19_hits(data_dir: Path, k: int) -> tuple[str, list[Hit]]:
    runs = json.loads((data_dir / "trec-dl19" / "bm25_top100.json").read_text(encoding="utf-8"))
    e = runs[0]
    hits = [
        Hit(passage=Passage(id=str(h["docid"]), text=h["content"]), score=float(h["score"]), rank=i + 1)
        for i, h in enumerate(e["hits"][:k])
    ]
    return e["query"], hits


@pytest.mark.parametrize("name", (*BASELINES, "identity"))
def test_every_baseline_ranks_real_candidates(smol_model, data_dir, name):
    query, hits = _dl19_hits(data_dir, 5)
    # A short generation budget keeps the listwise case quick; its output is still parsed and repaired.
    kw = {"step": 2, "tokens_per_passage": 2} if name == "listwise" else {}
    rr = PROBE_ENGINES.get(name)(smol_model, ProbeConfig(window_size=3, passage_max_tokens=64), **kw)
    old = smol_model.model.config._attn_implementation
    ranked = rr.rerank(query, hits)
    assert smol_model.model.config._attn_implementation == old
    assert sorted(ranked.ids) == sorted(h.passage.id for h in hits)
    assert [it.rank for it in ranked.items] == [1, 2, 3, 4, 5]
    scores = [it.score for it in ranked.items]
    assert scores == sorted(scores, reverse=True)
    first = {h.passage.id: h.score for h in hits}
    assert all(it.first_stage_score == first[it.passage.id] for it in ranked.items)
    assert ranked.info["seconds"] >= 0
    if name == "icr-reference":
        assert ranked.info["windows"] == 2  # 3 + 2 passages
        assert sorted(it.prompt_position for it in ranked.items) == [0, 0, 1, 1, 2]
    if name == "listwise":
        assert ranked.info["windows"] == 2  # [2, 5), then [0, 3)
        assert ranked.info["generated_tokens"] <= 2 * (2 * 3 + 10)
    if name == "identity":
        assert ranked.ids == [h.passage.id for h in hits]
    assert len(rr.rerank(query, hits, top_k=2)) == 2
