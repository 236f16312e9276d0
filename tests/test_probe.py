"""The attention probe on the real SmolLM2 and on tiny random-weight models of other families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from samples import PASSAGES, QUERY

from rerank.config import ModelConfig, ProbeConfig
from rerank.probe.capture import AttentionProbe, check_supported, reference_rows
from rerank.probe.model import load_model, wrap_model
from rerank.probe.prompt import NA_QUERY, build_prompt
from rerank.records import Hit, Passage


@pytest.fixture(scope="module")
def smol32():
    return load_model(ModelConfig(dtype="float32"))


def _tiny(kind: str, tokenizer):
    """A tiny random-weight model of another family, built locally from a config (no download)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=2048,
    )
    if kind == "qwen2":
        from transformers import Qwen2Config

        cfg = Qwen2Config(num_key_value_heads=2, **common)  # grouped-query attention
    elif kind == "mistral":
        from transformers import MistralConfig

        cfg = MistralConfig(num_key_value_heads=1, sliding_window=48, **common)
    elif kind == "gemma3":
        from transformers import Gemma3TextConfig

        cfg = Gemma3TextConfig(
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=32,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            **common,
        )
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    return wrap_model(model, tokenizer, f"tiny-{kind}")


def _max_row_error(m, layers=None):
    probe = AttentionProbe(m, layers=layers, early_exit=False)
    out = probe.probe(QUERY, PASSAGES)
    ref = reference_rows(m, out.prompt.input_ids, out.prompt.query_len)
    p = out.prompt.prefix_len
    return max(
        float(np.abs(ref[layer][:, :p].sum(0).numpy() - out.query_tok[i]).max())
        for i, layer in enumerate(out.layers)
    ), out


def test_rows_equal_eager_smollm2(smol32):
    err, out = _max_row_error(smol32)
    assert len(out.layers) == smol32.num_layers
    assert err < 1e-4


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "gemma3"])
def test_rows_equal_eager_other_families(smol32, kind):
    m = _tiny(kind, smol32.tokenizer)
    err, out = _max_row_error(m)
    assert out.prompt.num_tokens > 48, "the prompt must be longer than the sliding windows under test"
    assert err < 1e-4


def test_sliding_window_is_respected(smol32):
    # In a sliding layer, query rows must give zero attention to keys beyond the window.
    m = _tiny("gemma3", smol32.tokenizer)
    out = AttentionProbe(m, early_exit=False).probe(QUERY, PASSAGES, content_free=False)
    n = out.prompt.num_tokens
    first_query_pos = out.prompt.prefix_len
    # Every query row is at >= first_query_pos, so keys before first_query_pos - 32 + 1 are out of window.
    assert np.all(out.query_tok[0][: first_query_pos - 32] == 0)
    assert out.query_tok[3][:10].sum() > 0, "the full-attention layer sees the start"
    assert n > first_query_pos


def test_spans_cover_exactly_each_passage(smol32):
    tok = smol32.tokenizer
    pr = build_prompt(tok, QUERY, PASSAGES)
    for (s, e), p in zip(pr.spans, PASSAGES, strict=True):
        text = tok.decode(pr.input_ids[s:e])
        assert p.text in text
        assert text.strip().startswith("[")
        assert "\n\n" not in text.strip()
    # Spans are disjoint, in order, and all before the query section.
    ends = [e for _, e in pr.spans]
    starts = [s for s, _ in pr.spans]
    assert all(e <= s for e, s in zip(ends, starts[1:], strict=False))
    assert ends[-1] <= pr.prefix_len


@pytest.mark.parametrize("kind", ["smollm2", "gemma3"])
def test_na_pass_with_kv_reuse_equals_full_prefill(smol32, kind):
    # gemma3 has sliding-window cache layers, which are copied rather than cropped.
    m = smol32 if kind == "smollm2" else _tiny(kind, smol32.tokenizer)
    out = AttentionProbe(m, early_exit=False).probe(QUERY, PASSAGES)
    na = build_prompt(m.tokenizer, NA_QUERY, PASSAGES)
    ref = reference_rows(m, na.input_ids, na.query_len)
    p = out.prompt.prefix_len
    err = max(
        float(np.abs(ref[layer][:, :p].sum(0).numpy() - out.na_tok[i]).max())
        for i, layer in enumerate(out.layers)
    )
    assert err < 1e-4


