"""Controls every reranking figure is read against: ``identity`` keeps the first-stage order, ``shuffle``
is a seeded random order per query (the floor every reranker must clear). Neither needs a model."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from rerank.engines.base import (
    PROBE_ENGINES,
    Candidate,
    _Baseline,
    _Scores,
    as_query,
    check_top_k,
    split_candidates,
)
from rerank.records import Passage, Query, RankedList, ScoredPassage

logger = logging.getLogger(__name__)

@PROBE_ENGINES.register("identity")
class IdentityReranker:
    """Keeps the first-stage order (a control)."""

    needs_model = False

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def rerank(
        self, query: str | Query, passages: Sequence[Candidate], top_k: int | None = None
    ) -> RankedList:
        t0 = time.perf_counter()
        top_k = check_top_k(top_k)
        q = as_query(query)
        ps, fs = split_candidates(passages)
        n = len(ps)
        items = tuple(
            ScoredPassage(
                passage=p, score=float(n - i), rank=i + 1, first_stage_score=None if fs is None else fs[i]
            )
            for i, p in enumerate(ps)
        )
        info = {"seconds": time.perf_counter() - t0}
        return RankedList(query=q, items=items[:top_k], info=info)

    def rerank_batch(
        self,
        queries: Sequence[str | Query],
        lists: Sequence[Sequence[Candidate]],
        top_k: int | None = None,
        show_progress: bool = False,
    ) -> list[RankedList]:
        return [self.rerank(q, c, top_k=top_k) for q, c in zip(queries, lists, strict=True)]





@PROBE_ENGINES.register("shuffle")
class ShuffleReranker(_Baseline):
    """A random order, the same for the same query text and seed (a control; needs no model).

    Options:
        seed: Mixed with the query text into the random generator's seed.
    """

    name = "shuffle"
    options: ClassVar[dict[str, Any]] = {"seed": 0}
    needs_model = False

    def _configure(self) -> None:
        self.seed = self._int_option("seed", 0)

    def _score(self, query: str, passages: list[Passage]) -> _Scores:
        # A hash, not Python's hash(): stable across processes (PYTHONHASHSEED) and machines.
        digest = hashlib.sha256(f"{self.seed}\x00{query}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        n = len(passages)
        perm = rng.permutation(n)  # rank -> candidate index
        score = np.empty(n)
        score[perm] = np.arange(n, 0, -1, dtype=np.float64)
        return _Scores(score, {"seed": self.seed})

    def _empty_info(self) -> dict[str, Any]:
        return {"seed": self.seed}
