"""The FastAPI app of ``attn-rerank serve``: Cohere v1/v2, Jina and TEI rerank routes over one pipeline.

    app = create_app(ServeSettings(config="default"))   # loads the model in its worker thread
    uvicorn.run(app, host="127.0.0.1", port=8080)

Routes: ``POST /v2/rerank`` (Cohere v2), ``POST /v1/rerank`` (Cohere v1, Jina), ``POST /rerank`` (TEI
when the body has ``texts``, else as ``/v1/rerank``), ``GET /health``, ``GET /info``, ``GET /metrics``
and the OpenAPI pages ``/docs`` and ``/openapi.json``.

``relevance_score`` is ``1 / (1 + exp(-score))`` of the reranker's final score, which is a sum of
z-scores over the request's documents (standardised attention, plus, when ``first_stage_weight`` > 0,
the standardised stand-in that ``Pipeline.rerank`` fuses for documents sent without first-stage scores).
Documents go to ``Pipeline.rerank`` as plain strings in the request's order, so the answers equal the
Python API's on the same strings. 0.5 therefore marks a document scored exactly at the average of the
documents it was sent with; it is relative to the request, not an absolute probability of relevance.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from rerank.serve.metrics import ServeMetrics
from rerank.serve.runner import InferenceWorker, NotReady, Overloaded, QueueTimeout, RequestGate
from rerank.serve.schemas import (
    AttnOptions,
    ErrorEnvelope,
    ExplainRequest,
    TEIError,
    TEIRequest,
    TEIResult,
    TextDocument,
    V1Request,
    V1Response,
    V2Request,
    V2Response,
)
from rerank.serve.settings import ServeSettings

__all__ = ["ApiError", "ServeState", "build_pipeline", "create_app", "relevance_score"]

logger = logging.getLogger(__name__)

#: Routes that stay open without the API key (monitoring and the API description).
OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
RERANK_PATHS = ("/v2/rerank", "/v1/rerank", "/rerank")
_KNOWN_PATHS = frozenset({*RERANK_PATHS, *OPEN_PATHS, "/info", "/explain"})
# A body over the limit is still read (and dropped) up to this many bytes, so that the client gets its
# 413 instead of a reset connection; beyond it the connection is closed.
_DISCARD_LIMIT = 256 * 1024 * 1024
# TEI's error_type per status.
_TEI_TYPES = {
    400: "Validation",
    401: "Unauthorized",
    413: "Validation",
    422: "Validation",
    429: "Overloaded",
    503: "Unhealthy",
    504: "Overloaded",
    500: "Backend",
}


def relevance_score(score: float) -> float:
    """The logistic of a final score: in [0, 1], increasing, 0.5 at the request's average document."""
    if score >= 0:
        return 1.0 / (1.0 + math.exp(-score))
    e = math.exp(score)
    return e / (1.0 + e)


