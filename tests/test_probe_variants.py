"""The relevance variants of the probe: more prompt orders, top-m token pooling, reading only the
query's rows, and the query placed before the passages too. Real SmolLM2 in fp32."""

from __future__ import annotations

import math

import numpy as np
import pytest
from samples import PASSAGES, QUERY

from rerank.config import CalibrationConfig, ModelConfig, ProbeConfig
from rerank.probe.capture import AttentionProbe, reference_rows
from rerank.probe.model import load_model
from rerank.probe.prompt import EARLY_QUERY, NA_QUERY, PromptTemplate, build_prompt
from rerank.records import Passage

CF = CalibrationConfig(name="content-free")


@pytest.fixture(scope="module")
def smol32():
    return load_model(ModelConfig(dtype="float32"))


def _reranker(model, **probe):
    from rerank.engines import AttentionReranker

    return AttentionReranker(model, ProbeConfig(layers=(12, 19), nacal_form="ratio", **probe), CF)


def _six() -> list[Passage]:
    extra = [
        Passage(id="nile", text="The Nile flows north through eleven countries into the Mediterranean Sea."),
        Passage(id="java", text="Java is a programming language released by Sun Microsystems in 1995."),
    ]
    return [*PASSAGES, *extra]


def _max_err(ref, tok, layers, p) -> float:
    return max(
        float(np.abs(ref[layer][:, :p].sum(0).numpy() - tok[i]).max()) for i, layer in enumerate(layers)
    )


def test_extra_orders_are_distinct_seeded_shuffles():
    from rerank.engines.base import prompt_slots, window_orders

    cfg = ProbeConfig(prompt_order="both", extra_orders=2)
    orders = window_orders(6, cfg)
    assert orders[:2] == ("reversed", "retriever") and len(orders) == 4
    slots = [tuple(prompt_slots(6, o)) for o in orders]
    assert len(set(slots)) == 4 and all(sorted(s) == list(range(6)) for s in slots)
    # Fixed by the window's length alone: the same for every query and every call.
    assert window_orders(6, cfg) == orders and [tuple(prompt_slots(6, o)) for o in orders] == slots
    # A window of 3 has 3! = 6 orders: asking for more gives every one of them once.
    many = window_orders(3, ProbeConfig(prompt_order="both", extra_orders=16))
    assert len({tuple(prompt_slots(3, o)) for o in many}) == len(many) == math.factorial(3)
    # Rotations take precedence over extra orders in short windows; one passage is read once.
    assert window_orders(4, ProbeConfig(rotations_up_to=5, extra_orders=2))[0] == "rotate0"
    assert window_orders(1, cfg) == ("reversed",)
    with pytest.raises(ValueError):
        ProbeConfig(extra_orders=-1)


def test_extra_orders_average_every_order_read(smol32):
    from rerank.engines.attention import merge_orders
    from rerank.engines.base import prompt_slots, to_candidate_order, window_orders
    from rerank.probe.scoring import zscore

    ps = _six()
    rr = _reranker(smol32, prompt_order="both", extra_orders=2)
    _, cal, _ = rr.score_window(QUERY, ps)
    per_order = []
    for order in window_orders(len(ps), rr.cfg):
        prompt = [ps[c] for c in prompt_slots(len(ps), order)]
        per_order.append(to_candidate_order(rr.score_in_prompt_order(QUERY, prompt), order))
    assert len(per_order) == 4
    np.testing.assert_allclose(cal, np.mean([zscore(c) for c in per_order], axis=0), atol=1e-9)
    np.testing.assert_allclose(cal, merge_orders(per_order), atol=1e-12)
    ranked = rr.rerank(QUERY, ps)
    assert ranked.info["prompts"] == 4
    assert ranked.items[0].passage.id == "python"


