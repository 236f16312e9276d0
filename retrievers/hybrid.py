"""Hybrid retrieval: BM25 and dense lists fused by reciprocal rank or by weighted normalised scores.

The fusion functions are pure and work on ranked lists of ``(id, score)`` pairs (or :class:`Hit`), so
they can be checked on tiny inputs. Ties in the fused score are broken by id (ascending), so the
output order is fully determined by the inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from retrievers.base import check_queries, read_meta, seal_index, verify_index, write_meta
from retrievers.bm25 import BM25Retriever
from retrievers.config import RetrieverConfig
from retrievers.dense import DenseRetriever
from retrievers.records import Hit, Passage

__all__ = ["FUSIONS", "HybridRetriever", "rrf_fuse", "weighted_fuse"]

logger = logging.getLogger(__name__)

FUSIONS = ("rrf", "weighted")

RankedInput = Sequence[Hit | tuple[str, float]]


def _pairs(ranked: RankedInput, which: int) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for item in ranked:
        pid, score = (
            (item.passage.id, item.score) if isinstance(item, Hit) else (str(item[0]), float(item[1]))
        )
        if pid in seen:
            raise ValueError(
                f"list {which} holds id {pid!r} twice; each input list must rank an id at most once"
            )
        seen.add(pid)
        out.append((pid, score))
    return out


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} lists; give one weight per list")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0, got {list(weights)}")
    return [float(w) for w in weights]


def _sorted(scores: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def rrf_fuse(
    lists: Sequence[RankedInput], k: int = 60, weights: Sequence[float] | None = None
) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion (Cormack et al. 2009): ``score(d) = sum_i w_i / (k + rank_i(d))``.

    Args:
        lists: Ranked lists, best first, of ``(id, score)`` pairs or hits; only the order is used.
        k: The RRF constant (larger = flatter).
        weights: One weight per list; None = all 1.

    Returns:
        ``(id, fused score)`` for every id in any list, best first, ties broken by id.
    """
    if k < 0:
        raise ValueError(f"rrf k must be >= 0, got {k}")
    ws = _weights(weights, len(lists))
    fused: dict[str, float] = {}
    for i, (ranked, w) in enumerate(zip(lists, ws, strict=True)):
        for rank, (pid, _) in enumerate(_pairs(ranked, i), 1):
            fused[pid] = fused.get(pid, 0.0) + w / (k + rank)
    return _sorted(fused)


def weighted_fuse(
    lists: Sequence[RankedInput], weights: Sequence[float] | None = None
) -> list[tuple[str, float]]:
    """Weighted sum of min-max normalised scores.

    ``score(d) = sum_i w_i * (s_i(d) - min_i) / (max_i - min_i)``.

    An id missing from a list gets 0 from it (the list's minimum). A list whose scores are all equal
    gives each of its ids 1.

    Args:
        lists: Ranked lists of ``(id, score)`` pairs or hits.
        weights: One weight per list; None = all 1.

    Returns:
        ``(id, fused score)`` for every id in any list, best first, ties broken by id.
    """
    ws = _weights(weights, len(lists))
    fused: dict[str, float] = {}
    for i, (ranked, w) in enumerate(zip(lists, ws, strict=True)):
        pairs = _pairs(ranked, i)
        if not pairs:
            continue
        lo = min(s for _, s in pairs)
        hi = max(s for _, s in pairs)
        for pid, s in pairs:
            norm = (s - lo) / (hi - lo) if hi > lo else 1.0
            fused[pid] = fused.get(pid, 0.0) + w * norm
    return _sorted(fused)


