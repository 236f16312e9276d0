"""Suite ``retrieval``: first-stage retrievers on BEIR SciFact (test split, 300 claims, 5,183 abstracts).

Systems: ``bm25-rank_bm25``, ``bm25-bm25s`` (same tokens, same Lucene BM25 variant), ``dense``
(all-MiniLM-L6-v2 + FAISS), ``hybrid-rrf`` and ``hybrid-weighted`` (BM25s + dense, each to ``depth``).
Passages are indexed as title + text. Metrics: ``ndcg@10``, ``recall@100``, ``mrr@10``,
``seconds_per_query`` (batch search time / queries, query encoding included), ``index_build_seconds``
and ``peak_rss_mb`` (see :class:`eval.common.RssPeak`). The hybrids reuse the BM25s and dense indexes,
so their build time is the sum of those two.

``--quick``: the first ``queries`` test claims (default 20) over a reduced corpus: every abstract
judged for those claims plus ``distractors`` (default 200) others drawn with ``seed``. Its figures
are a smoke test, not comparable with published SciFact numbers.

Dense encoding: ``dense`` (and the hybrids) encode in ``RetrieverConfig.encoder_dtype`` (``auto``: bf16
autocast on a CPU with native bf16, else float32; ``config.dense.encoder_dtype`` says which ran). With
``compare_dtypes=1`` (default) the other dtype is run too, on the same passages in the same process,
as ``dense-float32`` or ``dense-bfloat16``; both carry ``passages_per_second`` (the index build), and
``dense`` gets ``build_speedup_vs_<other>`` and ``ndcg@10_minus_<other>``.

Options (``--opt key=value``): queries, distractors, seed, k1, b, index_type, batch_size, rrf_k,
weights (``0.5,0.5``), depth, compare_dtypes. Defaults are :class:`RetrieverConfig`'s; nothing is tuned on
test queries.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from typing import Any

from eval.common import RssPeak, check_opts, get_opt, ir_metrics, quick_corpus, require_data
from retrievers.config import RetrieverConfig
from retrievers.corpus import load_corpus, load_qrels, load_queries
from retrievers.records import Hit, Passage

logger = logging.getLogger(__name__)

DATASET = "beir-scifact"
MEASURES = ("ndcg@10", "recall@100", "mrr@10")
RUN_DEPTH = 100


def _run(qids: list[str], results: list[list[Hit]]) -> dict[str, dict[str, float]]:
    # Rank-derived scores: trec_eval would otherwise reorder score ties by doc id.
    return {q: {h.passage.id: 1.0 / h.rank for h in hits} for q, hits in zip(qids, results, strict=True)}


def _measure(
    retriever: Any, passages: list[Passage] | None, queries: list[str]
) -> tuple[list[list[Hit]], dict]:
    """Index (when ``passages`` is given) and search; return hits and timing/memory figures."""
    with RssPeak() as mem:
        build = 0.0
        if passages is not None:
            t0 = time.perf_counter()
            retriever.index(passages, show_progress=True)
            build = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = retriever.search_batch(queries, RUN_DEPTH, show_progress=True)
        search = time.perf_counter() - t0
    return results, {
        "seconds_per_query": round(search / len(queries), 6),
        "index_build_seconds": round(build, 3),
        "peak_rss_mb": round(mem.mb, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the suite; returns ``{"dataset", "config", "systems"}`` (see the module docstring)."""
    from retrievers.bm25 import BM25Retriever, tokenizer_info
    from retrievers.dense import DenseRetriever
    from retrievers.hybrid import HybridRetriever

    defaults = RetrieverConfig()
    opts = args.opts
    check_opts(
        opts,
        [
            "queries",
            "distractors",
            "seed",
            "k1",
            "b",
            "index_type",
            "batch_size",
            "rrf_k",
            "weights",
            "depth",
            "compare_dtypes",
        ],
    )
    k1 = get_opt(opts, "k1", defaults.bm25_k1)
    b = get_opt(opts, "b", defaults.bm25_b)
    index_type = get_opt(opts, "index_type", defaults.faiss_index)
    batch_size = get_opt(opts, "batch_size", defaults.batch_size)
    rrf_k = get_opt(opts, "rrf_k", defaults.rrf_k)
    weights = get_opt(opts, "weights", tuple(defaults.weights))
    depth = get_opt(opts, "depth", defaults.depth)

    root = require_data(args.data_dir, DATASET)
    corpus = load_corpus(root)
    queries = load_queries(root, split="test")
    qrels = load_qrels(root, split="test")
    qids = [q for q in queries if q in qrels]
    corpus_note = f"full corpus ({len(corpus)} abstracts)"
    if args.quick:
        n_q = get_opt(opts, "queries", 20)
        n_distract = get_opt(opts, "distractors", 200)
        seed = get_opt(opts, "seed", 0)
        qids = qids[:n_q]
        corpus, corpus_note = quick_corpus(corpus, qids, qrels, n_distract, seed)
    texts = [queries[q] for q in qids]
    logger.info("SciFact: %d queries, %d passages", len(qids), len(corpus))

    systems: dict[str, dict[str, Any]] = {}
    hits: dict[str, list[list[Hit]]] = {}

    def record(name: str, results: list[list[Hit]], figures: dict[str, float]) -> None:
        metrics = ir_metrics(qrels, _run(qids, results), MEASURES)
        systems[name] = {**{m: round(v, 4) for m, v in metrics.items()}, **figures}
        hits[name] = results
        logger.info("%s: %s", name, systems[name])
        print(f"{name:>16}: " + ", ".join(f"{k}={v:.4g}" for k, v in systems[name].items()), flush=True)

    rank_bm25 = BM25Retriever("rank_bm25", k1=k1, b=b)
    record("bm25-rank_bm25", *_measure(rank_bm25, corpus, texts))
    del rank_bm25
    gc.collect()

    bm25s = BM25Retriever("bm25s", k1=k1, b=b)
    record("bm25-bm25s", *_measure(bm25s, corpus, texts))
    ref, fast = systems["bm25-rank_bm25"], systems["bm25-bm25s"]
    fast["qps_ratio_bm25s_vs_rank_bm25"] = round(ref["seconds_per_query"] / fast["seconds_per_query"], 2)
    same = sum(
        [h.passage.id for h in x] == [h.passage.id for h in y]
        for x, y in zip(hits["bm25-rank_bm25"], hits["bm25-bm25s"], strict=True)
    )
    fast["top100_identical_to_rank_bm25"] = round(same / len(qids), 4)

    dense = DenseRetriever(
        defaults.encoder, index_type=index_type, batch_size=batch_size, dtype=defaults.encoder_dtype
    )
    _ = dense.encoder  # load the model before the clock starts: loading is not index building
    record("dense", *_measure(dense, corpus, texts))
    systems["dense"]["passages_per_second"] = round(len(corpus) / systems["dense"]["index_build_seconds"], 1)
    if get_opt(opts, "compare_dtypes", 1):
        other = "float32" if dense.dtype == "bfloat16" else "bfloat16"
        twin = DenseRetriever(defaults.encoder, index_type=index_type, batch_size=batch_size, dtype=other)
        name = f"dense-{other}"
        record(name, *_measure(twin, corpus, texts))
        fig = systems[name]
        fig["passages_per_second"] = round(len(corpus) / fig["index_build_seconds"], 1)
        systems["dense"][f"build_speedup_vs_{other}"] = round(
            fig["index_build_seconds"] / systems["dense"]["index_build_seconds"], 3
        )
        systems["dense"][f"ndcg@10_minus_{other}"] = round(
            systems["dense"]["ndcg@10"] - fig["ndcg@10"], 4
        )
        del twin
        gc.collect()

    for fusion in ("rrf", "weighted"):
        hybrid = HybridRetriever(bm25s, dense, fusion=fusion, rrf_k=rrf_k, weights=weights, depth=depth)
        results, figures = _measure(hybrid, None, texts)
        figures["index_build_seconds"] = round(
            systems["bm25-bm25s"]["index_build_seconds"] + systems["dense"]["index_build_seconds"], 3
        )
        record(f"hybrid-{fusion}", results, figures)

    config = {
        "split": "test",
        "n_queries": len(qids),
        "n_passages": len(corpus),
        "corpus": corpus_note,
        "indexed_text": "title + ' ' + text",
        "run_depth": RUN_DEPTH,
        "bm25": {"k1": k1, "b": b, "variant": "lucene", "tokenizer": tokenizer_info()},
        "dense": {
            "encoder": dense.identity,
            "encoder_dtype": dense.dtype,
            "faiss_index": index_type,
            "batch_size": batch_size,
        },
        "hybrid": {"bm25_backend": "bm25s", "rrf_k": rrf_k, "weights": list(weights), "depth": depth},
        "tuning": "none: RetrieverConfig defaults (k1=0.9, b=0.4 as in Anserini; rrf_k=60; weights 0.5/0.5)",
        "seconds_per_query": "one search_batch over all queries (top-100) divided by the query count",
        "peak_rss_mb": "peak process RSS while the system was built and searched (psutil sampled every "
        "10 ms); includes everything loaded earlier in the same process",
    }
    return {"dataset": DATASET, "config": config, "systems": systems}
