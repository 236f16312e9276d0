"""``attn-rerank calibrate``: fit the positional-bias curve of a model and probe configuration.

The fitting lists come from the NQ-open oracle data's *dev* questions (never the position sweep's test
questions): a question's gold passage among its hard distractors, at a random slot, for several list
lengths. Only distractor slots enter the curve (they carry no relevance signal for the question); the
gold passage is used to choose the correction form on held-out lists.

With ``--equalise-questions K`` it also runs a sweep over ``K`` more dev questions, each one's gold
passage moved through all 20 slots, and fits per-slot offsets that even out the gold passage's recall@1
over the slots (:func:`calibration.curve.equalise`). Which correction form and which offset shape (none,
every slot, or a few knots) is kept is chosen on the sweep's questions by repeated half splits: fitted
on one half, measured on the other (:func:`choose_by_sweep`).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration.curve import (
    MODES,
    BiasCurve,
    bin_spread,
    equalise,
    fit_curve,
    sweep_recall,
    sweep_samples,
)
from rerank.config import CalibrationConfig, PipelineConfig, load_config

logger = logging.getLogger(__name__)

LENGTHS = (5, 10, 15, 20)
SWEEP_LENGTH = 20
SWEEP_SPLITS = 20
# Offset shapes the sweep's half splits choose among: none, every slot (smoothed), or values at a few
# slots (0-based, for 20-passage lists) with straight lines between, denser at the start of the list
# where the bias changes fastest. Fewer values are fitted with less noise from the same questions.
OFFSET_SHAPES: dict[str, tuple[int, ...] | None] = {
    "none": (),
    "every-slot": None,
    "knots-7": (0, 1, 2, 4, 9, 14, 19),
    "knots-5": (0, 1, 3, 10, 19),
    "knots-4": (0, 1, 10, 19),
    "knots-3": (0, 10, 19),
}


def score_lists(
    reranker: Any, lists: Sequence[tuple[str, list[Any], int]], desc: str = "calibrate"
) -> list[Any]:
    """Probe each ``(question, passages, gold slot)``; return ``(scores in slot order, gold slot)``."""
    from tqdm.auto import tqdm

    from rerank.calibrators import ScoreSettings
    from rerank.probe import stats_of
    from rerank.scoring import passage_scores

    cfg = reranker.cfg
    settings = ScoreSettings.of(cfg)
    out = []
    for question, passages, gold in tqdm(lists, desc=desc, unit="list"):
        o = reranker.engine.probe(
            question,
            passages,
            content_free=reranker.calibrator.needs_content_free,
            max_passage_tokens=cfg.passage_max_tokens,
            template=reranker.template,
        )
        st = stats_of(o)
        kw = {"layers": settings.layers, "heads": settings.heads, "aggregation": settings.aggregation}
        kind = settings.kind(reranker.calibrator.score_kind)
        out.append((passage_scores(st, kind=kind, head_set=settings.head_set, **kw), gold))
    return out


def fitting_lists(items: Sequence[Any], n_lists: int, seed: int = 0) -> list[tuple[str, list[Any], int]]:
    rng = random.Random(seed)
    lists = []
    for i in range(n_lists):
        it = items[i % len(items)]
        n = LENGTHS[i % len(LENGTHS)]
        gold = rng.randrange(n)
        lists.append((it.question, it.with_gold_at(gold, n), gold))
    return lists


def _check_store_meta(path: Path, stored: dict[str, Any], meta: dict[str, Any], kind: str) -> None:
    if stored != meta:
        diff = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
        raise ValueError(
            f"{kind} store {path} was made with other settings ({', '.join(diff)} differ); "
            f"use another --{kind}-store or delete it"
        )


def load_lists_store(
    path: Path, meta: dict[str, Any], lists: Sequence[tuple[str, list[Any], int]]
) -> list[tuple[np.ndarray, int]] | None:
    """The fitting lists' stored scores, or None if ``path`` does not exist.

    Refused if the store was made with other model or probe settings, or for other lists (questions,
    lengths or gold slots).
    """
    import json

    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        _check_store_meta(path, json.loads(str(z["meta"])), meta, "lists")
        same = (
            z["questions"].tolist() == [q for q, _, _ in lists]
            and z["lengths"].tolist() == [len(p) for _, p, _ in lists]
            and z["gold"].tolist() == [g for _, _, g in lists]
        )
        if not same:
            raise ValueError(
                f"lists store {path} holds other fitting lists (another --lists or --equalise-questions, "
                "or other data); use another --lists-store or delete it"
            )
        return [
            (row[:n].astype(np.float64), int(g))
            for row, n, g in zip(z["scores"], z["lengths"], z["gold"], strict=True)
        ]


def save_lists_store(
    path: Path,
    meta: dict[str, Any],
    lists: Sequence[tuple[str, list[Any], int]],
    scored: Sequence[tuple[np.ndarray, int]],
) -> None:
    """Write the fitting lists' scores (NaN-padded to the longest list) with what identifies the lists."""
    import json

    from eval.probe_stats import save_npz

    width = max(len(s) for s, _ in scored)
    pad = np.full((len(scored), width), np.nan, dtype=np.float32)
    for i, (s, _) in enumerate(scored):
        pad[i, : len(s)] = s
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(
        path,
        meta=json.dumps(meta, sort_keys=True),
        questions=np.array([q for q, _, _ in lists]),
        lengths=np.array([len(p) for _, p, _ in lists]),
        gold=np.array([g for _, _, g in lists]),
        scores=pad,
    )


