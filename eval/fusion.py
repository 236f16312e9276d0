"""Suite ``fusion``: every signal by what it is worth, under the protocol of docs/method.md.

The shipped default fuses the probe with the cheap signals (first-stage score, in-list BM25, the
embedded encoder's cosine) at the weights fitted for the model on the calibration lists. The probe reads
each list once, as the reranker does (:func:`rerank.fitting.probe_readings`, stored by list, so a rerun
costs seconds); the cheap signals are computed per list (:func:`rerank.engines.signals.cheap_signals`);
every system is then :func:`calibration.fusion.fuse` with other weights (``tests/test_fusion.py`` checks
that this is what :meth:`AttentionReranker.rerank` returns):

* ``given-order``: the order given (BM25's; the hybrid's for the demo). It is also the position-only
  control: the probe's prompts follow the given order (``prompt_order: both`` reads it best-last, then
  best-first);
* ``encoder``: the dense cosine alone; ``probe``: the probe alone;
* ``default``: the fitted weights; ``default-no-probe``: the same without the probe (the probe's
  marginal contribution); ``fixed``: the previous default, z(probe) + 1 x z(first stage, or in-list BM25
  without one); ``all-signals``: every signal at its weight before the drop rule; ``agreement``: the
  probe's weight scaled per list by the Spearman agreement of its two prompt orders (clipped at 0);
  ``default-adaptive``: the default reading the second prompt order only where the curve's fitted rule
  says (``probe.second_order: adaptive``), and ``default-first-order``: the first order alone.

Each set is scored twice: ``scored`` (the first stage's scores given) and ``unscored`` (plain strings).
Sets (``--opt sets=a,b``): ``nq`` (5-fold cross-validation over the 120 fitting lists: weights fitted on
four folds, scored on the fifth; a choosing set), ``scifact`` (test, BM25 top-20, the first ``scifact=N``
judged queries, default 60; a choosing set), ``dl19`` (BM25 top-5, 20 and 100, ``depths=``; reported,
never chosen on; at top-100 the default is the cascade, and ``dl19_windows=1`` adds reading all five
windows), ``demo`` (the 8 demo questions over the pipeline's hybrid retrieval, nDCG@5 as ``make demo``
prints it). ``store=PATH``: the probe readings' store (default ``results/cache/fusion-DTYPE.npz``).
Comparisons: the paired bootstrap of per-query nDCG (``eval.common.paired_bootstrap_ci``).
"""

from __future__ import annotations

import time
from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from eval.common import REPO_ROOT, check_opts, get_opt, paired_bootstrap_ci, per_query_metric

OPTS = ("sets", "scifact", "store", "dl19_windows", "depths")
SETS = ("nq", "dl19", "demo", "scifact")
FOLDS = 5
COMPARE = (
    ("default", "given-order"),
    ("default", "encoder"),
    ("default", "default-no-probe"),
    ("default", "fixed"),
    ("all-signals", "default"),
    ("agreement", "default"),
    ("default-adaptive", "default"),
    ("default-first-order", "default"),
)


@dataclass(frozen=True)
class EvalList:
    """One list to rank: the candidates in the order given, their first-stage scores, the judgements."""

    qid: str
    question: str
    passages: tuple[Any, ...]
    first_stage: tuple[float, ...] | None
    qrels: dict[str, int]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else 0.0


class Scorer:
    """Signals of lists, read once (the probe through a store), fused under each system's weights."""

    def __init__(self, rr: Any, store: Path) -> None:
        self.rr = rr
        self.store = store
        self.probe_seconds: list[float] = []
        self.cheap_seconds: list[float] = []

    def signals(
        self, lists: Sequence[Any], scored: bool, desc: str, probe: bool = True
    ) -> list[dict[str, Any]]:
        """Per list: the raw signals (``probe`` from the store or the model) and the orders' agreement."""
        from rerank.engines.signals import cheap_signals
        from rerank.fitting import probe_readings

        readings: list[Any] = [None] * len(lists)
        if probe:
            t0 = time.perf_counter()
            readings = probe_readings(self.rr, lists, store=self.store, desc=desc)
            spent = (time.perf_counter() - t0) / max(len(lists), 1)
            if spent > 1.0:  # read from the model, not the store: a timing
                self.probe_seconds.append(spent)
        out = []
        for lst, reading in zip(lists, readings, strict=True):
            sig, _, secs = cheap_signals(
                lst.question,
                list(lst.passages),
                lst.first_stage if scored else None,
                None,
                ("first_stage", "bm25", "dense"),
                dense=self.rr.dense,
            )
            self.cheap_seconds.append(secs)
            agree = 1.0
            orders = None
            if reading is not None:
                sig["probe"], orders = reading
                agree = _spearman(orders[0], orders[1]) if len(orders) > 1 else 1.0
            out.append({"signals": sig, "agreement": agree, "orders": orders})
        return out


