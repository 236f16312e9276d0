"""Suite ``position``: is the calibrated score position-blind? NQ-open, gold passage moved over 20 slots.

Each test question's gold passage is placed at every slot of a 20-passage list of hard distractors
(see ``eval/nq.py``); the probe reads each list once (with the ``N/A`` pass), and every system is scored
from those same passes:

``probe-raw``           raw attention (calibrator ``none``)
``probe-nacal``         content-free calibration (ICR)
``probe-curve``         raw attention corrected by the fitted curve (no extra pass)
``probe-curve+nacal``   N/A-calibrated score corrected by a curve fitted on such scores
``probe-curve+nacal+bm25``  the default fused with the list's BM25 scores by the config's
                        ``first_stage_weight`` (when above 0), as the reranker fuses first-stage scores:
                        what a pipeline user gets; the gold passage keeps its BM25 score at every slot.
                        The sweep reads each list in one prompt order: for ``prompt_order: both`` this
                        is the score of the configuration's first (best-last) prompt alone, fused at
                        its weight, not the two-prompt average
``bm25``                BM25 order within the list: position-blind by construction, a reference
``probe-cv``            score kind (raw, N/A difference, ``logratio``, ``ratio``), layer band (six
                        fixed bands up to layer 23, and the SciFact head set) and curve form chosen
                        by nested cross-validation over the test questions: for each of
                        5 folds the variant with the best inner-CV (mean recall@1 - bin spread) on the
                        other questions is picked, its curve fitted on their distractor slots, and
                        the held-out fold scored; ``chosen`` lists each fold's pick

Metrics: gold recall@1 per slot (``recall@1@pos1`` .. ``@pos20``), per bin of four slots (``@bin1`` ..
``@bin5``), ``bin_spread`` (max - min over bins), ``recall@1`` (mean), ``mrr``; ``seconds_per_query`` is
timed separately per calibrator on the same lists (interleaved), since the shared pass runs ``N/A`` for all.
Beside each spread, what chance alone gives a position-blind ranker on the same questions (each
question's hits shuffled over its slots, 2,000 times): ``bin_spread_null_median``, ``_null_p95`` and
``bin_spread_p``, the share of shuffles at least as uneven as the observed. ``per_question`` keeps every
system's gold rank per question and slot (one string of 20 ranks per question), so that parts of a
run can be merged exactly (``python -m eval.merge``).

Options (``--opt``): ``questions=N`` (default 300; quick 4), ``config=PATH`` (probe settings; default
configs/default.yaml), ``curve_raw=PATHS`` and ``curve_nacal=PATHS`` (comma-separated candidates, the
first fitted for the loaded model's dtype is used; defaults: the shipped raw curves and the config's
curves), ``timing_lists=N`` (default 20; 0 leaves the timing keys out, for a run that only fills a
store),
``passage_max_tokens=N`` (default the config's, 300; quick 32, which cuts most NQ passages; a quick
run also reads layers up to the config's last only, so probe-cv's grid keeps the bands ending there),
``fresh_from=K``: also summarise every system over test questions ``K`` onwards only (``fresh``), for
when the first ``K`` questions were looked at while choosing the configuration.
``cv=0``: leave ``probe-cv`` out, so each pass stops after the config's last layer (19 of 30 for the
default, about a fifth less work than the grid's 23): for re-measuring the other systems, e.g. with a
new curve, when probe-cv's figure does not depend on it.
``store=PREFIX`` (with ``cv=0``): keep each question's scores (raw and N/A-calibrated, every gold slot x
prompt slot, float32) in ``PREFIX-raw.npz`` and ``PREFIX-nacal.npz``, the calibrate sweep's store format
(see ``rerank.fitting.sweep_scores``); questions found there are not probed again, so a new curve is
measured on all 300 test questions in seconds, and the hours of passes can be spread over several runs
that add to the same store one after another (one process per store: parts run at once fill the pass
cache, and a final run with the store reads them from it). A store made with another model, dtype,
layers or passage cap is refused.

A full run is 20 passes per question, hours on a CPU. ``start=S`` probes and reports test questions ``S``
to ``questions - 1`` only. Every pass is cached under ``results/cache/nq`` (keyed by model, dtype and
prompt), so several processes can each fill the cache for a disjoint range at once, e.g. on two cores
``--opt start=0 --opt questions=150`` and ``--opt start=150 --opt questions=300``. A final run without
``start`` then reads every pass from the cache and reports all the questions together, including
``probe-cv``, which needs them all (a part of fewer than 3 questions leaves it out).
"""

from __future__ import annotations

