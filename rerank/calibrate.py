"""``attn-rerank calibrate``: fit the positional-bias curve of a model and probe configuration.

The fitting lists come from the NQ-open oracle data's *dev* questions (never the position sweep's test
questions): a question's gold passage among its hard distractors, at a random slot, for several list
lengths. Only distractor slots enter the curve (they carry no relevance signal for the question); the
gold passage is used to choose the correction form on held-out lists.
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

from calibration.curve import MODES, BiasCurve, fit_curve
from rerank.config import CalibrationConfig, PipelineConfig, load_config

logger = logging.getLogger(__name__)

LENGTHS = (5, 10, 15, 20)


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


def _samples(scored: Sequence[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, list[int], list[bool]]]:
    return [(s, list(range(len(s))), [j != g for j in range(len(s))]) for s, g in scored]


def heldout_recall(curve: BiasCurve, scored: Sequence[tuple[np.ndarray, int]]) -> float:
    """Gold recall@1 after correction on held-out lists."""
    hits = [float(np.argmax(curve.apply(s)) == g) for s, g in scored]
    return float(np.mean(hits))


def fit_for(
    cfg: PipelineConfig,
    data_dir: Path,
    *,
    n_lists: int = 240,
    model: Any = None,
    modes: Sequence[str] = MODES,
) -> tuple[BiasCurve, dict[str, Any]]:
    """Fit a curve for ``cfg`` (its model, probe settings and calibrator's score kind).

    Three quarters of the lists fit each correction form; the form with the best gold recall@1 on the
    remaining quarter is refitted on all lists and returned.
    """
    from eval.nq import load_nq
    from rerank.model import load_model
    from rerank.reranker import AttentionReranker

    if not cfg.calibration.name.startswith("curve"):
        raise ValueError(
            f"calibration.name is '{cfg.calibration.name}'; set it to 'curve' or 'curve+content-free' "
            "to fit a curve"
        )
    model = model or load_model(cfg.model)
    # Probe with the same settings but without a curve (the one being fitted).
    base = "content-free" if cfg.calibration.name == "curve+content-free" else "none"
    rr = AttentionReranker(model, cfg.probe, CalibrationConfig(name=base))
    rr_meta = rr.probe_meta()
    _, dev = load_nq(data_dir)
    lists = fitting_lists(dev, n_lists)
    scored = score_lists(rr, lists)
    cut = len(scored) * 3 // 4
    report: dict[str, Any] = {"heldout_recall@1": {}}
    for mode in modes:
        if mode == "multiplicative" and any(np.any(s <= 0) for s, _ in scored):
            continue  # a ratio needs positive scores
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
    ax[1].plot(x, cor, "o-", color="C2")
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
        curve, report = fit_for(cfg, args.data_dir, n_lists=args.lists)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    curve.save(args.out)
    png = args.out.with_suffix(".png")
    plot_curve(curve, report["scored"], png)
    print(
        f"wrote {args.out} and {png}; mode {report['mode']}; held-out recall@1 {report['heldout_recall@1']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
