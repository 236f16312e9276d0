"""``attn-rerank index build``: index a corpus with the configured retriever and save the index folder."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rerank.batch.jobs import add_engine_arguments, index_builder
from rerank.core.common import EXIT_OK, UsageError, load_cli_config


def cmd_index_build(args: argparse.Namespace) -> int:
    """``index build``: load a corpus, index it with the configured retriever, save the index."""
    from retrievers.corpus import CorpusError, load_corpus
    from retrievers.index import build_retriever, save_retriever

    cfg = load_cli_config(args.config)
    build = index_builder(args)  # --engine ray without Ray: exit 2 before reading the corpus
    if args.retriever:
        cfg = cfg.model_copy(update={"retriever": cfg.retriever.model_copy(update={"name": args.retriever})})
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise UsageError(
            f"{out} exists and is not an empty folder; pass --force to overwrite the index there"
        )
    try:
        passages = load_corpus(args.corpus)
    except CorpusError as exc:
        raise UsageError(str(exc)) from None
    t0 = time.perf_counter()
    try:
        retriever = build_retriever(cfg.retriever)
        build(retriever, passages, cfg.retriever)
    except (KeyError, ValueError, OSError) as exc:
        raise UsageError(f"cannot index with the {cfg.retriever.name} retriever: {exc}") from None
    save_retriever(retriever, out)
    print(
        f"indexed {len(passages)} passages with the {cfg.retriever.name} retriever into {out} "
        f"in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return EXIT_OK




def add_parser(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    """Register ``index build``."""
    p_index = sub.add_parser("index", help="build a retrieval index from a corpus", formatter_class=fmt)
    index_sub = p_index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    p_build = index_sub.add_parser(
        "build",
        help="index a corpus with the configured retriever (BM25, dense or hybrid) and save it",
        description="Index a corpus with the configured retriever (default: hybrid = BM25 + dense) and\n"
        "save the index folder for `attn-rerank run --index`.",
        epilog="corpus: JSON lines with 'id' (or '_id'), 'text' (or 'contents') and an optional 'title'; "
        "a BEIR folder holding corpus.jsonl also works.\n\n"
        "exit codes:\n  0    the index was written\n  2    usage error (bad arguments, config or corpus)\n",
        formatter_class=fmt,
    )
    p_build.add_argument("--corpus", type=Path, required=True, metavar="FILE.jsonl", help="the corpus")
    p_build.add_argument("--out", type=Path, required=True, metavar="DIR", help="index folder to write")
    p_build.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="CFG",
        help="pipeline config, a YAML file or a name in configs/ such as 'default' (its 'retriever' part)",
    )
    p_build.add_argument(
        "--retriever",
        choices=["bm25", "dense", "hybrid"],
        default=None,
        help="override retriever.name of the config",
    )
    p_build.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")
    p_build.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_engine_arguments(p_build)
    p_build.set_defaults(func=cmd_index_build)