def second_order_of(sig: dict[str, Any], fusion: Any) -> tuple[np.ndarray, bool] | None:
    """The adaptive default's scores of one list and whether it reads the second order (the rule of
    :meth:`AttentionReranker.second_order_rule` at the fitted ``k``); None without a fitted rule."""
    from calibration.fusion import cut_margin, fuse

    rule = fusion.second_order
    orders = sig.get("orders")
    s, w = sig["signals"], dict(fusion.weights)
    if orders is not None and w.get("probe", 0) == 0:
        return fuse(s, w, len(orders[0])), False  # the probe is not read at all
    if rule is None or orders is None or len(orders) != 2:
        return None
    one = fuse({**s, "probe": orders[0]}, w, len(orders[0]))
    if cut_margin(one, int(rule["k"]), w["probe"]) < float(rule["margin"]):
        return fuse(s, w, len(orders[0])), True
    return one, False


def systems_of(sig: dict[str, Any], fusion: Any, scored: bool) -> dict[str, np.ndarray]:
    """Every system's scores of one list from its signals (see the module docstring)."""
    from calibration.fusion import fuse

    s = sig["signals"]
    n = len(s["bm25"])
    w = dict(fusion.weights)
    out = {
        "given-order": np.arange(n, 0, -1, dtype=np.float64),
        "encoder": fuse(s, {"dense": 1.0}, n),
        "default": fuse(s, w, n),
        "default-no-probe": fuse(s, {**w, "probe": 0.0}, n),
    }
    if "probe" in s:
        out.update(
            probe=fuse(s, {"probe": 1.0}, n),
            fixed=fuse(s, {"probe": 1.0, ("first_stage" if scored else "bm25"): 1.0}, n),
            agreement=fuse(s, {**w, "probe": w.get("probe", 0.0) * max(0.0, sig["agreement"])}, n),
        )
        out["all-signals"] = fuse(s, fusion.meta["rounds"][0]["weights"], n)
    adaptive = second_order_of(sig, fusion)
    if adaptive is not None:
        out["default-adaptive"] = adaptive[0]
        out["default-first-order"] = fuse({**s, "probe": sig["orders"][0]}, w, n)
    return out


def _table(per: dict[str, dict[str, float]], metric: str) -> dict[str, Any]:
    rows: dict[str, Any] = {
        name: {metric: round(float(np.mean(list(v.values()))), 4)} for name, v in per.items()
    }
    for a, b in COMPARE:
        if a in per and b in per:
            mean, lo, hi = paired_bootstrap_ci(per[a], per[b])
            rows[a][f"minus_{b}"] = round(mean, 4)
            rows[a][f"minus_{b}_ci95"] = [round(lo, 4), round(hi, 4)]
    return rows


def _per_query(
    lists: Sequence[EvalList],
    runs: Sequence[dict[str, np.ndarray]],
    metric: str,
    measure: Callable | None = None,
) -> dict[str, dict[str, float]]:
    """{system: {qid: metric}} from each list's system scores."""
    per: dict[str, dict[str, float]] = {}
    names = sorted({n for r in runs for n in r})
    for name in names:
        run = {
            lst.qid: {p.id: float(s) for p, s in zip(lst.passages, r[name], strict=True)}
            for lst, r in zip(lists, runs, strict=True)
            if name in r
        }
        qrels = {lst.qid: lst.qrels for lst in lists}
        per[name] = measure(qrels, run) if measure else per_query_metric(qrels, run, metric)
    return per


def score_set(
    sc: Scorer,
    lists: Sequence[EvalList],
    fusion: Any,
    desc: str,
    metric: str = "ndcg@10",
    measure: Callable | None = None,
) -> dict[str, Any]:
    """Every system on ``lists``, scored and unscored."""
    out: dict[str, Any] = {"queries": len(lists)}
    for scored in (True, False):
        probe_before, cheap_before = len(sc.probe_seconds), len(sc.cheap_seconds)
        sigs = sc.signals(lists, scored, desc)
        if len(sc.probe_seconds) > probe_before:  # probed now, not read from the store: timed
            out["probe_seconds_per_query"] = round(sc.probe_seconds[-1], 3)
        if scored:
            out["signals_seconds_per_query"] = round(float(np.mean(sc.cheap_seconds[cheap_before:])), 4)
        runs = [systems_of(sig, fusion, scored) for sig in sigs]
        out["scored" if scored else "unscored"] = _table(_per_query(lists, runs, metric, measure), metric)
        if scored:
            out["orders_agreement_mean"] = round(float(np.mean([s["agreement"] for s in sigs])), 3)
        reads = [a[1] for a in (second_order_of(s, fusion) for s in sigs) if a is not None]
        if reads:
            out[f"second_order_rate_{'scored' if scored else 'unscored'}"] = round(float(np.mean(reads)), 4)
    return out


