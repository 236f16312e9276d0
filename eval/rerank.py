"""Suite ``rerank``: TREC DL19 passage ranking of BM25's top-100 by the attention probe.

Every probe system is scored from one set of forward passes (all layers, with the ``N/A`` pass; see
``rerank/fitting.py``), so the variants differ only in how the captured attention is read. The
``position-prior`` control ranks by prompt slot alone with the same windows and merging: a probe figure
means something only where it beats this control.

Selection is honest: ``probe-cv`` chooses, for each of 5 query folds, the best variant of the grid on
the other 4 folds and scores the held-out fold with it. ``probe-default`` is the shipped
``configs/default.yaml`` configuration, run end to end through :class:`AttentionReranker` (its own
timing, early exit included).

Baselines (``rerank/baselines.py``, run end to end on the same BM25 candidates, each timed per query):
``icr-reference`` (published ICR: eager attention, all layers, a second full ``N/A`` forward, windows of
20), ``listwise`` (RankGPT-style generation, windows of 20 sliding by 10 from the bottom), ``pointwise``
(P(Yes) per passage), ``identity`` (BM25 order) and ``shuffle`` (seeded random order). The baselines are
never cached. The probe grid's passes are (``results/cache/dl19``): a pass read from there reports the
seconds measured when it was computed, and the JSON says so in ``config.probe_seconds``.

The shipped pipeline's first stage is the hybrid retriever, not BM25 alone. DL19 ships BM25's top-100
rather than the collection, so ``hybrid`` here is the configured retriever's dense half ranking those
candidates, fused with BM25's ranking by the configured fusion (:func:`hybrid_pool`). On it the suite
reruns, at the configuration's ``top_k``, the control and the probe (``position-prior``, ``probe-raw``,
``probe-nacal``, ``probe-default-alone``: the default's score without fusion, and ``probe-default``,
end to end with the hybrid's scores), each named ``...-hybrid`` and compared with ``hybrid`` itself
(``p_vs_hybrid``) as well as with BM25: a probe figure on this first stage means something only where
it beats the first stage.

Options (``--opt``): ``first_stages=bm25,hybrid`` whose candidates the probe reranks (default both;
``hybrid`` alone skips the BM25 depth sweep and the baselines); ``depths=20,100`` candidate depths;
``queries=N`` limit (quick 5);
``baselines=a,b`` which baselines (default all; ``none`` for none); ``baseline_depths=20,100``;
``baseline_queries=N`` runs the baselines on the first N queries only (default all; 1 with ``--quick``:
icr-reference's two eager forwards take 35-60 s per window of 20 on a busy 2-core CPU). In quick mode
``baseline_depths`` defaults to 20.
``passage_max_tokens=N`` (every system; default the config's, 300; quick 32).
``baselines_from=FILE`` copies the baseline rows of an earlier full run on the same model and queries
(they do not depend on the probe configuration) instead of running them again.
"""

from __future__ import annotations

import itertools
import json
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval.common import (
    REPO_ROOT,
    SuiteError,
    check_opts,
    get_opt,
    ir_metrics,
    per_query_metric,
    require_data,
    with_passage_tokens,
)
from rerank.engines.attention import fuse_first_stage
from rerank.probe.scoring import PassageStats, passage_scores, zscore
from rerank.records import Passage

WINDOW = 20
METRICS = ("ndcg@10", "mrr@10")
BASELINES = ("icr-reference", "listwise", "pointwise", "identity", "shuffle")
FIRST_STAGES = ("bm25", "hybrid")
QUICK_BASELINE_QUERIES = 1
# Per-query counters from RankedList.info that a baseline's system entry sums over the queries.
BASELINE_COUNTERS = {
    "icr-reference": ("windows", "forwards"),
    "listwise": (
        "windows",
        "parse_failures",
        "repaired",
        "out_of_range",
        "duplicates",
        "missing",
        "generated_tokens",
    ),
    "pointwise": ("forwards",),
}