class HybridRetriever:
    """BM25 and dense retrieval, each to ``depth``, fused into one list.

    Args:
        bm25: A BM25 retriever (indexed or not).
        dense: A dense retriever over the same passages (indexed or not).
        fusion: ``rrf`` or ``weighted``.
        rrf_k: The RRF constant.
        weights: Weights of the (BM25, dense) lists in either fusion.
        depth: Hits taken from each list before fusing.
    """

    kind = "hybrid"

    def __init__(
        self,
        bm25: BM25Retriever | None = None,
        dense: DenseRetriever | None = None,
        fusion: str = "rrf",
        rrf_k: int = 60,
        weights: tuple[float, float] = (0.5, 0.5),
        depth: int = 100,
    ) -> None:
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of: {', '.join(FUSIONS)}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.bm25 = bm25 if bm25 is not None else BM25Retriever()
        self.dense = dense if dense is not None else DenseRetriever()
        self.fusion = fusion
        self.rrf_k = int(rrf_k)
        self.weights = (float(weights[0]), float(weights[1]))
        _weights(self.weights, 2)
        self.depth = int(depth)
        if len(self.bm25) and len(self.dense):
            self._check_same_passages()

    @classmethod
    def from_config(cls, cfg: RetrieverConfig) -> HybridRetriever:
        """Create an empty hybrid retriever (both components) from ``cfg``."""
        return cls(
            bm25=BM25Retriever.from_config(cfg),
            dense=DenseRetriever.from_config(cfg),
            fusion=cfg.fusion,
            rrf_k=cfg.rrf_k,
            weights=cfg.weights,
            depth=cfg.depth,
        )

    def __repr__(self) -> str:
        return f"HybridRetriever(fusion={self.fusion!r}, {self.bm25!r}, {self.dense!r})"

    def __len__(self) -> int:
        return len(self.bm25)

    @property
    def passages(self) -> list[Passage]:
        return self.bm25.passages

    def _check_same_passages(self) -> None:
        if [p.id for p in self.bm25.passages] != [p.id for p in self.dense.passages]:
            raise ValueError(
                "the BM25 and dense retrievers index different passages; index both on the same list"
            )

    def index(self, passages: Sequence[Passage], show_progress: bool = True) -> None:
        """Index ``passages`` in both components."""
        self.bm25.index(passages, show_progress=show_progress)
        self.dense.index(passages, show_progress=show_progress)

    def fuse(self, bm25_hits: Sequence[Hit], dense_hits: Sequence[Hit], k: int) -> list[Hit]:
        """Fuse one query's component lists with this retriever's settings; return the best ``k``."""
        lists = [bm25_hits, dense_hits]
        if self.fusion == "rrf":
            fused = rrf_fuse(lists, k=self.rrf_k, weights=self.weights)
        else:
            fused = weighted_fuse(lists, weights=self.weights)
        by_id = {h.passage.id: h.passage for hits in lists for h in hits}
        cosine = {h.passage.id: h.score for h in dense_hits}
        return [
            Hit(passage=by_id[pid], score=s, rank=r, signals={"dense": cosine[pid]} if pid in cosine else {})
            for r, (pid, s) in enumerate(fused[:k], 1)
        ]

    def search(self, query: str, k: int = 10) -> list[Hit]:
        """Return the ``k`` best fused passages for ``query``."""
        return self.search_batch([query], k)[0]

    def search_batch(
        self, queries: Sequence[str], k: int = 10, show_progress: bool = False
    ) -> list[list[Hit]]:
        """Search both components to ``max(depth, k)`` and fuse each query's lists."""
        queries = check_queries(queries)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        depth = max(self.depth, k)
        sparse = self.bm25.search_batch(queries, depth, show_progress=show_progress)
        dense = self.dense.search_batch(queries, depth, show_progress=show_progress)
        pairs = zip(sparse, dense, strict=True)
        return [
            self.fuse(s, d, k)
            for s, d in tqdm(pairs, total=len(queries), disable=not show_progress, leave=False)
        ]

    def save(self, directory: str | Path) -> Path:
        """Write ``meta.json`` and the two component indexes in ``bm25/`` and ``dense/``."""
        self._check_same_passages()
        directory = write_meta(
            directory,
            self.kind,
            fusion=self.fusion,
            rrf_k=self.rrf_k,
            weights=list(self.weights),
            depth=self.depth,
            n_passages=len(self),
        )
        self.bm25.save(directory / "bm25")
        self.dense.save(directory / "dense")
        seal_index(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path, encoder: Any = None) -> HybridRetriever:
        """Load an index written by :meth:`save` (``encoder`` as in :meth:`DenseRetriever.load`)."""
        directory = Path(directory)
        meta = read_meta(directory, kind=cls.kind)
        verify_index(directory, meta)
        return cls(
            bm25=BM25Retriever.load(directory / "bm25"),
            dense=DenseRetriever.load(directory / "dense", encoder=encoder),
            fusion=meta["fusion"],
            rrf_k=meta["rrf_k"],
            weights=tuple(meta["weights"]),
            depth=meta["depth"],
        )
