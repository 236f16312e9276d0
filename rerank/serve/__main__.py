"""``attn-rerank serve`` (also ``python -m rerank.serve``): the rerank HTTP service.

attn-rerank serve --config default --host 127.0.0.1 --port 8080
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from rerank.core.common import positive_int

__all__ = ["add_arguments", "build_parser", "run", "serve_main"]

API_KEY_ENV = "ATTN_RERANK_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``serve``, added to ``p`` (shared by ``attn-rerank serve`` and ``python -m``)."""
    from rerank.serve.settings import ServeSettings

    d = ServeSettings()
    p.add_argument("--config", default=d.config, help="pipeline config: a name in configs/ or a YAML path")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes the service)")
    p.add_argument("--port", type=int, default=8080, help="TCP port")
    p.add_argument(
        "--max-documents",
        type=positive_int,
        default=d.max_documents,
        help="most documents in one request; more get 422 (windows handle any count up to it)",
    )
    p.add_argument(
        "--max-tokens-per-doc",
        type=positive_int,
        default=None,
        help="cut each document to this many tokens and report it (default: the config's "
        "probe.passage_max_tokens)",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=positive_int,
        default=d.max_concurrent_requests,
        help="rerank requests running or queued at once; one more gets 429 with Retry-After",
    )
    p.add_argument(
        "--payload-limit",
        type=positive_int,
        default=d.payload_limit,
        help="largest request body in bytes; larger gets 413",
    )
    p.add_argument(
        "--max-queue-ms",
        type=positive_int,
        default=d.max_queue_ms,
        help="a request that waits this long for the model gets 504",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}); /health and /metrics stay "
        "open, /docs too with --public-docs",
    )
    p.add_argument(
        "--public-docs",
        action="store_true",
        help="with --api-key: serve /docs and /openapi.json without the key (the API still needs it)",
    )
    p.add_argument(
        "--auto-truncate",
        action="store_true",
        help="TEI route: cut over-long texts even when the request says truncate: false",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout_s,
        help="seconds to wait for requests in flight after SIGTERM",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def build_parser(prog: str = "attn-rerank serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve reranking over HTTP (Cohere, Jina, TEI APIs)."
    )
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Check the config, then serve until SIGTERM; returns the exit status.

    0 after a clean drain, 1 when the model failed to load or the port could not be bound, 2 for a bad
    config or a missing ``[server]`` extra.
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # Under `attn-rerank serve` the root logger is already set (WARNING); the service's own lines follow
    # --log-level.
    logging.getLogger("rerank").setLevel(args.log_level.upper())
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        print(
            f"error: serve needs the server extra: pip install 'attn-rerank[server]' ({exc})", file=sys.stderr
        )
        return 2
    from pydantic import ValidationError

    from rerank.config import load_config
    from rerank.serve.server import run_server
    from rerank.serve.settings import ServeSettings

    try:
        load_config(args.config)  # a bad config fails here, before the port opens
        settings = ServeSettings(
            config=args.config,
            max_documents=args.max_documents,
            max_tokens_per_doc=args.max_tokens_per_doc,
            max_concurrent_requests=args.max_concurrent_requests,
            payload_limit=args.payload_limit,
            max_queue_ms=args.max_queue_ms,
            api_key=args.api_key or None,
            public_docs=args.public_docs,
            auto_truncate=args.auto_truncate,
            drain_timeout_s=args.drain_timeout,
        )
    except (ValueError, FileNotFoundError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_server(settings, host=args.host, port=args.port, log_level=args.log_level)


def serve_main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` and serve; returns the exit status."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(serve_main())
