"""First stage: BM25 (rank-bm25 or bm25s), dense (sentence-transformers + FAISS) and hybrid fusion.

Heavy libraries load inside the backends; importing this package is cheap. The names below are
resolved on first access, so ``import retrievers`` imports neither torch, FAISS nor bm25s.
"""

from __future__ import annotations

import importlib
from typing import Any

from retrievers.records import Hit, Passage
from retrievers.registry import Registry

_LAZY = {
    "BM25Retriever": "retrievers.bm25",
    "tokenize": "retrievers.bm25",
    "DenseRetriever": "retrievers.dense",
    "load_encoder": "retrievers.dense",
    "HybridRetriever": "retrievers.hybrid",
    "rrf_fuse": "retrievers.hybrid",
    "weighted_fuse": "retrievers.hybrid",
    "CorpusError": "retrievers.corpus",
    "load_corpus": "retrievers.corpus",
    "load_queries": "retrievers.corpus",
    "load_qrels": "retrievers.corpus",
    "RETRIEVERS": "retrievers.index",
    "IndexFormatError": "retrievers.index",
    "build_retriever": "retrievers.index",
    "load_retriever": "retrievers.index",
    "save_retriever": "retrievers.index",
    "RetrieverConfig": "retrievers.config",
}

__all__ = ["Hit", "Passage", "Registry", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'retrievers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
