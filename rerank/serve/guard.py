"""The ASGI guard in front of every route (drain, API key, payload limit, request counts), the
service's shared state, and what happens when a client leaves before its answer."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from rerank.serve.errors import ApiError, error_json
from rerank.serve.metrics import ServeMetrics
from rerank.serve.runner import InferenceWorker, RequestGate
from rerank.serve.settings import ServeSettings

#: Routes that stay open without the API key (monitoring).
OPEN_PATHS = frozenset({"/health", "/metrics"})
#: The API description: open without the key only with ``public_docs``.
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json"})
#: Swagger UI's script and style, served from the swagger-ui-bundle package so /docs works offline.
DOC_ASSETS = "/docs/assets"
RERANK_PATHS = ("/v2/rerank", "/v1/rerank", "/rerank")
KNOWN_PATHS = frozenset({*RERANK_PATHS, *OPEN_PATHS, *DOC_PATHS, "/info", "/explain"})
# A body over the limit is still read (and dropped) up to this many bytes, so that the client gets its
# 413 instead of a reset connection; beyond it the connection is closed.
_DISCARD_LIMIT = 256 * 1024 * 1024


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


class Guard:
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
        route = path if path in KNOWN_PATHS else "other"
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
                await error_json(err, tei)(scope, receive, send_counted)
                return
            if st.settings.api_key is not None and not self._open(path) and not self._authorized(scope):
                err = ApiError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    "authentication_error",
                    code="unauthorized",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error_json(err, tei)(scope, receive, send_counted)
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
                        await error_json(err, tei)(scope, receive, send_counted)
                        return
                    receive = _replay(body, receive)
                await self.app(scope, receive, send_counted)
            finally:
                st.in_flight -= 1
        finally:
            st.metrics.count(route, status[0])

    def _open(self, path: str) -> bool:
        if path in OPEN_PATHS:
            return True
        docs = path in DOC_PATHS or path.startswith(DOC_ASSETS + "/")
        return docs and self.state.settings.public_docs

    def _authorized(self, scope: dict[str, Any]) -> bool:
        # The scheme is case-insensitive (RFC 9110 section 11.1: "bearer KEY" is "Bearer KEY"); the key
        # is compared exactly, in constant time.
        expected = str(self.state.settings.api_key).encode()
        for k, v in scope["headers"]:
            if k == b"authorization":
                scheme, _, key = v.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), expected)
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


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def unless_gone(request: Request, state: ServeState, work: Awaitable[Any]) -> Any:
    """Await ``work`` unless the client disconnects first: then cancel it (a queued job is dropped
    unrun, a running one stops at its next window) and raise :class:`ClientGone`.

    Uvicorn does not cancel a handler whose client left; after the body, the next ``receive`` message is
    ``http.disconnect``, so one task waits for it beside the work.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(request.receive())
    try:
        while True:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if gone.result().get("type") == "http.disconnect":
                task.cancel()
                state.metrics.abandoned()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise ClientGone()
            gone = asyncio.ensure_future(request.receive())
    finally:
        if not gone.done():
            gone.cancel()


def _replay(body: bytes, receive: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the client to disconnect

    return again
