"""``attn-rerank calibrate``: fit the positional-bias curve for a model and probe configuration.

The curve is fitted on calibration lists: the NQ-open dev lists shipped with the package by default, or
the user's own JSONL (``--data``, see :mod:`calibration.lists`). It writes the curve JSON, a PNG of the
bias before and after correction, and a config YAML beside them that uses the curve.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rerank.config import is_config_name
from rerank.core.common import EXIT_OK, UsageError, load_cli_config, positive_int

#: The shipped default reads layers 12-19 of the embedded model's 30: the middle of the network, where
#: the relevance signal peaks (see DESIGN.md). Another model gets the same fraction of its depth.
BAND = (12 / 30, 19 / 30)


def layer_band(num_layers: int) -> tuple[int, int]:
    """The default config's layer band scaled to a model with ``num_layers`` layers."""
    first = min(int(BAND[0] * num_layers), num_layers - 1)
    last = max(first, min(int(BAND[1] * num_layers), num_layers - 1))
    return first, last


def _config_for(args: argparse.Namespace) -> Any:
    cfg = load_cli_config(args.config)
    name = args.model
    if name is not None and Path(name).expanduser().is_dir():
        # A folder is recorded absolute: the curve and the config written beside it then name the same
        # model from whatever folder they are used.
        name = str(Path(name).expanduser().resolve())
    model = cfg.model.model_copy(
        update={k: v for k, v in (("name", name), ("dtype", args.dtype)) if v is not None}
    )
    cal = cfg.calibration
    if not cal.name.startswith("curve"):
        cal = cal.model_copy(update={"name": "curve+content-free"})
    return cfg.model_copy(update={"model": model, "calibration": cal.model_copy(update={"curve": None})})


def _write_config(path: Path, cfg: Any, curve_path: Path, base: str, fitted: bool = True) -> None:
    import yaml

    probe: dict[str, Any] = {"layers": list(cfg.probe.layers) if cfg.probe.layers else None}
    if not fitted:
        # No weights were fitted (--fusion-hard 0 --fusion-retrieved 0): the fixed fusion.
        probe.update(fusion="fixed", first_stage_weight=1.0)
    doc = {
        "extends": base,
        "model": {"name": cfg.model.name, "dtype": cfg.model.dtype},
        "probe": probe,
        "calibration": {"name": cfg.calibration.name, "curve": str(curve_path.resolve())},
    }
    header = f"# Written by attn-rerank calibrate: the curve {curve_path.name} applied to {cfg.model.name}.\n"
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))


def _short_items(args: argparse.Namespace, items: list[Any]) -> list[Any]:
    """The questions of the short-list sweeps (none without ``--short-lengths``)."""
    if not args.short_lengths:
        if args.extend is not None:
            raise UsageError("--extend adds offsets at short lengths: give --short-lengths, e.g. 3,5,10")
        return []
    start = args.equalise_questions if args.short_start is None else args.short_start
    if start < 0 or start + args.short_questions > len(items):
        raise UsageError(
            f"--short-start {start} with --short-questions {args.short_questions} needs "
            f"{start + args.short_questions} calibration questions; there are {len(items)}"
        )
    return items[start : start + args.short_questions]


def _add_short_offsets(
    args: argparse.Namespace, curve: Any, cfg: Any, model: Any, short: list[Any], label: str | None
) -> Any:
    from rerank.fitting import fit_short_offsets

    start = args.equalise_questions if args.short_start is None else args.short_start
    return fit_short_offsets(
        curve,
        cfg,
        short,
        args.short_lengths,
        model=model,
        cache_dir=args.cache_dir,
        data_label=f"{label or 'NQ-open dev lists'}, questions {start}..{start + len(short) - 1}",
        show_progress=not args.no_progress,
    )


def _save(args: argparse.Namespace, cfg: Any, curve: Any) -> tuple[Path, Path]:
    """Write the curve to ``--out`` and, beside it, a config YAML that uses it; return both paths."""
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    curve.save(out)
    yml = out.with_suffix(".yaml")
    ref = str(args.config)
    _write_config(
        yml, cfg, out, ref if is_config_name(ref) else str(args.config.resolve()), curve.fusion is not None
    )
    return out, yml


def _extend(args: argparse.Namespace, cfg: Any, model: Any, short: list[Any], label: str | None) -> int:
    """``--extend CURVE``: the curve as it is, plus offsets fitted at ``--short-lengths``."""
    from calibration.curve import BiasCurve

    try:
        curve = BiasCurve.load(args.extend)
        curve = _add_short_offsets(args, curve, cfg, model, short, label)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    out, yml = _save(args, cfg, curve)
    for n, fig in sorted(curve.meta["fit"]["offsets_by_length"].items(), key=lambda kv: int(kv[0])):
        b, a = fig["before"], fig["after"]
        print(
            f"{n} passages: recall@1 {b['recall@1']:.3f} -> {a['recall@1']:.3f}, "
            f"bin spread {b['bin_spread']:.3f} -> {a['bin_spread']:.3f} (on the fitted lists)",
            file=sys.stderr,
        )
    print(f"wrote {out} and {yml}", file=sys.stderr)
    return EXIT_OK