def _cascade_set(sc: Scorer, lists: Sequence[EvalList], fusion: Any, windows: bool) -> dict[str, Any]:
    """Deep lists: the cheap signals over every candidate; the cascade (the probe reads the 20 the cheap
    fusion ranks best, in that order; the window fused as the reranker does, the rest below it); with
    ``windows``, every window probed instead."""
    from calibration.fusion import fuse

    size = sc.rr.cfg.window_size
    w = dict(fusion.weights)
    out: dict[str, Any] = {"queries": len(lists)}
    for scored in (True, False):
        kind = "scored" if scored else "unscored"
        before = len(sc.cheap_seconds)
        cheap = sc.signals(lists, scored, "", probe=False)
        out[f"signals_seconds_per_query_{kind}"] = round(float(np.mean(sc.cheap_seconds[before:])), 4)
        runs = [systems_of(sig, fusion, scored) for sig in cheap]
        tops = []
        for lst, r in zip(lists, runs, strict=True):
            top = sorted(range(len(lst.passages)), key=lambda i: (-r["default-no-probe"][i], i))[:size]
            first = None if lst.first_stage is None else tuple(lst.first_stage[i] for i in top)
            tops.append((top, replace(lst, passages=tuple(lst.passages[i] for i in top), first_stage=first)))
        t0 = time.perf_counter()
        win_sigs = sc.signals([t for _, t in tops], scored, f"dl19 cascade ({kind})")
        probe_s = (time.perf_counter() - t0) / len(lists)
        for (top, _), sig, r in zip(tops, win_sigs, runs, strict=True):
            n = len(r["given-order"])
            win = fuse(sig["signals"], w, len(top))
            rest = [i for i in range(n) if i not in set(top)]
            final = r["default-no-probe"].copy()
            if rest:
                final[rest] += min(win) - max(final[rest]) - 1.0
            final[top] = win
            r["default-cascade"] = final
        if windows:
            full = sc.signals(lists, scored, f"dl19 all windows ({kind})")
            for r, sig in zip(runs, full, strict=True):
                r["default-all-windows"] = fuse(sig["signals"], w, len(r["given-order"]))
        per = _per_query(lists, runs, "ndcg@10")
        per["default"] = per.pop("default-cascade")
        table = _table(per, "ndcg@10")
        table["default"]["probe_and_signals_seconds_per_query"] = round(probe_s, 3)
        out[kind] = table
    return out


def _dl19_lists(data_dir: Path, depth: int) -> list[EvalList]:
    from eval.rerank import load_dl19

    queries, qrels = load_dl19(data_dir)
    return [
        EvalList(
            q["qid"], q["query"], tuple(q["passages"][:depth]), tuple(q["bm25"][:depth]), qrels[q["qid"]]
        )
        for q in queries
        if q["qid"] in qrels
    ]


def _nq_cv(sc: Scorer, fusion: Any) -> dict[str, Any]:
    """5-fold cross-validation over the fusion fitting lists (a choosing set: weights never see the fold
    they are scored on)."""
    from calibration.fusion import FusionWeights, LabelledList, fit_fusion, fit_second_order
    from calibration.lists import fusion_lists, load_calibration_items
    from retrievers.hybrid import HybridRetriever

    items = load_calibration_items()
    n_hard, n_ret = fusion.meta.get("lists_by_kind", {"hard": 60, "retrieved": 60}).values()
    retriever = HybridRetriever()
    pool = {p.id: p for it in items for p in (it.gold, *it.distractors)}
    retriever.index(list(pool.values()), show_progress=False)
    sc.rr.dense.retriever = retriever.dense
    flists = fusion_lists(items, n_hard, n_ret, retriever=retriever)
    lists = [
        EvalList(
            f.qid,
            f.question,
            f.passages,
            f.first_stage,
            {p.id: g for p, g in zip(f.passages, f.labels, strict=True)},
        )
        for f in flists
    ]
    sigs = sc.signals(lists, True, "nq fusion lists")
    rng = np.random.default_rng(0)
    fold = rng.permutation(len(lists)) % FOLDS
    runs: list[dict[str, np.ndarray]] = [{} for _ in lists]
    folds: list[Any] = [None] * len(lists)
    rules: list[dict[str, Any] | None] = []
    for k in range(FOLDS):
        train = [
            LabelledList(sigs[i]["signals"], np.array(flists[i].labels))
            for i in range(len(lists))
            if fold[i] != k
        ]
        fitted: FusionWeights = fit_fusion(train)
        pairs = [
            (dict(sigs[i]["signals"], probe=None), sigs[i]["orders"][0], sigs[i]["signals"]["probe"])
            for i in range(len(lists))
            if fold[i] != k and sigs[i]["orders"] is not None and len(sigs[i]["orders"]) == 2
        ]
        fitted = replace(fitted, second_order=fit_second_order(pairs, fitted.weights))
        rules.append(fitted.second_order)
        for i in np.flatnonzero(fold == k):
            runs[i] = systems_of(sigs[i], fitted, flists[i].first_stage is not None)
            folds[i] = fitted
    per = _per_query(lists, runs, "ndcg@10")
    reads = [a[1] for a in (second_order_of(sigs[i], folds[i]) for i in range(len(lists))) if a is not None]
    return {
        "queries": len(lists),
        "folds": FOLDS,
        "second_order_margins": [r["margin"] if r else None for r in rules],
        "second_order_rate": round(float(np.mean(reads)), 4) if reads else None,
        "all": _table(per, "ndcg@10"),
    }