class ApiError(Exception):
    """An error answer: HTTP status, message, and the envelope's ``type``, ``code`` and ``param``."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}


def _error_json(err: ApiError, tei: bool) -> JSONResponse:
    if tei:
        body: Any = {"error": err.message, "error_type": _TEI_TYPES.get(err.status, "Backend")}
    else:
        body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def _invalid(message: str, *, code: str, param: str | None = None, status: int = 400) -> ApiError:
    return ApiError(status, message, "invalid_request_error", code=code, param=param)


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
        raise _invalid("the request body is empty; send a JSON object", code="empty_body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(
            f"the request body is not UTF-8 (invalid byte at position {exc.start})", code="invalid_encoding"
        ) from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise _invalid(
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
        raise _invalid(
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
        raise _invalid("query is empty", code="empty_query", param="query")
    if not req.documents:
        raise _invalid("documents is empty; send at least one document", code="empty_documents")
    if len(req.documents) > settings.max_documents:
        raise _invalid(
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
        raise _invalid("query is empty", code="empty_query", param="query")
    if not docs:
        raise _invalid(
            f"{docs_key} is empty; send at least one document", code="empty_documents", param=docs_key
        )
    if len(docs) > settings.max_documents:
        raise _invalid(
            f"{len(docs)} documents is more than this server takes in one request (--max-documents "
            f"{settings.max_documents}); split them over several requests",
            code="too_many_documents",
            param=docs_key,
            status=422,
        )
    texts = []
    rank_fields = getattr(req, "rank_fields", None)
    for i, d in enumerate(docs):
        t = _document_text(d, i, rank_fields)
        if not t.strip():
            raise _invalid(f"{docs_key}[{i}] is empty", code="empty_document", param=f"{docs_key}[{i}]")
        texts.append(t)
    attn = req.attn or AttnOptions()
    if attn.prune is not None:
        from rerank.policies import PRUNE_POLICIES

        try:
            PRUNE_POLICIES.get(attn.prune)
        except KeyError as exc:
            raise _invalid(
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
        max_tokens=limit,
        truncate=dialect != "tei" or bool(req.truncate) or settings.auto_truncate,
        top_n=getattr(req, "top_n", None),
        return_documents=bool(
            req.return_text if dialect == "tei" else getattr(req, "return_documents", False)
        ),
        attn=attn,
        raw_scores=dialect == "tei" and bool(req.raw_scores),
    )


def _document_text(doc: str | TextDocument, i: int, rank_fields: list[str] | None) -> str:
    if isinstance(doc, str):
        return doc
    fields = doc.model_dump(exclude_none=True)
    if rank_fields:
        missing = [f for f in rank_fields if f not in fields]
        if len(missing) == len(rank_fields):
            raise _invalid(
                f"documents[{i}] has none of the rank_fields {rank_fields}",
                code="missing_field",
                param=f"documents[{i}]",
                status=422,
            )
        # Cohere's convention for several fields: one "key: value" line each, in rank_fields order.
        return "\n".join(f"{f}: {fields[f]}" for f in rank_fields if f in fields)
    if doc.text is None:
        raise _invalid(
            f"documents[{i}] has no 'text' (or name the keys to rank with rank_fields)",
            code="missing_field",
            param=f"documents[{i}].text",
            status=422,
        )
    return doc.text


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
    # Plain strings in the given order: no first-stage scores, ids are the request's indices.
    try:
        ranked = pipe.rerank(call.query, texts)
    except ValueError as exc:
        raise _invalid(f"cannot rerank these documents: {exc}", code="unprocessable", status=422) from None
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
    )
    for it in ranked.items:
        i = int(it.passage.id)
        out.score[i] = it.score
        out.raw[i] = it.raw_score
        out.calibrated[i] = it.calibrated_score
        out.position[i] = it.prompt_position
    return out


_MAX_TOKEN_CHARS: dict[int, int] = {}


def _max_token_chars(tok: Any) -> int:
    key = id(tok)
    if key not in _MAX_TOKEN_CHARS:
        _MAX_TOKEN_CHARS[key] = max(8, max(len(t) for t in tok.get_vocab()))
    return _MAX_TOKEN_CHARS[key]


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
            res["document"] = {"text": call.texts[i]}
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


@dataclass
class ServeState:
    """What the routes and the middleware share; ``draining`` is set on SIGTERM."""

    settings: ServeSettings
    worker: InferenceWorker
    gate: RequestGate
    metrics: ServeMetrics
    owns_worker: bool
    draining: bool = False
    in_flight: int = 0

    @property
    def max_tokens(self) -> int:
        if self.settings.max_tokens_per_doc is not None:
            return self.settings.max_tokens_per_doc
        pipe = self.worker.target
        return int(pipe.config.probe.passage_max_tokens) if pipe is not None else 300


class _Guard:
    """ASGI middleware in front of every route: drain, API key, payload limit, request counts."""

    def __init__(self, app: Any, state: ServeState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st = self.state
        path = scope["path"]
        route = path if path in _KNOWN_PATHS else "other"
        tei = path == "/rerank"
        status = [500]

        async def send_counted(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            if st.draining and path not in ("/health", "/metrics"):
                err = ApiError(
                    503,
                    "the server is shutting down; retry on another instance",
                    "service_unavailable",
                    code="draining",
                    headers={"Connection": "close"},
                )
                await _error_json(err, tei)(scope, receive, send_counted)
                return
            if st.settings.api_key is not None and path not in OPEN_PATHS and not self._authorized(scope):
                err = ApiError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    "authentication_error",
                    code="unauthorized",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await _error_json(err, tei)(scope, receive, send_counted)
                return
            st.in_flight += 1
            try:
                if scope["method"] in ("POST", "PUT", "PATCH"):
                    body = await self._read_body(scope, receive)
                    if body is None:
                        limit = st.settings.payload_limit
                        err = ApiError(
                            413,
                            f"the request body is larger than {limit} bytes (--payload-limit)",
                            "request_too_large",
                            code="payload_too_large",
                        )
                        await _error_json(err, tei)(scope, receive, send_counted)
                        return
                    receive = _replay(body, receive)
                await self.app(scope, receive, send_counted)
            finally:
                st.in_flight -= 1
        finally:
            st.metrics.count(route, status[0])

    def _authorized(self, scope: dict[str, Any]) -> bool:
        expected = f"Bearer {self.state.settings.api_key}".encode()
        for k, v in scope["headers"]:
            if k == b"authorization":
                return hmac.compare_digest(v.strip(), expected)
        return False

    async def _read_body(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]]) -> bytes | None:
        """The whole body, or None when it is over the limit (the rest is read and dropped)."""
        limit = self.state.settings.payload_limit
        chunks: list[bytes] = []
        size = 0
        over = False
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                over = True
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                over = True
                chunks = []
            elif not over:
                chunks.append(chunk)
            if not msg.get("more_body", False) or size > _DISCARD_LIMIT:
                break
        return None if over else b"".join(chunks)


def _replay(body: bytes, receive: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the client to disconnect

    return again


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _gate_error(exc: Exception) -> ApiError:
    """The answer for a request the inference gate did not run: 503 not ready, 429 full, 504 waited."""
    if isinstance(exc, NotReady):
        return ApiError(
            503, f"not ready: {exc}", "service_unavailable", code="not_ready", headers={"Retry-After": "5"}
        )
    if isinstance(exc, Overloaded):
        return ApiError(
            429,
            str(exc),
            "rate_limit_error",
            code="too_many_requests",
            headers={"Retry-After": str(exc.retry_after)},
        )
    return ApiError(504, str(exc), "timeout_error", code="queue_timeout")


def create_app(
    settings: ServeSettings | None = None,
    *,
    worker: InferenceWorker | None = None,
    start_worker: bool = True,
) -> FastAPI:
    """Build the service.

    Args:
        settings: Limits and options (defaults: ``ServeSettings()``).
        worker: An inference worker to share (several apps over one model, as the tests do); by default
            the app makes its own from ``settings.config`` and stops it on shutdown.
        start_worker: Start loading the model when the app starts (``/health`` is 503 until it is ready).

    Returns:
        The FastAPI app; ``app.state.serve`` is its :class:`ServeState`.
    """
    settings = settings or ServeSettings()
    owns = worker is None
    worker = worker or new_worker(settings)
    state = ServeState(
        settings=settings,
        worker=worker,
        gate=RequestGate(worker, settings.max_concurrent_requests, settings.max_queue_ms / 1000),
        metrics=ServeMetrics(),
        owns_worker=owns,
    )

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if start_worker:
            worker.start()
        yield
        if owns:
            worker.stop()

    app = FastAPI(
        title="attn-rerank",
        summary="Attention-probe reranking behind the Cohere, Jina and TEI rerank APIs",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.serve = state

    async def rerank_route(request: Request) -> Response:
        path = request.url.path
        call = None
        try:
            raw = await request.body()
            call = parse_body(raw, path, settings, state.max_tokens)
            ranking, queued, ran = await state.gate.run(lambda pipe: run_call(pipe, call))
        except ApiError as err:
            return _error_json(err, _is_tei(path, call))
        except (NotReady, Overloaded, QueueTimeout) as exc:
            return _error_json(_gate_error(exc), _is_tei(path, call))
        except Exception:  # a failure in one request must not take the server down
            logger.exception("rerank failed")
            err = ApiError(
                500,
                "internal error while reranking; see the server log",
                "internal_error",
                code="internal_error",
            )
            return _error_json(err, _is_tei(path, call))
        state.metrics.observe_job(queued, ran, len(call.texts), ranking.input_tokens, sum(ranking.truncated))
        return JSONResponse(render(call, ranking, _served_model(state)))

    common = {
        "response_model": None,
        "responses": {
            400: {"model": ErrorEnvelope},
            401: {"model": ErrorEnvelope},
            413: {"model": ErrorEnvelope},
            422: {"model": ErrorEnvelope},
            429: {"model": ErrorEnvelope},
            503: {"model": ErrorEnvelope},
            504: {"model": ErrorEnvelope},
        },
    }
    app.add_api_route(
        "/v2/rerank",
        rerank_route,
        methods=["POST"],
        summary="Rerank (Cohere v2)",
        openapi_extra=_body_doc(V2Request),
        **{**common, "responses": {**common["responses"], 200: {"model": V2Response}}},
    )
    app.add_api_route(
        "/v1/rerank",
        rerank_route,
        methods=["POST"],
        summary="Rerank (Cohere v1, Jina)",
        openapi_extra=_body_doc(V1Request),
        **{**common, "responses": {**common["responses"], 200: {"model": V1Response}}},
    )
    app.add_api_route(
        "/rerank",
        rerank_route,
        methods=["POST"],
        summary="Rerank (TEI when the body has 'texts', else Cohere v1)",
        description="TEI answers a bare list of {index, score, text?}; errors are {error, error_type}.",
        openapi_extra=_body_doc(TEIRequest),
        responses={
            200: {"model": list[TEIResult]},
            413: {"model": TEIError},
            422: {"model": TEIError},
            429: {"model": TEIError},
            503: {"model": TEIError},
        },
    )

    async def explain_route(request: Request) -> Response:
        from rerank.explain import explain_payload

        try:
            req = parse_explain(await request.body(), settings)
            docs = [d if isinstance(d, str) else d.model_dump(exclude_none=True) for d in req.documents]

            def job(pipe: Any) -> Any:
                cf = req.counterfactual
                return explain_payload(pipe, req.query, docs, counterfactual=cf, html=req.html)

            payload, _, _ = await state.gate.run(job)
        except ApiError as err:
            return _error_json(err, False)
        except (NotReady, Overloaded, QueueTimeout) as exc:
            return _error_json(_gate_error(exc), False)
        except ValueError as exc:
            return _error_json(_invalid(str(exc), code="invalid_documents"), False)
        except Exception:  # a failure in one request must not take the server down
            logger.exception("explain failed")
            err = ApiError(500, "internal error while explaining; see the server log", "internal_error")
            return _error_json(err, False)
        return JSONResponse(payload)

    app.add_api_route(
        "/explain",
        explain_route,
        methods=["POST"],
        summary="Why each document landed where it did: the explain page's figures (and HTML if asked)",
        openapi_extra=_body_doc(ExplainRequest),
        **common,
    )

    @app.get(
        "/health", summary="200 when the model is loaded; 503 while loading, after a failure or draining"
    )
    async def health() -> Response:
        if state.draining:
            status, msg = "draining", "the server is shutting down"
        elif worker.state == "ready":
            return JSONResponse({"status": "ok"})
        else:
            status, msg = worker.state, worker.error or f"the model is {worker.state}"
        err = {"message": msg, "type": "service_unavailable", "param": None, "code": status}
        return JSONResponse({"status": status, "error": err}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/info", summary="Model, dtype, calibration curve, score mapping and limits")
    async def info() -> Response:
        return JSONResponse(_info(state))

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        state.metrics.in_flight.set(state.gate.active)
        text, ctype = state.metrics.render()
        return Response(text, media_type=ctype)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (V2Request, V1Request, TEIRequest, ExplainRequest):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(_Guard, state=state)
    return app


def _is_tei(path: str, call: RerankCall | None) -> bool:
    return path == "/rerank" and (call is None or call.dialect == "tei")


def _served_model(state: ServeState) -> str:
    pipe = state.worker.target
    return str(pipe.model.model_id) if pipe is not None else "unknown"


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("attn-rerank")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _info(state: ServeState) -> dict[str, Any]:
    s = state.settings
    out: dict[str, Any] = {
        "state": "draining" if state.draining else state.worker.state,
        "config": s.config,
        "relevance_score": (
            "1 / (1 + exp(-score)), score = the reranker's final score, a sum of z-scores over the "
            "request's documents; 0.5 = the request's average document"
        ),
        "limits": {
            "max_documents": s.max_documents,
            "max_tokens_per_doc": state.max_tokens,
            "max_concurrent_requests": s.max_concurrent_requests,
            "payload_limit": s.payload_limit,
            "max_queue_ms": s.max_queue_ms,
            "auto_truncate": s.auto_truncate,
            "auth": s.api_key is not None,
        },
    }
    pipe = state.worker.target
    if pipe is None:
        return out
    m = pipe.model
    cfg = pipe.config
    rr = pipe.reranker
    curve = getattr(rr, "curve", None)
    out["model"] = {
        "id": m.model_id,
        "dtype": m.dtype,
        "device": m.device,
        "weights_hash": m.weights_hash,
        "layers": m.num_layers,
    }
    out["probe"] = {
        "engine": cfg.probe.engine,
        "layers": list(cfg.probe.layers) if cfg.probe.layers is not None else None,
        "prompt_order": cfg.probe.prompt_order,
        "window_size": cfg.probe.window_size,
        "first_stage_weight": cfg.probe.first_stage_weight,
    }
    out["calibration"] = {
        "name": cfg.calibration.name,
        "curve": None
        if curve is None
        else {
            "mode": curve.mode,
            "lengths": list(curve.lengths),
            **{k: curve.meta.get(k) for k in ("model_id", "dtype", "layers", "score_kind")},
        },
    }
    return out
