"""``attn-rerank serve``: the rerank HTTP service (Cohere v1/v2, Jina and TEI APIs) over one model.

    attn-rerank serve --config default --host 127.0.0.1 --port 8080

The options and the server live in :mod:`rerank.serve`; this module only registers the command.
"""

from __future__ import annotations

import argparse
from typing import Any

SERVE_HELP = """\
routes: POST /v2/rerank (Cohere v2), POST /v1/rerank (Cohere v1, Jina), POST /rerank (TEI when the
body has "texts"), GET /health, /info, /metrics (Prometheus), /docs (OpenAPI).

relevance_score = 1 / (1 + exp(-score)) of the reranker's final score (a sum of z-scores over the
request's documents): 0.5 is the request's average document.

SIGTERM drains: requests in flight finish, new ones get 503, then the process exits 0.
exit codes: 0 clean shutdown, 1 the model failed to load or the port is taken, 2 bad config or a
missing [server] extra.
"""


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """Register ``serve`` on the ``attn-rerank`` subparsers."""
    from rerank.serve.__main__ import add_arguments

    p = sub.add_parser(
        "serve",
        help="serve reranking over HTTP (Cohere, Jina, TEI APIs)",
        epilog=SERVE_HELP,
        formatter_class=fmt,
    )
    add_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """``serve``: load the model once and serve until SIGTERM."""
    from rerank.serve.__main__ import run

    return run(args)