def test_early_exit_reads_extra_orders_only_when_the_two_orders_disagree(smol32):
    from calibration.lists import load_calibration_items
    from rerank.engines.base import prompt_slots, to_candidate_order

    dev = load_calibration_items()  # the real NQ-open dev lists shipped with the package
    plain = _reranker(smol32, prompt_order="both")
    early = _reranker(smol32, prompt_order="both", extra_orders=2, orders_early_exit=True)
    full = _reranker(smol32, prompt_order="both", extra_orders=2)
    memo: dict = {}  # the three read the same prompts: each is probed once
    for rr in (plain, early, full):
        rr.engine.memo = memo
    counts = []
    for it in dev[:8]:
        ps = it.with_gold_at(3, 8)
        tops = set()
        for o in ("reversed", "retriever"):
            cal = plain.score_in_prompt_order(it.question, [ps[c] for c in prompt_slots(8, o)])
            tops.add(int(np.argmax(to_candidate_order(cal, o))))
        ranked = early.rerank(it.question, ps)
        n = ranked.info["prompts"]
        counts.append(n)
        if len(tops) == 1:
            # Agreement: exactly the default's two prompts and the default's ranking.
            assert n == 2
            assert ranked.ids == plain.rerank(it.question, ps).ids
        else:
            assert n in (3, 4)
            if n == 4:
                assert ranked.ids == full.rerank(it.question, ps).ids
    assert all(c <= 4 for c in counts)
    # On these real lists both cases occur, so both branches above were checked.
    assert 2 in counts and max(counts) > 2


def test_topm_pooling(smol32):
    from rerank.probe.capture import stats_of
    from rerank.probe.scoring import passage_scores

    out = AttentionProbe(smol32, layers=(12, 19)).probe(QUERY, PASSAGES)
    st = stats_of(out)
    longest = int(st.lengths.max())
    # Every token kept: the ratio over all of a block's tokens, i.e. the pooled ratio score.
    np.testing.assert_allclose(
        passage_scores(st, kind="ratio", aggregation="topm", top_m=longest),
        passage_scores(st, kind="ratio"),
        atol=1e-5,
    )
    # One token kept: the block's most attended token, its query over N/A attention.
    one = passage_scores(st, kind="ratio", aggregation="topm", top_m=1)
    q, na = st.query_tok.sum(axis=0), st.na_tok.sum(axis=0)
    for i, (s, e) in enumerate(st.spans):
        t = s + int(np.argmax(q[s:e]))
        assert one[i] == pytest.approx(np.log(q[t] + 1e-9) - np.log(na[t] + 1e-9), abs=1e-6)
    raw3 = passage_scores(st, kind="raw", aggregation="topm", top_m=3)
    for i, (s, e) in enumerate(st.spans):
        assert raw3[i] == pytest.approx(np.sort(q[s:e])[-3:].mean(), rel=1e-6)
    with pytest.raises(ValueError, match="topm"):
        passage_scores(st, kind="logratio", aggregation="topm")
    # The reranker reads it through the config, and the answer still wins.
    assert (
        _reranker(smol32, aggregation="topm", top_m=8).rerank(QUERY, PASSAGES).items[0].passage.id == "python"
    )


def test_query_rows_read_only_the_query_and_header(smol32):
    probe = AttentionProbe(smol32, rows="query", early_exit=False)
    out = probe.probe(QUERY, PASSAGES)
    pr = out.prompt
    text = smol32.tokenizer.decode(pr.input_ids[pr.query_start :])
    assert text.lstrip().startswith(QUERY) and pr.prefix_len < pr.query_start
    ref = reference_rows(smol32, pr.input_ids, pr.num_tokens - pr.query_start)
    p = pr.prefix_len
    assert _max_err(ref, out.query_tok, out.layers, p) < 1e-4
    na = build_prompt(smol32.tokenizer, NA_QUERY, PASSAGES)
    ref_na = reference_rows(smol32, na.input_ids, na.num_tokens - na.query_start)
    assert _max_err(ref_na, out.na_tok, out.layers, p) < 1e-4
    # The late instruction's rows are the same in both prompts, so leaving them out changes the scores.
    full = AttentionProbe(smol32, early_exit=False).probe(QUERY, PASSAGES)
    assert not np.allclose(full.query_head, out.query_head, atol=1e-4)
    with pytest.raises(ValueError, match="rows"):
        AttentionProbe(smol32, rows="late")


