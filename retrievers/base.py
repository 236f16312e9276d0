"""What every retriever shares: the index directory format (``meta.json``, ``passages.jsonl``), the
base class and query checks. The registry, build, save and load live in :mod:`retrievers.index`.

An index directory holds ``meta.json`` (``format_version``, ``kind`` and the retriever's settings),
``passages.jsonl`` and the backend's own files (``faiss.index``, ``tokens.npz``, ``bm25s/``, ...).
Nothing is pickled. Loading a directory written with another ``format_version``, by another kind of
retriever, or (dense) with another encoder, raises :class:`IndexFormatError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from retrievers.records import Hit, Passage

__all__ = [
    "FORMAT_VERSION",
    "BaseRetriever",
    "IndexFormatError",
    "Retriever",
    "check_queries",
    "cpu_has_native_bf16",
    "indexed_text",
    "load_passages",
    "read_meta",
    "save_passages",
    "load_guarded",
    "seal_index",
    "verify_index",
    "write_meta",
]

logger = logging.getLogger(__name__)

#: Bump when the layout of an index directory changes; older directories are then refused on load.
FORMAT_VERSION = 1
META_FILE = "meta.json"
PASSAGES_FILE = "passages.jsonl"


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16 (bf16 matmuls then run ~3x faster than fp32).
    Shared by the dense encoder and the reranker's model loader."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class IndexFormatError(ValueError):
    """An index directory is missing, incomplete, of another format version, or built differently."""


@runtime_checkable
class Retriever(Protocol):
    """What every registered retriever provides."""

    kind: str

    def index(self, passages: Sequence[Passage], show_progress: bool = True) -> None: ...

    def search(self, query: str, k: int = 10) -> list[Hit]: ...

    def search_batch(
        self, queries: Sequence[str], k: int = 10, show_progress: bool = False
    ) -> list[list[Hit]]: ...

    def save(self, directory: str | Path) -> Path: ...


def indexed_text(passage: Passage) -> str:
    """The text a retriever indexes for ``passage``: the title (when there is one), then the text."""
    return f"{passage.title} {passage.text}" if passage.title else passage.text


# --------------------------------------------------------------------------------------------------
# Metadata and passages on disk
# --------------------------------------------------------------------------------------------------


def write_meta(directory: str | Path, kind: str, **fields: Any) -> Path:
    """Create ``directory`` and write its ``meta.json`` with ``format_version`` and ``kind``.

    Returns:
        The directory as a :class:`Path`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "kind": kind, **fields}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    return directory