@pytest.mark.parametrize("kind", ["smollm2", "qwen2", "gemma3"])
def test_prefix_reuse_equals_fresh_probes(smol32, kind):
    # The gold passage moved through the slots of one list: consecutive prompts share a token prefix.
    m = smol32 if kind == "smollm2" else _tiny(kind, smol32.tokenizer)
    lists = [PASSAGES[1:i] + PASSAGES[:1] + PASSAGES[i:] for i in (3, 2, 1)] + [PASSAGES[::-1]]
    reuse = AttentionProbe(m, layers=(0, 2), reuse_prefix=True)
    fresh = AttentionProbe(m, layers=(0, 2))
    for ps in lists:
        a, b = reuse.probe(QUERY, ps), fresh.probe(QUERY, ps)
        assert a.spans == b.spans
        np.testing.assert_allclose(a.query_head, b.query_head, atol=1e-5)
        np.testing.assert_allclose(a.na_head, b.na_head, atol=1e-5)
        np.testing.assert_allclose(a.query_tok, b.query_tok, atol=1e-5)
    if kind == "gemma3":
        assert reuse.reused_tokens == 0, "sliding-window caches cannot be cropped, so nothing is reused"
    else:
        assert reuse.reused_tokens > 0


def test_early_exit_keeps_scores_and_skips_later_layers(smol32):
    full = AttentionProbe(smol32, early_exit=False).probe(QUERY, PASSAGES)
    calls = []
    mlp = smol32.model.model.layers[20].mlp
    handle = mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        part = AttentionProbe(smol32, layers=(4, 12)).probe(QUERY, PASSAGES)
    finally:
        handle.remove()
    assert part.layers == tuple(range(4, 13))
    np.testing.assert_allclose(part.query_tok, full.query_tok[4:13], atol=1e-6)
    np.testing.assert_allclose(part.na_tok, full.na_tok[4:13], atol=1e-6)
    assert calls == [], "layer 20 ran although the probe stops after layer 12"


def test_content_free_calibration_finds_the_answer(smol32):
    from rerank.engines import AttentionReranker

    rr = AttentionReranker(smol32, ProbeConfig(window_size=20))
    ranked = rr.rerank(QUERY, PASSAGES)
    assert ranked.ids[0] == "python"
    assert sorted(it.prompt_position for it in ranked.items) == [0, 1, 2, 3]
    assert all(it.raw_score is not None and it.calibrated_score is not None for it in ranked.items)


def test_ratio_score_pools_layers_before_the_log_and_finds_the_answer(smol32):
    from rerank.engines import AttentionReranker
    from rerank.probe.capture import stats_of
    from rerank.probe.scoring import passage_scores

    out = AttentionProbe(smol32, layers=(12, 19)).probe(QUERY, PASSAGES, content_free=True)
    # Independently of the per-head arrays: token rows summed over heads, then over each passage's span.
    q = np.array([out.query_tok[:, s:e].sum() for s, e in out.spans])
    na = np.array([out.na_tok[:, s:e].sum() for s, e in out.spans])
    got = passage_scores(stats_of(out), kind="ratio")
    np.testing.assert_allclose(got, np.log(q + 1e-9) - np.log(na + 1e-9), atol=1e-5)
    # An explicit head set of every head in the band is the same pooled score.
    every = [(layer, h) for layer in out.layers for h in range(out.query_head.shape[1])]
    np.testing.assert_allclose(passage_scores(stats_of(out), kind="ratio", head_set=every), got, atol=1e-9)
    rr = AttentionReranker(smol32, ProbeConfig(layers=(12, 19), nacal_form="ratio"))
    assert rr.rerank(QUERY, PASSAGES).ids[0] == "python"


def test_windows_are_standardised_including_a_lone_last_window(smol32):
    from rerank.engines import AttentionReranker

    # 4 passages in windows of 3: the last window holds one passage, whose score cannot be
    # standardised against anything and must not dwarf the z-scores of the first window.
    ranked = AttentionReranker(smol32, ProbeConfig(window_size=3)).rerank(QUERY, PASSAGES)
    by_id = {it.passage.id: it for it in ranked.items}
    assert by_id[PASSAGES[3].id].score == 0.0
    first = np.array([by_id[p.id].score for p in PASSAGES[:3]])
    assert abs(first.mean()) < 1e-9 and abs(first.std() - 1.0) < 1e-9
    assert ranked.info["windows"] == 2


