"""What runs in the worker thread: building the pipeline, and one call's rerank (truncation,
pruning, the per-document figures)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rerank.serve.errors import ApiError, invalid
from rerank.serve.parsing import RerankCall
from rerank.serve.runner import InferenceWorker
from rerank.serve.settings import ServeSettings

# ------------------------------------------------------------------------------------------------------
# Inference (runs in the worker thread)
# ------------------------------------------------------------------------------------------------------


@dataclass
class Ranking:
    """What the worker returns for one call: indices best first and per-document figures."""

    order: list[int]
    score: list[float]
    raw: list[float | None]
    calibrated: list[float | None]
    position: list[int | None]
    truncated: list[bool]
    input_tokens: int
    doc_tokens: list[int] = field(default_factory=list)
    signals: list[dict[str, float]] = field(default_factory=list)


def _cut(tokenizer: Any, text: str, max_tokens: int, char_cap: int) -> tuple[str, bool, int]:
    """``text`` cut to ``max_tokens`` tokens at a token boundary; (text, was cut, tokens kept).

    The text is first cut to ``char_cap`` characters (more than ``max_tokens`` tokens can span), so a
    1 MB document costs no more to tokenise than a short one.
    """
    head = text[:char_cap]
    enc = tokenizer(head, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= max_tokens and len(head) == len(text):
        return text, False, len(offsets)
    if len(offsets) <= max_tokens:  # only whitespace or a partial token beyond the cap
        return head, True, len(offsets)
    return text[: offsets[max_tokens - 1][1]], True, max_tokens


def run_call(pipe: Any, call: RerankCall) -> Ranking:
    """Rerank one validated call with ``pipe`` (called in the worker thread only)."""
    tok = pipe.model.tokenizer
    char_cap = (call.max_tokens + 2) * _max_token_chars(tok)
    texts, truncated, counts = [], [], []
    for i, t in enumerate(call.texts):
        cut, was_cut, n = _cut(tok, t, call.max_tokens, char_cap)
        if was_cut and not call.truncate:
            raise ApiError(
                413,
                f"texts[{i}] is longer than {call.max_tokens} tokens; send truncate: true to cut it",
                "invalid_request_error",
                code="document_too_long",
                param=f"texts[{i}]",
            )
        texts.append(cut)
        truncated.append(was_cut)
        counts.append(n)
    q_tokens = len(tok(call.query, add_special_tokens=False)["input_ids"])
    # At the probe's own budget the documents go in as sent: the probe cuts them the same way, and what
    # stands in for missing first-stage scores (computed from the texts) then sees what the Python API
    # sees. Only a request's lower max_tokens_per_doc needs the cut texts.
    if call.max_tokens >= int(pipe.config.probe.passage_max_tokens):
        texts = list(call.texts)
    # Plain strings in the given order: no first-stage scores, ids are the request's indices. With
    # attn.first_stage "order" the order is the first stage's ranking: scores n..1 carry exactly it.
    cands: list[Any] = texts
    if call.attn.first_stage == "order":
        from rerank.records import Hit, Passage

        cands = [
            Hit(passage=Passage(id=str(i), text=t), score=float(len(texts) - i), rank=i + 1)
            for i, t in enumerate(texts)
        ]
    try:
        ranked = pipe.rerank(call.query, cands)
    except ValueError as exc:
        raise invalid(f"cannot rerank these documents: {exc}", code="unprocessable", status=422) from None
    items = list(ranked.items)
    if call.attn.prune is not None:
        from rerank.policies import PRUNE_POLICIES

        settings = {
            k: v for k, v in call.attn.model_dump(exclude={"raw_scores", "prune"}).items() if v is not None
        }
        pcfg = pipe.config.policy.model_copy(update={"prune": call.attn.prune, **settings})
        items = PRUNE_POLICIES.get(call.attn.prune)(
            items, pcfg, token_counts=[counts[int(it.passage.id)] for it in items]
        )
    n = len(texts)
    out = Ranking(
        order=[int(it.passage.id) for it in items],
        score=[0.0] * n,
        raw=[None] * n,
        calibrated=[None] * n,
        position=[None] * n,
        truncated=truncated,
        input_tokens=q_tokens + sum(counts),
        doc_tokens=counts,
        signals=[{} for _ in range(n)],
    )
    for it in ranked.items:
        i = int(it.passage.id)
        out.score[i] = it.score
        out.raw[i] = it.raw_score
        out.calibrated[i] = it.calibrated_score
        out.position[i] = it.prompt_position
        out.signals[i] = dict(it.signals)
    return out


_MAX_TOKEN_CHARS: dict[int, int] = {}


def _max_token_chars(tok: Any) -> int:
    key = id(tok)
    if key not in _MAX_TOKEN_CHARS:
        _MAX_TOKEN_CHARS[key] = max(8, max(len(t) for t in tok.get_vocab()))
    return _MAX_TOKEN_CHARS[key]


# ------------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------------


def build_pipeline(settings: ServeSettings) -> Any:
    """The pipeline of ``settings.config``, model loaded, with ``max_tokens_per_doc`` as the probe's cap."""
    from rerank.config import load_config
    from rerank.pipeline import Pipeline

    cfg = load_config(settings.config)
    if settings.max_tokens_per_doc is not None:
        probe = cfg.probe.model_copy(update={"passage_max_tokens": settings.max_tokens_per_doc})
        cfg = cfg.model_copy(update={"probe": probe})
    pipe = Pipeline(cfg)
    pipe.reranker  # noqa: B018 - load the model and the curve now, not on the first request
    return pipe


def _warmup(pipe: Any) -> None:
    pipe.rerank("warm-up query", ["a first short passage", "a second short passage"])


def new_worker(settings: ServeSettings) -> InferenceWorker:
    """A worker that builds ``settings``' pipeline in its thread (not started)."""
    return InferenceWorker(lambda: build_pipeline(settings), warmup=_warmup)