@dataclass(frozen=True)
class Variant:
    """How to read the captured attention: calibration, layer band, aggregation, fusion with BM25."""

    kind: str  # raw | nacal
    layers: tuple[int, int] | None
    aggregation: str
    bm25_weight: float

    @property
    def name(self) -> str:
        lay = "all" if self.layers is None else f"L{self.layers[0]}-{self.layers[1]}"
        return f"probe-{self.kind}-{lay}-{self.aggregation}-w{self.bm25_weight:g}"


def load_dl19(data_dir: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    root = require_data(data_dir, "trec-dl19")
    runs = json.loads((root / "bm25_top100.json").read_text(encoding="utf-8"))
    qrels: dict[str, dict[str, int]] = {}
    for line in (root / "qrels.txt").read_text().splitlines():
        qid, _, docid, grade = line.split()
        qrels.setdefault(qid, {})[docid] = int(grade)
    queries = []
    for e in runs:
        hits = e["hits"]
        bm25 = [float(h["score"]) for h in hits]
        queries.append(
            {
                "qid": str(hits[0]["qid"]),
                "query": e["query"],
                "passages": [Passage(id=str(h["docid"]), text=h["content"]) for h in hits],
                "bm25": bm25,
                "first_stage": bm25,
            }
        )
    return queries, qrels


def hybrid_pool(queries: list[dict[str, Any]], retriever: Any) -> list[dict[str, Any]]:
    """The pipeline's hybrid first stage over each query's BM25 candidates.

    DL19 ships BM25's top-100, not the 8.8M-passage collection, so the dense half cannot search the
    collection: the configured retriever's dense half indexes each query's candidates and ranks them,
    and its fusion merges that ranking with DL19's BM25 ranking (``retriever.fusion``, ``rrf_k``,
    ``weights``). Returns copies of the queries with the candidates in fused order and the fused
    score as ``first_stage``.
    """
    from tqdm.auto import tqdm

    from retrievers.hybrid import HybridRetriever
    from retrievers.records import Hit

    hybrid = HybridRetriever.from_config(retriever)
    out = []
    for q in tqdm(queries, desc="dense scores", unit="q"):
        ps = q["passages"]
        order = sorted(range(len(ps)), key=lambda i: -q["bm25"][i])
        sparse = [Hit(passage=ps[i], score=q["bm25"][i], rank=r) for r, i in enumerate(order, 1)]
        hybrid.dense.index(ps, show_progress=False)
        dense = hybrid.dense.search_batch([q["query"]], k=len(ps))[0]
        fused = hybrid.fuse(sparse, dense, len(ps))
        bm25 = {p.id: s for p, s in zip(ps, q["bm25"], strict=True)}
        out.append(
            {
                **q,
                "passages": [h.passage for h in fused],
                "bm25": [bm25[h.passage.id] for h in fused],
                "first_stage": [h.score for h in fused],
            }
        )
    return out


def window_jobs(queries: list[dict[str, Any]], depth: int) -> list[Any]:
    """Consecutive windows of 20 in BM25 order, each placed best-last in its prompt."""
    from rerank.fitting import ProbeJob

    jobs = []
    for q in queries:
        ps = q["passages"][:depth]
        for w in range(0, len(ps), WINDOW):
            jobs.append(ProbeJob(f"{q['qid']}:{w}", q["query"], tuple(ps[w : w + WINDOW][::-1])))
    return jobs


def _window_scores(st: PassageStats, v: Variant) -> np.ndarray:
    # Prompt order is reversed BM25 order; return scores in BM25 order.
    s = passage_scores(st, kind=v.kind, layers=v.layers, aggregation=v.aggregation)
    return zscore(s[::-1])


def fused_scores(
    q: dict[str, Any], depth: int, stats: dict[str, PassageStats], v: Variant | None
) -> np.ndarray:
    """Final scores of the top ``depth`` in BM25 order; ``v=None`` is the position-prior control."""
    n = min(depth, len(q["passages"]))
    parts = []
    for w in range(0, n, WINDOW):
        m = min(WINDOW, n - w)
        if v is None:
            # Best-last prompt: slot m-1-i holds candidate i; the later the slot, the more attention.
            parts.append(zscore(np.arange(m, 0, -1, dtype=np.float64)))
        else:
            parts.append(_window_scores(stats[f"{q['qid']}:{w}"], v))
    s = np.concatenate(parts)
    w_bm25 = 0.0 if v is None else v.bm25_weight
    return fuse_first_stage(s, np.asarray(q["first_stage"][:n]), w_bm25) if w_bm25 else s


def to_run(queries: list[dict[str, Any]], scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Rank-derived run scores; passages below the reranked depth keep BM25 order underneath."""
    run = {}
    for q in queries:
        s = scores[q["qid"]]
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        ids = [q["passages"][i].id for i in order] + [p.id for p in q["passages"][len(s) :]]
        run[q["qid"]] = {d: float(len(ids) - r) for r, d in enumerate(ids)}
    return run


def per_query_ndcg(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    return per_query_metric(qrels, run, "ndcg@10")


def variant_grid(num_layers: int) -> list[Variant]:
    bands = [None, (0, 11), (6, 17), (12, 23), (18, num_layers - 1), (8, 20)]
    grid = []
    for kind, layers, agg, w in itertools.product(
        ("raw", "nacal"), bands, ("mean", "sum"), (0.0, 0.5, 1.0, 2.0)
    ):
        grid.append(Variant(kind, layers, agg, w))
    for layers, w in itertools.product(bands, (0.0, 0.5, 1.0, 2.0)):
        grid.append(Variant("logratio", layers, "mean", w))
    return grid


def head_set_scores(
    q: dict[str, Any], depth: int, stats: dict[str, PassageStats], heads: Any, w: float
) -> np.ndarray:
    """Like :func:`fused_scores` for an explicit head set (log-ratio calibration)."""
    n = min(depth, len(q["passages"]))
    parts = [
        zscore(passage_scores(stats[f"{q['qid']}:{s}"], kind="logratio", head_set=heads)[::-1])
        for s in range(0, n, WINDOW)
    ]
    out = np.concatenate(parts)
    return fuse_first_stage(out, np.asarray(q["first_stage"][:n]), w) if w else out


def paired_randomization(
    a: dict[str, float], b: dict[str, float], trials: int = 10000, seed: int = 0
) -> float:
    """Two-sided p-value of mean(a - b) under random sign flips of the per-query differences."""
    d = np.array([a[q] - b[q] for q in a])
    rng = np.random.default_rng(seed)
    obs = abs(d.mean())
    flips = rng.choice([-1.0, 1.0], size=(trials, len(d)))
    return float(((np.abs((flips * d).mean(axis=1)) >= obs - 1e-12).sum() + 1) / (trials + 1))


def parse_first_stages(opts: dict[str, str]) -> list[str]:
    """``--opt first_stages=bm25,hybrid``: whose candidates and scores the probe reranks (default both)."""
    raw = str(get_opt(opts, "first_stages", ",".join(FIRST_STAGES)))
    stages = list(dict.fromkeys(x.strip() for x in raw.split(",") if x.strip()))
    unknown = [x for x in stages if x not in FIRST_STAGES]
    if unknown or not stages:
        raise SuiteError(f"--opt first_stages={raw!r}: choose one or more of {', '.join(FIRST_STAGES)}")
    return stages


def parse_baselines(opts: dict[str, str], quick: bool) -> tuple[list[str], list[int], int]:
    """Baseline names, depths and query limit (0 = all) from ``--opt``; a SuiteError names the choices."""
    raw = str(get_opt(opts, "baselines", ",".join(BASELINES))).strip()
    names = [] if raw.lower() in ("", "none") else [x.strip() for x in raw.split(",") if x.strip()]
    unknown = [x for x in names if x not in BASELINES]
    if unknown:
        raise SuiteError(f"unknown baseline(s) {', '.join(unknown)}; choose from: {', '.join(BASELINES)}")
    raw_d = str(get_opt(opts, "baseline_depths", "20" if quick else "20,100"))
    try:
        depths = [int(x) for x in raw_d.split(",") if x.strip()]
    except ValueError:
        raise SuiteError(f"--opt baseline_depths={raw_d!r}: expected integers like 20,100") from None
    if any(d < 1 for d in depths):
        raise SuiteError(f"--opt baseline_depths={raw_d!r}: depths must be >= 1")
    limit = int(get_opt(opts, "baseline_queries", QUICK_BASELINE_QUERIES if quick else 0))
    if limit < 0:
        raise SuiteError(f"--opt baseline_queries={limit}: must be >= 0 (0 = all queries)")
    return list(dict.fromkeys(names)), list(dict.fromkeys(depths)), limit


def reuse_baselines(
    opts: dict[str, str],
    names: list[str],
    depths: list[int],
    n_queries: int,
    model: Any,
    passage_max_tokens: int = 300,
) -> dict[str, dict[str, Any]]:
    """Baseline rows of an earlier result (``--opt baselines_from=FILE``), instead of running them again.

    The baselines do not depend on the probe configuration, so a rerun for a new default can take them
    from a full run on the same model, queries, candidates and passage budget (runs that predate
    ``config.passage_max_tokens`` used 300); each copied row names its source file.
    """
    path = str(get_opt(opts, "baselines_from", ""))
    if not path or not names:
        return {}
    f = Path(path)
    if not f.is_file():
        raise SuiteError(f"--opt baselines_from={path}: file not found")
    old = json.loads(f.read_text(encoding="utf-8"))
    cfg = old.get("config", {})
    mismatch = [
        what
        for what, ok in (
            ("suite", old.get("suite") == "rerank"),
            ("quick", not cfg.get("quick")),
            ("model", cfg.get("model") == model.model_id),
            ("dtype", cfg.get("dtype") == model.dtype),
            ("baseline_queries", cfg.get("baseline_queries") == n_queries),
            ("passage_max_tokens", cfg.get("passage_max_tokens", 300) == passage_max_tokens),
        )
        if not ok
    ]
    if mismatch:
        raise SuiteError(f"--opt baselines_from={path}: not the same run ({', '.join(mismatch)} differ)")
    out = {}
    for depth in depths:
        for name in names:
            key = f"{name}@{depth}"
            if key not in old.get("systems", {}):
                raise SuiteError(f"--opt baselines_from={path}: it has no {key}")
            out[key] = {**old["systems"][key], "measured_in": f.name}
    return out


def run_baseline(
    model: Any, name: str, queries: list[dict[str, Any]], depth: int, probe: Any
) -> tuple[dict[str, np.ndarray], list[float], dict[str, int]]:
    """Rerank each query's BM25 top ``depth`` with a registered baseline.

    Returns scores in BM25 order per query, wall seconds per query and the summed info counters.
    """
    from tqdm.auto import tqdm

    from rerank.engines import PROBE_ENGINES
    from rerank.records import Hit

    rr = PROBE_ENGINES.get(name)(model, probe)
    scores: dict[str, np.ndarray] = {}
    seconds: list[float] = []
    counters = dict.fromkeys(BASELINE_COUNTERS.get(name, ()), 0)
    for q in tqdm(queries, desc=f"{name}@{depth}", unit="q"):
        ps, bm = q["passages"][:depth], q["first_stage"][:depth]
        hits = [Hit(passage=p, score=s, rank=i + 1) for i, (p, s) in enumerate(zip(ps, bm, strict=True))]
        t0 = time.perf_counter()
        ranked = rr.rerank(q["query"], hits)
        seconds.append(time.perf_counter() - t0)
        by_id = {it.passage.id: it.score for it in ranked.items}
        scores[q["qid"]] = np.array([by_id[p.id] for p in ps])
        for k in counters:
            counters[k] += int(ranked.info[k])
    return scores, seconds, counters


def run_default(
    rr: Any, queries: list[dict[str, Any]], depth: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """Rerank each query's first-stage top ``depth`` with ``rr``, given the first stage's scores.

    Returns, in first-stage order per query, the reranker's scores and its score without the first
    stage's (the fused score minus ``first_stage_weight`` x the z-scored first-stage score: exactly the
    windows' merged probe score), and the mean wall seconds per query.
    """
    from rerank.probe.scoring import zscore
    from rerank.records import Hit

    scores, alone, t = {}, {}, []
    for q in queries:
        ps = q["passages"][:depth]
        fs = np.asarray(q["first_stage"][:depth], dtype=np.float64)
        hits = [
            Hit(passage=p, score=float(s), rank=i + 1) for i, (p, s) in enumerate(zip(ps, fs, strict=True))
        ]
        t0 = time.perf_counter()
        ranked = rr.rerank(q["query"], hits)
        t.append(time.perf_counter() - t0)
        by_id = {it.passage.id: it.score for it in ranked.items}
        scores[q["qid"]] = np.array([by_id[p.id] for p in ps])
        alone[q["qid"]] = scores[q["qid"]] - rr.cfg.first_stage_weight * zscore(fs)
    return scores, alone, float(np.mean(t))


def run(args: Namespace) -> dict[str, Any]:
    from eval.heads import choose
    from rerank.config import load_config
    from rerank.fitting import collect
    from rerank.probe.model import load_model

    opts = getattr(args, "opts", {}) or {}
    check_opts(
        opts,
        [
            "depths",
            "queries",
            "config",
            "baselines",
            "baseline_depths",
            "baseline_queries",
            "baselines_from",
            "passage_max_tokens",
            "first_stages",
        ],
    )
    stages = parse_first_stages(opts)
    baselines, baseline_depths, baseline_limit = parse_baselines(opts, args.quick)
    if "bm25" not in stages:
        # The baselines and the depth sweep rerank BM25's candidates.
        baselines, depths_opt = [], "none"
    else:
        depths_opt = str(get_opt(opts, "depths", "20,100"))
    depths = [] if depths_opt == "none" else [int(x) for x in depths_opt.split(",")]
    queries, qrels = load_dl19(args.data_dir)
    limit = int(get_opt(opts, "queries", 0)) or (5 if args.quick else len(queries))
    queries = [q for q in queries if q["qid"] in qrels][:limit]
    if args.quick and depths:
        depths = [20]
    config_path = Path(get_opt(opts, "config", str(REPO_ROOT / "configs" / "default.yaml")))
    # Every system, the baselines included, reads the passages with the same budget.
    cfg = with_passage_tokens(load_config(config_path), opts, args.quick)
    cap = cfg.probe.passage_max_tokens
    model = load_model(cfg.model)
    cached: list[str] = []
    jobs = window_jobs(queries, max(depths, default=0))
    stats, seconds = collect(
        model,
        jobs,
        cache_dir=REPO_ROOT / "results" / "cache" / "dl19",
        max_passage_tokens=cap,
        desc="dl19",
        cached=cached,
    )
    grid = variant_grid(model.num_layers)
    # The SciFact head set (the previous default) is scored from the same passes for comparison.
    heads_cfg = cfg if cfg.probe.head_set is not None else load_config(REPO_ROOT / "configs" / "heads.yaml")
    systems: dict[str, dict[str, Any]] = {}
    per_q: dict[str, dict[str, float]] = {}

    def add(name: str, run_: dict[str, dict[str, float]], sec: float, **extra: Any) -> None:
        systems[name] = {**ir_metrics(qrels, run_, METRICS), "seconds_per_query": round(sec, 4), **extra}
        per_q[name] = per_query_ndcg(qrels, run_)

    def scores_run(fn: Any) -> dict[str, dict[str, float]]:
        return to_run(queries, {q["qid"]: fn(q) for q in queries})

    add("bm25", scores_run(lambda q: np.asarray(q["bm25"], dtype=np.float64)), 0.0)
    qids = [q["qid"] for q in queries]
    folds = [list(range(f, len(qids), 5)) for f in range(5)]
    for depth in depths:
        nwin = -(-depth // WINDOW)
        sec = float(np.mean([sum(seconds[f"{q['qid']}:{w * WINDOW}"] for w in range(nwin)) for q in queries]))
        sfx = f"@{depth}"
        add("position-prior" + sfx, scores_run(lambda q, d=depth: fused_scores(q, d, stats, None)), 0.0)
        named = {
            "probe-raw": Variant("raw", None, "mean", 0.0),
            "probe-nacal": Variant("nacal", None, "mean", 0.0),
            "probe-logratio": Variant("logratio", None, "mean", 0.0),
        }
        for name, v in named.items():
            add(name + sfx, scores_run(lambda q, d=depth, v=v: fused_scores(q, d, stats, v)), sec)
        if heads_cfg.probe.head_set is not None:
            hs, w = heads_cfg.probe.head_set, heads_cfg.probe.first_stage_weight
            add(
                "probe-heads" + sfx,
                scores_run(lambda q, d=depth, h=hs: head_set_scores(q, d, stats, h, 0.0)),
                sec,
            )
            if w:
                add(
                    "probe-heads+bm25" + sfx,
                    scores_run(lambda q, d=depth, hs=hs, w=w: head_set_scores(q, d, stats, hs, w)),
                    sec,
                    first_stage_weight=w,
                )
        # Nested choice: for each fold, the grid variant or a head set chosen on the other folds only.
        runs = {v: scores_run(lambda q, d=depth, v=v: fused_scores(q, d, stats, v)) for v in grid}
        nd = {v: per_query_ndcg(qrels, r) for v, r in runs.items()}
        cv_run: dict[str, dict[str, float]] = {}
        chosen = []
        for fold in folds:
            train = [i for i in range(len(qids)) if i not in fold]
            best_v = max(grid, key=lambda v: np.mean([nd[v][qids[i]] for i in train]))
            best_grid = float(np.mean([nd[best_v][qids[i]] for i in train]))
            pick = choose(queries, qrels, stats, train)
            # Heads and weight are chosen on the first window; judge them at this depth on the training folds.
            pick_run = scores_run(
                lambda q, d=depth, p=pick: head_set_scores(q, d, stats, p["head_set"], p["w"])
            )
            pick_nd = per_query_ndcg(qrels, pick_run)
            heads_score = float(np.mean([pick_nd[qids[i]] for i in train]))
            for i in fold:
                q = queries[i]
                if heads_score > best_grid:
                    cv_run[q["qid"]] = pick_run[q["qid"]]
                else:
                    cv_run[q["qid"]] = runs[best_v][q["qid"]]
            chosen.append(f"heads k={pick['k']} w={pick['w']:g}" if heads_score > best_grid else best_v.name)
        add("probe-cv" + sfx, cv_run, sec, chosen_per_fold=chosen)
    # The shipped default, run end to end (its own windows, prompt orders, early exit and timing), and
    # its score without the first stage's.
    from rerank.engines import AttentionReranker

    rr = AttentionReranker(model, cfg.probe, cfg.calibration)
    depth = cfg.retriever.top_k
    if "bm25" in stages:
        scores, own, sec = run_default(rr, queries, depth)
        add(f"probe-default@{depth}", to_run(queries, scores), sec)
        add(f"probe-default-alone@{depth}", to_run(queries, own), sec)
    if "hybrid" in stages:
        # The pipeline's own first stage; each system is compared with it as well as with BM25.
        h_queries = hybrid_pool(queries, cfg.retriever)
        add("hybrid", to_run(h_queries, {q["qid"]: np.asarray(q["first_stage"]) for q in h_queries}), 0.0)
        h_jobs = window_jobs(h_queries, depth)
        jobs = [*jobs, *h_jobs]
        h_stats, h_seconds = collect(
            model,
            h_jobs,
            cache_dir=REPO_ROOT / "results" / "cache" / "dl19",
            max_passage_tokens=cap,
            desc="dl19/hybrid",
            cached=cached,
        )
        h_sec = float(
            np.mean([sum(h_seconds[k] for k in h_seconds if k.startswith(f"{q['qid']}:")) for q in queries])
        )
        sfx = f"@{depth}-hybrid"

        def h_run(fn: Any) -> dict[str, dict[str, float]]:
            return to_run(h_queries, {q["qid"]: fn(q) for q in h_queries})

        add("position-prior" + sfx, h_run(lambda q: fused_scores(q, depth, h_stats, None)), 0.0)
        for name, v in (
            ("probe-raw", Variant("raw", None, "mean", 0.0)),
            ("probe-nacal", Variant("nacal", None, "mean", 0.0)),
        ):
            add(name + sfx, h_run(lambda q, v=v: fused_scores(q, depth, h_stats, v)), h_sec)
        scores, own, sec = run_default(rr, h_queries, depth)
        add("probe-default-alone" + sfx, to_run(h_queries, own), sec)
        add("probe-default" + sfx, to_run(h_queries, scores), sec)
    # Baselines, end to end on the same candidates (windows of 20, best BM25 passage last in ICR prompts).
    from rerank.config import ProbeConfig

    b_queries = queries[:baseline_limit] if baseline_limit else queries
    b_probe = ProbeConfig(
        window_size=WINDOW, prompt_order="reversed", passage_max_tokens=cfg.probe.passage_max_tokens
    )
    # On a query subset, BM25's nDCG@10 over the same queries is the figure to read a baseline against.
    subset = len(b_queries) < len(queries)
    bm25_same = float(np.mean([per_q["bm25"][q["qid"]] for q in b_queries])) if subset else None
    reused = reuse_baselines(opts, baselines, baseline_depths, len(b_queries), model, cap)
    systems.update(reused)
    for depth in baseline_depths:
        for name in baselines:
            if f"{name}@{depth}" in reused:
                continue
            b_scores, b_sec, counters = run_baseline(model, name, b_queries, depth, b_probe)
            extra: dict[str, Any] = {"queries": len(b_queries), **counters}
            if bm25_same is not None:
                extra["bm25_ndcg@10_same_queries"] = round(bm25_same, 4)
            add(f"{name}@{depth}", to_run(b_queries, b_scores), float(np.mean(b_sec)), **extra)
    for name in systems:
        if name != "bm25" and name not in reused:
            systems[name]["p_vs_bm25"] = round(paired_randomization(per_q[name], per_q["bm25"]), 4)
        if name.endswith("-hybrid"):
            systems[name]["p_vs_hybrid"] = round(paired_randomization(per_q[name], per_q["hybrid"]), 4)
    return {
        "dataset": "trec-dl19 (BM25 top-100, 43 judged queries)"
        if not args.quick
        else "trec-dl19 (quick subset)",
        "config": {
            "model": model.model_id,
            "dtype": model.dtype,
            "window": WINDOW,
            "prompt_order": "best-last (BM25 rank 1 next to the query)",
            "depths": depths,
            "first_stages": stages,
            "hybrid": "the configured retriever's encoder scores BM25's top-100 and its fusion merges the "
            "two rankings (the collection itself is not searched)"
            if "hybrid" in stages
            else None,
            "queries": len(queries),
            "passage_max_tokens": cap,
            "default_config": cfg.model_dump(mode="json"),
            "timing_note": "probe-* variants share one all-layer pass with the N/A pass; probe-default is "
            "timed separately with its own configuration",
            "probe_seconds": (
                f"the probe-* grid's seconds_per_query come from the pass cache for {len(cached)} of "
                f"{len(jobs)} passes: seconds measured when those passes were computed, not in this run"
                if cached
                else "the probe-* grid's seconds_per_query were measured in this run"
            ),
            "grid_size": len(grid),
            "baselines": baselines,
            "baseline_depths": baseline_depths,
            "baseline_queries": len(b_queries),
        },
        "systems": systems,
    }
