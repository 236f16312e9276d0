"""The FastAPI app of ``attn-rerank serve``: Cohere v1/v2, Jina and TEI rerank routes over one pipeline.

    app = create_app(ServeSettings(config="default"))   # loads the model in its worker thread
    uvicorn.run(app, host="127.0.0.1", port=8080)

Routes: ``POST /v2/rerank`` (Cohere v2), ``POST /v1/rerank`` (Cohere v1, Jina), ``POST /rerank`` (TEI
when the body has ``texts``, else as ``/v1/rerank``), ``GET /health``, ``GET /info``, ``GET /metrics``
and the OpenAPI pages ``/docs`` and ``/openapi.json``.

``relevance_score`` is ``1 / (1 + exp(-score))`` of the reranker's final score, which is a sum of
weighted z-scores over the request's documents (the probe's standardised attention and the cheap
signals over the documents themselves, in-list BM25 and the encoder's cosine, at the model's fitted
weights; with ``attn.first_stage: "order"`` also the order they were sent in).
Documents go to ``Pipeline.rerank`` as plain strings in the request's order, so the answers equal the
Python API's on the same strings. 0.5 therefore marks a document scored exactly at the average of the
documents it was sent with; it is relative to the request, not an absolute probability of relevance.

One file per concern: :mod:`~rerank.serve.parsing` (bodies to one call), :mod:`~rerank.serve.inference`
(the worker's side), :mod:`~rerank.serve.render` (responses per dialect), :mod:`~rerank.serve.errors`
(one envelope per dialect), :mod:`~rerank.serve.guard` (the middleware and shared state); this module
wires the routes.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from rerank.serve.errors import ApiError, error_json, gate_error, invalid
from rerank.serve.guard import DOC_ASSETS, RERANK_PATHS, ClientGone, Guard, ServeState, unless_gone
from rerank.serve.inference import build_pipeline, new_worker, run_call
from rerank.serve.metrics import ServeMetrics
from rerank.serve.parsing import RerankCall, parse_body, parse_explain
from rerank.serve.render import relevance_score, render
from rerank.serve.runner import InferenceWorker, NotReady, Overloaded, QueueTimeout, RequestGate
from rerank.serve.schemas import (
    ErrorEnvelope,
    ExplainRequest,
    TEIError,
    TEIRequest,
    TEIResult,
    V1Request,
    V1Response,
    V2Request,
    V2Response,
)
from rerank.serve.settings import ServeSettings

__all__ = ["ApiError", "ServeState", "build_pipeline", "create_app", "relevance_score"]

logger = logging.getLogger(__name__)


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


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
    state.metrics.watch_worker(worker)

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
        docs_url=None,
        redoc_url=None,
    )
    app.state.serve = state
    _offline_docs(app)

    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths (404) and wrong methods (405) answer in the same envelope as every other error.
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", None) or "error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        if status == 404:
            detail = f"no route {request.url.path}; the rerank routes are {', '.join(RERANK_PATHS)}"
        elif status == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        err = ApiError(
            status, str(detail), "invalid_request_error", code=code, headers=getattr(exc, "headers", None)
        )
        return error_json(err, request.url.path == "/rerank")

    app.add_exception_handler(StarletteHTTPException, http_error)

    async def rerank_route(request: Request) -> Response:
        path = request.url.path
        call = None
        try:
            raw = await request.body()
            call = parse_body(raw, path, settings, state.max_tokens)
            ranking, queued, ran = await unless_gone(
                request, state, state.gate.run(lambda pipe: run_call(pipe, call))
            )
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the job was dropped or stopped
        except ApiError as err:
            return error_json(err, _is_tei(path, call))
        except (NotReady, Overloaded, QueueTimeout) as exc:
            return error_json(gate_error(exc), _is_tei(path, call))
        except Exception:  # a failure in one request must not take the server down
            logger.exception("rerank failed")
            err = ApiError(
                500,
                "internal error while reranking; see the server log",
                "internal_error",
                code="internal_error",
            )
            return error_json(err, _is_tei(path, call))
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
            return error_json(err, False)
        except (NotReady, Overloaded, QueueTimeout) as exc:
            return error_json(gate_error(exc), False)
        except ValueError as exc:
            return error_json(invalid(str(exc), code="invalid_documents"), False)
        except Exception:  # a failure in one request must not take the server down
            logger.exception("explain failed")
            err = ApiError(500, "internal error while explaining; see the server log", "internal_error")
            return error_json(err, False)
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
            if settings.api_key is not None:
                # Declared so that Swagger UI's Authorize button sends the key with "Try it out".
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(Guard, state=state)
    return app


def _offline_docs(app: FastAPI) -> None:
    """``/docs`` with Swagger UI's assets from the swagger-ui-bundle package (no CDN: works offline).
    Without that package (``pip install swagger-ui-bundle``, part of the ``server`` extra) there is no
    ``/docs``; ``/openapi.json`` is always served."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        logger.info("no /docs: install swagger-ui-bundle to serve Swagger UI offline")
        return
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount(DOC_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="attn-rerank API",
            swagger_js_url=f"{DOC_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOC_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOC_ASSETS}/favicon-32x32.png",
        )

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)


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