def _with_fusion(
    args: argparse.Namespace, cfg: Any, model: Any, curve: Any, items: list[Any], label: str | None
) -> Any:
    """``curve`` with the fusion weights fitted for the probe it corrects."""
    import dataclasses

    from rerank.engines import AttentionReranker
    from rerank.fitting import fit_fusion_for

    rr = AttentionReranker(model, cfg.probe, cfg.calibration, curve=curve)
    fusion = fit_fusion_for(
        rr,
        items,
        n_hard=args.fusion_hard,
        n_retrieved=args.fusion_retrieved,
        store=args.fusion_store,
        data_label=label,
        show_progress=not args.no_progress,
    )
    return dataclasses.replace(curve, fusion=fusion)


def _print_fusion(fusion: Any) -> None:
    for name, w in fusion.weights.items():
        lo, hi = fusion.ci.get(name, (float("nan"), float("nan")))
        print(
            f"fusion weight {name}: {w:.3f} (95% CI with every signal: {lo:.3f} to {hi:.3f})", file=sys.stderr
        )
    so = fusion.second_order
    if so is not None:
        print(
            f"second prompt order read where the top-{so['k']} margin < {so['margin']:.3f}: "
            f"{so['second_order_rate']:.0%} of the calibration lists; kept set as with both orders in "
            f"{so['kept_same_adaptive']:.0%} (first order alone: {so['kept_same_first_order_only']:.0%})",
            file=sys.stderr,
        )


def _weights_for(args: argparse.Namespace, cfg: Any, model: Any, items: list[Any], label: str | None) -> int:
    """``--weights-for CURVE``: the curve as it is, with fusion weights fitted for it."""
    from calibration.curve import BiasCurve

    try:
        curve = _with_fusion(args, cfg, model, BiasCurve.load(args.weights_for), items, label)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    out, yml = _save(args, cfg, curve)
    _print_fusion(curve.fusion)
    print(f"wrote {out} and {yml}", file=sys.stderr)
    return EXIT_OK