def test_edge_cases(smol32):
    from rerank.engines import AttentionReranker

    rr = AttentionReranker(smol32, ProbeConfig(passage_max_tokens=8))
    assert len(rr.rerank(QUERY, [])) == 0
    one = rr.rerank(QUERY, PASSAGES[:1])
    assert one.ids == ["eiffel"] and one.items[0].rank == 1
    pr = build_prompt(smol32.tokenizer, QUERY, PASSAGES, max_passage_tokens=8)
    assert pr.truncated == (True, True, True, True)
    assert all(e - s <= 8 + 12 for s, e in pr.spans)  # 8 text tokens plus the "[n] title: " header
    with pytest.raises(ValueError, match="at least one passage"):
        build_prompt(smol32.tokenizer, QUERY, [])
    with pytest.raises(ValueError, match="context"):
        rr.rerank("why " * 9000, PASSAGES[:2])
    with pytest.raises(ValueError, match="duplicate passage ids"):
        rr.rerank(QUERY, [PASSAGES[0], PASSAGES[0]])


def test_plain_strings_and_top_k(smol32):
    from rerank.engines import AttentionReranker, IdentityReranker

    rr = AttentionReranker(smol32, ProbeConfig(layers=(12, 19), nacal_form="ratio"))
    as_passages = rr.rerank(QUERY, PASSAGES)
    as_strings = rr.rerank(QUERY, [p.text for p in PASSAGES])
    # A string is a passage with its index as id and no title.
    untitled = rr.rerank(QUERY, [Passage(id=str(i), text=p.text) for i, p in enumerate(PASSAGES)])
    assert as_strings.ids == untitled.ids
    assert [it.score for it in as_strings.items] == [it.score for it in untitled.items]
    assert as_passages.ids[:2] == rr.rerank(QUERY, PASSAGES, top_k=2).ids
    assert as_passages.info["first_stage"] == "none"
    # Fused with the first stage: unscored candidates are fused with BM25 over the list itself, never
    # with their order; Hits with the same BM25 scores give the same fused scores.
    from retrievers.bm25 import in_list_bm25
    from retrievers.index import indexed_text

    fused = AttentionReranker(smol32, ProbeConfig(layers=(12, 19), nacal_form="ratio", first_stage_weight=2))
    by_bm25 = fused.rerank(QUERY, PASSAGES)
    bm = in_list_bm25(QUERY, [indexed_text(p) for p in PASSAGES])
    assert bm.max() > bm.min()
    pairs = enumerate(zip(PASSAGES, bm, strict=True))
    hits = [Hit(passage=p, score=float(s), rank=i + 1) for i, (p, s) in pairs]
    by_scores = fused.rerank(QUERY, hits)
    assert (by_bm25.info["first_stage"], by_scores.info["first_stage"]) == ("in-list-bm25", "scores")
    assert by_bm25.ids == by_scores.ids
    np.testing.assert_allclose([it.score for it in by_bm25.items], [it.score for it in by_scores.items])
    ranks = [Hit(passage=p, score=10.0 - i, rank=i + 1) for i, p in enumerate(PASSAGES)]
    by_rank = fused.rerank(QUERY, ranks)
    assert [it.score for it in by_rank.items] != [it.score for it in by_bm25.items]
    assert len(rr.rerank(QUERY, PASSAGES, top_k=0)) == 0
    for engine in (rr, IdentityReranker()):
        for bad in (-1, 1.5, True, "3"):
            with pytest.raises(ValueError, match="top_k must be None or an integer >= 0"):
                engine.rerank(QUERY, PASSAGES, top_k=bad)
        with pytest.raises(ValueError, match="candidate 1 is an empty string"):
            engine.rerank(QUERY, ["Paris", "  "])
        with pytest.raises(TypeError, match="got one string"):
            engine.rerank(QUERY, "Paris is in France.")
        with pytest.raises(TypeError, match="got int"):
            engine.rerank(QUERY, [3])


