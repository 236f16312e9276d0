"""The rerank HTTP service (``attn-rerank serve``): Cohere v1/v2, Jina and TEI rerank APIs over one model.

Needs the ``server`` extra (``pip install 'attn-rerank[server]'``). Importing this package imports
neither torch nor FastAPI; the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ServeSettings", "create_app", "relevance_score", "run_server"]

_WHERE = {
    "ServeSettings": "rerank.serve.settings",
    "create_app": "rerank.serve.app",
    "relevance_score": "rerank.serve.app",
    "run_server": "rerank.serve.server",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'rerank.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
