"""Suite ``heads``: choose the probe's heads, how many, and the BM25 fusion weight on SciFact.

Each (layer, head) of the model is scored on its own: the per-head content-free log-ratio score
(see :func:`rerank.scoring.passage_scores`, kind ``logratio``) ranks BM25's top-20 for each SciFact
query, and the head's mean nDCG@10 is its merit. The ``k`` best heads form the head set; ``k`` and the
fusion weight ``w`` are chosen by 5-fold cross-validation on SciFact. The result is what
configs/heads.yaml ships (the default until the position sweep chose a layer band with the bias curve;
see docs/method.md); DL19 (the reported figure) plays no part in the choice.

The same lists also choose the fusion weight of the default configuration's score (its kind, layer
band and bias curve, see ``configs/default.yaml``): systems ``default-w<W>`` for each weight of
``DEFAULT_WEIGHTS``, and ``choice.default_first_stage_weight``.

Options (``--opt``): ``queries=N`` (default 150; quick 12), ``config=PATH`` (default
configs/default.yaml), ``passage_max_tokens=N`` (default 120; quick 32).
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.common import REPO_ROOT, check_opts, get_opt, passage_tokens, per_query_metric
from rerank.reranker import fuse_first_stage
from rerank.scoring import PassageStats, passage_scores, zscore

KS = (1, 2, 4, 8, 16, 32)
WEIGHTS = (0.0, 0.5, 1.0, 2.0)
DEFAULT_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)


def _ndcg_per_query(qrels: dict, queries: list[dict[str, Any]], scores: dict[str, np.ndarray]) -> np.ndarray:
    run = {}
    for q in queries:
        s = scores[q["qid"]]
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        run[q["qid"]] = {q["passages"][i].id: float(len(s) - r) for r, i in enumerate(order)}
    per_q = per_query_metric(qrels, run, "ndcg@10")
    return np.array([per_q[q["qid"]] for q in queries])


def head_merit(
    queries: list[dict[str, Any]], qrels: dict, stats: dict[str, PassageStats], kind: str = "logratio"
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Per-query nDCG@10 of every single head: returns the head list and a (heads, queries) matrix."""
    st0 = stats[f"{queries[0]['qid']}:0"]
    heads = [(layer, h) for layer in st0.layers for h in range(st0.query.shape[1])]
    merit = np.zeros((len(heads), len(queries)))
    for j, hd in enumerate(heads):
        scores = {
            q["qid"]: passage_scores(stats[f"{q['qid']}:0"], kind=kind, head_set=[hd])[::-1] for q in queries
        }
        merit[j] = _ndcg_per_query(qrels, queries, scores)
    return heads, merit


def fused(q: dict[str, Any], st: PassageStats, head_set: Sequence[tuple[int, int]], w: float) -> np.ndarray:
    s = zscore(passage_scores(st, kind="logratio", head_set=head_set)[::-1])
    return fuse_first_stage(s, np.asarray(q["bm25"][: len(s)]), w) if w else s


def choose(
    queries: list[dict[str, Any]],
    qrels: dict,
    stats: dict[str, PassageStats],
    idx: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Best (heads, k, w) using the queries at ``idx`` (default all), with k and w by 5-fold CV there."""
    idx = list(range(len(queries))) if idx is None else list(idx)
    sub = [queries[i] for i in idx]
    heads, merit = head_merit(sub, qrels, stats)
    folds = [list(range(f, len(sub), 5)) for f in range(5)]
    cv = {}
    for k in KS:
        for w in WEIGHTS:
            vals = np.zeros(len(sub))
            for f in folds:
                train = [i for i in range(len(sub)) if i not in f]
                top = [heads[j] for j in np.argsort(-merit[:, train].mean(axis=1), kind="stable")[:k]]
                held = [sub[i] for i in f]
                vals[f] = _ndcg_per_query(
                    qrels, held, {q["qid"]: fused(q, stats[f"{q['qid']}:0"], top, w) for q in held}
                )
            cv[(k, w)] = float(vals.mean())
    k, w = max(cv, key=lambda kw: (cv[kw], -kw[0], -kw[1]))
    top = [heads[j] for j in np.argsort(-merit.mean(axis=1), kind="stable")[:k]]
    return {
        "head_set": top,
        "k": k,
        "w": w,
        "cv_ndcg@10": cv,
        "head_merit": merit.mean(axis=1),
        "heads": heads,
    }


def run(args: Namespace) -> dict[str, Any]:
    from eval.scifact_stats import MAX_TOKENS, collect_scifact
    from rerank.calibrators import ScoreSettings
    from rerank.config import load_config
    from rerank.model import load_model
    from rerank.reranker import AttentionReranker

    opts = getattr(args, "opts", {}) or {}
    check_opts(opts, ["queries", "config", "passage_max_tokens"])
    n = int(get_opt(opts, "queries", 12 if args.quick else 150))
    cap = passage_tokens(opts, args.quick, MAX_TOKENS)
    cfg = load_config(Path(get_opt(opts, "config", str(REPO_ROOT / "configs" / "default.yaml"))))
    model = load_model()
    queries, qrels, stats = collect_scifact(model, args.data_dir, n, cap)
    res = choose(queries, qrels, stats)
    bm25 = _ndcg_per_query(qrels, queries, {q["qid"]: np.asarray(q["bm25"]) for q in queries}).mean()
    best_single = int(np.argmax(res["head_merit"]))
    systems = {
        "bm25": {"ndcg@10": round(float(bm25), 4)},
        "probe-heads-cv": {"ndcg@10": round(res["cv_ndcg@10"][(res["k"], res["w"])], 4)},
        "best-single-head": {"ndcg@10": round(float(res["head_merit"][best_single]), 4)},
    }
    # The default configuration's score, read from the same passes (prompt order is reversed BM25 order).
    rr = AttentionReranker(model, cfg.probe, cfg.calibration)
    settings = ScoreSettings.of(cfg.probe)
    kind = settings.kind(rr.calibrator.score_kind)
    base = {}
    for q in queries:
        st = stats[f"{q['qid']}:0"]
        _, s = rr.calibrator(st, range(st.num_passages), settings, rr.curve)
        base[q["qid"]] = zscore(s[::-1])
    per_w = {}
    for w in DEFAULT_WEIGHTS:
        scores = {q["qid"]: fuse_first_stage(base[q["qid"]], np.asarray(q["bm25"]), w) for q in queries}
        per_w[w] = float(_ndcg_per_query(qrels, queries, scores).mean())
        systems[f"default-w{w:g}"] = {"ndcg@10": round(per_w[w], 4)}
    return {
        "dataset": f"beir-scifact test queries with judgements, first {len(queries)}, BM25 top-20",
        "config": {
            "model": model.model_id,
            "dtype": model.dtype,
            "kind": "logratio",
            "passage_max_tokens": cap,
        },
        "systems": systems,
        "choice": {
            "head_set": [list(h) for h in res["head_set"]],
            "k": res["k"],
            "first_stage_weight": res["w"],
            "cv_grid": {f"k{k}-w{w:g}": round(v, 4) for (k, w), v in res["cv_ndcg@10"].items()},
            "best_single_head": list(res["heads"][best_single]),
            "default_first_stage_weight": max(DEFAULT_WEIGHTS, key=lambda w: (per_w[w], -w)),
            "default_score": {"kind": kind, "layers": cfg.probe.layers, "curve": cfg.calibration.curve},
        },
    }
