"""Suite ``relevance``: the choosing set of the relevance protocol (SciFact) for variants of the probe.

Each system is the shipped default with some probe or calibration settings changed. On SciFact (the
first ``scifact`` test queries with judgements, BM25's top ``scifact_depth``, one window) every system
reranks as configured, fused with the BM25 scores (``scifact_ndcg@10``), and by its calibrated score
alone (``scifact_ndcg@10_unfused``). Each system is compared with its reference system by the mean
per-query nDCG@10 difference and its 95% paired-bootstrap interval (``minus_<ref>``, ``..._ci95``):

* order variants (``orders3``, ``orders4``: one or two seeded shuffles read after the default's two
  orders; ``orders4-early``: the shuffles only where the two orders disagree on the top passage) against
  ``default``;
* screens of changes that alter the score's scale, so the shipped curve cannot apply to them without a
  refit (``cf-topm8``, ``cf-topm32``: top-m token pooling; ``cf-query-rows``: only the rows from the
  query's first token on; ``cf-query-both``: the query before the passages as well), against ``cf``:
  the default's reading with the content-free correction alone (no curve). A screen that does not beat
  ``cf`` gives no reason to fit a curve for it. The ``-reversed`` screens read one prompt order (the
  default's first) against ``cf-reversed``: with the query before the passages too, each ``N/A`` pass is
  a full prefill, so two orders would cost four prefills, over the issue's 2x bound.

Each finished system's row is also written to ``<output>.partial`` as the run goes.

Prompts the systems share are probed once (:class:`rerank.probe.capture.AttentionProbe`'s ``memo``); each
system reports how many prompts it reads per query (``prompts_per_query``; with the query before the
passages every ``N/A`` pass is a full prefill, reported as ``full_prefills_per_query``).

``nq=N`` (default 0) also runs the NQ-open dev position sweep (gold passage over every slot of
``nq_length``-passage lists, questions ``nq_start``.. of the shipped dev lists, probe alone): gold
recall@1 and its bin spread, the protocol's second check.

The position-only control is BM25's own order (``bm25``): in the best-last prompt, slot alone ranks the
passages as BM25 does.

Options (``--opt``): ``systems=a,b`` (default all), ``scifact=N`` (default 300; quick 4),
``scifact_depth=N`` (default 20), ``nq=N``, ``nq_start=N``, ``nq_length=N`` (default 20),
``passage_max_tokens=N`` (default the config's; quick 32).
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path
from typing import Any

from eval.common import (
    SuiteError,
    check_opts,
    get_opt,
    ir_metrics,
    paired_bootstrap_ci,
    per_query_metric,
    with_passage_tokens,
)
from eval.shortlists import bin_spread, nq_sweep, scifact_runs

CF = {"calibration": {"name": "content-free", "curve": None}}
# name -> (reference system, probe settings, other overrides)
VARIANTS: dict[str, tuple[str | None, dict[str, Any], dict[str, Any]]] = {
    "default": (None, {}, {}),
    "orders3": ("default", {"extra_orders": 1}, {}),
    "orders4": ("default", {"extra_orders": 2}, {}),
    "orders4-early": ("default", {"extra_orders": 2, "orders_early_exit": True}, {}),
    "cf": (None, {}, CF),
    "cf-topm8": ("cf", {"aggregation": "topm", "top_m": 8}, CF),
    "cf-topm32": ("cf", {"aggregation": "topm", "top_m": 32}, CF),
    "cf-query-rows": ("cf", {"query_rows": "query"}, CF),
    "cf-query-both": ("cf", {"query_position": "both"}, CF),
    # One prompt order (half the prefills): the screens at the default's first order.
    "cf-reversed": (None, {"prompt_order": "reversed"}, CF),
    "cf-query-rows-reversed": ("cf-reversed", {"prompt_order": "reversed", "query_rows": "query"}, CF),
    "cf-query-both-reversed": ("cf-reversed", {"prompt_order": "reversed", "query_position": "both"}, CF),
}


def run(args: Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from eval.nq import load_nq
    from eval.scifact_stats import scifact_windows
    from rerank.config import load_config
    from rerank.engines import AttentionReranker
    from rerank.probe.model import load_model

    opts = getattr(args, "opts", {}) or {}
    check_opts(
        opts, ["systems", "scifact", "scifact_depth", "nq", "nq_start", "nq_length", "passage_max_tokens"]
    )
    quick = args.quick
    names = str(get_opt(opts, "systems", ",".join(VARIANTS))).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SuiteError(f"unknown systems {unknown}; choose among {', '.join(VARIANTS)}")
    for n in names:
        ref = VARIANTS[n][0]
        if ref is not None and ref not in names:
            raise SuiteError(f"system {n} is compared with {ref}: add {ref} to systems")
    n_sf = int(get_opt(opts, "scifact", 4 if quick else 300))
    depth = int(get_opt(opts, "scifact_depth", 20))
    n_nq = int(get_opt(opts, "nq", 0))
    nq_start = int(get_opt(opts, "nq_start", 0))
    nq_len = int(get_opt(opts, "nq_length", 20))
    cfg = with_passage_tokens(load_config("default"), opts, quick)
    model = load_model(cfg.model)
    sf_queries, sf_qrels = scifact_windows(args.data_dir, n_sf, "bm25")
    items = load_nq(args.data_dir)[1][nq_start : nq_start + n_nq] if n_nq else []
    memo: dict[Any, Any] = {}
    systems: dict[str, dict[str, Any]] = {}
    runs: dict[str, tuple[dict, dict]] = {}
    for name in names:
        _, probe_upd, other = VARIANTS[name]
        cal = cfg.calibration.model_copy(update=other.get("calibration", {}))
        probe = cfg.probe.model_copy(update={"fusion": "fixed", "first_stage_weight": 1.0, **probe_upd})
        rr = AttentionReranker(model, probe, cal)
        rr.engine.memo = memo
        prompts: list[int] = []
        bar = tqdm(sf_queries, desc=f"{name}: scifact", unit="query", disable=quick)
        runs[name] = scifact_runs(rr, bar, depth, prompts)
        row: dict[str, Any] = {
            "settings": {**probe_upd, **({"calibration": other["calibration"]} if other else {})},
            "prompts_per_query": sum(prompts) / max(len(prompts), 1),
        }
        if probe.query_position == "both":
            row["full_prefills_per_query"] = 2 * row["prompts_per_query"]
        for label, r in zip(("", "_unfused"), runs[name], strict=True):
            row[f"scifact_ndcg@10{label}"] = ir_metrics(sf_qrels, r, ["ndcg@10"])["ndcg@10"]
        if items:
            alone = AttentionReranker(
                model, probe.model_copy(update={"first_stage_weight": 0.0, "fusion": "fixed"}), cal
            )
            alone.engine.memo = memo
            bar = tqdm(items, desc=f"{name}: nq sweep", unit="question", disable=quick)
            hits, _ = nq_sweep(alone, bar, nq_len)
            per_slot = hits.mean(axis=0)
            row[f"nq_dev_recall@1@{nq_len}"] = float(per_slot.mean())
            row[f"nq_dev_bin_spread@{nq_len}"] = bin_spread(per_slot)
            row[f"nq_dev_per_slot@{nq_len}"] = [round(float(x), 4) for x in per_slot]
        systems[name] = row
        if getattr(args, "output", None):
            # Each finished system is kept beside the output: a long run stopped early keeps its rows.
            partial = Path(f"{args.output}.partial")
            partial.write_text(
                json.dumps({"done": list(systems), "systems": systems}, indent=1), encoding="utf-8"
            )
    for name in names:
        ref = VARIANTS[name][0]
        if ref is None:
            continue
        for label, r, base in zip(("", "_unfused"), runs[name], runs[ref], strict=True):
            mean, lo, hi = paired_bootstrap_ci(
                per_query_metric(sf_qrels, r), per_query_metric(sf_qrels, base)
            )
            systems[name][f"scifact_minus_{ref}{label}"] = mean
            systems[name][f"scifact_minus_{ref}{label}_ci95"] = [lo, hi]
    bm = {q["qid"]: {p.id: float(depth - i) for i, p in enumerate(q["passages"][:depth])} for q in sf_queries}
    systems["bm25"] = {"scifact_ndcg@10": ir_metrics(sf_qrels, bm, ["ndcg@10"])["ndcg@10"]}
    return {
        "dataset": f"beir-scifact test, BM25 top-{depth} of {len(sf_queries)} queries"
        + (
            f"; nq-open-oracle dev questions {nq_start}..{nq_start + len(items) - 1}, {nq_len} passages"
            if items
            else ""
        ),
        "config": {
            "model": model.model_id,
            "dtype": model.dtype,
            "probe": "the default's with each system's settings; fused with BM25 as shipped, and alone",
            "passage_max_tokens": cfg.probe.passage_max_tokens,
            "references": {n: VARIANTS[n][0] for n in names if VARIANTS[n][0]},
        },
        "systems": systems,
    }
