"""``attn-rerank run``: rerank every query of a JSONL file, resumable and crash-safe.

Each result line is written with one ``write()`` and fsynced; a rerun skips the queries already in the
output and cuts away a line torn by a crash, so after any interruption (even SIGKILL) rerunning the same
command leaves exactly one line per query.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from rerank.batch.jobs import add_engine_arguments, engine_process
from rerank.core.common import (
    EXIT_BAD_LINES,
    EXIT_CODES_HELP,
    EXIT_OK,
    StrictAbort,
    UsageError,
    build_pipeline,
    load_cli_config,
    positive_int,
    retrieve_for,
)
from rerank.core.inputs import DEFAULT_MAX_LINE_BYTES, input_queries, read_requests, scan_input
from rerank.core.output import (
    ErrorLog,
    LineWriter,
    check_errors_file,
    check_trec_file,
    recover_output,
    result_line,
    scan_output,
    write_trec_run,
)

logger = logging.getLogger(__name__)

RUN_HELP = """\
input (JSON lines, one query per line; both forms may be mixed):
  {"qid": "q1", "query": "text"}
      retrieve candidates from --index (retriever.top_k of the config), then rerank them
  {"query": {"qid": "q1", "text": "text"},
   "candidates": [{"docid": "d1", "score": 12.3, "doc": "passage text"}, ...]}
      rank_llm request: rerank the given candidates, given best first; "doc" is a string or an
      object with "contents" (or "text"/"segment") and an optional "title"; "score" is optional

output (one JSON line per query, in completion order):
  {"qid": "q1", "query": "text", "ranking": [{"docid", "score", "rank", "raw_score",
   "calibrated_score", "prompt_position"}, ...]}       ranking best first

bad lines (invalid JSON, UTF-8 or Unicode, a missing or mistyped field, an empty query, a score that
is not a finite number, scores on only some candidates, a duplicate qid, a line over --max-line-bytes)
are reported on stderr as FILE:LINE: message and written to the errors file as {"line", "error", "raw"};
a valid line whose reranking fails is reported the same way with its "qid". The other lines are
processed. Blank lines are skipped.

resuming: queries whose qid already has a complete line in OUTPUT are skipped (they are not errors);
a partial last line left by a crash is removed and redone. The errors file is rewritten on each run
and holds the bad lines of that run (it is removed when there are none).