import logging
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from eval.common import (
    RAW_CURVES,
    REPO_ROOT,
    SuiteError,
    check_opts,
    get_opt,
    get_start,
    load_curve,
    require_data,
    with_passage_tokens,
)

logger = logging.getLogger(__name__)

N = 20
BINS = 5
CV_FOLDS = 5
MIN_CV_QUESTIONS = 3
# Shuffles for the position-blind null of the bin spread (see spread_null).
NULL_TRIALS = 2000
NULL_KEYS = ("bin_spread_null_median", "bin_spread_null_p95", "bin_spread_p")
SWEEP_LAST = 23
CV_KINDS = ("raw", "nacal", "ratio", "logratio")
CV_BANDS: tuple[tuple[int, int], ...] = ((0, 23), (5, 23), (8, 16), (12, 19), (12, 23), (16, 23))
CV_FORMS = ("none", "subtractive", "zscore", "multiplicative")
# The default's calibrated score fused with the list's BM25 scores, as the reranker fuses first-stage
# scores: what a pipeline user gets when the first stage scores the candidates.
FUSED = "probe-curve+nacal+bm25"


def summarize(ranks: dict[int, list[int]]) -> dict[str, float]:
    """``ranks[pos]`` = 1-based rank of the gold passage for each question with gold at slot ``pos``."""
    out: dict[str, float] = {}
    per_pos = []
    for pos in range(N):
        r = np.asarray(ranks[pos])
        per_pos.append(float((r == 1).mean()))
        out[f"recall@1@pos{pos + 1}"] = round(per_pos[-1], 4)
    size = N // BINS
    bins = [float(np.mean(per_pos[b * size : (b + 1) * size])) for b in range(BINS)]
    for b, v in enumerate(bins):
        out[f"recall@1@bin{b + 1}"] = round(v, 4)
    spread = max(bins) - min(bins)
    out["bin_spread"] = round(spread, 4)
    out["recall@1"] = round(float(np.mean(per_pos)), 4)
    allr = np.concatenate([np.asarray(ranks[p]) for p in range(N)])
    out["mrr"] = round(float((1.0 / allr).mean()), 4)
    hits = np.array([np.asarray(ranks[p]) == 1 for p in range(N)]).T  # (questions, slot)
    out.update(spread_null(hits, spread))
    return out