def _demo(sc: Scorer, pipe: Any, fusion: Any) -> dict[str, Any]:
    import json
    from importlib import resources

    from rerank.demo import ndcg
    from retrievers.corpus import load_corpus

    root = resources.files("rerank") / "data"
    pipe.index(load_corpus(Path(str(root / "demo_corpus.jsonl"))), show_progress=False)
    sc.rr.dense.retriever = pipe.retriever.dense
    lists = []
    for line in (root / "demo_queries.jsonl").read_text().splitlines():
        q = json.loads(line)
        hits = pipe.retrieve(q["query"])
        lists.append(
            EvalList(
                q["qid"],
                q["query"],
                tuple(h.passage for h in hits),
                tuple(h.score for h in hits),
                q["relevant"],
            )
        )

    def measure(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
        return {q: ndcg(sorted(r, key=lambda d: -r[d]), qrels[q]) for q, r in run.items()}

    return score_set(sc, lists, fusion, "demo", "ndcg@5", measure)


def run(args: Namespace) -> dict[str, Any]:
    from rerank import Pipeline

    opts = args.opts
    check_opts(opts, OPTS)
    sets = [s for s in str(get_opt(opts, "sets", ",".join(SETS))).split(",") if s]
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise ValueError(f"unknown sets {unknown}; choose from: {', '.join(SETS)}")
    pipe = Pipeline.from_config("default", generator=None)
    rr = pipe.reranker
    fusion = rr.curve.fusion if rr.curve is not None else None
    if fusion is None:
        raise ValueError(
            "the default's curve has no fitted fusion weights (attn-rerank calibrate --weights-for)"
        )
    default_store = REPO_ROOT / "results" / "cache" / f"fusion-{rr.model.dtype}.npz"
    sc = Scorer(rr, Path(get_opt(opts, "store", str(default_store))))
    systems: dict[str, Any] = {}
    if "nq" in sets:
        systems["nq-cv-top20"] = _nq_cv(sc, fusion)
    if "demo" in sets:
        systems["demo"] = _demo(sc, pipe, fusion)
    if "dl19" in sets:
        windows = bool(int(get_opt(opts, "dl19_windows", 0)))
        for depth in [int(d) for d in str(get_opt(opts, "depths", "5,20,100")).split(",")]:
            lists = _dl19_lists(args.data_dir, depth)
            if depth <= rr.cfg.window_size:
                systems[f"dl19-top{depth}"] = score_set(sc, lists, fusion, f"dl19 top-{depth}")
            else:
                systems[f"dl19-top{depth}"] = _cascade_set(sc, lists, fusion, windows)
    if "scifact" in sets:
        from eval.scifact_stats import scifact_windows

        queries, qrels = scifact_windows(args.data_dir, int(get_opt(opts, "scifact", 60)), "bm25")
        lists = [
            EvalList(q["qid"], q["query"], tuple(q["passages"]), tuple(q["first_stage"]), qrels[q["qid"]])
            for q in queries
        ]
        systems["scifact-top20"] = score_set(sc, lists, fusion, "scifact")
    config = {
        "weights": fusion.weights,
        "weights_ci95": {k: list(v) for k, v in fusion.ci.items()},
        "fitted_on": fusion.meta.get("data"),
        "lists_by_kind": fusion.meta.get("lists_by_kind"),
        "dtype": rr.model.dtype,
        "probe_store": str(sc.store),
        "probe_seconds_per_list": round(float(np.mean(sc.probe_seconds)), 3) if sc.probe_seconds else None,
        "cheap_signals_seconds_per_list": round(float(np.mean(sc.cheap_seconds)), 4),
    }
    return {"dataset": ", ".join(sets), "config": config, "systems": systems}
