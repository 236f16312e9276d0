"""The retriever registry, and building, saving and loading a retriever by name.

The registry maps a name to a *zero-argument function returning the retriever class*, so that
registering does not import the backend (and its heavy dependencies) before it is used::

    RETRIEVERS.register("mine")(lambda: MyRetriever)

The index directory format and the shared base class are in :mod:`retrievers.base` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from retrievers.base import (
    FORMAT_VERSION,
    META_FILE,
    PASSAGES_FILE,
    BaseRetriever,
    IndexFormatError,
    Retriever,
    check_queries,
    indexed_text,
    load_passages,
    read_meta,
    save_passages,
    seal_index,
    verify_index,
    write_meta,
)
from retrievers.config import RetrieverConfig
from retrievers.registry import Registry

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "PASSAGES_FILE",
    "RETRIEVERS",
    "BaseRetriever",
    "IndexFormatError",
    "Retriever",
    "build_retriever",
    "check_queries",
    "indexed_text",
    "load_passages",
    "load_retriever",
    "read_meta",
    "save_passages",
    "save_retriever",
    "seal_index",
    "verify_index",
    "write_meta",
]

# --------------------------------------------------------------------------------------------------
# Registry, build, save, load
# --------------------------------------------------------------------------------------------------

RETRIEVERS: Registry[Callable[[], type]] = Registry("retriever")


@RETRIEVERS.register("bm25")
def _bm25_class() -> type:
    from retrievers.bm25 import BM25Retriever

    return BM25Retriever


@RETRIEVERS.register("dense")
def _dense_class() -> type:
    from retrievers.dense import DenseRetriever

    return DenseRetriever


@RETRIEVERS.register("hybrid")
def _hybrid_class() -> type:
    from retrievers.hybrid import HybridRetriever

    return HybridRetriever


def build_retriever(cfg: RetrieverConfig | None = None) -> Any:
    """Create an empty retriever from its config (call ``.index(passages)`` next).

    Raises:
        KeyError: ``cfg.name`` is not registered; the message lists the registered names.
    """
    cfg = cfg or RetrieverConfig()
    return RETRIEVERS.get(cfg.name)().from_config(cfg)


def save_retriever(retriever: Any, directory: str | Path) -> Path:
    """Save any registered retriever to ``directory`` (same as ``retriever.save(directory)``)."""
    if not isinstance(retriever, Retriever):
        raise TypeError(f"{type(retriever).__name__} is not a retriever (needs index/search/save)")
    return retriever.save(directory)


def load_retriever(directory: str | Path, **kwargs: Any) -> Any:
    """Load the retriever saved in ``directory``, whatever its kind.

    Args:
        directory: An index directory written by ``save``.
        **kwargs: Passed to the retriever's ``load`` (e.g. ``encoder=`` for dense and hybrid).

    Raises:
        IndexFormatError: Not an index directory, another format version, or another encoder.
    """
    meta = read_meta(directory)
    if meta["kind"] not in RETRIEVERS:
        raise IndexFormatError(
            f"{directory}: unknown retriever kind {meta['kind']!r}; "
            f"choose one of: {', '.join(RETRIEVERS.names())}"
        )
    return RETRIEVERS.get(meta["kind"])().load(directory, **kwargs)