def spread_null(
    hits: np.ndarray, observed: float, trials: int = NULL_TRIALS, seed: int = 0
) -> dict[str, float]:
    """What bin spread a position-blind ranker would show on these questions, and how the observed compares.

    ``hits[q, pos]``: the gold passage ranked first with gold at ``pos``. Under position-blindness each
    question's hits are exchangeable over its 20 slots, so shuffling them within the question gives
    the spread that chance alone produces with this many questions and this per-question accuracy.
    Returns the null's median and 95th percentile, and the share of shuffles at least as uneven as the
    observed (``bin_spread_p``: small means the unevenness is real, large that the sample cannot tell).
    """
    rng = np.random.default_rng(seed)
    q = hits.shape[0]
    null = np.empty(trials)
    for t0 in range(0, trials, 250):
        t = min(250, trials - t0)
        perm = rng.permuted(np.broadcast_to(hits, (t, *hits.shape)), axis=2)
        bins = perm.reshape(t, q, BINS, N // BINS).mean(axis=(1, 3))
        null[t0 : t0 + t] = bins.max(axis=1) - bins.min(axis=1)
    figures = (
        np.median(null),
        np.percentile(null, 95),
        ((null >= observed - 1e-12).sum() + 1) / (trials + 1),
    )
    return {k: round(float(v), 4) for k, v in zip(NULL_KEYS, figures, strict=True)}


def gold_rank(scores: np.ndarray, gold: int) -> int:
    # Ties count against the gold passage: a constant score must not look perfect.
    return int((scores >= scores[gold]).sum())


def _fit(scores: np.ndarray, qs: np.ndarray, form: str) -> Any:
    """Curve of ``form`` fitted on the distractor slots of questions ``qs`` (None for ``none``)."""
    from calibration.curve import fit_curve, sweep_samples

    if form == "none":
        return None
    return fit_curve(sweep_samples(scores[qs]), mode=form, n_bootstrap=0)


def _ranks(scores: np.ndarray, qs: np.ndarray, curve: Any) -> np.ndarray:
    """(questions, gold slot) rank of the gold passage after the curve."""
    return np.array(
        [[gold_rank(curve.apply(scores[q, p]) if curve else scores[q, p], p) for p in range(N)] for q in qs]
    )


def _objective(ranks: np.ndarray) -> float:
    from calibration.curve import evenness_objective

    return evenness_objective((ranks == 1).mean(axis=0), BINS)


def nested_cv(
    variants: dict[str, tuple[np.ndarray, str]], folds: int = CV_FOLDS, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """Held-out gold ranks (questions, slot) and each outer fold's chosen variant.

    ``variants[name] = (scores, form)`` with ``scores`` of shape (questions, gold slot, prompt slot).
    """
    nq = next(iter(variants.values()))[0].shape[0]
    folds = min(folds, nq)
    if folds < 3:
        raise ValueError(f"nested cross-validation needs at least 3 questions, got {nq}")
    order = np.random.default_rng(seed).permutation(nq)
    ranks = np.zeros((nq, N), dtype=np.int64)
    chosen = []
    for test in np.array_split(order, folds):
        train = np.setdiff1d(order, test)
        inner = np.array_split(train, folds - 1)

        def inner_score(name: str, train: np.ndarray = train, inner: list[np.ndarray] = inner) -> float:
            scores, form = variants[name]
            r = [_ranks(scores, g, _fit(scores, np.setdiff1d(train, g), form)) for g in inner]
            return _objective(np.concatenate(r))

        best = max(variants, key=inner_score)
        scores, form = variants[best]
        ranks[test] = _ranks(scores, test, _fit(scores, train, form))
        chosen.append(best)
    return ranks, chosen


def cv_variants(
    test: list[Any], stats: dict[str, Any], last: int, probe_cfg: Any
) -> dict[str, tuple[np.ndarray, str]]:
    """probe-cv's grid: every score kind x layer band (and head set) x curve form, scored on ``test``."""
    from rerank.config import load_config
    from rerank.probe.scoring import passage_scores

    bands: list[Any] = [b for b in CV_BANDS if b[1] <= last]
    # The SciFact head set (configs/heads.yaml, the previous default) is in the grid too.
    heads_cfg = load_config(REPO_ROOT / "configs" / "heads.yaml")
    for hs_cfg in (probe_cfg, heads_cfg.probe):
        if hs_cfg.head_set and max(layer for layer, _ in hs_cfg.head_set) <= last:
            band_hs = tuple(map(tuple, hs_cfg.head_set))
            if band_hs not in bands:
                bands.append(band_hs)
    variants: dict[str, tuple[np.ndarray, str]] = {}
    for kind in CV_KINDS:
        for band in bands:
            hs = band if isinstance(band[0], tuple) else None
            band_kw = {"head_set": hs} if hs else {"layers": band}
            arr = np.array(
                [
                    [passage_scores(stats[f"{it.qid}:{pos}"], kind=kind, **band_kw) for pos in range(N)]
                    for it in test
                ]
            )
            label = "head_set" if hs else f"layers{band[0]}-{band[1]}"
            for form in CV_FORMS:
                if form == "multiplicative" and kind != "raw":
                    continue  # a ratio needs positive scores
                variants[f"{kind}/{label}/{form}"] = (arr, form)
    return variants


def pass_last_layer(model: Any, probe_cfg: Any, grid: bool = True) -> int:
    """The last layer each sweep pass reads: with ``grid``, up to ``SWEEP_LAST`` (or the config's, if
    deeper), so that every band of probe-cv's grid is scored from the same cached passes; else the
    config's own last layer.
    """
    cfg_last = probe_cfg.layer_range[1] if probe_cfg.layer_range else model.num_layers - 1
    return min(max(cfg_last, SWEEP_LAST), model.num_layers - 1) if grid else cfg_last


def run(args: Namespace) -> dict[str, Any]:
    from eval.nq import load_nq
    from rerank.config import CalibrationConfig, load_config
    from rerank.engines import AttentionReranker
    from rerank.engines.attention import fuse_first_stage
    from rerank.fitting import ProbeJob, collect, sweep_rows, sweep_scores
    from rerank.probe.calibrators import ScoreSettings
    from rerank.probe.model import load_model
    from rerank.probe.scoring import zscore
    from retrievers.bm25 import BM25Retriever

    opts = getattr(args, "opts", {}) or {}
    check_opts(
        opts,
        [
            "questions",
            "start",
            "config",
            "curve_raw",
            "curve_nacal",
            "timing_lists",
            "fresh_from",
            "passage_max_tokens",
            "cv",
            "store",
        ],
    )
    require_data(args.data_dir, "nq-open-oracle")
    n_q = int(get_opt(opts, "questions", 4 if args.quick else 300))
    start = get_start(opts, n_q)
    fresh_from = int(get_opt(opts, "fresh_from", 0))
    with_cv = get_opt(opts, "cv", True)
    store = str(get_opt(opts, "store", ""))
    if store and with_cv:
        raise SuiteError(
            "store keeps the config's scores only, and probe-cv needs every pass's layers: add --opt cv=0"
        )
    if fresh_from and not start < fresh_from < n_q:
        raise SuiteError(f"fresh_from={fresh_from} must be between start + 1 ({start + 1}) and {n_q - 1}")
    config_path = Path(get_opt(opts, "config", str(REPO_ROOT / "configs" / "default.yaml")))
    cfg = with_passage_tokens(load_config(config_path), opts, args.quick)
    model = load_model(cfg.model)
    probe_cfg = cfg.probe
    # Each option names candidate files (comma-separated); the one fitted for this model's dtype is used.
    curve_raw = load_curve(get_opt(opts, "curve_raw", RAW_CURVES), model, probe_cfg, "curve")
    nacal = get_opt(opts, "curve_nacal", "") or cfg.calibration.curves or ("smollm2-135m-nacal.json",)
    curve_na = load_curve(nacal, model, probe_cfg, "curve+content-free")
    test, _ = load_nq(args.data_dir)
    if len(test) < n_q:
        raise SuiteError(f"questions={n_q}, but the test split holds {len(test)}")
    test = test[start:n_q]
    cache = REPO_ROOT / "results" / "cache" / "nq"
    settings = ScoreSettings.of(probe_cfg)
    last = pass_last_layer(model, probe_cfg, grid=with_cv and not args.quick)
    stats: dict[str, Any] = {}
    if store:
        # Scores by question from the stores (PREFIX-raw.npz, PREFIX-nacal.npz); questions missing there
        # are probed (the N/A pass included) and added, so a curve can be re-measured without a pass.
        scores = {
            kind: sweep_scores(
                AttentionReranker(model, probe_cfg, CalibrationConfig(name=calibrator)),
                test,
                cache,
                Path(f"{store}-{kind}.npz"),
                desc=f"position sweep ({kind})",
            )
            for kind, calibrator in (("raw", "none"), ("nacal", "content-free"))
        }
    else:
        jobs = [
            ProbeJob(f"{it.qid}:{pos}", it.question, tuple(it.with_gold_at(pos, N)))
            for it in test
            for pos in range(N)
        ]
        # Every pass reads layers 0..SWEEP_LAST (or deeper, if the config needs it) so that probe-cv's
        # bands and any configuration up to that layer are scored from the same cached passes; a quick
        # run stops at the config's last layer, and its grid keeps the bands that end there; so does a
        # run without probe-cv.
        stats, _ = collect(
            model,
            jobs,
            cache_dir=cache,
            max_passage_tokens=probe_cfg.passage_max_tokens,
            last_layer=last,
            # Consecutive jobs move the gold passage one slot down the same list: the slots before it
            # are the same tokens, so their KV cache is kept rather than recomputed.
            reuse_prefix=True,
            desc="position sweep",
        )
        scores = {}
        for name, kind in (("raw", "raw"), ("nacal", settings.kind("nacal"))):
            rows = sweep_rows(stats, test, settings, kind)
            scores[name] = np.array([rows[it.qid] for it in test], dtype=np.float64)
    names = ["probe-raw", "probe-nacal", "probe-curve", "probe-curve+nacal", "bm25"]
    weight = probe_cfg.first_stage_weight
    if weight > 0:
        names.insert(4, FUSED)
    ranks: dict[str, dict[int, list[int]]] = {s: {p: [] for p in range(N)} for s in names}
    for i, it in enumerate(test):
        bm = BM25Retriever(backend="bm25s")
        bm.index(it.with_gold_at(0, N), show_progress=False)
        bm_gold_first = np.asarray(bm.scores(it.question), dtype=np.float64)
        bm_rank = gold_rank(bm_gold_first, 0)  # the same at every slot: BM25 does not see position
        for pos in range(N):
            raw, na = scores["raw"][i, pos], scores["nacal"][i, pos]
            cal = curve_na.apply(na)
            ranks["probe-raw"][pos].append(gold_rank(raw, pos))
            ranks["probe-nacal"][pos].append(gold_rank(na, pos))
            ranks["probe-curve"][pos].append(gold_rank(curve_raw.apply(raw), pos))
            ranks["probe-curve+nacal"][pos].append(gold_rank(cal, pos))
            ranks["bm25"][pos].append(bm_rank)
            if weight > 0:
                # The list's BM25 scores in prompt order (gold at slot pos), fused by the reranker's own
                # rule; the list is one window of 20, whose calibrated scores the reranker z-scores.
                bm_slots = np.insert(bm_gold_first[1:], pos, bm_gold_first[0])
                fused = fuse_first_stage(zscore(cal), bm_slots, weight)
                ranks[FUSED][pos].append(gold_rank(fused, pos))
    systems = {name: summarize(ranks[name]) for name in names}
    # Nested cross-validation over score kinds, layer bands and curve forms (see the module docstring);
    # it needs 3 questions at least, which a part of a split run may not have.
    enough = len(test) >= MIN_CV_QUESTIONS
    variants = cv_variants(test, stats, last, probe_cfg) if with_cv and enough else {}
    chosen: list[str] = []
    if variants:
        cv_ranks, chosen = nested_cv(variants)
        ranks["probe-cv"] = {p: list(cv_ranks[:, p]) for p in range(N)}
        systems["probe-cv"] = summarize(ranks["probe-cv"])
        systems["probe-cv"]["chosen"] = chosen  # type: ignore[assignment]
    elif with_cv:
        logger.warning(
            "probe-cv left out: %d questions, nested cross-validation needs %d", len(test), MIN_CV_QUESTIONS
        )
    fresh: dict[str, Any] = {}
    if fresh_from:
        fresh = {
            "from_question": fresh_from,
            "questions": n_q - fresh_from,
            "systems": {
                n: summarize({p: r[p][fresh_from - start :] for p in range(N)}) for n, r in ranks.items()
            },
        }
    # Timing: the four calibrators on the same lists, interleaved, each with its own passes.
    n_t = int(get_opt(opts, "timing_lists", 4 if args.quick else 20))
    timers = {
        "probe-raw": AttentionReranker(model, probe_cfg, CalibrationConfig(name="none")),
        "probe-nacal": AttentionReranker(model, probe_cfg, CalibrationConfig(name="content-free")),
        "probe-curve": AttentionReranker(model, probe_cfg, CalibrationConfig(name="curve"), curve=curve_raw),
        "probe-curve+nacal": AttentionReranker(
            model, probe_cfg, CalibrationConfig(name="curve+content-free"), curve=curve_na
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in timers}
    for j in range(n_t):
        it = test[j % len(test)]
        passages = it.with_gold_at(j % N, N)
        for name, rr in timers.items():
            t0 = time.perf_counter()
            rr.rerank(it.question, passages)
            times[name].append(time.perf_counter() - t0)
    if n_t:
        for name, t in times.items():
            systems[name]["seconds_per_query"] = round(float(np.median(t)), 4)
        _timed_like_the_default(systems, chosen)
    # else (timing_lists=0, e.g. a run that only fills a store): no timing keys, rather than NaN.
    return {
        "dataset": f"nq-open-oracle test split ({len(test)} questions x {N} gold slots, 19 BM25 distractors)"
        + (f", questions {start}-{n_q - 1}" if start else ""),
        "questions": {"start": start, "stop": n_q},
        "config": {
            "model": model.model_id,
            "dtype": model.dtype,
            "probe": probe_cfg.model_dump(),
            "curve_raw_mode": curve_raw.mode,
            "curve_nacal_mode": curve_na.mode,
            "first_stage_weight": weight,
            "timing_lists": n_t,
            "cv": {
                "folds": min(CV_FOLDS, len(test)) if variants else 0,
                "variants": len(variants),
                "objective": "mean recall@1 - bin spread (inner CV)",
            },
        },
        "systems": systems,
        **({"fresh": fresh} if fresh else {}),
        "per_question": {
            "qids": [it.qid for it in test],
            "gold_rank": {
                name: [" ".join(str(int(r[p][i])) for p in range(N)) for i in range(len(test))]
                for name, r in ranks.items()
            },
        },
    }


def _timed_like_the_default(systems: dict[str, Any], chosen: list[str]) -> None:
    """Seconds for the systems not timed on their own, and the curve's time ratio to raw."""
    # probe-cv's variants need the N/A pass unless raw attention was chosen in most folds.
    if chosen:
        raw_picks = sum(c.startswith("raw/") for c in chosen)
        timed_as = "probe-curve" if raw_picks * 2 > len(chosen) else "probe-curve+nacal"
        systems["probe-cv"]["seconds_per_query"] = systems[timed_as]["seconds_per_query"]
        systems["probe-cv"]["timed_as"] = timed_as
    if FUSED in systems:
        # Fusion is arithmetic on scores the probe already made: its time is the default's.
        systems[FUSED]["seconds_per_query"] = systems["probe-curve+nacal"]["seconds_per_query"]
        systems[FUSED]["timed_as"] = "probe-curve+nacal"
    systems["probe-curve"]["time_ratio_vs_raw"] = round(
        systems["probe-curve"]["seconds_per_query"] / systems["probe-raw"]["seconds_per_query"], 4
    )
