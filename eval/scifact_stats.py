"""Probe passes over BEIR SciFact's BM25 top-20: the data on which probe heads and weights are chosen.

SciFact is never a reported reranking figure; choosing on it keeps DL19 (the reported figure) clean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.common import REPO_ROOT, require_data

DEPTH = 20
MAX_TOKENS = 120


def scifact_windows(data_dir: Path, n_queries: int) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """The first ``n_queries`` test queries with judgements, with BM25 (bm25s) top-20 candidates."""
    from retrievers.bm25 import BM25Retriever
    from retrievers.corpus import load_corpus, load_qrels, load_queries

    root = require_data(data_dir, "beir-scifact")
    corpus = load_corpus(root)
    queries = load_queries(root)
    qrels = load_qrels(root)
    bm25 = BM25Retriever(backend="bm25s")
    bm25.index(corpus, show_progress=False)
    qids = [q for q in queries if q in qrels][:n_queries]
    hits = bm25.search_batch([queries[q] for q in qids], k=DEPTH)
    out = []
    for qid, hs in zip(qids, hits, strict=True):
        out.append(
            {
                "qid": qid,
                "query": queries[qid],
                "passages": [h.passage for h in hs],
                "bm25": [h.score for h in hs],
            }
        )
    return out, qrels


def collect_scifact(
    model: Any, data_dir: Path, n_queries: int = 150, max_passage_tokens: int = MAX_TOKENS
) -> tuple[list[dict[str, Any]], Any, Any]:
    from eval.probe_stats import ProbeJob, collect

    queries, qrels = scifact_windows(data_dir, n_queries)
    jobs = [ProbeJob(f"{q['qid']}:0", q["query"], tuple(q["passages"][::-1])) for q in queries]
    stats, _ = collect(
        model,
        jobs,
        cache_dir=REPO_ROOT / "results" / "cache" / "scifact",
        max_passage_tokens=max_passage_tokens,
        desc="scifact",
    )
    return queries, qrels, stats
