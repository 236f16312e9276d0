"""Every error the service answers, in one envelope per dialect: ``{"error": {message, type, param,
code}}`` (Cohere, Jina) or ``{error, error_type}`` (TEI)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from rerank.serve.runner import NotReady, Overloaded

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


def error_json(err: ApiError, tei: bool) -> JSONResponse:
    if tei:
        body: Any = {"error": err.message, "error_type": _TEI_TYPES.get(err.status, "Backend")}
    else:
        body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def invalid(message: str, *, code: str, param: str | None = None, status: int = 400) -> ApiError:
    return ApiError(status, message, "invalid_request_error", code=code, param=param)


def gate_error(exc: Exception) -> ApiError:
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
