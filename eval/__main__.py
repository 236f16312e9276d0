"""Command line of the evaluation suites.

Suites are registered below as ``name -> "module:function"`` and imported only when chosen. A suite
function takes the parsed arguments (``data_dir``, ``output``, ``quick`` and ``opts``, the
``--opt key=value`` pairs) and returns ``{"dataset": str, "config": {...}, "systems": {...}}``; this
module adds ``suite`` and ``machine`` and writes the JSON.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eval.common import REPO_ROOT, DataDirError, SuiteError, default_data_dir, machine_info, write_json
from retrievers.corpus import CorpusError

logger = logging.getLogger(__name__)

#: Suite name -> "module:function". Add a suite by adding a line.
SUITES: dict[str, str] = {
    "retrieval": "eval.retrieval:run",
    "heads": "eval.heads:run",
    "rerank": "eval.rerank:run",
    "position": "eval.position:run",
    "qa": "eval.qa:run",
    "speed": "eval.speed:run",
    "serve": "eval.serve:run",
    "report": "eval.report:run",
    "batch": "eval.batch:run",
    "profile": "eval.profile:run",
    "shortlists": "eval.shortlists:run",
    "relevance": "eval.relevance:run",
    "fusion": "eval.fusion:run",
}


def _suite_function(name: str) -> Callable[[argparse.Namespace], dict[str, Any]]:
    try:
        target = SUITES[name]
    except KeyError:
        raise KeyError(f"unknown suite {name!r}; choose one of: {', '.join(sorted(SUITES))}") from None
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def _parse_opts(pairs: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    opts: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--opt takes key=value, got {pair!r}")
        opts[key.strip()] = value.strip()
    return opts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES), help="which suite to run")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="shared evaluation data, read in place (default: ../shared/data next to the repository)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="result JSON (default: results/<suite>.json)"
    )
    parser.add_argument("--quick", action="store_true", help="a small subset, for smoke tests")
    parser.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="suite-specific option, repeatable (see the suite's docstring)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one suite and write its JSON; returns the process exit code (0 ok, 2 bad input or data)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.opts = _parse_opts(args.opt, parser)
    if args.output is None:
        args.output = REPO_ROOT / "results" / f"{args.suite}.json"
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    started = time.perf_counter()
    try:
        result = _suite_function(args.suite)(args)
    except (DataDirError, CorpusError, SuiteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = {"dataset", "config", "systems"} - set(result)
    if missing:
        raise RuntimeError(
            f"suite {args.suite!r} returned no {sorted(missing)}; a suite must return all three"
        )
    out = {
        "suite": args.suite,
        "dataset": result["dataset"],
        "config": {**result["config"], "quick": args.quick, "opts": args.opts},
        "systems": result["systems"],
        "machine": machine_info(),
        **{k: v for k, v in result.items() if k not in {"dataset", "config", "systems"}},
    }
    out["config"]["wall_seconds"] = round(time.perf_counter() - started, 2)
    path = write_json(args.output, out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