def read_meta(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read and check ``meta.json`` of an index directory.

    Args:
        directory: The index directory.
        kind: The retriever kind expected there; None accepts any.

    Raises:
        IndexFormatError: No index there, unreadable metadata, another format version or kind.
    """
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise IndexFormatError(
            f"{directory} is not an index directory (no {META_FILE}); build one with "
            "build_retriever(cfg).index(passages) and save it with .save(directory)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{path}: not valid JSON ({exc}); rebuild the index") from exc
    if not isinstance(meta, dict) or "format_version" not in meta or "kind" not in meta:
        raise IndexFormatError(f"{path}: needs the keys 'format_version' and 'kind'; rebuild the index")
    if meta["format_version"] != FORMAT_VERSION:
        raise IndexFormatError(
            f"{directory}: index format_version {meta['format_version']!r}, but this code reads version "
            f"{FORMAT_VERSION}; rebuild the index with this version of the code"
        )
    if kind is not None and meta["kind"] != kind:
        raise IndexFormatError(
            f"{directory} holds a '{meta['kind']}' index, not a '{kind}' index; "
            f"load it with load_retriever() or the {meta['kind']} retriever's load()"
        )
    return meta


def save_passages(directory: Path, passages: Sequence[Passage]) -> None:
    """Write the indexed passages, in index order, as JSON lines."""
    with (directory / PASSAGES_FILE).open("w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps(p.model_dump(), ensure_ascii=False) + "\n")


def load_passages(directory: Path, expected: int | None = None) -> list[Passage]:
    """Read the passages written by :func:`save_passages`.

    Raises:
        IndexFormatError: The file is missing or its count differs from ``expected``.
    """
    path = directory / PASSAGES_FILE
    if not path.is_file():
        raise IndexFormatError(
            f"{directory}: {PASSAGES_FILE} is missing; the index is incomplete, rebuild it"
        )
    with path.open(encoding="utf-8") as f:
        passages = [Passage.model_validate_json(line) for line in f if line.strip()]
    if expected is not None and len(passages) != expected:
        raise IndexFormatError(
            f"{path}: {len(passages)} passages, but meta.json says {expected}; "
            "the index is incomplete, rebuild it"
        )
    return passages


# --------------------------------------------------------------------------------------------------
# Shared behaviour of the retrievers
# --------------------------------------------------------------------------------------------------


class BaseRetriever:
    """Passage bookkeeping, deterministic top-k selection and batch search shared by the retrievers."""

    kind = "base"

    def __init__(self) -> None:
        self._passages: list[Passage] = []
        # Position of each passage's id in sorted id order: ties in score are broken by id.
        self._id_rank: np.ndarray = np.zeros(0, dtype=np.int64)

    @property
    def passages(self) -> list[Passage]:
        """The indexed passages, in index order (a copy of the list; the passages are frozen)."""
        return list(self._passages)

    def __len__(self) -> int:
        return len(self._passages)

    def _set_passages(self, passages: Sequence[Passage]) -> None:
        passages = list(passages)
        if not passages:
            raise ValueError("cannot index an empty passage list; pass at least one Passage")
        for i, p in enumerate(passages):
            if not isinstance(p, Passage):
                raise TypeError(
                    f"passage {i} is a {type(p).__name__}, not a retrievers.Passage; "
                    "load files with retrievers.load_corpus()"
                )
        seen: set[str] = set()
        for p in passages:
            if p.id in seen:
                raise ValueError(f"duplicate passage id {p.id!r}; passage ids must be unique")
            seen.add(p.id)
        self._passages = passages
        order = sorted(range(len(passages)), key=lambda i: passages[i].id)
        self._id_rank = np.empty(len(passages), dtype=np.int64)
        self._id_rank[order] = np.arange(len(passages))

    def _check_ready(self) -> None:
        if not self._passages:
            raise RuntimeError(
                f"the {self.kind} retriever has no index; call .index(passages) or .load(dir) first"
            )

    @staticmethod
    def _check_k(k: int) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")

    def _top_k(self, scores: np.ndarray, k: int, positive_only: bool) -> list[Hit]:
        """Hits for the ``k`` best of ``scores`` (one per passage), ties broken by passage id.

        All passages tied with the k-th best score are considered, so the result does not depend on
        how ``argpartition`` happens to split a tie.
        """
        valid = scores > 0 if positive_only else np.isfinite(scores)
        cand = np.flatnonzero(valid)
        if len(cand) > k:
            kth = np.partition(scores[cand], len(cand) - k)[len(cand) - k]
            cand = cand[scores[cand] >= kth]
        order = np.lexsort((self._id_rank[cand], -scores[cand]))[:k]
        sel = cand[order]
        return [Hit(passage=self._passages[i], score=float(scores[i]), rank=r) for r, i in enumerate(sel, 1)]

    def search(self, query: str, k: int = 10) -> list[Hit]:
        """Return the ``k`` best passages for ``query``, best first."""
        return self.search_batch([query], k)[0]

    def search_batch(
        self, queries: Sequence[str], k: int = 10, show_progress: bool = False
    ) -> list[list[Hit]]:
        raise NotImplementedError


def check_queries(queries: Iterable[str]) -> list[str]:
    """Return ``queries`` as a list, refusing a bare string (a common slip) and non-strings."""
    if isinstance(queries, str):
        raise TypeError(
            "search_batch() takes a list of queries, got a single string; use search(query) instead"
        )
    queries = list(queries)
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise TypeError(f"query {i} is a {type(q).__name__}, not a str")
    return queries


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
