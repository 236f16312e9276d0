"""Batch reranking and index building on a distributed engine (Ray Data), the optional extra ``[ray]``.

    import ray
    from rerank.batch import rerank_dataset

    ds = ray.data.read_text("queries.jsonl")            # one JSON request line per row
    out = rerank_dataset(ds, "default", workers=4)      # rows {line, qid, result, error}

The command line reaches the same code with ``attn-rerank run --engine ray`` and
``attn-rerank index build --engine ray`` (:mod:`rerank.batch.jobs`). Importing this package imports
neither Ray nor torch; the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "rerank_dataset": "rerank.batch.ray_engine",
    "encode_passages": "rerank.batch.ray_engine",
    "QueryReranker": "rerank.batch.ray_engine",
    "PassageEncoder": "rerank.batch.ray_engine",
    "RAY_INSTALL_HINT": "rerank.batch.ray_engine",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'rerank.batch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