def _lengths(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected list lengths like 3,5,10, got {text!r}") from None
    if not values or values[0] < 2:
        raise argparse.ArgumentTypeError(f"list lengths must be >= 2, got {text!r}")
    return values


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit, then write ``OUT`` (curve), ``OUT.png`` and ``OUT.yaml`` (a config that uses it)."""
    from calibration.lists import load_calibration_items
    from calibration.plots import plot_curve
    from rerank.fitting import fit_for
    from rerank.probe.model import load_model

    cfg = _config_for(args)
    try:
        items = load_calibration_items(args.data)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    try:
        model = load_model(cfg.model)
    except (OSError, ValueError, ImportError) as exc:
        raise UsageError(f"cannot load model {cfg.model.name!r}: {exc}") from None
    if args.layers is not None:
        band = tuple(args.layers)
    elif args.model is not None:
        band = layer_band(model.num_layers)
    else:
        band = cfg.probe.layer_range
    if band is not None and band[1] >= model.num_layers:
        raise UsageError(f"layers {list(band)} do not exist: the model has {model.num_layers} (0-based)")
    if band is not None and cfg.probe.head_set is None:
        cfg = cfg.model_copy(update={"probe": cfg.probe.model_copy(update={"layers": band})})
    label = None if args.data is None else f"the user's calibration lists {Path(args.data).name}"
    short = _short_items(args, items)
    if args.weights_for is not None:
        return _weights_for(args, cfg, model, items, label)
    if args.extend is not None:
        return _extend(args, cfg, model, short, label)
    try:
        curve, report = fit_for(
            cfg,
            items,
            n_lists=args.lists,
            model=model,
            equalise_questions=args.equalise_questions,
            cache_dir=args.cache_dir,
            sweep_store=args.sweep_store,
            sweep_dtype=args.sweep_dtype,
            lists_store=args.lists_store,
            native_sweep_store=args.native_sweep_store,
            data_label=label,
            show_progress=not args.no_progress,
        )
        if short:
            curve = _add_short_offsets(args, curve, cfg, model, short, label)
        if args.fusion_hard + args.fusion_retrieved:
            curve = _with_fusion(args, cfg, model, curve, items, label)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    out, yml = _save(args, cfg, curve)
    png = out.with_suffix(".png")
    plot_curve(curve, report.get("plot_lists", report["scored"]), png)
    recall = ", ".join(f"{k} {v:.3f}" for k, v in report["heldout_recall@1"].items())
    print(f"wrote {out}, {png} and {yml}", file=sys.stderr)
    print(f"correction: {report['mode']}; held-out gold recall@1: {recall}", file=sys.stderr)
    if "offset_shape" in report:
        print(f"per-slot offsets: {report['offset_shape']}", file=sys.stderr)
    if curve.fusion is not None:
        _print_fusion(curve.fusion)
    print(f"use it: attn-rerank run --config {yml} ..., or Pipeline.from_config('{yml}')", file=sys.stderr)
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    """Register ``calibrate``."""
    p = sub.add_parser(
        "calibrate",
        help="fit the positional-bias curve for a model (yours or the embedded one)",
        description="Fit the positional-bias curve of a model and probe configuration. Writes OUT (the\n"
        "curve, JSON), OUT.png (bias before and after correction) and OUT.yaml (a config that uses it).",
        epilog="examples:\n"
        "  attn-rerank calibrate --model Qwen/Qwen2.5-7B-Instruct --out qwen-curve.json\n"
        "  attn-rerank calibrate --model ./my-model --data my-lists.jsonl --out my-curve.json\n\n"
        "exit codes:\n  0    the curve was written\n  2    bad arguments, config, data or model\n",
        formatter_class=fmt,
    )
    p.add_argument(
        "--config",
        type=Path,
        default=Path("default"),
        metavar="CFG",
        help="pipeline config the curve is for (default: %(default)s); its curve, if any, is not used",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model to calibrate: a local folder or a Hugging Face id in the local cache (default: the "
        "config's); its layer band becomes the default's share of its depth unless --layers is given",
    )
    p.add_argument("--layers", type=int, nargs=2, metavar=("FIRST", "LAST"), help="layer band to read")
    p.add_argument("--out", type=Path, required=True, metavar="CURVE.json", help="curve file to write")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="LISTS.jsonl",
        help="your calibration lists, one JSON line per question: {query, positive, negatives (>= 19)} "
        "(default: the NQ-open dev lists shipped with the package)",
    )
    p.add_argument("--lists", type=positive_int, default=240, help="fitting lists (default %(default)s)")
    p.add_argument(
        "--equalise-questions",
        type=int,
        default=0,
        metavar="K",
        help="also sweep K questions' gold passage over 20 slots and fit per-slot offsets that even out "
        "its recall@1 (default 0: none); K x 20 passes",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="override model.dtype: a curve holds for the dtype it was fitted in",
    )
    p.add_argument("--cache-dir", type=Path, help="where the sweep's passes are cached")
    p.add_argument(
        "--sweep-store",
        type=Path,
        help="an .npz of the sweep's scores by question: questions in it are not probed again, and new "
        "ones are added (refused if made with other model or probe settings)",
    )
    p.add_argument(
        "--native-sweep-store",
        type=Path,
        help="with --sweep-dtype: a sweep store in the model's own dtype; its rows take precedence",
    )
    p.add_argument(
        "--lists-store",
        type=Path,
        help="an .npz of the fitting lists' scores: read if it holds the same lists and settings",
    )
    p.add_argument(
        "--sweep-dtype",
        choices=("bfloat16", "float16", "float32"),
        help="the --sweep-store was made in this dtype, not the model's (it must hold every swept question)",
    )
    p.add_argument(
        "--short-lengths",
        type=_lengths,
        metavar="N,N,...",
        help="also fit per-slot offsets at these list lengths (e.g. 3,5,10), each on its own sweep: "
        "the 20-slot offsets do not carry over to short lists",
    )
    p.add_argument(
        "--short-questions",
        type=positive_int,
        default=120,
        metavar="K",
        help="questions in each short-list sweep (default %(default)s; K x the sum of the lengths passes)",
    )
    p.add_argument(
        "--short-start",
        type=int,
        metavar="S",
        help="the short sweeps take questions S..S+K-1 (default: those after the --equalise-questions)",
    )
    p.add_argument(
        "--extend",
        type=Path,
        metavar="CURVE.json",
        help="fit nothing else: add the --short-lengths offsets to this curve and write it to --out",
    )
    p.add_argument(
        "--fusion-hard",
        type=int,
        default=60,
        metavar="K",
        help="lists of a gold passage among hard distractors for fitting the fusion weights (default "
        "%(default)s; 0 and --fusion-retrieved 0 fit no weights)",
    )
    p.add_argument(
        "--fusion-retrieved",
        type=int,
        default=60,
        metavar="K",
        help="lists retrieved over the calibration passages for fitting the fusion weights (default "
        "%(default)s)",
    )
    p.add_argument(
        "--fusion-store",
        type=Path,
        help="an .npz of the fusion lists' probe readings: read first, written as lists are probed",
    )
    p.add_argument(
        "--weights-for",
        type=Path,
        metavar="CURVE.json",
        help="fit nothing else: fit the fusion weights for this curve and write it to --out",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_calibrate)
