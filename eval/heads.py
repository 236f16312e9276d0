"""Suite ``heads``: choose the probe's heads, how many, and the BM25 fusion weight on SciFact.

Each (layer, head) of the model is scored on its own: the per-head content-free log-ratio score
(see :func:`rerank.probe.scoring.passage_scores`, kind ``logratio``) ranks BM25's top-20 for each SciFact
query, and the head's mean nDCG@10 is its merit. The ``k`` best heads form the head set; ``k`` and the
fusion weight ``w`` are chosen by 5-fold cross-validation on SciFact. The result is what
configs/heads.yaml ships (the default until the position sweep chose a layer band with the bias curve;
see docs/method.md); DL19 (the reported figure) plays no part in the choice.

The fusion weight of the default configuration's score (its kind, layer band, bias curve and prompt
order, see ``configs/default.yaml``; ``both`` adds passes in retriever order, stopped after the
configuration's last layer) is chosen on SciFact too, for each first stage: systems ``default-w<W>`` on
BM25's top-20 and ``default-w<W>-hybrid`` on the top-20 of the pipeline's hybrid retriever (BM25 and
the dense encoder, fused as the configuration says), each fused with its own first stage's score, for
each weight of ``DEFAULT_WEIGHTS``, beside the first stages alone (``bm25``, ``hybrid``).
``choice.default_first_stage_weight`` is the weight for the configuration's own retriever.

Options (``--opt``): ``queries=N`` (default 150; quick 12), ``config=PATH`` (default
configs/default.yaml), ``passage_max_tokens=N`` (default 120; quick 32), ``first_stages=bm25,hybrid``
(default both; ``bm25`` alone skips encoding the corpus). ``--quick`` retrieves the hybrid's
candidates from a smoke-test subset of the corpus: the abstracts judged for the queries and
``QUICK_DISTRACTORS`` others.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.common import (
    REPO_ROOT,
    SuiteError,
    check_opts,
    fixed_fusion,
    get_opt,
    passage_tokens,
    per_query_metric,
)
from rerank.engines.attention import fuse_first_stage, merge_orders
from rerank.engines.base import prompt_orders, to_candidate_order
from rerank.probe.scoring import PassageStats, passage_scores, zscore

KS = (1, 2, 4, 8, 16, 32)
WEIGHTS = (0.0, 0.5, 1.0, 2.0)
DEFAULT_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
QUICK_DISTRACTORS = 200


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
    return fuse_first_stage(s, np.asarray(q["first_stage"][: len(s)]), w) if w else s


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


def default_scores(
    queries: list[dict[str, Any]], stats_by_order: dict[str, dict[str, PassageStats]], rr: Any, settings: Any
) -> dict[str, np.ndarray]:
    """The default configuration's score per query, in first-stage order, from the passes.

    As :meth:`AttentionReranker.score_window` reads a window: per prompt order, the calibrated scores
    standardised; their mean over the orders (``prompt_order: both``), standardised again.
    """
    base = {}
    for q in queries:
        per = []
        for order, stats in stats_by_order.items():
            st = stats[f"{q['qid']}:0"]
            _, s = rr.calibrator(st, range(st.num_passages), settings, rr.curve)
            per.append(to_candidate_order(s, order))
        base[q["qid"]] = zscore(merge_orders(per))
    return base


def run(args: Namespace) -> dict[str, Any]:
    from eval.scifact_stats import FIRST_STAGES, MAX_TOKENS, collect_scifact, scifact_passes
    from rerank.config import load_config
    from rerank.engines import AttentionReranker
    from rerank.probe.calibrators import ScoreSettings
    from rerank.probe.model import load_model

    opts = getattr(args, "opts", {}) or {}
    check_opts(opts, ["queries", "config", "passage_max_tokens", "first_stages"])
    n = int(get_opt(opts, "queries", 12 if args.quick else 150))
    cap = passage_tokens(opts, args.quick, MAX_TOKENS)
    cfg = load_config(Path(get_opt(opts, "config", str(REPO_ROOT / "configs" / "default.yaml"))))
    cfg = cfg.model_copy(update={"probe": fixed_fusion(cfg.probe)})
    stages = [x.strip() for x in str(get_opt(opts, "first_stages", ",".join(FIRST_STAGES))).split(",") if x]
    unknown = [x for x in stages if x not in FIRST_STAGES]
    if unknown or "bm25" not in stages:
        raise SuiteError(
            f"--opt first_stages={','.join(stages)}: give bm25 (the head choice reads it) and optionally "
            f"hybrid; known: {', '.join(FIRST_STAGES)}"
        )
    model = load_model()
    queries, qrels, stats = collect_scifact(model, args.data_dir, n, cap)
    res = choose(queries, qrels, stats)
    best_single = int(np.argmax(res["head_merit"]))
    systems = {
        "bm25": {"ndcg@10": _first_stage_ndcg(qrels, queries)},
        "probe-heads-cv": {"ndcg@10": round(res["cv_ndcg@10"][(res["k"], res["w"])], 4)},
        "best-single-head": {"ndcg@10": round(float(res["head_merit"][best_single]), 4)},
    }
    # The default configuration's score, read from passes over each first stage's top-20 in each of its
    # prompt orders, fused with that first stage's score at each weight.
    rr = AttentionReranker(model, cfg.probe, cfg.calibration)
    settings = ScoreSettings.of(cfg.probe)
    kind = settings.kind(rr.calibrator.score_kind)
    last = cfg.probe.layer_range[1] if cfg.probe.layer_range is not None else None
    chosen_w = {}
    for stage in stages:
        if stage == "bm25":
            qs, st = queries, stats
        else:
            # Quick runs search a small corpus: encoding all 5,183 abstracts takes minutes on a CPU.
            qs, _, st = collect_scifact(
                model, args.data_dir, n, cap, stage, cfg.retriever, QUICK_DISTRACTORS if args.quick else None
            )
            systems[stage] = {"ndcg@10": _first_stage_ndcg(qrels, qs)}
        # Passes in another order than the heads' read only the layers the configuration reads.
        by_order = {
            o: st if o == "reversed" else scifact_passes(model, qs, cap, o, last, f"scifact/{stage}/{o}")
            for o in prompt_orders(cfg.probe)
        }
        base = default_scores(qs, by_order, rr, settings)
        per_w = {}
        for w in DEFAULT_WEIGHTS:
            scores = {q["qid"]: fuse_first_stage(base[q["qid"]], np.asarray(q["first_stage"]), w) for q in qs}
            per_w[w] = _mean_ndcg(qrels, qs, scores)
            systems[f"default-w{w:g}" + ("" if stage == "bm25" else f"-{stage}")] = {"ndcg@10": per_w[w]}
        chosen_w[stage] = max(DEFAULT_WEIGHTS, key=lambda w, p=per_w: (p[w], -w))
    return {
        "dataset": f"beir-scifact test queries with judgements, first {len(queries)}, top-20 of "
        + " and of ".join(stages)
        + (
            f" (hybrid: QUICK SUBSET of the corpus, the judged abstracts and {QUICK_DISTRACTORS} others)"
            if args.quick and "hybrid" in stages
            else ""
        ),
        "config": {
            "model": model.model_id,
            "dtype": model.dtype,
            "kind": "logratio",
            "passage_max_tokens": cap,
            "first_stages": stages,
            "retriever": cfg.retriever.model_dump(mode="json"),
        },
        "systems": systems,
        "choice": {
            "head_set": [list(h) for h in res["head_set"]],
            "k": res["k"],
            "first_stage_weight": res["w"],
            "cv_grid": {f"k{k}-w{w:g}": round(v, 4) for (k, w), v in res["cv_ndcg@10"].items()},
            "best_single_head": list(res["heads"][best_single]),
            # The weight for the first stage the configuration's pipeline uses, when it was measured.
            "default_first_stage_weight": chosen_w.get(cfg.retriever.name, chosen_w["bm25"]),
            "default_first_stage_weight_by_first_stage": chosen_w,
            "default_score": {
                "kind": kind,
                "layers": cfg.probe.layers,
                "curve": cfg.calibration.curve,
                "prompt_order": cfg.probe.prompt_order,
            },
        },
    }


def _first_stage_ndcg(qrels: dict, queries: list[dict[str, Any]]) -> float:
    return _mean_ndcg(qrels, queries, {q["qid"]: np.asarray(q["first_stage"]) for q in queries})


def _mean_ndcg(qrels: dict, queries: list[dict[str, Any]], scores: dict[str, np.ndarray]) -> float:
    return round(float(_ndcg_per_query(qrels, queries, scores).mean()), 4)
