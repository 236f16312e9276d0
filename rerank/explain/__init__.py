"""The explain view: why each passage of one rerank call landed where it did.

    exp = pipe.explain("who wrote Hamlet?", passages)   # an Explanation (frozen record)
    exp.to_html("report.html")                          # one self-contained page
    exp.to_json("report.json")                          # the same data

Everything comes from the prefills that produced the ranking (see :mod:`rerank.explain.build`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rerank.explain.record import NOTICE, Explanation

__all__ = ["NOTICE", "Explanation", "build_explanation", "explain_payload"]


def build_explanation(pipeline: Any, query: Any, passages: Sequence[Any], **kw: Any) -> Explanation:
    """See :func:`rerank.explain.build.build_explanation`."""
    from rerank.explain.build import build_explanation as build

    return build(pipeline, query, passages, **kw)


def explain_payload(
    pipeline: Any,
    query: str,
    documents: Sequence[Any],
    *,
    counterfactual: bool = False,
    html: bool = False,
    top_tokens: int = 8,
) -> dict[str, Any]:
    """The body of an HTTP ``POST /explain`` answer.

    Args:
        pipeline: A :class:`rerank.pipeline.Pipeline` (attention engine).
        query: The query text.
        documents: Candidates best first, as in a rerank request: strings, ``{"text", "title"?, "id"?}``
            objects, or :class:`rerank.records.Passage`. A document without an id gets its index.
        counterfactual: Also probe the top passage at the other end of its prompt (one more prefill).
        html: Also return the self-contained page under ``"html"``.
        top_tokens: Top tokens listed per passage.

    Returns:
        ``{"explanation": <Explanation as JSON data>}``, plus ``"html"`` when asked.

    Raises:
        ValueError: An empty query, no documents, a document without text, or a non-attention engine.
    """
    from rerank.records import Passage

    if not isinstance(query, str) or not query.strip():
        raise ValueError("query must be a non-empty string")
    if not documents:
        raise ValueError("documents is empty: give at least one passage")
    passages = []
    for i, d in enumerate(documents):
        if isinstance(d, Passage):
            passages.append(d)
        elif isinstance(d, str):
            passages.append(Passage(id=str(i), text=d))
        elif isinstance(d, dict):
            text = d.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"documents[{i}] has no non-empty 'text'")
            passages.append(Passage(id=str(d.get("id", i)), text=text, title=str(d.get("title") or "")))
        else:
            raise ValueError(f"documents[{i}] must be a string or an object with 'text'")
    exp = build_explanation(pipeline, query, passages, counterfactual=counterfactual, top_tokens=top_tokens)
    out: dict[str, Any] = {"explanation": exp.to_dict()}
    if html:
        out["html"] = exp.to_html()
    return out
