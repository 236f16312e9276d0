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

SciFact (``--opt scifact=N``, the choosing set of the relevance issue's protocol; default 0 = skipped):
the first N test queries with judgements, BM25's top ``scifact_depth`` (default 5) reranked by each
system as shipped, fused with the BM25 scores (``scifact_ndcg@10``), and by the probe alone
(``scifact_ndcg@10_unfused``, the same prompts ranked by the calibrated score), beside BM25's own order;
each system other than ``default`` gets the mean per-query difference to ``default`` and its 95%
paired-bootstrap interval (``scifact_minus_default``, ``..._ci95``), fused and unfused.

``candidate`` (with ``--opt curve=PATH``): the default's reading with another curve file (e.g. one with
per-slot offsets fitted at short lengths) in place of the shipped ones.

Options (``--opt``): ``questions=N`` NQ questions (default 50; quick 4), ``start=N`` (skip the first N
questions of the split), ``lengths=3,5``, ``split=dev|test``, ``dl19_queries=N`` (default 43; quick 3),
``systems=default,rotations`` (add ``candidate`` with ``curve``), ``curve=PATH``,
``passage_max_tokens=N`` (default the config's; quick 32).
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Iterable
from typing import Any

import numpy as np

from eval.common import (
    SuiteError,
    check_opts,
    get_opt,
    ir_metrics,
    paired_bootstrap_ci,
    per_query_metric,
    with_passage_tokens,
)

VARIANTS = {"default": {}, "rotations": {"rotations_up_to": 5}, "candidate": {}}


def bin_spread(per_slot: np.ndarray, bins: int = 5) -> float:
    """Max minus min of recall@1 over up to ``bins`` contiguous slot bins (the sweep's bin spread)."""
    groups = np.array_split(per_slot, min(bins, len(per_slot)))
    means = [g.mean() for g in groups if len(g)]
    return float(max(means) - min(means))


def nq_sweep(rr: Any, items: list[Any], n: int) -> tuple[np.ndarray, int]:
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


def scifact_runs(
    rr: Any, queries: Iterable[dict[str, Any]], depth: int, prompts: list[int] | None = None
) -> tuple[dict, dict]:
    """Runs ``{qid: {doc: score}}`` of ``rr`` over each query's top ``depth``: fused (as configured)
    and unfused (by the calibrated score of the same prompts; one window, so its order is the probe's).
    ``prompts``, if given, receives each query's count of prompts read."""
    from rerank.records import Hit

    fused: dict[str, dict[str, float]] = {}
    alone: dict[str, dict[str, float]] = {}
    for q in queries:
        hits = [
            Hit(passage=p, score=s, rank=i + 1)
            for i, (p, s) in enumerate(zip(q["passages"][:depth], q["first_stage"][:depth], strict=True))
        ]
        ranked = rr.rerank(q["query"], hits)
        if prompts is not None:
            prompts.append(int(ranked.info.get("prompts", 0)))
        fused[q["qid"]] = {it.passage.id: float(depth - i) for i, it in enumerate(ranked.items)}
        given = {h.passage.id: i for i, h in enumerate(hits)}
        by_cal = sorted(ranked.items, key=lambda it: (-it.calibrated_score, given[it.passage.id]))
        alone[q["qid"]] = {it.passage.id: float(depth - i) for i, it in enumerate(by_cal)}
    return fused, alone


def run(args: Namespace) -> dict[str, Any]:
    from eval.nq import load_nq
    from eval.rerank import load_dl19
    from rerank.config import load_config
    from rerank.engines import AttentionReranker
    from rerank.probe.model import load_model

    opts = getattr(args, "opts", {}) or {}
    check_opts(
        opts,
        [
            "questions",
            "start",
            "lengths",
            "split",
            "dl19_queries",
            "systems",
            "passage_max_tokens",
            "curve",
            "scifact",
            "scifact_depth",
        ],
    )
    quick = args.quick
    n_q = int(get_opt(opts, "questions", 4 if quick else 50))
    lengths = [int(x) for x in str(get_opt(opts, "lengths", "3,5")).split(",")]
    split = get_opt(opts, "split", "dev")
    n_dl = int(get_opt(opts, "dl19_queries", 3 if quick else 43))
    start = int(get_opt(opts, "start", 0))
    curve = get_opt(opts, "curve", "") or None
    names = str(get_opt(opts, "systems", "default,rotations" + (",candidate" if curve else ""))).split(",")
    if split not in ("dev", "test") or any(name not in VARIANTS for name in names):
        raise SuiteError(f"split is dev or test and systems are among {', '.join(VARIANTS)}")
    if ("candidate" in names) != bool(curve):
        raise SuiteError("the candidate system and --opt curve=PATH go together")
    cfg = with_passage_tokens(load_config("default"), opts, quick)
    model = load_model(cfg.model)
    test, dev = load_nq(args.data_dir)
    items = (dev if split == "dev" else test)[start : start + n_q]
    queries, qrels = load_dl19(args.data_dir)
    queries = queries[:n_dl]
    n_sf = int(get_opt(opts, "scifact", 0))
    sf_depth = int(get_opt(opts, "scifact_depth", 5))
    sf_queries: list[dict[str, Any]] = []
    sf_qrels: dict[str, dict[str, int]] = {}
    sf_runs: dict[str, tuple[dict, dict]] = {}
    if n_sf:
        from eval.scifact_stats import scifact_windows

        sf_queries, sf_qrels = scifact_windows(args.data_dir, n_sf, "bm25")
    systems: dict[str, dict[str, Any]] = {}
    for name in names:
        probe = cfg.probe.model_copy(update={"first_stage_weight": 0.0, "fusion": "fixed", **VARIANTS[name]})
        cal = cfg.calibration
        if name == "candidate":
            cal = cal.model_copy(update={"curve": (str(curve),)})
        rr = AttentionReranker(model, probe, cal)
        row: dict[str, Any] = {}
        for n in lengths:
            hits, prefills = nq_sweep(rr, items, n)
            per_slot = hits.mean(axis=0)
            row[f"recall@1@{n}"] = float(per_slot.mean())
            row[f"bin_spread@{n}"] = bin_spread(per_slot)
            row[f"per_slot@{n}"] = [round(float(x), 4) for x in per_slot]
            row[f"prefills_per_list@{n}"] = float(prefills)
        row.update({f"dl19_{k}": v for k, v in _dl19_rotations(rr, queries, qrels).items()})
        if sf_queries:
            shipped = cfg.probe.model_copy(update=VARIANTS[name])
            sf_runs[name] = scifact_runs(AttentionReranker(model, shipped, cal), sf_queries, sf_depth)
            for label, r in zip(("", "_unfused"), sf_runs[name], strict=True):
                row[f"scifact_ndcg@10{label}"] = ir_metrics(sf_qrels, r, ["ndcg@10"])["ndcg@10"]
        systems[name] = row
    if sf_queries and "default" in sf_runs:
        for name, pair in sf_runs.items():
            if name == "default":
                continue
            for label, r, base in zip(("", "_unfused"), pair, sf_runs["default"], strict=True):
                mean, lo, hi = paired_bootstrap_ci(
                    per_query_metric(sf_qrels, r), per_query_metric(sf_qrels, base)
                )
                systems[name][f"scifact_minus_default{label}"] = mean
                systems[name][f"scifact_minus_default{label}_ci95"] = [lo, hi]
        bm = {
            q["qid"]: {p.id: float(sf_depth - i) for i, p in enumerate(q["passages"][:sf_depth])}
            for q in sf_queries
        }
        systems["bm25-scifact"] = {"scifact_ndcg@10": ir_metrics(sf_qrels, bm, ["ndcg@10"])["ndcg@10"]}
    bm = {}
    for n in lengths:
        per_slot = _in_list_bm25_sweep(items, n).mean(axis=0)
        bm[f"recall@1@{n}"] = float(per_slot.mean())
        bm[f"bin_spread@{n}"] = bin_spread(per_slot)
    systems["in-list-bm25"] = bm
    bm_run = {q["qid"]: {p.id: float(5 - i) for i, p in enumerate(q["passages"][:5])} for q in queries}
    systems["bm25"] = {"dl19_ndcg@5": ir_metrics(qrels, bm_run, ["ndcg@5"])["ndcg@5"]}
    return {
        "dataset": f"nq-open-oracle {split} ({len(items)} questions, gold over every slot of "
        f"{'/'.join(map(str, lengths))}-passage lists) and trec-dl19 BM25 top-5 ({len(queries)} queries, 5 "
        "rotations each)"
        + (f"; beir-scifact test, BM25 top-{sf_depth} of {len(sf_queries)} queries" if sf_queries else ""),
        "config": {
            "model": model.model_id,
            "dtype": model.dtype,
            "probe": "the default's, first_stage_weight 0 (the probe alone)",
            "variants": {k: VARIANTS[k] for k in names},
            "passage_max_tokens": cfg.probe.passage_max_tokens,
            "split": split,
            "questions": f"{start}..{start + len(items) - 1}",
            "candidate_curve": curve,
        },
        "systems": systems,
    }
