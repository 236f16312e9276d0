"""Running the probe for a fit, then handing its scores to :mod:`calibration` (model-free): the
curve's fitting lists and position sweep (passes cached on disk), and the lists the fusion weights are
fitted on (:func:`fit_fusion_for`).

The lists come from :mod:`calibration.lists`: the NQ-open dev lists shipped with the package, or the
user's own JSONL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.curve import MODES, BiasCurve, fit_curve
from calibration.lists import CalibrationItem
from calibration.select import (
    LENGTHS,
    SWEEP_LENGTH,
    SWEEP_SPLITS,
    choose_by_sweep,
    fit_shape,
    fitting_lists,
    heldout_recall,
    list_samples,
)
from calibration.stores import (
    load_lists_store,
    load_sweep_store,
    save_lists_store,
    save_npz,
    save_sweep_store,
)
from rerank.config import CalibrationConfig, PipelineConfig
from rerank.probe.model import LoadedModel
from rerank.probe.prompt import NA_QUERY, PromptTemplate, build_prompt
from rerank.probe.scoring import PassageStats
from rerank.records import Passage

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ProbeJob:
    """One prompt to probe: ``passages`` in prompt order."""

    key: str
    query: str
    passages: tuple[Passage, ...]


def _digest(
    model: LoadedModel, job: ProbeJob, max_tokens: int, template: PromptTemplate, last: int, rows: str = "all"
) -> str:
    h = hashlib.sha256()
    h.update(f"{model.weights_hash}|{model.dtype}|{max_tokens}|{template!r}|{job.query}".encode())
    if last != model.num_layers - 1:
        h.update(f"|last{last}".encode())
    if rows != "all":
        h.update(f"|rows-{rows}".encode())
    for p in job.passages:
        h.update(f"|{p.id}|{p.title}|{p.text}".encode())
    return h.hexdigest()[:20]


def collect(
    model: LoadedModel,
    jobs: Sequence[ProbeJob],
    *,
    cache_dir: Path,
    max_passage_tokens: int = 300,
    template: PromptTemplate | None = None,
    keep_tokens: bool = False,
    last_layer: int | None = None,
    reuse_prefix: bool = False,
    rows: str = "all",
    desc: str = "probe",
    show_progress: bool = True,
    cached: list[str] | None = None,
) -> tuple[dict[str, PassageStats], dict[str, float]]:
    """Probe every job (layers 0..``last_layer``, default all, with the N/A pass).

    ``cached``, if given, receives the keys of the jobs read from the cache (for a caller that must label
    their seconds as not measured now). Returns stats and seconds per job key; cached results report
    the seconds measured when they were
    computed. ``reuse_prefix`` keeps the KV cache of the previous prompt's common token prefix (see
    :class:`rerank.probe.AttentionProbe`): order ``jobs`` so that consecutive prompts share long prefixes.
    ``rows``: which token rows after the passages are read (``probe.query_rows``).
    """
    from tqdm.auto import tqdm

    from rerank.probe.capture import AttentionProbe, stats_of

    template = template or PromptTemplate()
    last = model.num_layers - 1 if last_layer is None else last_layer
    probe = AttentionProbe(model, layers=(0, last), early_exit=True, reuse_prefix=reuse_prefix, rows=rows)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, PassageStats] = {}
    seconds: dict[str, float] = {}
    for job in tqdm(jobs, desc=desc, unit="prompt", disable=not show_progress):
        f = cache_dir / f"{_digest(model, job, max_passage_tokens, template, last, rows)}.npz"
        z = np.load(f) if f.is_file() else None
        if z is not None and (not keep_tokens or "query_tok" in z):
            meta = json.loads(str(z["meta"]))
            stats[job.key] = PassageStats(
                layers=tuple(meta["layers"]),
                query=z["query"],
                na=z["na"],
                lengths=z["lengths"],
                query_tok=z["query_tok"] if "query_tok" in z else None,
                na_tok=z["na_tok"] if "na_tok" in z else None,
                spans=tuple(tuple(s) for s in meta["spans"]) if "query_tok" in z else None,
            )
            seconds[job.key] = float(meta["seconds"])
            if cached is not None:
                cached.append(job.key)
            continue
        t0 = time.perf_counter()
        kw = {"max_passage_tokens": max_passage_tokens, "template": template}
        prompt = build_prompt(model.tokenizer, job.query, job.passages, **kw)
        na = build_prompt(model.tokenizer, NA_QUERY, job.passages, **kw)
        reused = probe.reused_tokens
        out = probe.run_prompt(prompt, na)
        dt = time.perf_counter() - t0
        reused = probe.reused_tokens - reused
        st = stats_of(out)
        arrays = {"query": st.query.astype(np.float32), "na": st.na.astype(np.float32), "lengths": st.lengths}
        if keep_tokens:
            arrays["query_tok"] = st.query_tok.astype(np.float32)
            arrays["na_tok"] = st.na_tok.astype(np.float32)
        meta = {
            "layers": list(st.layers),
            "spans": [list(s) for s in st.spans],
            "seconds": dt,
            "tokens": prompt.num_tokens,
            "reused_prefix_tokens": reused,
        }
        save_npz(f, meta=json.dumps(meta), **arrays)
        if not keep_tokens:
            st = PassageStats(st.layers, st.query, st.na, st.lengths)
        stats[job.key] = st
        seconds[job.key] = dt
    return stats, seconds


def score_lists(
    reranker: Any,
    lists: Sequence[tuple[str, list[Any], int]],
    desc: str = "calibrate",
    show_progress: bool = True,
) -> list[Any]:
    """Probe each ``(question, passages, gold slot)``; return ``(scores in slot order, gold slot)``."""
    from tqdm.auto import tqdm

    from rerank.probe.calibrators import ScoreSettings
    from rerank.probe.capture import stats_of
    from rerank.probe.scoring import passage_scores

    cfg = reranker.cfg
    settings = ScoreSettings.of(cfg)
    out = []
    for question, passages, gold in tqdm(lists, desc=desc, unit="list", disable=not show_progress):
        o = reranker.engine.probe(
            question,
            passages,
            content_free=reranker.calibrator.needs_content_free,
            max_passage_tokens=cfg.passage_max_tokens,
            template=reranker.template,
        )
        st = stats_of(o)
        kind = settings.kind(reranker.calibrator.score_kind)
        out.append((passage_scores(st, kind=kind, **settings.kwargs()), gold))
    return out


def sweep_meta(reranker: Any) -> dict[str, Any]:
    """What a stored sweep's scores depend on: the model, the probe settings and the list layout."""
    return {
        **reranker.probe_meta(),
        "passage_max_tokens": reranker.cfg.passage_max_tokens,
        "sweep_length": SWEEP_LENGTH,
    }


