"""What every ``attn-rerank`` command shares: exit codes, the two setup exceptions, config loading."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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