def test_both_prompt_orders_average_the_two_passes(smol32):
    from rerank.engines import AttentionReranker
    from rerank.probe.scoring import zscore

    def reranker(order, **kw):
        return AttentionReranker(
            smol32, ProbeConfig(layers=(12, 19), nacal_form="ratio", prompt_order=order, **kw)
        )

    both, rev, fwd = reranker("both"), reranker("reversed"), reranker("retriever")
    raw_b, cal_b, pos_b = both.score_window(QUERY, PASSAGES)
    raw_r, cal_r, pos_r = rev.score_window(QUERY, PASSAGES)
    raw_f, cal_f, pos_f = fwd.score_window(QUERY, PASSAGES)
    n = len(PASSAGES)
    assert pos_r == list(range(n))[::-1] and pos_f == list(range(n))
    # Each passage is read once next to the query's end of the prompt and once far from it.
    np.testing.assert_allclose(cal_b, (zscore(cal_r) + zscore(cal_f)) / 2, atol=1e-12)
    np.testing.assert_allclose(raw_b, (raw_r + raw_f) / 2, atol=1e-12)
    assert pos_b == pos_r
    # The two orders disagree (positional bias is left in each), so averaging changes the scores.
    assert not np.allclose(zscore(cal_r), zscore(cal_f), atol=1e-3)
    ranked = both.rerank(QUERY, PASSAGES)
    assert (ranked.info["windows"], ranked.info["prompts"]) == (1, 2)
    np.testing.assert_allclose(sorted(it.score for it in ranked.items), sorted(zscore(cal_b)), atol=1e-12)
    # A window of one passage reads the same prompt in either order: probed once, like one order.
    lone = both.rerank(QUERY, PASSAGES[:1])
    assert lone.info["prompts"] == 1
    assert lone.items[0].raw_score == pytest.approx(
        rev.rerank(QUERY, PASSAGES[:1]).items[0].raw_score, abs=1e-12
    )
    # Windows: the last window of one passage is probed once, the others twice.
    split = reranker("both", window_size=n - 1).rerank(QUERY, PASSAGES)
    assert (split.info["windows"], split.info["prompts"]) == (2, 3)
    with pytest.raises(ValueError, match="prompt_order"):
        ProbeConfig(prompt_order="middle")


def test_windows_cover_all_candidates(smol32):
    from rerank.engines import AttentionReranker

    rr = AttentionReranker(smol32, ProbeConfig(window_size=3, layers=(0, 5)))
    ranked = rr.rerank(QUERY, PASSAGES * 1 + [Passage(id="x", text="An unrelated sentence about tea.")])
    assert ranked.info["windows"] == 2
    assert sorted(ranked.ids) == sorted([p.id for p in PASSAGES] + ["x"])


def test_unsupported_model_is_refused(smol32):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100))
    with pytest.raises(ValueError, match="not supported"):
        check_supported(gpt2)
    with pytest.raises(ValueError, match="out of range"):
        AttentionProbe(smol32, layers=(0, 99))


def test_rotations_make_short_lists_order_free(smol_model):
    """``rotations_up_to``: a window of n <= that many passages is read in its n cyclic rotations, so
    every passage sits in every slot once; any rotation of the input then gives the same scores, where
    the two-order default does not promise that. Longer windows keep the configured orders."""
    from rerank.config import load_config
    from rerank.engines import AttentionReranker
    from rerank.engines.base import prompt_slots, window_orders

    assert prompt_slots(4, "rotate0") == prompt_slots(4, "reversed") == [3, 2, 1, 0]
    assert prompt_slots(4, "rotate1") == [2, 1, 0, 3]
    orders = window_orders(4, ProbeConfig(rotations_up_to=5))
    assert orders == ("rotate0", "rotate1", "rotate2", "rotate3")
    slots_of = {c: sorted(prompt_slots(4, o).index(c) for o in orders) for c in range(4)}
    assert all(v == [0, 1, 2, 3] for v in slots_of.values()), "every passage visits every slot once"
    assert window_orders(6, ProbeConfig(rotations_up_to=5, prompt_order="both")) == ("reversed", "retriever")
    assert window_orders(1, ProbeConfig(rotations_up_to=5)) == ("reversed",)

    cfg = load_config("default")
    probe = cfg.probe.model_copy(update={"first_stage_weight": 0.0, "rotations_up_to": 5})
    rr = AttentionReranker(smol_model, probe, cfg.calibration)
    ps = PASSAGES[:4]
    scores = []
    for r in range(4):
        ranked = rr.rerank(QUERY, ps[r:] + ps[:r])
        assert ranked.info["prompts"] == 4
        scores.append({it.passage.id: it.score for it in ranked.items})
    for other in scores[1:]:
        for pid, s in scores[0].items():
            assert other[pid] == pytest.approx(s, abs=1e-6)