def sweep_rows(
    stats: dict[str, Any], items: Sequence[Any], settings: Any, kind: str, length: int = SWEEP_LENGTH
) -> dict[str, np.ndarray]:
    """Each question's (slot of the gold passage, prompt slot) scores of ``kind`` over ``length``-passage
    lists, from passes keyed ``qid:slot``, as float32: what a sweep store keeps, so stored and fresh rows
    are the same numbers."""
    from rerank.probe.scoring import passage_scores

    return {
        it.qid: np.array(
            [
                passage_scores(stats[f"{it.qid}:{g}"], kind=kind, **settings.kwargs())
                for g in range(length)
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
    from rerank.probe.calibrators import ScoreSettings

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
            rows=reranker.engine.rows,
            keep_tokens=reranker.cfg.aggregation in ("topm", "icr"),
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


def length_sweep(
    reranker: Any,
    items: Sequence[Any],
    length: int,
    cache_dir: Path,
    show_progress: bool = True,
) -> np.ndarray:
    """Scores (questions, slot of the gold passage, prompt slot) of ``length``-passage lists: each
    question's gold passage visits every slot among its first ``length - 1`` distractors, one prompt
    per list, read in exactly that order (what :func:`calibration.curve.equalise` takes)."""
    from rerank.probe.calibrators import ScoreSettings

    jobs = [
        ProbeJob(f"{it.qid}:{g}", it.question, tuple(it.with_gold_at(g, length)))
        for it in items
        for g in range(length)
    ]
    stats, _ = collect(
        reranker.model,
        jobs,
        cache_dir=cache_dir,
        max_passage_tokens=reranker.cfg.passage_max_tokens,
        template=reranker.template,
        last_layer=reranker.engine.layers[-1],
        reuse_prefix=True,
        rows=reranker.engine.rows,
        keep_tokens=reranker.cfg.aggregation in ("topm", "icr"),
        desc=f"sweep of {length}-passage lists",
        show_progress=show_progress,
    )
    settings = ScoreSettings.of(reranker.cfg)
    rows = sweep_rows(stats, items, settings, settings.kind(reranker.calibrator.score_kind), length)
    return np.array([rows[it.qid] for it in items], dtype=np.float64)


def fit_short_offsets(
    curve: BiasCurve,
    cfg: PipelineConfig,
    items: Sequence[Any],
    lengths: Sequence[int],
    *,
    model: Any = None,
    cache_dir: Path | None = None,
    data_label: str = "calibration questions",
    show_progress: bool = True,
) -> BiasCurve:
    """``curve`` with per-slot offsets fitted at each of ``lengths`` on its own sweep over ``items``
    (see :func:`calibration.curve.equalise_lengths`); its mean, spread and other offsets are kept.

    The curve's per-slot offsets are fitted on 20-passage lists and reach shorter lists only by
    interpolation over relative position, which does not hold: at 3 passages the middle slot's gold
    passage came first half as often as at the ends. Lists of other lengths interpolate between the
    fitted ones.
    """
    from calibration.curve import equalise_lengths
    from rerank.engines import AttentionReranker
    from rerank.probe.model import default_cache_dir, load_model

    model = model or load_model(cfg.model)
    base = "content-free" if cfg.calibration.name == "curve+content-free" else "none"
    rr = AttentionReranker(model, cfg.probe, CalibrationConfig(name=base))
    curve.check_compatible(rr.probe_meta())
    passes = cache_dir or default_cache_dir() / "passes"
    sweeps = {n: length_sweep(rr, items, n, passes, show_progress) for n in lengths}
    return equalise_lengths(curve, sweeps, note={"data": f"{data_label} ({len(items)} questions)"})


def fit_for(
    cfg: PipelineConfig,
    items: Sequence[CalibrationItem] | None = None,
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
    data_label: str | None = None,
    show_progress: bool = True,
) -> tuple[BiasCurve, dict[str, Any]]:
    """Fit a curve for ``cfg`` (its model, probe settings and calibrator's score kind).

    ``items``: the calibration questions (default: the NQ-open dev lists shipped with the package, see
    :func:`calibration.lists.load_calibration_items`); the sweep takes the first ``equalise_questions``
    of them, the fitting lists the others.

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
    from calibration.lists import load_calibration_items
    from rerank.engines import AttentionReranker
    from rerank.probe.model import load_model

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
    dev = list(items) if items is not None else load_calibration_items()
    if equalise_questions < 0 or equalise_questions + min(n_lists, 1) > len(dev):
        raise ValueError(f"equalise_questions must be 0..{len(dev) - 1}, got {equalise_questions}")
    # The sweep takes the first dev questions, the fitting lists the others.
    sweep_items, list_items = dev[:equalise_questions], dev[equalise_questions:]
    if equalise_questions:
        from rerank.probe.model import default_cache_dir

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
        scored = score_lists(rr, lists, show_progress=show_progress)
        if lists_store is not None:
            save_lists_store(lists_store, store_meta, lists, scored)
    cut = len(scored) * 3 // 4
    report: dict[str, Any] = {"heldout_recall@1": {}}
    usable = [m for m in modes if not (m == "multiplicative" and any(np.any(s <= 0) for s, _ in scored))]
    for mode in usable:
        c = fit_curve(list_samples(scored[:cut]), mode=mode)
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
            "data": data_label or "nq-open-oracle dev questions (not the position sweep's test questions)",
            "list_lengths": list(LENGTHS),
            "mode_choice": report["heldout_recall@1"],
        },
    }
    if equalise_questions:
        (best, shape), table = choose_by_sweep(scored, sweep, usable)
        meta["fit"]["data"] += (
            f"; a sweep over {equalise_questions} more questions, gold passage at each of "
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
        curve = fit_shape(scored, sweep, best, shape, meta=meta, n_bootstrap=200)
        report.update(mode=best, offset_shape=shape, sweep_choice=table)
        # The plot's 20-passage lists: the sweep's, which outnumber the fitting lists of that length.
        plot_lists = [(row[g], g) for row in sweep for g in range(SWEEP_LENGTH)]
        return curve, {"scored": scored, "plot_lists": plot_lists, **report}
    curve = fit_curve(list_samples(scored), mode=best, meta=meta)
    report["mode"] = best
    return curve, {"scored": scored, **report}




def probe_readings(
    reranker: Any,
    lists: Sequence[Any],
    store: Path | None = None,
    desc: str = "fusion lists",
    show_progress: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The probe's scores of each list (anything with ``qid``, ``question`` and ``passages``), read as
    the reranker reads them: per list, the merged calibrated scores and each prompt order's, in
    candidate order. ``store``: an ``.npz`` of readings by list, read first and written as lists are
    probed (the probe is the expensive part of a fusion fit; the other signals cost seconds).
    """
    from tqdm.auto import tqdm

    from calibration.stores import list_key, load_signal_store, save_signal_store
    from rerank.engines.attention import trace_probes

    meta = {
        **reranker.probe_meta(),
        "passage_max_tokens": reranker.cfg.passage_max_tokens,
        "prompt_order": reranker.cfg.prompt_order,
        "window_size": reranker.cfg.window_size,
        "curve": (reranker.curve.meta.get("fit", {}).get("data") if reranker.curve is not None else None),
    }
    rows = load_signal_store(store, meta) if store is not None else {}
    out = []
    last_save = time.monotonic()
    for lst in tqdm(lists, desc=desc, unit="list", disable=not show_progress):
        ids = [p.id for p in lst.passages]
        key = list_key(lst.qid, ids)
        if key not in rows:
            with trace_probes() as traces:
                ranked = reranker.score_only(lst.question, list(lst.passages))
            pos = {pid: i for i, pid in enumerate(ids)}
            orders = np.zeros((len(traces), len(ids)))
            for j, tr in enumerate(traces):
                for slot, p in enumerate(tr.passages):
                    orders[j, pos[p.id]] = tr.calibrated[slot]
            rows[key] = (ranked, orders)
            if store is not None and time.monotonic() - last_save > 60:
                save_signal_store(store, meta, rows)
                last_save = time.monotonic()
        out.append(rows[key])
    if store is not None and rows:
        save_signal_store(store, meta, rows)
    return out


def fit_fusion_for(
    reranker: Any,
    items: Sequence[CalibrationItem],
    *,
    n_hard: int = 60,
    n_retrieved: int = 60,
    store: Path | None = None,
    data_label: str | None = None,
    show_progress: bool = True,
) -> Any:
    """Fit the fusion weights of ``reranker``'s probe (with its curve) and of the cheap signals.

    The lists are :func:`calibration.lists.fusion_lists` of ``items``; the probe reads each as the
    reranker would (``store``: see :func:`probe_readings`), the other signals are computed here, and
    :func:`calibration.fusion.fit_fusion` fits the weights.
    """
    from calibration.fusion import LabelledList, fit_fusion, fit_second_order
    from calibration.lists import fusion_lists
    from rerank.engines.signals import cheap_signals
    from retrievers.hybrid import HybridRetriever

    retriever = HybridRetriever()
    if n_retrieved:
        pool = {p.id: p for it in items for p in (it.gold, *it.distractors)}
        retriever.index(list(pool.values()), show_progress=show_progress)
    reranker.dense.retriever = retriever.dense  # one encoder for the lists and the dense signal
    lists = fusion_lists(items, n_hard, n_retrieved, retriever=retriever)
    readings = probe_readings(reranker, lists, store=store, show_progress=show_progress)
    labelled = []
    pairs = []
    for lst, (merged, orders) in zip(lists, readings, strict=True):
        sig, _, _ = cheap_signals(
            lst.question, lst.passages, lst.first_stage, None, ("first_stage", "bm25", "dense"),
            dense=reranker.dense,
        )
        if len(orders) == 2:
            pairs.append((dict(sig), orders[0], merged))
        sig["probe"] = merged
        labelled.append(LabelledList(sig, np.asarray(lst.labels), lst.source))
    kinds = {k: sum(lst.source == k for lst in lists) for k in ("hard", "retrieved")}
    meta = {
        "data": data_label or "NQ-open dev questions shipped with the package (never a test split)",
        "lists_by_kind": kinds,
        "list_kinds": "hard: gold at a seeded random slot among 19 BM25-hard distractors, no first-stage "
        "scores; retrieved: hybrid (BM25 + dense, RRF) top-20 over every passage of the lists, with the "
        "fused scores as first-stage scores, relevant = gold passage or one holding an answer string",
    }
    fitted = fit_fusion(labelled, meta=meta)
    if reranker.cfg.prompt_order != "both" or len(pairs) != len(lists):
        return fitted
    return dataclasses.replace(fitted, second_order=fit_second_order(pairs, fitted.weights))
