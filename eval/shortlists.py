"""Suite ``shortlists``: does the bias correction hold on the short lists RAG callers send?

Every other quality figure uses 20-passage windows. Here the shipped default and its variants rerank
lists of 3, 5 and 10 passages, the probe alone (``first_stage_weight: 0``: the fusion would hide what the
probe does with positions):

* NQ-open, the gold passage among its hard distractors, moved over every slot of an ``n``-passage list
  (3 and 5 by default):
  gold recall@1 and its spread over slot bins (the position sweep at other lengths). ``split=dev``
  (default) reads the dev lists shipped with the package, where variants are chosen; ``split=test``
  the 300 test questions, where a chosen variant is reported.
* TREC DL19, BM25's top-5 in each of its 5 rotations: the share of queries whose top passage is the
  same under every rotation (``rotation_stable``), how often the top passage came from the first or the
  last input slot, and nDCG@5 of the unrotated list. Rotating the input moves every passage to
  another prompt slot: a reranker that reads relevance gives one answer.

Systems: ``default`` (the shipped reading: two prompt orders), ``rotations`` (windows of up to 5
passages read in all their cyclic rotations, ``probe.rotations_up_to: 5``), the controls ``in-list-bm25``
(NQ) and ``bm25`` (DL19, the given order), each with ``prefills_per_list``.

Options (``--opt``): ``questions=N`` NQ questions (default 50; quick 4), ``lengths=3,5``,
``split=dev|test``, ``dl19_queries=N`` (default 43; quick 3), ``systems=default,rotations``,
``passage_max_tokens=N`` (default the config's; quick 32).
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

import numpy as np

from eval.common import check_opts, get_opt, ir_metrics, with_passage_tokens

VARIANTS = {"default": {}, "rotations": {"rotations_up_to": 5}}


def _bins(per_slot: np.ndarray, bins: int = 5) -> float:
    """Max minus min of recall@1 over up to ``bins`` contiguous slot bins (the sweep's bin spread)."""
    groups = np.array_split(per_slot, min(bins, len(per_slot)))
    means = [g.mean() for g in groups if len(g)]
    return float(max(means) - min(means))


def _nq_sweep(rr: Any, items: list[Any], n: int) -> tuple[np.ndarray, int]:
    """(questions, gold slot) gold-is-top hits of ``rr`` over ``n``-passage lists, and prefills per list."""
    hits = np.zeros((len(items), n))
    prefills = 0
    for qi, it in enumerate(items):
        for g in range(n):
            ps = it.with_gold_at(g, n)
            ranked = rr.rerank(it.question, ps)
            hits[qi, g] = float(ranked.items[0].passage.id == it.gold.id)
            prefills = ranked.info.get("prompts", 0)
    return hits, prefills


def _in_list_bm25_sweep(items: list[Any], n: int) -> np.ndarray:
    from retrievers.bm25 import BM25Retriever

    hits = np.zeros((len(items), n))
    for qi, it in enumerate(items):
        for g in range(n):
            ps = it.with_gold_at(g, n)
            bm = BM25Retriever(backend="rank_bm25")
            bm.index(ps, show_progress=False)
            top = bm.search(it.question, 1)
            hits[qi, g] = float(bool(top) and top[0].passage.id == it.gold.id)
    return hits


def _dl19_rotations(rr: Any, queries: list[dict[str, Any]], qrels: dict, k: int = 5) -> dict[str, float]:
    stable, from_ends, prefills = 0, 0, 0
    run: dict[str, dict[str, float]] = {}
    for q in queries:
        ps = q["passages"][:k]
        tops = []
        for r in range(k):
            rotated = ps[r:] + ps[:r]
            ranked = rr.rerank(q["query"], rotated)
            top = ranked.items[0].passage.id
            tops.append(top)
            slot = [p.id for p in rotated].index(top)
            from_ends += int(slot in (0, k - 1))
            prefills = ranked.info.get("prompts", 0)
            if r == 0:
                run[q["qid"]] = {it.passage.id: float(k - i) for i, it in enumerate(ranked.items)}
        stable += int(len(set(tops)) == 1)
    n = len(queries)
    return {
        "rotation_stable": stable / n,
        "top_from_first_or_last_slot": from_ends / (n * k),
        "ndcg@5": ir_metrics(qrels, run, ["ndcg@5"])["ndcg@5"],
        "prefills_per_list": float(prefills),
    }


def run(args: Namespace) -> dict[str, Any]:
    from eval.nq import load_nq
    from eval.rerank import load_dl19
    from rerank.config import load_config
    from rerank.engines import AttentionReranker
    from rerank.probe.model import load_model

    opts = getattr(args, "opts", {}) or {}
    check_opts(opts, ["questions", "lengths", "split", "dl19_queries", "systems", "passage_max_tokens"])
    quick = args.quick
    n_q = int(get_opt(opts, "questions", 4 if quick else 50))
    lengths = [int(x) for x in str(get_opt(opts, "lengths", "3,5")).split(",")]
    split = get_opt(opts, "split", "dev")
    n_dl = int(get_opt(opts, "dl19_queries", 3 if quick else 43))
    names = str(get_opt(opts, "systems", ",".join(VARIANTS))).split(",")
    if split not in ("dev", "test") or any(name not in VARIANTS for name in names):
        raise ValueError(f"split is dev or test and systems are among {', '.join(VARIANTS)}")
    cfg = with_passage_tokens(load_config("default"), opts, quick)
    model = load_model(cfg.model)
    test, dev = load_nq(args.data_dir)
    items = (dev if split == "dev" else test)[:n_q]
    queries, qrels = load_dl19(args.data_dir)
    queries = queries[:n_dl]
    systems: dict[str, dict[str, Any]] = {}
    for name in names:
        probe = cfg.probe.model_copy(update={"first_stage_weight": 0.0, **VARIANTS[name]})
        rr = AttentionReranker(model, probe, cfg.calibration)
        row: dict[str, Any] = {}
        for n in lengths:
            hits, prefills = _nq_sweep(rr, items, n)
            per_slot = hits.mean(axis=0)
            row[f"recall@1@{n}"] = float(per_slot.mean())
            row[f"bin_spread@{n}"] = _bins(per_slot)
            row[f"per_slot@{n}"] = [round(float(x), 4) for x in per_slot]
            row[f"prefills_per_list@{n}"] = float(prefills)
        row.update({f"dl19_{k}": v for k, v in _dl19_rotations(rr, queries, qrels).items()})
        systems[name] = row
    bm = {}
    for n in lengths:
        per_slot = _in_list_bm25_sweep(items, n).mean(axis=0)
        bm[f"recall@1@{n}"] = float(per_slot.mean())
        bm[f"bin_spread@{n}"] = _bins(per_slot)
    systems["in-list-bm25"] = bm
    bm_run = {q["qid"]: {p.id: float(5 - i) for i, p in enumerate(q["passages"][:5])} for q in queries}
    systems["bm25"] = {"dl19_ndcg@5": ir_metrics(qrels, bm_run, ["ndcg@5"])["ndcg@5"]}
    return {
        "dataset": f"nq-open-oracle {split} ({len(items)} questions, gold over every slot of "
        f"{'/'.join(map(str, lengths))}-passage lists) and trec-dl19 BM25 top-5 ({len(queries)} queries, 5 "
        "rotations each)",
        "config": {
            "model": model.model_id,
            "dtype": model.dtype,
            "probe": "the default's, first_stage_weight 0 (the probe alone)",
            "variants": {k: VARIANTS[k] for k in names},
            "passage_max_tokens": cfg.probe.passage_max_tokens,
            "split": split,
        },
        "systems": systems,
    }