@pytest.mark.parametrize("kind", ["smollm2", "qwen2"])
def test_batched_prompts_equal_one_at_a_time(smol32, kind):
    m = smol32 if kind == "smollm2" else _tiny(kind, smol32.tokenizer)
    probe = AttentionProbe(m, layers=(0, 3))
    orders = [PASSAGES, PASSAGES[::-1], PASSAGES[1:] + PASSAGES[:1]]
    prompts = [build_prompt(m.tokenizer, QUERY, ps) for ps in orders]
    nas = [build_prompt(m.tokenizer, NA_QUERY, ps) for ps in orders]
    assert len({p.num_tokens for p in prompts}) == 1, "the orders of one list tokenise to one length"
    calls = []
    handle = m.model.model.layers[0].register_forward_hook(lambda mod, a, out: calls.append(a[0].shape[0]))
    try:
        batched = probe.run_prompts(prompts, nas)
    finally:
        handle.remove()
    assert calls == [3, 3], "one forward over the three prompts, one over their N/A twins"
    for out, q, n in zip(batched, prompts, nas, strict=True):
        one = probe.run_prompt(q, n)
        assert out.spans == one.spans and out.prompt == q
        for field in ("query_tok", "na_tok", "query_head", "na_head"):
            np.testing.assert_allclose(getattr(out, field), getattr(one, field), atol=2e-6, err_msg=field)


def test_batched_prompts_fall_back_where_they_cannot_batch(smol32):
    probe = AttentionProbe(smol32, layers=(0, 3))
    prompts = [build_prompt(smol32.tokenizer, QUERY, ps) for ps in (PASSAGES, PASSAGES[:-1])]
    calls = []
    handle = smol32.model.model.layers[0].register_forward_hook(lambda mod, a, out: calls.append(1))
    try:
        outs = probe.run_prompts(prompts)  # two lengths: probed one at a time
    finally:
        handle.remove()
    assert len(calls) == 2 and [o.prompt for o in outs] == prompts
    for out, q in zip(outs, prompts, strict=True):
        np.testing.assert_allclose(out.query_head, probe.run_prompt(q).query_head, atol=1e-7)
    gemma = _tiny("gemma3", smol32.tokenizer)  # sliding-window caches: one at a time as well
    g = AttentionProbe(gemma)
    gp = [build_prompt(gemma.tokenizer, QUERY, ps) for ps in (PASSAGES, PASSAGES[::-1])]
    gn = [build_prompt(gemma.tokenizer, NA_QUERY, ps) for ps in (PASSAGES, PASSAGES[::-1])]
    for out, q, n in zip(g.run_prompts(gp, gn), gp, gn, strict=True):
        np.testing.assert_allclose(out.na_head, g.run_prompt(q, n).na_head, atol=1e-7)
    with pytest.raises(ValueError, match="2 prompts but 1 N/A prompts"):
        probe.run_prompts(prompts, gn[:1])


@pytest.mark.parametrize("extra", [{}, {"rotations_up_to": 5}])
def test_reranker_batched_prompts_keep_the_scores(smol32, extra):
    from rerank.engines import AttentionReranker

    def reranker(batch):
        cfg = ProbeConfig(
            layers=(12, 19), nacal_form="ratio", prompt_order="both", batch_prompts=batch, **extra
        )
        return AttentionReranker(smol32, cfg)

    hits = [Hit(passage=p, score=float(10 - i), rank=i + 1) for i, p in enumerate(PASSAGES)]
    one, batched = reranker(False).rerank(QUERY, hits), reranker(True).rerank(QUERY, hits)
    assert [it.passage.id for it in batched.items] == [it.passage.id for it in one.items]
    assert batched.info["prompts"] == one.info["prompts"] == (len(PASSAGES) if extra else 2)
    for a, b in zip(batched.items, one.items, strict=True):
        assert a.raw_score == pytest.approx(b.raw_score, abs=1e-5)
        assert a.calibrated_score == pytest.approx(b.calibrated_score, abs=1e-4)
        assert a.prompt_position == b.prompt_position
