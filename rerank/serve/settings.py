"""The service's limits and options, one frozen record shared by the app, the CLI and the tests."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ServeSettings"]


class ServeSettings(BaseModel):
    """Limits and options of one ``attn-rerank serve`` process.

    Attributes:
        config: The pipeline config the model and probe come from (a name in ``configs/`` or a path).
        max_documents: Most documents in one request; more is refused with 422. Windows of
            ``probe.window_size`` handle any count up to this, as the Python API does.
        max_tokens_per_doc: Token budget of one document; longer ones are cut (and reported). None
            means the config's ``probe.passage_max_tokens``.
        max_concurrent_requests: Rerank requests running or queued at once; one more gets 429.
        payload_limit: Largest request body in bytes; a larger one gets 413.
        max_queue_ms: A request that waited this long for the model gets 504 instead of a late answer.
        api_key: When set, every route except ``/health`` and ``/metrics`` needs ``Authorization:
            Bearer <key>`` (the scheme in any case); the OpenAPI pages too unless ``public_docs``.
        public_docs: Serve ``/docs`` and ``/openapi.json`` without the key (the routes they describe
            still need it; Swagger UI's Authorize button sends it).
        auto_truncate: TEI's ``--auto-truncate``: cut over-long texts on ``/rerank`` even when the
            request says ``truncate: false``.
        drain_timeout_s: On SIGTERM, how long to wait for requests in flight before exiting anyway.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: str = "default"
    max_documents: int = Field(default=1000, ge=1)
    max_tokens_per_doc: int | None = Field(default=None, ge=1)
    max_concurrent_requests: int = Field(default=32, ge=1)
    payload_limit: int = Field(default=2_000_000, ge=1024)
    max_queue_ms: int = Field(default=30_000, ge=1)
    api_key: str | None = None
    public_docs: bool = False
    auto_truncate: bool = False
    drain_timeout_s: float = Field(default=60.0, gt=0)
