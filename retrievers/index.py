"""The retriever registry, and building, saving and loading a retriever by name.

The registry maps a name to a *zero-argument function returning the retriever class*, so that
registering does not import the backend (and its heavy dependencies) before it is used::

    RETRIEVERS.register("mine")(lambda: MyRetriever)

The index directory format and the shared base class are in :mod:`retrievers.base` (re-exported here).
"""

from __future__ import annotations

import hashlib
import json
import os
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
# Integrity: every file's size and SHA-256 in meta.json, checked before anything is loaded
# --------------------------------------------------------------------------------------------------

FILES_KEY = "files"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _index_files(directory: Path) -> list[Path]:
    """Every file of the index directory but its own ``meta.json``, in a fixed order."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / META_FILE)


def seal_index(directory: str | Path) -> None:
    """Record the size and SHA-256 of every file under ``directory`` in its ``meta.json`` (the last step
    of every ``save``): a file swapped, truncated or edited afterwards is refused by :func:`verify_index`.
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta[FILES_KEY] = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in _index_files(directory)
    }
    tmp = meta_path.with_name(META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, meta_path)


def verify_index(directory: str | Path, meta: dict[str, Any]) -> None:
    """Check every file recorded by :func:`seal_index` against its size and SHA-256.

    Raises:
        IndexFormatError: No record (an index saved by an older version, or a save that did not finish),
            or a file that is missing, of another size or with other contents; the message names it.
    """
    directory = Path(directory)
    files = meta.get(FILES_KEY)
    if not isinstance(files, dict) or not files:
        raise IndexFormatError(
            f"{directory / META_FILE}: no '{FILES_KEY}' record of the index's files (saved by an older "
            "version, or its save did not finish); rebuild the index"
        )
    for rel, want in sorted(files.items()):
        path = directory / rel
        if (
            not isinstance(want, dict)
            or not isinstance(want.get("bytes"), int)
            or not isinstance(want.get("sha256"), str)
            or Path(rel).is_absolute()
            or ".." in Path(rel).parts
        ):
            raise IndexFormatError(
                f"{directory / META_FILE}: bad '{FILES_KEY}' entry {rel!r}; rebuild the index"
            )
        if not path.is_file():
            raise IndexFormatError(f"{path} is missing; the index is incomplete, rebuild it")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise IndexFormatError(
                f"{path} is {size} bytes, but meta.json records {want['bytes']}: the file was truncated "
                "or replaced after the index was saved; rebuild the index"
            )
        if _sha256(path) != want["sha256"]:
            raise IndexFormatError(
                f"{path} does not match the SHA-256 recorded in meta.json: the file was changed or "
                "replaced (e.g. by another corpus's) after the index was saved; rebuild the index"
            )


def load_guarded(directory: str | Path, what: str, fn: Callable[[], Any]) -> Any:
    """Run a backend's loading step, turning its own errors on a corrupt file into IndexFormatError."""
    try:
        return fn()
    except IndexFormatError:
        raise
    except (ValueError, RuntimeError, OSError, KeyError, TypeError, EOFError) as exc:
        raise IndexFormatError(
            f"{Path(directory)}: cannot read {what} ({type(exc).__name__}: {exc}); rebuild the index"
        ) from exc

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
