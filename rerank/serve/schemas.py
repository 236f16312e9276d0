"""Request and response bodies of the rerank routes, in the dialects existing clients speak.

* Cohere v2 (``POST /v2/rerank``): documents are strings; ``max_tokens_per_doc``.
* Cohere v1 and Jina (``POST /v1/rerank``, and ``POST /rerank`` without ``texts``): documents are
  strings or ``{"text": ...}`` objects (``rank_fields`` picks other keys); ``return_documents``.
* Text Embeddings Inference (``POST /rerank`` with ``texts``): ``raw_scores``, ``return_text``,
  ``truncate``; the answer is a bare list.

Request bodies ignore keys they do not know (clients send fields of their own, such as Cohere's
``priority`` or ``max_chunks_per_doc``), but type every key they do know strictly: a string where a
number belongs is a 422, not a guess. Our own options sit under ``attn`` and are checked strictly.
The response models document the shapes in OpenAPI; the routes build the JSON themselves so that keys
a client did not ask for are left out rather than sent as ``null``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AttnOptions",
    "AttnResult",
    "ErrorBody",
    "ErrorEnvelope",
    "TEIError",
    "TEIRequest",
    "TEIResult",
    "TextDocument",
    "V1Request",
    "V1Response",
    "V2Request",
    "V2Response",
]


class AttnOptions(BaseModel):
    """attn-rerank's own options, under ``attn`` in any rerank body; other clients never send it.

    Attributes:
        raw_scores: Add ``attn`` to each result: the final score, the raw and calibrated attention
            scores and the prompt slot the document was read in.
        prune: A prune policy (``rerank.policies.PRUNE_POLICIES``) applied to the ranking before
            ``top_n``; the pruned documents are left out of the results.
        top_k, threshold, mass, token_budget, min_keep: That policy's settings (defaults: the config's
            ``policy`` section).
        first_stage: ``order``: the documents are sent already ranked, best first, and that order is
            fused as the first-stage signal (``probe.first_stage: order``). Unset (the default, as
            Cohere clients expect): the order carries no meaning.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    raw_scores: bool = False
    prune: str | None = None
    top_k: int | None = Field(default=None, ge=1)
    threshold: float | None = None
    mass: float | None = Field(default=None, gt=0.0, le=1.0)
    token_budget: int | None = Field(default=None, ge=1)
    min_keep: int | None = Field(default=None, ge=0)
    first_stage: Literal["order"] | None = None


class _Body(BaseModel):
    # Unknown keys are ignored: clients add fields of their own and must not be refused for them.
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    model: str | None = Field(default=None, description="Accepted and ignored: one model per process.")
    query: str
    attn: AttnOptions | None = None


class TextDocument(BaseModel):
    """A v1/Jina document object: ``text`` is ranked unless ``rank_fields`` names other keys."""

    model_config = ConfigDict(frozen=True, extra="allow")

    text: str | None = None


class V2Request(_Body):
    """Cohere v2 rerank request."""

    documents: list[str]
    top_n: int | None = Field(default=None, ge=1)
    max_tokens_per_doc: int | None = Field(default=None, ge=1)


class V1Request(_Body):
    """Cohere v1 / Jina rerank request."""

    documents: list[str | TextDocument]
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool | None = None
    rank_fields: list[str] | None = None
    max_tokens_per_doc: int | None = Field(default=None, ge=1)


class TEIRequest(_Body):
    """Text Embeddings Inference rerank request: every text is scored and returned."""

    texts: list[str]
    raw_scores: bool | None = None
    return_text: bool | None = None
    truncate: bool | None = None


class AttnResult(BaseModel):
    """Per-result probe details, present when ``attn.raw_scores`` is true."""

    score: float = Field(description="The final score the ranking is sorted by (a sum of z-scores).")
    raw_score: float | None = None
    calibrated_score: float | None = None
    prompt_position: int | None = None
    truncated: bool = False
    signals: dict[str, float] = Field(
        default_factory=dict, description="Each fused signal's raw value (probe, first_stage, bm25, dense)."
    )


class _V2Result(BaseModel):
    index: int
    relevance_score: float = Field(ge=0.0, le=1.0)
    attn: AttnResult | None = None


class V2Response(BaseModel):
    """Cohere v2 rerank response (results best first)."""

    id: str
    results: list[_V2Result]
    meta: dict[str, Any]


class _DocText(BaseModel):
    """The document as sent: ``text`` for a string, an object's own fields otherwise."""

    model_config = ConfigDict(extra="allow")

    text: str | None = None


class _V1Result(_V2Result):
    document: _DocText | None = Field(default=None, description="Only when return_documents is true.")


class V1Response(BaseModel):
    """Cohere v1 / Jina rerank response (results best first)."""

    id: str
    model: str
    results: list[_V1Result]
    meta: dict[str, Any]
    usage: dict[str, int]


class TEIResult(BaseModel):
    """One item of TEI's bare response list (sorted best first)."""

    index: int
    score: float
    text: str | None = Field(default=None, description="Only when return_text is true.")
    attn: AttnResult | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    """The error body of every route except TEI's dialect."""

    error: ErrorBody


class TEIError(BaseModel):
    """TEI's error body, on ``/rerank``."""

    error: str
    error_type: str


class ExplainRequest(BaseModel):
    """``POST /explain``: one query and its documents, in first-stage order (best first).

    Attributes:
        counterfactual: Also move the top passage to the other end of its prompt and score it there
            (one extra prefill).
        html: Add the self-contained HTML page to the answer, beside the JSON figures.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    query: str
    documents: list[str | TextDocument]
    counterfactual: bool = False
    html: bool = False
