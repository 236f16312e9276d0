"""What every ``attn-rerank`` command shares: exit codes, the two setup exceptions, config loading."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BAD_LINES = 1
EXIT_USAGE = 2
EXIT_STRICT = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0    every input line was processed (or was already in the output)
  1    some input lines were bad or failed; they are listed on stderr and in the errors file,
       every other line was processed
  2    usage or setup error (bad arguments, config, index or model); nothing was processed
  3    aborted by --strict at the first bad line: the whole input is checked before any reranking,
       so nothing new was processed (a query whose reranking fails also stops a --strict run)
  130  interrupted (Ctrl-C); rerun the same command to resume
"""

class UsageError(Exception):
    """Bad arguments, config, index or model: the run cannot start (exit code 2)."""


class StrictAbort(Exception):
    """``--strict`` met a bad line (exit code 3)."""


def load_cli_config(path: Path | None) -> Any:
    from rerank.config import PipelineConfig, load_config

    if path is None:
        return PipelineConfig()
    try:
        return load_config(path)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value




def build_pipeline(cfg: Any, index_dir: Path | None) -> Any:
    """The pipeline of a batch job with its model loaded now, so a bad config fails before any query.

    Raises:
        RuntimeError: Any failure to build it (a bad index, model, curve or device), in one line.
    """
    from rerank.pipeline import Pipeline

    try:
        pipe = Pipeline.from_config(cfg, index_dir=index_dir)
        pipe.reranker  # noqa: B018 - load the model now
    except Exception as exc:  # any failure here is a setup error
        where = f" (index {index_dir})" if index_dir is not None else ""
        raise RuntimeError(f"cannot build the pipeline{where}: {type(exc).__name__}: {exc}") from exc
    return pipe


def retrieve_for(pipe: Any, requests: Sequence[Any], k: int) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """First-stage candidates of the requests without candidates, by qid, and the error of each query whose
    search failed: the batch at once, and one query at a time when the batch fails, so that only the
    failing query is reported."""
    todo = [r for r in requests if r.candidates is None]
    if not todo:
        return {}, {}
    try:
        hits = pipe.retriever.search_batch([r.text for r in todo], k=k)
        return {r.qid: h for r, h in zip(todo, hits, strict=True)}, {}
    except Exception:  # one query broke the batch: search them one by one to find it
        logger.info("batch search failed; searching one query at a time", exc_info=True)
    found: dict[str, list[Any]] = {}
    failed: dict[str, str] = {}
    for r in todo:
        try:
            found[r.qid] = pipe.retriever.search(r.text, k)
        except Exception as exc:
            logger.info("search failed for qid %s", r.qid, exc_info=True)
            failed[r.qid] = f"retrieval failed: {type(exc).__name__}: {exc}"
    return found, failed
