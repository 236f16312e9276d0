"""The ``attn-rerank`` command line.

    attn-rerank index build --corpus corpus.jsonl --out my_index [--config cfg.yaml]
    attn-rerank run --config default --input queries.jsonl --output results.jsonl [--index my_index]
    attn-rerank calibrate --model MODEL --out my-curve.json
    attn-rerank explain --config default --query "..." --passages top20.jsonl --out report.html

One module per command (:mod:`.index`, :mod:`.run`, :mod:`.calibrate`, ...), each with
``add_parser(subparsers, formatter)`` and a function that returns the exit code; input parsing lives in
:mod:`.inputs`, durable output in :mod:`.output`, exit codes and setup errors in :mod:`.common`.
Command modules import nothing heavy at import time, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from rerank.core.common import (
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_STRICT,
    EXIT_USAGE,
    StrictAbort,
    UsageError,
)

#: Subcommand modules under ``rerank.cli``, in the order ``--help`` lists them.
COMMANDS = ("index", "run", "calibrate", "explain", "serve")


def build_parser() -> argparse.ArgumentParser:
    """The ``attn-rerank`` argument parser (every subcommand has its own ``--help``)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="attn-rerank",
        description="Training-free reranking for RAG from one LLM prefill: query-to-passage attention,\n"
        "corrected for positional bias.",
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level, show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"rerank.cli.{name}").add_parser(sub, fmt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attn-rerank`` command line.

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit code: 0 ok, 1 some input lines were bad, 2 usage or setup error, 3 aborted by
        ``--strict``, 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): return the code instead of exiting
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except UsageError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StrictAbort as exc:
        print(f"aborted by --strict at {exc}; nothing more was processed", file=sys.stderr)
        return EXIT_STRICT
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # anything else is a setup failure: one line, the traceback only with -v
        if args.verbose:
            traceback.print_exc()
        detail = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else exc
        hint = "" if args.verbose else " (rerun with -v for the traceback)"
        print(f"error: {type(exc).__name__}: {detail}{hint}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