existing files: an OUTPUT holding anything but this tool's results for queries of this input (same
qid, same query text), or an errors or TREC file that is not one, is refused (exit 2) and left as it
is; --overwrite replaces them.
"""


def run_tag(text: str) -> str:
    """``--run-tag``: one non-empty TREC column (no whitespace)."""
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(
            f"the run tag is one column of a whitespace-separated TREC line: no spaces, got {text!r}"
        )
    return text


def cmd_run(args: argparse.Namespace) -> int:
    """``run``: rerank every query of the input file and append the results to the output file."""
    from tqdm.auto import tqdm

    inp: Path = args.input
    out: Path = args.output
    errors_path: Path = args.errors or out.with_name(out.stem + ".errors.jsonl")
    if not inp.is_file():
        raise UsageError(f"input file not found: {inp}")
    resolved = {p.resolve() for p in (inp, out, errors_path)}
    if len(resolved) < 3:
        raise UsageError("--input, --output and --errors must be three different files")
    if args.trec_run is not None and args.trec_run.resolve() in resolved:
        raise UsageError("--trec-run must differ from --input, --output and --errors")
    if args.index is not None and not args.index.is_dir():
        raise UsageError(f"index folder not found: {args.index}; build one with: attn-rerank index build")
    cfg = load_cli_config(args.config)
    process = engine_process(args, _process)  # --engine ray without Ray: exit 2 before any work
    if not args.overwrite:
        check_errors_file(errors_path)
        if args.trec_run is not None:
            check_trec_file(args.trec_run)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder of --output {out}: {exc.strerror or exc}") from None
    if out.exists() and not out.is_file():
        raise UsageError(f"--output {out} is not a regular file")
    writer = LineWriter(out)  # takes the lock before anything reads or cuts the output
    try:
        if args.overwrite:
            writer.clear()
        else:
            _check_output_is_ours(out, inp, args)
        errors = ErrorLog(inp, errors_path)
    except BaseException:
        writer.close()
        raise
    try:
        done = recover_output(out)
        writer.reopen()  # recovery may have replaced the file: append to the new one
        pending, skipped = scan_input(
            inp,
            done,
            errors,
            has_index=args.index is not None,
            max_line_bytes=args.max_line_bytes,
            strict=args.strict,
        )
        processed = process(args, cfg, inp, pending, writer, errors, tqdm)
    finally:
        writer.close()
        errors.close()
    if args.trec_run is not None:
        n = write_trec_run(out, args.trec_run, args.run_tag)
        logger.info("wrote %d queries to %s", n, args.trec_run)
    summary = f"{processed} queries reranked, {skipped} already done, {errors.count} bad lines"
    if errors.count:
        summary += f" (see {errors_path})"
    print(f"{summary}; results in {out}", file=sys.stderr)
    return EXIT_BAD_LINES if errors.count else EXIT_OK


def _check_output_is_ours(out: Path, inp: Path, args: argparse.Namespace) -> None:
    """Refuse an existing ``--output`` that is not this tool's output for this input: a line that is not
    a result record, or a result for a qid (or query text) that the input does not hold.

    Raises:
        UsageError: Names the first line or qid that does not belong.
    """
    scan = scan_output(out)
    hint = "pass --overwrite to replace it, or choose another --output"
    if not scan.ours:
        where = f"line {scan.foreign[0]}" if scan.foreign else "its last line"
        raise UsageError(f"{out} exists and {where} is not an attn-rerank result; {hint}")
    if not scan.queries:
        return
    queries = input_queries(inp, args.max_line_bytes)
    for qid, text in scan.queries.items():
        if qid not in queries:
            raise UsageError(f"{out} holds results for qid {qid!r}, which is not in {inp}; {hint}")
        if text is not None and text != queries[qid]:
            raise UsageError(f"{out} holds qid {qid!r} for another query text than {inp} has; {hint}")


def _build_pipeline(args: argparse.Namespace, cfg: Any) -> Any:
    try:
        return build_pipeline(cfg, args.index)
    except RuntimeError as exc:
        logger.info("the pipeline could not be built", exc_info=True)
        raise UsageError(str(exc)) from None


def _retrieve(pipe: Any, batch: list[Any], k: int, errors: ErrorLog) -> dict[str, list[Any]]:
    """First-stage candidates of the batch's lines without candidates; a query whose search fails is
    reported (with its qid) and left out."""
    found, failed = retrieve_for(pipe, batch, k)
    for r in batch:
        if r.qid in failed:
            errors.report(r.line, failed[r.qid], None, qid=r.qid)
    return found


def _process(
    args: argparse.Namespace,
    cfg: Any,
    inp: Path,
    pending: list[tuple[int, int]],
    writer: LineWriter,
    errors: ErrorLog,
    tqdm: Any,
) -> int:
    """Second pass: rerank the pending lines in batches; returns how many were written."""
    from rerank.records import Query

    if not pending:
        return 0
    pipe = _build_pipeline(args, cfg)
    processed = 0
    bar = tqdm(total=len(pending), unit="q", desc="rerank", file=sys.stderr, disable=args.no_progress)
    errors.bar = bar
    try:
        with inp.open("rb") as f:
            for start in range(0, len(pending), args.batch_size):
                batch = read_requests(
                    f,
                    pending[start : start + args.batch_size],
                    has_index=args.index is not None,
                    max_line_bytes=args.max_line_bytes,
                )
                retrieved = _retrieve(pipe, batch, cfg.retriever.top_k, errors)
                for req in batch:
                    if req.candidates is None and req.qid not in retrieved:
                        bar.update(1)
                        continue  # its search failed: already reported
                    cands = req.candidates if req.candidates is not None else retrieved[req.qid]
                    try:
                        ranked = pipe.rerank(Query(qid=req.qid, text=req.text), cands, top_k=args.top_k)
                        line = result_line(req.qid, req.text, ranked)
                    except Exception as exc:  # one failing line must not end the run: report it, go on
                        logger.info("rerank failed for qid %s (line %d)", req.qid, req.line, exc_info=True)
                        msg = f"rerank failed: {type(exc).__name__}: {exc}"
                        errors.report(req.line, msg, None, qid=req.qid)
                        if args.strict:
                            raise StrictAbort(f"{inp}:{req.line}: {msg}") from None
                    else:
                        writer.write(line)
                        processed += 1
                    bar.update(1)
                    bar.set_postfix(errors=errors.count, refresh=False)
    finally:
        errors.bar = None
        bar.close()
    return processed


def add_parser(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    """Register ``run``."""
    p_run = sub.add_parser(
        "run",
        help="rerank a JSONL file of queries (resumable)",
        description="Rerank every query of a JSON-lines file and append one result line per query to\n"
        "OUTPUT. Resumable: rerun the same command after any interruption.",
        epilog=RUN_HELP + "\n" + EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    p_run.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="CFG",
        help="pipeline config: a YAML file, or a name in configs/ such as 'default'",
    )
    p_run.add_argument("--input", type=Path, required=True, metavar="QUERIES.jsonl", help="queries")
    p_run.add_argument("--output", type=Path, required=True, metavar="RESULTS.jsonl", help="results")
    p_run.add_argument(
        "--index", type=Path, default=None, metavar="DIR", help="index folder, for lines without candidates"
    )
    p_run.add_argument(
        "--trec-run",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write a TREC run (qid Q0 docid rank score tag), rebuilt from the whole OUTPUT at the end "
        "of every run that is not aborted, so the two always agree",
    )
    p_run.add_argument(
        "--run-tag",
        type=run_tag,
        default="attn-rerank",
        help="last column of the TREC run, no spaces (default: %(default)s)",
    )
    p_run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUTPUT (and errors and TREC files) that this tool did not write for "
        "this input; without it such files are refused and left as they are",
    )
    p_run.add_argument(
        "--errors",
        type=Path,
        default=None,
        metavar="FILE",
        help="bad lines as JSON lines {line, error, raw} (default: next to OUTPUT, NAME.jsonl -> "
        "NAME.errors.jsonl)",
    )
    p_run.add_argument(
        "--strict", action="store_true", help="stop at the first bad line, before reranking anything (exit 3)"
    )
    p_run.add_argument(
        "--top-k",
        type=positive_int,
        default=None,
        metavar="N",
        help="keep the best N per query (default: all)",
    )
    p_run.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        metavar="N",
        help="queries read and retrieved together (default: %(default)s)",
    )
    p_run.add_argument(
        "--max-line-bytes",
        type=positive_int,
        default=DEFAULT_MAX_LINE_BYTES,
        metavar="N",
        help="longer input lines are reported as bad (default: %(default)s = 1 MiB)",
    )
    p_run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_arguments(p_run)
    p_run.set_defaults(func=cmd_run)

