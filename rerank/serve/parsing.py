"""Decoding and validating a request body of any dialect into one :class:`RerankCall`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from rerank.serve.errors import invalid
from rerank.serve.schemas import (
    AttnOptions,
    ExplainRequest,
    TEIRequest,
    TextDocument,
    V1Request,
    V2Request,
)
from rerank.serve.settings import ServeSettings

# ------------------------------------------------------------------------------------------------------
# Parsing a body
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RerankCall:
    """One validated rerank request, whatever its dialect."""

    dialect: str  # "v2", "v1" or "tei"
    model: str | None
    query: str
    texts: tuple[str, ...]
    max_tokens: int
    truncate: bool
    top_n: int | None
    return_documents: bool
    attn: AttnOptions
    raw_scores: bool = False
    #: The documents as sent (a string, or an object's fields): what v1's ``return_documents`` returns.
    sent: tuple[Any, ...] = ()


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "TextDocument"):
            continue  # the branch of a union, not a key of the body
        else:
            out += ("." if out else "") + str(part)
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; 400 for an empty, non-UTF-8 or malformed body or a non-object."""
    if not raw.strip():
        raise invalid("the request body is empty; send a JSON object", code="empty_body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(
            f"the request body is not UTF-8 (invalid byte at position {exc.start})", code="invalid_encoding"
        ) from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise invalid(
            f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json"
        )
    return obj


def _validated(schema: type[BaseModel], obj: dict[str, Any]) -> Any:
    """``schema`` over ``obj`` (strict types); 422 naming the first wrong field."""
    try:
        return schema.model_validate(obj, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _loc(first["loc"])
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise invalid(
            f"{param or 'body'}: {first['msg']}{more}",
            code=str(first["type"]),
            param=param or None,
            status=422,
        ) from None


def parse_explain(raw: bytes, settings: ServeSettings) -> Any:
    """Decode and validate a ``POST /explain`` body (:class:`ExplainRequest`).

    Raises:
        ApiError: 400 for a malformed body, an empty query or no documents; 422 for a wrong type or more
            than ``settings.max_documents`` documents.
    """
    req = _validated(ExplainRequest, _json_object(raw))
    if not req.query.strip():
        raise invalid("query is empty", code="empty_query", param="query")
    if not req.documents:
        raise invalid("documents is empty; send at least one document", code="empty_documents")
    if len(req.documents) > settings.max_documents:
        raise invalid(
            f"{len(req.documents)} documents is more than --max-documents {settings.max_documents}",
            code="too_many_documents",
            param="documents",
            status=422,
        )
    return req


def parse_body(raw: bytes, path: str, settings: ServeSettings, max_tokens: int) -> RerankCall:
    """Decode and validate a rerank body for ``path``.

    Raises:
        ApiError: 400 for an empty, non-UTF-8 or malformed body, an empty query or document, or no
            documents; 422 for a wrong type, a value out of range, an unknown prune policy or more than
            ``settings.max_documents`` documents.
    """
    obj = _json_object(raw)
    dialect = {"/v2/rerank": "v2", "/v1/rerank": "v1"}.get(path) or ("tei" if "texts" in obj else "v1")
    schema: type[BaseModel] = {"v2": V2Request, "v1": V1Request, "tei": TEIRequest}[dialect]
    req: Any = _validated(schema, obj)
    docs_key = "texts" if dialect == "tei" else "documents"
    docs = req.texts if dialect == "tei" else req.documents
    if not req.query.strip():
        raise invalid("query is empty", code="empty_query", param="query")
    if not docs:
        raise invalid(
            f"{docs_key} is empty; send at least one document", code="empty_documents", param=docs_key
        )
    if len(docs) > settings.max_documents:
        raise invalid(
            f"{len(docs)} documents is more than this server takes in one request (--max-documents "
            f"{settings.max_documents}); split them over several requests",
            code="too_many_documents",
            param=docs_key,
            status=422,
        )
    _valid_text(req.query, "query")
    texts = []
    rank_fields = getattr(req, "rank_fields", None)
    for i, d in enumerate(docs):
        t = _document_text(d, i, rank_fields)
        if not t.strip():
            raise invalid(f"{docs_key}[{i}] is empty", code="empty_document", param=f"{docs_key}[{i}]")
        texts.append(_valid_text(t, f"{docs_key}[{i}]"))
    attn = req.attn or AttnOptions()
    if attn.prune is not None:
        from rerank.policies import PRUNE_POLICIES

        try:
            PRUNE_POLICIES.get(attn.prune)
        except KeyError as exc:
            raise invalid(
                str(exc.args[0]), code="unknown_prune_policy", param="attn.prune", status=422
            ) from None
    limit = max_tokens
    if getattr(req, "max_tokens_per_doc", None) is not None:
        limit = min(limit, req.max_tokens_per_doc)
    return RerankCall(
        dialect=dialect,
        model=req.model,
        query=req.query,
        texts=tuple(texts),
        sent=tuple(d if isinstance(d, str) else d.model_dump(exclude_none=True) for d in docs),
        max_tokens=limit,
        truncate=dialect != "tei" or bool(req.truncate) or settings.auto_truncate,
        top_n=getattr(req, "top_n", None),
        return_documents=bool(
            req.return_text if dialect == "tei" else getattr(req, "return_documents", False)
        ),
        attn=attn,
        raw_scores=dialect == "tei" and bool(req.raw_scores),
    )


def _valid_text(text: str, param: str) -> str:
    """``text``, or a 400 when it is not valid Unicode (a lone surrogate, which JSON can carry as
    ``\\ud800`` but no tokenizer or UTF-8 writer accepts)."""
    from rerank.records import check_text

    try:
        return check_text(text, param)
    except ValueError as exc:
        raise invalid(str(exc), code="invalid_text", param=param) from None


def _document_text(doc: str | TextDocument, i: int, rank_fields: list[str] | None) -> str:
    if isinstance(doc, str):
        return doc
    fields = doc.model_dump(exclude_none=True)
    if rank_fields:
        missing = [f for f in rank_fields if f not in fields]
        if len(missing) == len(rank_fields):
            raise invalid(
                f"documents[{i}] has none of the rank_fields {rank_fields}",
                code="missing_field",
                param=f"documents[{i}]",
                status=422,
            )
        # Cohere's convention for several fields: one "key: value" line each, in rank_fields order.
        return "\n".join(f"{f}: {fields[f]}" for f in rank_fields if f in fields)
    if doc.text is None:
        raise invalid(
            f"documents[{i}] has no 'text' (or name the keys to rank with rank_fields)",
            code="missing_field",
            param=f"documents[{i}].text",
            status=422,
        )
    return doc.text
