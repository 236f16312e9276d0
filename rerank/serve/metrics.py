"""Prometheus metrics of one app, in a registry of its own (several apps may share a process in tests)."""

from __future__ import annotations

from typing import Any

__all__ = ["ServeMetrics"]

# Seconds: the probe takes ~0.1-2 s per window on a CPU; queues can reach tens of seconds.
_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DOC_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_TOKEN_BUCKETS = (100, 300, 1000, 3000, 10_000, 30_000, 100_000, 300_000)


class ServeMetrics:
    """Request counts by route and status, queue and inference time, documents and tokens per request."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        ns = "attn_rerank"
        self.requests = Counter(
            "requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            namespace=ns,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "queue_seconds",
            "Time a rerank request waited for the model",
            namespace=ns,
            buckets=_TIME_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "inference_seconds",
            "Time the model spent on one rerank request",
            namespace=ns,
            buckets=_TIME_BUCKETS,
            registry=self.registry,
        )
        self.documents = Histogram(
            "documents_per_request",
            "Documents in one rerank request",
            namespace=ns,
            buckets=_DOC_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Histogram(
            "tokens_per_request",
            "Input tokens (query and documents, after truncation) of one request",
            namespace=ns,
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.truncated = Counter(
            "truncated_documents",
            "Documents cut to the token budget",
            namespace=ns,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "rerank_in_flight",
            "Rerank requests running or queued",
            namespace=ns,
            registry=self.registry,
        )

        self.abandoned_requests = Counter(
            "abandoned_requests",
            "Rerank requests whose client disconnected before the answer (their job dropped or stopped)",
            namespace=ns,
            registry=self.registry,
        )

    def watch_worker(self, worker: Any) -> None:
        """Export the worker's job counts: what the model actually ran, and what it stopped early."""
        from prometheus_client import Gauge

        ns = "attn_rerank"
        Gauge(
            "jobs_started", "Jobs the model worker started", namespace=ns, registry=self.registry
        ).set_function(lambda: worker.jobs_started)
        Gauge(
            "jobs_interrupted",
            "Started jobs stopped at a window boundary",
            namespace=ns,
            registry=self.registry,
        ).set_function(lambda: worker.jobs_interrupted)

    def abandoned(self) -> None:
        self.abandoned_requests.inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe_job(self, queued: float, ran: float, documents: int, tokens: int, truncated: int) -> None:
        self.queue_seconds.observe(queued)
        self.inference_seconds.observe(ran)
        self.documents.observe(documents)
        self.tokens.observe(tokens)
        if truncated:
            self.truncated.inc(truncated)

    def count(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
