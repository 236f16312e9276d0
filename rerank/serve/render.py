"""Rendering a ranking as each dialect's response body, and the ``relevance_score`` squashing."""

from __future__ import annotations

import math
import uuid
from typing import Any

from rerank.serve.inference import Ranking
from rerank.serve.parsing import RerankCall


def relevance_score(score: float) -> float:
    """The logistic of a final score: in [0, 1], increasing, 0.5 at the request's average document."""
    if score >= 0:
        return 1.0 / (1.0 + math.exp(-score))
    e = math.exp(score)
    return e / (1.0 + e)


# ------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------


def _attn_detail(r: Ranking, i: int) -> dict[str, Any]:
    return {
        "score": r.score[i],
        "raw_score": r.raw[i],
        "calibrated_score": r.calibrated[i],
        "prompt_position": r.position[i],
        "truncated": r.truncated[i],
        "signals": r.signals[i] if r.signals else {},
    }


def _warnings(r: Ranking, max_tokens: int) -> list[str]:
    cut = [i for i, t in enumerate(r.truncated) if t]
    if not cut:
        return []
    shown = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
    return [f"{len(cut)} document(s) were truncated to {max_tokens} tokens (indices {shown})"]


def render(call: RerankCall, r: Ranking, served_model: str) -> Any:
    """The response body of ``call`` in its dialect (keys not asked for are left out)."""
    order = r.order if call.top_n is None else r.order[: call.top_n]
    if call.dialect == "tei":
        tei = []
        for i in order:
            item: dict[str, Any] = {
                "index": i,
                "score": r.score[i] if call.raw_scores else relevance_score(r.score[i]),
            }
            if call.return_documents:
                item["text"] = call.texts[i]
            if call.attn.raw_scores:
                item["attn"] = _attn_detail(r, i)
            tei.append(item)
        return tei
    results = []
    for i in order:
        res: dict[str, Any] = {"index": i, "relevance_score": relevance_score(r.score[i])}
        if call.dialect == "v1" and call.return_documents:
            # As Cohere v1 does: the document as sent, not the text built from its rank_fields.
            sent = call.sent[i] if call.sent else call.texts[i]
            res["document"] = {"text": sent} if isinstance(sent, str) else sent
        if call.attn.raw_scores:
            res["attn"] = _attn_detail(r, i)
        results.append(res)
    units = math.ceil(len(call.texts) / 100)
    meta: dict[str, Any] = {
        "api_version": {"version": "2" if call.dialect == "v2" else "1"},
        "billed_units": {"search_units": units},
    }
    if call.dialect == "v2":
        meta["tokens"] = {"input_tokens": r.input_tokens, "output_tokens": 0}
    warnings = _warnings(r, call.max_tokens)
    if warnings:
        meta["warnings"] = warnings
    body: dict[str, Any] = {"id": str(uuid.uuid4()), "results": results, "meta": meta}
    if call.dialect == "v1":
        body["model"] = call.model or served_model
        body["usage"] = {"total_tokens": r.input_tokens}
    return body
