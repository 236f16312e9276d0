"""Probe passes over BEIR SciFact's top-20: the data on which probe heads and weights are chosen.

SciFact is never a reported reranking figure; choosing on it keeps DL19 (the reported figure) clean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.common import REPO_ROOT, quick_corpus, require_data

DEPTH = 20
MAX_TOKENS = 120
FIRST_STAGES = ("bm25", "hybrid")


def scifact_windows(
    data_dir: Path,
    n_queries: int,
    first_stage: str = "bm25",
    retriever: Any = None,
    distractors: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """The first ``n_queries`` test queries with judgements, with their first stage's top-20.

    Args:
        first_stage: ``bm25`` (bm25s with its defaults: the lists heads are chosen on) or ``hybrid``
            (the pipeline's first stage: BM25 and the dense encoder fused, from ``retriever``).
        retriever: The :class:`~retrievers.config.RetrieverConfig` of ``hybrid`` (default: its defaults).
        distractors: None searches the whole corpus; a number searches a smoke-test subset: the abstracts
            judged for the queries plus that many others (see :func:`eval.common.quick_corpus`).

    Each query holds ``passages`` and their ``first_stage`` scores, best first.
    """
    from retrievers.bm25 import BM25Retriever
    from retrievers.config import RetrieverConfig
    from retrievers.corpus import load_corpus, load_qrels, load_queries
    from retrievers.index import build_retriever

    if first_stage not in FIRST_STAGES:
        raise ValueError(f"unknown first stage {first_stage!r}; choose one of: {', '.join(FIRST_STAGES)}")
    root = require_data(data_dir, "beir-scifact")
    corpus = load_corpus(root)
    queries = load_queries(root)
    qrels = load_qrels(root)
    qids = [q for q in queries if q in qrels][:n_queries]
    if distractors is not None:
        corpus, _ = quick_corpus(corpus, qids, qrels, distractors, seed=0)
    if first_stage == "bm25":
        ret: Any = BM25Retriever(backend="bm25s")
    else:
        ret = build_retriever((retriever or RetrieverConfig()).model_copy(update={"name": "hybrid"}))
    ret.index(corpus, show_progress=first_stage != "bm25")
    hits = ret.search_batch([queries[q] for q in qids], k=DEPTH)
    out = []
    for qid, hs in zip(qids, hits, strict=True):
        out.append(
            {
                "qid": qid,
                "query": queries[qid],
                "passages": [h.passage for h in hs],
                "first_stage": [h.score for h in hs],
            }
        )
    return out, qrels


def collect_scifact(
    model: Any,
    data_dir: Path,
    n_queries: int = 150,
    max_passage_tokens: int = MAX_TOKENS,
    first_stage: str = "bm25",
    retriever: Any = None,
    distractors: int | None = None,
) -> tuple[list[dict[str, Any]], Any, Any]:
    """Probe passes (all layers, ``N/A`` pass) over each query's top-20, best first-stage passage last."""
    queries, qrels = scifact_windows(data_dir, n_queries, first_stage, retriever, distractors)
    return queries, qrels, scifact_passes(model, queries, max_passage_tokens, desc=f"scifact/{first_stage}")


def scifact_passes(
    model: Any,
    queries: list[dict[str, Any]],
    max_passage_tokens: int = MAX_TOKENS,
    order: str = "reversed",
    last_layer: int | None = None,
    desc: str = "scifact",
) -> Any:
    """Probe passes (with the ``N/A`` pass) over each query's ``passages``, keyed ``qid:0``.

    Args:
        order: Prompt order: ``reversed`` (best first-stage passage last, as the heads are chosen) or
            ``retriever``.
        last_layer: The passes stop after this layer (default: all layers).
    """
    from rerank.engines.base import prompt_slots
    from rerank.fitting import ProbeJob, collect

    jobs = [
        ProbeJob(
            f"{q['qid']}:0",
            q["query"],
            tuple(q["passages"][c] for c in prompt_slots(len(q["passages"]), order)),
        )
        for q in queries
    ]
    stats, _ = collect(
        model,
        jobs,
        cache_dir=REPO_ROOT / "results" / "cache" / "scifact",
        max_passage_tokens=max_passage_tokens,
        last_layer=last_layer,
        desc=desc,
    )
    return stats
