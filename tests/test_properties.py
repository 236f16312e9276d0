"""Property-based tests (hypothesis, a fixed example budget, derandomised): the JSONL decoder over
arbitrary bytes and JSON values, and ``rerank()`` on a tiny random-weight model over arbitrary text."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rerank.core.inputs import LineError, _decode, scan_input
from rerank.records import Hit, Passage

FAST = settings(
    max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
MODEL = settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Any code point, lone surrogates included (a JSON file can hold "\ud800").
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**500), max_value=10**500) | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
# Values shaped like requests, so that deep fields are reached and not only the top-level checks.
candidate_like = st.fixed_dictionaries(
    {"docid": json_values | any_text, "doc": json_values | any_text},
    optional={"score": json_values | st.floats() | st.integers(min_value=-(10**400), max_value=10**400)},
)
request_like = st.fixed_dictionaries(
    {
        "query": st.fixed_dictionaries({"qid": json_values | any_text, "text": json_values | any_text}),
        "candidates": st.lists(candidate_like, max_size=4) | json_values,
    }
) | st.fixed_dictionaries({"qid": json_values | any_text, "query": json_values | any_text})


def decode_or_report(raw: bytes, has_index: bool) -> Any:
    """The decoder's contract: a request, None (blank line), or a LineError; nothing else escapes."""
    try:
        req = _decode(raw, 1, has_index)
    except LineError as exc:
        assert str(exc)
        str(exc).encode("utf-8", errors="backslashreplace")
        return exc
    if req is not None:
        # A request that passed holds only valid Unicode and finite scores.
        req.text.encode("utf-8")
        req.qid.encode("utf-8")
        for c in req.candidates or ():
            p = c if isinstance(c, Passage) else c.passage
            (p.id + p.text + p.title).encode("utf-8")
            if isinstance(c, Hit):
                assert math.isfinite(c.score)
    return req


@FAST
@given(st.binary(max_size=200), st.booleans())
def test_decoder_over_arbitrary_bytes(raw: bytes, has_index: bool) -> None:
    decode_or_report(raw, has_index)


@FAST
@given(json_values | request_like, st.booleans())
def test_decoder_over_arbitrary_json_values(value: Any, has_index: bool) -> None:
    decode_or_report(json.dumps(value).encode(), has_index)
    decode_or_report(json.dumps(value, ensure_ascii=False).encode("utf-8", errors="surrogatepass"), has_index)


@settings(max_examples=20, derandomize=True, deadline=None)
@given(
    st.lists(
        st.binary(max_size=80) | (json_values | request_like).map(lambda v: json.dumps(v).encode()),
        max_size=8,
    )
)
def test_scan_input_reports_every_bad_line_and_never_raises(
    tmp_path_factory: Any, lines: list[bytes]
) -> None:
    from rerank.core.output import ErrorLog

    d = tmp_path_factory.mktemp("scan")
    path = d / "in.jsonl"
    path.write_bytes(b"\n".join(x.replace(b"\n", b" ") for x in lines) + b"\n")
    errors = ErrorLog(path, d / "errors.jsonl")
    try:
        pending, skipped = scan_input(path, set(), errors, has_index=False, max_line_bytes=1 << 20)
    finally:
        errors.close()
    assert skipped == 0

    def blank(i: int, raw: bytes) -> bool:
        raw = raw[3:] if i == 0 and raw.startswith(b"\xef\xbb\xbf") else raw
        try:
            return not raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return False

    rows = [x.replace(b"\n", b" ") for x in lines]
    assert len(pending) + errors.count == sum(1 for i, x in enumerate(rows) if not blank(i, x))
    if errors.count:
        recs = (d / "errors.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(recs) == errors.count


# --------------------------------------------------------------------------------------------------
# rerank() on a tiny random-weight model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_llama: Any) -> Any:
    return tiny_llama


def rerankers(tiny: Any) -> dict[str, Any]:
    from rerank.config import CalibrationConfig, ProbeConfig
    from rerank.engines import AttentionReranker

    out = {}
    for window in (1, 7, 30):
        for order in ("reversed", "both"):
            probe = ProbeConfig(
                window_size=window, prompt_order=order, first_stage_weight=1.0, passage_max_tokens=24
            )
            out[f"{window}-{order}"] = AttentionReranker(tiny, probe, CalibrationConfig(name="content-free"))
    return out


@pytest.fixture(scope="module")
def engines(tiny: Any) -> dict[str, Any]:
    return rerankers(tiny)


passage_text = st.text(min_size=1, max_size=60).filter(lambda t: t.strip() != "")
finite_scores = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def candidate_lists(draw: Any) -> list[Any]:
    texts = draw(st.lists(passage_text, min_size=1, max_size=30))
    kind = draw(st.sampled_from(["str", "passage", "hit"]))
    if kind == "str":
        return texts
    passages = [
        Passage(id=f"d{i}", text=t, title=draw(st.sampled_from(["", "T"]))) for i, t in enumerate(texts)
    ]
    if kind == "passage":
        return passages
    return [Hit(passage=p, score=draw(finite_scores), rank=i + 1) for i, p in enumerate(passages)]


@MODEL
@given(
    query=passage_text,
    cands=candidate_lists(),
    top_k=st.none() | st.integers(min_value=0, max_value=35),
    engine=st.sampled_from([f"{w}-{o}" for w in (1, 7, 30) for o in ("reversed", "both")]),
)
def test_rerank_is_a_deterministic_permutation_with_finite_scores(
    engines: dict[str, Any], query: str, cands: list[Any], top_k: int | None, engine: str
) -> None:
    rr = engines[engine]
    before = list(cands)
    dumped = [c if isinstance(c, str) else c.model_dump() for c in cands]
    first = rr.rerank(query, cands, top_k=top_k)
    second = rr.rerank(query, cands, top_k=top_k)
    ids = [
        str(i) if isinstance(c, str) else (c.id if isinstance(c, Passage) else c.passage.id)
        for i, c in enumerate(cands)
    ]
    n = len(ids) if top_k is None else min(top_k, len(ids))
    assert len(first) == n
    assert len(set(first.ids)) == n and set(first.ids) <= set(ids)
    assert [it.rank for it in first.items] == list(range(1, n + 1))
    scores = [it.score for it in first.items]
    assert all(np.isfinite(scores)) and scores == sorted(scores, reverse=True)
    if top_k is None or top_k >= len(ids):
        assert sorted(first.ids) == sorted(ids)  # a permutation of the input
    assert first.ids == second.ids and scores == [it.score for it in second.items]
    assert cands == before and [c if isinstance(c, str) else c.model_dump() for c in cands] == dumped


@MODEL
@given(cands=candidate_lists(), bad_at=st.integers(min_value=0, max_value=29))
def test_invalid_unicode_in_any_candidate_is_a_value_error(
    engines: dict[str, Any], cands: list[Any], bad_at: int
) -> None:
    i = bad_at % len(cands)
    c = cands[i]
    bad = "x\udc80"
    if isinstance(c, str):
        cands[i] = bad
    elif isinstance(c, Passage):
        cands[i] = Passage(id=c.id, text=bad)
    else:
        cands[i] = Hit(passage=Passage(id=c.passage.id, text=bad), score=c.score, rank=c.rank)
    with pytest.raises(ValueError, match="not valid Unicode"):
        engines["7-both"].rerank("query", cands)
