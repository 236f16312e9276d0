"""``attn-rerank explain``: one query's ranking as a self-contained HTML page (and JSON).

    attn-rerank explain --config default --query "how long is life cycle of flea" \
        --passages top20.jsonl --out report.html [--json report.json] [--screenshot report.png]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from rerank.core.common import EXIT_CODES_HELP, EXIT_OK, UsageError, load_cli_config, positive_int

logger = logging.getLogger(__name__)

EXPLAIN_HELP = """\
passages (--passages FILE.jsonl): one passage per line, best first, as in a corpus file:
  {"id": "d1", "text": "passage text", "title": "optional", "score": 12.3}
  ("_id" for "id" and "contents" for "text" also work). When every line has a numeric "score", it is
  the first-stage score fused with the probe's; otherwise the file order stands in for it.
--index DIR retrieves retriever.top_k passages for the query from a saved index instead.

The page opens in any browser with no network. It shows the ranking table (sortable), the
positional-bias strip, per-passage token heatmaps (raw or bias-corrected), the per-layer chart and the
run facts; --json writes the same data.
"""


def _read_passages(path: Path) -> list[Any]:
    from rerank.records import Hit, Passage
    from retrievers.corpus import CorpusError, load_corpus

    try:
        passages = load_corpus(path)
    except CorpusError as exc:
        raise UsageError(str(exc)) from None
    scores = [p.metadata.get("score") for p in passages]
    if all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores):
        return [
            Hit(passage=Passage(id=p.id, text=p.text, title=p.title), score=float(s), rank=i + 1)
            for i, (p, s) in enumerate(zip(passages, scores, strict=True))
        ]
    return passages


def cmd_explain(args: argparse.Namespace) -> int:
    """``explain``: rerank one query's passages and write the explanation page."""
    from rerank.pipeline import Pipeline

    if (args.passages is None) == (args.index is None):
        raise UsageError("give exactly one of --passages FILE.jsonl or --index DIR")
    if not args.query.strip():
        raise UsageError("--query is empty")
    if args.passages is not None and not args.passages.is_file():
        raise UsageError(f"passages file not found: {args.passages}")
    if args.index is not None and not args.index.is_dir():
        raise UsageError(f"index folder not found: {args.index}; build one with: attn-rerank index build")
    cfg = load_cli_config(args.config)
    if args.top_k is not None and args.index is not None:
        cfg = cfg.model_copy(update={"retriever": cfg.retriever.model_copy(update={"top_k": args.top_k})})
    try:
        pipe = Pipeline.from_config(cfg, index_dir=args.index)
        pipe.reranker  # noqa: B018 - load the model now: a bad config fails before any work
    except (KeyError, ValueError, FileNotFoundError, ImportError) as exc:
        raise UsageError(f"cannot build the pipeline: {exc}") from None
    if args.passages is not None:
        cands = _read_passages(args.passages)
        if args.top_k is not None:
            cands = cands[: args.top_k]
    else:
        cands = pipe.retrieve(args.query)
    try:
        exp = pipe.explain(args.query, cands, counterfactual=args.counterfactual)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    exp.to_html(args.out)
    written = [str(args.out)]
    if args.json is not None:
        exp.to_json(args.json, indent=1)
        written.append(str(args.json))
    if args.screenshot is not None:
        from rerank.explain.browser import screenshot

        try:
            screenshot(args.out, args.screenshot, width=args.width, height=args.height)
        except RuntimeError as exc:
            raise UsageError(str(exc)) from None
        written.append(str(args.screenshot))
    t = exp.facts["timings"]
    print(
        f"explained {len(exp.passages)} passages (rerank {t['rerank_seconds']:.2f} s, explain "
        f"{t['explain_seconds']:.2f} s); wrote {', '.join(written)}",
        file=sys.stderr,
    )
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    """Register ``explain``."""
    p = sub.add_parser(
        "explain",
        help="explain one query's ranking as a self-contained HTML page",
        description="Rerank one query's passages and write a page that shows why each passage landed\n"
        "where it did: scores, slots, the positional-bias curve, token heatmaps, layers.",
        epilog=EXPLAIN_HELP + "\n" + EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    p.add_argument(
        "--config", type=Path, required=True, metavar="CFG", help="pipeline config (YAML file or a name)"
    )
    p.add_argument("--query", required=True, help="the query text")
    p.add_argument("--passages", type=Path, default=None, metavar="FILE.jsonl", help="passages, best first")
    p.add_argument("--index", type=Path, default=None, metavar="DIR", help="retrieve from this index instead")
    p.add_argument(
        "--top-k", type=positive_int, default=None, metavar="K", help="use only the first K passages"
    )
    p.add_argument("--out", type=Path, required=True, metavar="REPORT.html", help="the page to write")
    p.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="also write the data as JSON")
    p.add_argument(
        "--counterfactual",
        action="store_true",
        help="also probe the top passage at the other end of its prompt (one extra prefill)",
    )
    p.add_argument(
        "--screenshot",
        type=Path,
        default=None,
        metavar="PNG",
        help="also save a screenshot of the page (headless Chromium; needs the explain extra)",
    )
    p.add_argument("--width", type=positive_int, default=1400, help="screenshot width (default %(default)s)")
    p.add_argument(
        "--height", type=positive_int, default=1800, help="screenshot height (default %(default)s)"
    )
    p.set_defaults(func=cmd_explain)