def test_query_before_the_passages_too(smol32):
    rr = _reranker(smol32, query_position="both")
    assert rr.template.early == EARLY_QUERY
    ranked = rr.rerank(QUERY, PASSAGES)
    assert ranked.items[0].passage.id == "python"
    template = PromptTemplate(early=EARLY_QUERY)
    pr = build_prompt(smol32.tokenizer, QUERY, PASSAGES, template=template)
    assert pr.text.count(QUERY) == 2 and pr.text.index(QUERY) < pr.text.index(PASSAGES[0].text)
    # The N/A twin has N/A in both places, so it shares no passage KV with the query prompt: its pass
    # is a full prefill, and its per-token scores are moved onto the query prompt's positions.
    out = rr.engine.probe(QUERY, PASSAGES, template=template)
    na = build_prompt(smol32.tokenizer, NA_QUERY, PASSAGES, template=template)
    assert na.spans != pr.spans
    alone = AttentionProbe(smol32, layers=(12, 19)).run_prompt(na)
    np.testing.assert_allclose(out.na_head, alone.query_head, atol=1e-5)
    for (s, e), (ns, ne) in zip(pr.spans, na.spans, strict=True):
        np.testing.assert_allclose(out.na_tok[:, s:e], alone.query_tok[:, ns:ne], atol=1e-5)
    # The prompt's identity changes, so a curve fitted without the early query does not apply.
    from rerank.engines.attention import template_id

    assert template_id(PromptTemplate()) == "12cfe07b3b8a"  # the shipped curves' template
    assert template_id(rr.template) != template_id(PromptTemplate())


def test_variant_settings_are_part_of_a_curves_identity(smol32):
    from calibration.curve import CurveMismatchError
    from rerank.config import load_config
    from rerank.engines import AttentionReranker

    cfg = load_config("default")
    model = load_model(cfg.model)
    for upd in ({"query_rows": "query"}, {"aggregation": "topm"}, {"query_position": "both"}):
        with pytest.raises(CurveMismatchError):
            AttentionReranker(model, cfg.probe.model_copy(update=upd), cfg.calibration)
    # Extra orders read the same prompts' scores: the shipped curve applies.
    AttentionReranker(model, cfg.probe.model_copy(update={"extra_orders": 2}), cfg.calibration)


def test_memo_answers_a_repeated_prompt_without_a_pass(smol32):
    memo: dict = {}
    probe = AttentionProbe(smol32, layers=(12, 19), memo=memo)
    a = probe.probe(QUERY, PASSAGES)
    assert len(memo) == 1
    b = probe.probe(QUERY, PASSAGES)
    assert b is a and len(memo) == 1
    # Other rows read, another entry: the key holds what the output depends on.
    AttentionProbe(smol32, layers=(12, 19), memo=memo, rows="query").probe(QUERY, PASSAGES)
    assert len(memo) == 2


def test_explain_follows_early_exit(smol32):
    from rerank.config import PipelineConfig
    from rerank.pipeline import Pipeline

    probe = {"layers": [12, 19], "nacal_form": "ratio", "prompt_order": "both", "extra_orders": 2}
    for early in (False, True):
        cfg = PipelineConfig.model_validate(
            {
                "probe": {**probe, "orders_early_exit": early},
                "calibration": {"name": "content-free"},
                "generator": {"name": "none"},
            }
        )
        pipe = Pipeline(cfg, model=smol32)
        exp = pipe.explain(QUERY, _six())
        ranked = pipe.rerank(QUERY, _six())
        data = exp.to_dict()
        assert [p["id"] for p in data["passages"]] == ranked.ids
        reads = {len(p["readings"]) for p in data["passages"]}
        assert reads == ({ranked.info["prompts"]} if early else {4})