def _samples(scored: Sequence[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, list[int], list[bool]]]:
    return [(s, list(range(len(s))), [j != g for j in range(len(s))]) for s, g in scored]


def heldout_recall(curve: BiasCurve, scored: Sequence[tuple[np.ndarray, int]]) -> float:
    """Gold recall@1 after correction on held-out lists."""
    hits = [float(np.argmax(curve.apply(s)) == g) for s, g in scored]
    return float(np.mean(hits))


def sweep_meta(reranker: Any) -> dict[str, Any]:
    """What a stored sweep's scores depend on: the model, the probe settings and the list layout."""
    return {
        **reranker.probe_meta(),
        "passage_max_tokens": reranker.cfg.passage_max_tokens,
        "sweep_length": SWEEP_LENGTH,
    }


def load_sweep_store(path: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """Stored sweep rows by question id; refuses a store made with another model or probe setting."""
    import json

    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as z:
        _check_store_meta(path, json.loads(str(z["meta"])), meta, "sweep")
        return dict(zip(z["qids"].tolist(), z["scores"], strict=True))


def save_sweep_store(path: Path, meta: dict[str, Any], rows: dict[str, np.ndarray]) -> None:
    """Write sweep rows (question id -> gold slot x prompt slot scores), sorted by id, atomically."""
    import json

    from eval.probe_stats import save_npz

    qids = sorted(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(
        path,
        meta=json.dumps(meta, sort_keys=True),
        qids=np.array(qids),
        scores=np.stack([rows[q] for q in qids]).astype(np.float32),
    )


def sweep_rows(
    stats: dict[str, Any], items: Sequence[Any], settings: Any, kind: str
) -> dict[str, np.ndarray]:
    """Each question's (slot of the gold passage, prompt slot) scores of ``kind``, from passes keyed
    ``qid:slot``, as float32: what a sweep store keeps, so stored and fresh rows are the same numbers."""
    from rerank.scoring import passage_scores

    kw = {"layers": settings.layers, "heads": settings.heads, "aggregation": settings.aggregation}
    return {
        it.qid: np.array(
            [
                passage_scores(stats[f"{it.qid}:{g}"], kind=kind, head_set=settings.head_set, **kw)
                for g in range(SWEEP_LENGTH)
            ],
            dtype=np.float32,
        )
        for it in items
    }


def sweep_scores(
    reranker: Any,
    items: Sequence[Any],
    cache_dir: Path,
    store: Path | None = None,
    desc: str = "calibrate sweep",
    store_dtype: str | None = None,
    native_store: Path | None = None,
    dtypes: dict[str, int] | None = None,
) -> np.ndarray:
    """Scores (questions, slot of the gold passage, prompt slot) of 20-passage lists of ``items``.

    Each question's gold passage visits every slot among its 19 hard distractors; the passes stop after
    the configuration's last layer and are cached in ``cache_dir``. With ``store``, an ``.npz`` of the
    scores by question id (a few KB per question, against minutes of passes each): questions found
    there are not probed again, and the store is rewritten with the new ones added. It is refused if it
    was made with another model, dtype, layer band, score kind, template or passage cap.

    ``store_dtype`` reads a store made in another dtype than the model's (everything else the same):
    its rows stand in for this dtype's, read only. It must then hold every question of ``items`` (a
    missing one would be probed in the model's dtype and mix two kinds of rows), unless ``native_store``
    is given: a store in the model's own dtype, whose rows take precedence, and into which questions
    neither store holds are probed. The two kinds of rows are then mixed on purpose; ``dtypes``, if
    given, is filled with how many of ``items``' rows came from each dtype, for the caller to record.
    """
    from eval.probe_stats import ProbeJob, collect
    from rerank.calibrators import ScoreSettings

    n = SWEEP_LENGTH
    meta = sweep_meta(reranker)
    foreign = store_dtype is not None and store_dtype != meta["dtype"]
    if foreign and store is None:
        raise ValueError("a sweep in another dtype is read from a store: give its path")
    if native_store is not None and not foreign:
        raise ValueError("a native sweep store goes with a store in another dtype (--sweep-dtype)")
    native_meta = meta
    if foreign:
        meta = {**meta, "dtype": store_dtype}
    known = load_sweep_store(store, meta) if store is not None else {}
    own: dict[str, np.ndarray] = {}
    if native_store is not None:
        own = load_sweep_store(native_store, native_meta)
        known.update(own)
    todo = [it for it in items if it.qid not in known]
    if foreign and native_store is None and todo:
        raise ValueError(
            f"sweep store {store} holds {len(items) - len(todo)} of the {len(items)} questions, in "
            f"{store_dtype}; the model runs in {reranker.model.dtype}, so the missing ones are not probed "
            "into it: add --native-sweep-store PATH to probe them into a store in the model's own dtype, "
            "fill the store in its own dtype first, or sweep fewer questions"
        )
    jobs = [
        ProbeJob(f"{it.qid}:{g}", it.question, tuple(it.with_gold_at(g, n))) for it in todo for g in range(n)
    ]
    if todo:
        cfg = reranker.cfg
        stats, _ = collect(
            reranker.model,
            jobs,
            cache_dir=cache_dir,
            max_passage_tokens=cfg.passage_max_tokens,
            template=reranker.template,
            last_layer=reranker.engine.layers[-1],
            reuse_prefix=True,
            desc=desc,
        )
        settings = ScoreSettings.of(cfg)
        fresh = sweep_rows(stats, todo, settings, settings.kind(reranker.calibrator.score_kind))
        known.update(fresh)
        if native_store is not None:
            save_sweep_store(native_store, native_meta, {**own, **fresh})
        elif store is not None:
            save_sweep_store(store, meta, known)
    if dtypes is not None:
        # Rows in the model's dtype: fresh ones and the native store's; the rest are the foreign store's.
        probed = {it.qid for it in todo}
        n_own = sum(not foreign or it.qid in own or it.qid in probed for it in items)
        for d, c in ((native_meta["dtype"], n_own), (meta["dtype"], len(items) - n_own)):
            if c:
                dtypes[d] = c
    # float32 whether stored or fresh, so a fit does not depend on which questions came from the store
    return np.array([known[it.qid] for it in items], dtype=np.float64)


def _fit_shape(
    scored: Sequence[tuple[np.ndarray, int]],
    sweep: np.ndarray,
    mode: str,
    shape: str,
    meta: dict[str, Any] | None = None,
    n_bootstrap: int = 0,
) -> BiasCurve:
    curve = fit_curve(_samples(scored) + sweep_samples(sweep), mode=mode, meta=meta, n_bootstrap=n_bootstrap)
    knots = OFFSET_SHAPES[shape]
    if knots == ():
        return curve
    return equalise(curve, sweep, knots=knots, note={"shape": shape})


def choose_by_sweep(
    scored: Sequence[tuple[np.ndarray, int]],
    sweep: np.ndarray,
    modes: Sequence[str],
    splits: int = SWEEP_SPLITS,
    seed: int = 0,
) -> tuple[tuple[str, str], dict[str, dict[str, float]]]:
    """Pick (correction form, offset shape) on the sweep's questions by repeated half splits.

    In each split, every candidate is fitted on the fitting lists plus half of the sweep's questions and
    measured on the other half alone: its mean recall@1 and its spread over five slot bins. The table
    holds their means over the splits (and the 90th percentile of the spread); the objective is mean
    recall@1 minus mean spread, which is what one shipped curve meets on questions it has not seen.

    Pooling held-out folds of a k-fold cross-validation would understate that spread: each fold's
    offsets err differently, and the pooled per-slot recall averages their errors away. On the 209-question
    dev sweep of the default model, pooled 5-fold figures put every offset shape at 0.012-0.034 while
    a curve fitted on one half left 0.055-0.07 on the other (and the shipped curve 0.063 on the 300 test
    questions).
    """
    q = sweep.shape[0]
    if q < 2:
        raise ValueError(f"choosing offsets on a sweep needs at least 2 sweep questions, got {q}")
    rng = np.random.default_rng(seed)
    halves = [rng.permutation(q) for _ in range(splits)]
    table: dict[str, dict[str, float]] = {}
    for mode in modes:
        for shape in OFFSET_SHAPES:
            recall, spread = [], []
            for order in halves:
                train, test = order[: q // 2], order[q // 2 :]
                curve = _fit_shape(scored, sweep[train], mode, shape)
                per_slot = sweep_recall(
                    np.array(
                        [[curve.apply(lists[g]) for g in range(sweep.shape[1])] for lists in sweep[test]]
                    )
                )
                recall.append(float(per_slot.mean()))
                spread.append(bin_spread(per_slot))
            table[f"{mode}/{shape}"] = {
                "recall@1": round(float(np.mean(recall)), 4),
                "bin_spread": round(float(np.mean(spread)), 4),
                "bin_spread_p90": round(float(np.percentile(spread, 90)), 4),
                "objective": round(float(np.mean(recall) - np.mean(spread)), 4),
            }
    best = max(table, key=lambda k: table[k]["objective"])
    mode, shape = best.split("/")
    return (mode, shape), table


def fit_for(
    cfg: PipelineConfig,
    data_dir: Path,
    *,
    n_lists: int = 240,
    model: Any = None,
    modes: Sequence[str] = MODES,
    equalise_questions: int = 0,
    cache_dir: Path | None = None,
    sweep_store: Path | None = None,
    sweep_dtype: str | None = None,
    lists_store: Path | None = None,
    native_sweep_store: Path | None = None,
) -> tuple[BiasCurve, dict[str, Any]]:
    """Fit a curve for ``cfg`` (its model, probe settings and calibrator's score kind).

    Three quarters of the lists fit each correction form; the form with the best gold recall@1 on the
    remaining quarter is refitted on all lists and returned. With ``equalise_questions`` > 0, a sweep
    over that many further dev questions (cached in ``cache_dir``, stored in ``sweep_store``: see
    :func:`sweep_scores`) decides instead, on half splits of its questions, both the form and the
    per-slot offsets (see :func:`choose_by_sweep`). ``sweep_dtype``: the store's rows were made in that
    dtype, not the model's (see :func:`sweep_scores`); the fitting lists are still probed in the model's
    own dtype; ``native_sweep_store``, a store in the model's dtype beside it, takes precedence and
    receives the questions neither holds. ``lists_store``: an ``.npz`` of the fitting lists' scores,
    read if it holds these lists with these settings, else written after probing them (a refit then
    costs seconds, not an hour).
    """
    from eval.nq import load_nq
    from rerank.model import load_model
    from rerank.reranker import AttentionReranker

    if not cfg.calibration.name.startswith("curve"):
        raise ValueError(
            f"calibration.name is '{cfg.calibration.name}'; set it to 'curve' or 'curve+content-free' "
            "to fit a curve"
        )
    if sweep_dtype and not equalise_questions:
        raise ValueError("--sweep-dtype names the dtype of a sweep: add --equalise-questions")
    if native_sweep_store is not None and not sweep_dtype:
        raise ValueError(
            "--native-sweep-store goes beside a --sweep-store in another dtype: add --sweep-dtype"
        )
    model = model or load_model(cfg.model)
    # Probe with the same settings but without a curve (the one being fitted).
    base = "content-free" if cfg.calibration.name == "curve+content-free" else "none"
    rr = AttentionReranker(model, cfg.probe, CalibrationConfig(name=base))
    rr_meta = rr.probe_meta()
    _, dev = load_nq(data_dir)
    if equalise_questions < 0 or equalise_questions + min(n_lists, 1) > len(dev):
        raise ValueError(f"equalise_questions must be 0..{len(dev) - 1}, got {equalise_questions}")
    # The sweep takes the first dev questions, the fitting lists the others.
    sweep_items, list_items = dev[:equalise_questions], dev[equalise_questions:]
    if equalise_questions:
        from rerank.model import default_cache_dir

        # Before the fitting lists, so that a store refused for its settings or its missing questions
        # stops the fit before the lists' passes (minutes to an hour) rather than after them.
        passes = cache_dir or default_cache_dir() / "passes"
        counts: dict[str, int] = {}
        sweep = sweep_scores(
            rr,
            sweep_items,
            passes,
            sweep_store,
            store_dtype=sweep_dtype,
            native_store=native_sweep_store,
            dtypes=counts,
        )
    lists = fitting_lists(list_items, n_lists)
    store_meta = sweep_meta(rr)
    scored = load_lists_store(lists_store, store_meta, lists) if lists_store is not None else None
    if scored is None:
        scored = score_lists(rr, lists)
        if lists_store is not None:
            save_lists_store(lists_store, store_meta, lists, scored)
    cut = len(scored) * 3 // 4
    report: dict[str, Any] = {"heldout_recall@1": {}}
    usable = [m for m in modes if not (m == "multiplicative" and any(np.any(s <= 0) for s, _ in scored))]
    for mode in usable:
        c = fit_curve(_samples(scored[:cut]), mode=mode)
        report["heldout_recall@1"][mode] = heldout_recall(c, scored[cut:])
    raw_recall = float(np.mean([float(np.argmax(s) == g) for s, g in scored[cut:]]))
    report["heldout_recall@1"]["uncorrected"] = raw_recall
    best = max(
        (m for m in report["heldout_recall@1"] if m != "uncorrected"),
        key=lambda m: report["heldout_recall@1"][m],
    )
    meta = {
        **rr_meta,
        "fit": {
            "data": "nq-open-oracle dev questions (not the position sweep's test questions)",
            "list_lengths": list(LENGTHS),
            "mode_choice": report["heldout_recall@1"],
        },
    }
    if equalise_questions:
        (best, shape), table = choose_by_sweep(scored, sweep, usable)
        meta["fit"]["data"] += (
            f"; a sweep over {equalise_questions} more dev questions, gold passage at each of "
            f"{SWEEP_LENGTH} slots"
        )
        if sweep_dtype and sweep_dtype != rr_meta["dtype"]:
            meta["fit"]["sweep_dtypes"] = counts
            if sweep_dtype in counts:
                meta["fit"]["sweep_dtype"] = sweep_dtype
                meta["fit"]["data"] += f" (the sweep's scores from {sweep_dtype} passes"
                if len(counts) > 1:
                    meta["fit"]["data"] += (
                        f" for {counts[sweep_dtype]} questions and from {rr_meta['dtype']} passes for "
                        f"{counts[rr_meta['dtype']]}"
                    )
                meta["fit"]["data"] += ")"
        meta["fit"]["sweep_choice"] = {
            "protocol": f"{SWEEP_SPLITS} half splits of the sweep's questions: "
            "fitted on one half, measured on the other",
            "candidates": table,
        }
        curve = _fit_shape(scored, sweep, best, shape, meta=meta, n_bootstrap=200)
        report.update(mode=best, offset_shape=shape, sweep_choice=table)
        # The plot's 20-passage lists: the sweep's, which outnumber the fitting lists of that length.
        plot_lists = [(row[g], g) for row in sweep for g in range(SWEEP_LENGTH)]
        return curve, {"scored": scored, "plot_lists": plot_lists, **report}
    curve = fit_curve(_samples(scored), mode=best, meta=meta)
    report["mode"] = best
    return curve, {"scored": scored, **report}


def plot_curve(curve: BiasCurve, scored: Sequence[tuple[np.ndarray, int]], path: Path) -> None:
    """PNG of raw vs corrected mean distractor score by slot, with the fitted band (20-passage lists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(curve.lengths)
    rows = [s for s, _ in scored if len(s) == n]
    golds = [g for s, g in scored if len(s) == n]

    def per_slot(vals: list[np.ndarray]) -> np.ndarray:
        mat = np.vstack(vals)
        mask = np.ones_like(mat, dtype=bool)
        for i, g in enumerate(golds):
            mask[i, g] = False
        return np.array([mat[mask[:, j], j].mean() for j in range(n)])

    from calibration.curve import _normalise

    raw = per_slot([_normalise(s, curve.mode) for s in rows])
    cor = per_slot([curve.apply(s) for s in rows])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(1, n + 1)
    ax[0].plot(x, raw, "o-", label="measured (distractors)")
    ax[0].plot(x, curve.mean[n], "-", label="fitted bias b(slot)")
    if n in curve.lower:
        ax[0].fill_between(x, curve.lower[n], curve.upper[n], alpha=0.3, label="95% band")
    kind = {"raw": "raw attention"}.get(
        curve.meta.get("score_kind", "raw"), f"{curve.meta.get('score_kind')} score"
    )
    ax[0].set_title(f"{kind} by slot ({curve.mode})")
    ax[0].set_xlabel("prompt slot (1 = first)")
    ax[0].legend(fontsize=7)
    ax[1].plot(x, cor, "o-", color="C2", label="distractors, corrected")
    if curve.offset:
        ax[1].plot(x, curve.offsets(n), "--", color="C3", label="per-slot offsets (included)")
        ax[1].legend(fontsize=7)
    ax[1].set_title("after correction")
    ax[1].set_xlabel("prompt slot (1 = first)")
    meta = curve.meta
    title = f"{meta.get('model_id', '')} {meta.get('dtype', '')} layers {meta.get('layers')}"
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``attn-rerank calibrate``. Exit codes: 0 ok, 2 bad config or data."""
    ap = argparse.ArgumentParser(
        prog="attn-rerank calibrate",
        description="Fit the positional-bias curve of a model and probe configuration (JSON and PNG).",
    )
    ap.add_argument(
        "--config", required=True, help="pipeline YAML (model, probe, calibration.name: curve...)"
    )
    ap.add_argument(
        "--out", required=True, type=Path, help="curve JSON to write (a .png is written beside it)"
    )
    ap.add_argument(
        "--data-dir", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    )
    ap.add_argument("--lists", type=int, default=240, help="number of fitting lists (default 240)")
    ap.add_argument(
        "--equalise-questions",
        type=int,
        default=0,
        metavar="K",
        help="also sweep K dev questions' gold passage over 20 slots and fit per-slot offsets that even "
        "out its recall@1 (default 0: none); K x 20 passes",
    )
    ap.add_argument(
        "--cache-dir",
        type=Path,
        help="where the sweep's passes are cached (default: the user cache folder's passes/)",
    )
    ap.add_argument(
        "--sweep-store",
        type=Path,
        help="an .npz of the sweep's scores by question: questions in it are not probed again, and new "
        "ones are added (refused if made with other model or probe settings)",
    )
    ap.add_argument(
        "--native-sweep-store",
        type=Path,
        help="with --sweep-dtype: a sweep store in the model's own dtype; its rows take precedence over "
        "the --sweep-store's, and questions neither holds are probed into it",
    )
    ap.add_argument(
        "--lists-store",
        type=Path,
        help="an .npz of the fitting lists' scores: read if it holds the same lists made with the same "
        "settings (no passes), else written after probing them",
    )
    ap.add_argument(
        "--sweep-dtype",
        choices=("bfloat16", "float16", "float32"),
        help="the --sweep-store was made in this dtype, not the model's: its rows are used as they are "
        "(it must hold every swept question); for a dtype too slow to sweep on this machine",
    )
    ap.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="override model.dtype: a curve holds for the dtype it was fitted in (default: the config's)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
        if args.dtype:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": args.dtype})})
        curve, report = fit_for(
            cfg,
            args.data_dir,
            n_lists=args.lists,
            equalise_questions=args.equalise_questions,
            cache_dir=args.cache_dir,
            sweep_store=args.sweep_store,
            sweep_dtype=args.sweep_dtype,
            lists_store=args.lists_store,
            native_sweep_store=args.native_sweep_store,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    curve.save(args.out)
    png = args.out.with_suffix(".png")
    plot_curve(curve, report.get("plot_lists", report["scored"]), png)
    print(
        f"wrote {args.out} and {png}; mode {report['mode']}; held-out recall@1 {report['heldout_recall@1']}"
    )
    if "sweep_choice" in report:
        print(f"offsets: {report['offset_shape']}; sweep half splits: {report['sweep_choice']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
