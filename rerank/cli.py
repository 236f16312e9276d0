"""The ``attn-rerank`` command: build an index, rerank query files, fit calibration curves, evaluate.

    attn-rerank index build --corpus corpus.jsonl --out my_index [--config cfg.yaml]
    attn-rerank run --config cfg.yaml --input queries.jsonl --output results.jsonl [--index my_index]
    attn-rerank calibrate ...      (same as rerank.calibrate's command line)
    attn-rerank eval ...           (same as python -m eval)

``run`` is resumable and crash-safe: each result line is written with one ``write()`` and fsynced, a
rerun skips the queries already in the output and cuts away a line torn by a crash, so after any
interruption (even SIGKILL) rerunning the same command leaves exactly one line per query.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BAD_LINES = 1
EXIT_USAGE = 2
EXIT_STRICT = 3
EXIT_INTERRUPTED = 130

DEFAULT_MAX_LINE_BYTES = 1 << 20
RAW_PREVIEW_CHARS = 200
_TEXT_KEYS = ("contents", "text", "segment")

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

bad lines (invalid JSON or UTF-8, a missing or mistyped field, an empty query, a duplicate qid, a line
over --max-line-bytes) are reported on stderr as FILE:LINE: message and written to the errors file as
{"line", "error", "raw"}; the other lines are processed. Blank lines are skipped.

resuming: queries whose qid already has a complete line in OUTPUT are skipped (they are not errors);
a partial last line left by a crash is removed and redone. The errors file is rewritten on each run
and holds the bad lines of that run (it is removed when there are none).
"""


class LineError(ValueError):
    """One input line cannot become a request; the message says what is wrong."""


class UsageError(Exception):
    """Bad arguments, config, index or model: the run cannot start (exit code 2)."""


class StrictAbort(Exception):
    """``--strict`` met a bad line (exit code 3)."""


@dataclass(frozen=True)
class Request:
    """One parsed input line.

    Attributes:
        line: 1-based line number in the input file.
        qid: Query id.
        text: Query text.
        candidates: Passages (or hits, when the input gives scores) to rerank in the given order;
            None means "retrieve them from the index".
    """

    line: int
    qid: str
    text: str
    candidates: tuple[Any, ...] | None


# --------------------------------------------------------------------------------------------------
# Input parsing
# --------------------------------------------------------------------------------------------------


def _id_field(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise LineError(f"{where} must be a string or an integer, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise LineError(f"{where} is empty")
    if any(c.isspace() for c in text):
        raise LineError(f"{where} {text!r} contains whitespace (TREC run files are whitespace-separated)")
    return text


def _text_field(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise LineError(f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise LineError(f"{where} is empty")
    return value


def _candidate(i: int, cand: Any) -> Any:
    from rerank.records import Hit, Passage

    where = f"candidates[{i}]"
    if not isinstance(cand, dict):
        raise LineError(f"{where} must be an object, got {type(cand).__name__}")
    if "docid" not in cand:
        raise LineError(f"{where} has no 'docid'")
    docid = _id_field(cand["docid"], f"{where}.docid")
    if "doc" not in cand:
        raise LineError(f"{where} has no 'doc' (the passage text, or an object with 'contents')")
    doc = cand["doc"]
    title = ""
    if isinstance(doc, str):
        text = _text_field(doc, f"{where}.doc")
    elif isinstance(doc, dict):
        key = next((k for k in _TEXT_KEYS if k in doc), None)
        if key is None:
            raise LineError(f"{where}.doc has none of the text fields {', '.join(map(repr, _TEXT_KEYS))}")
        text = _text_field(doc[key], f"{where}.doc.{key}")
        raw_title = doc.get("title")
        if raw_title is not None and not isinstance(raw_title, str):
            raise LineError(f"{where}.doc.title must be a string, got {type(raw_title).__name__}")
        title = raw_title or ""
    else:
        raise LineError(f"{where}.doc must be a string or an object, got {type(doc).__name__}")
    passage = Passage(id=docid, text=text, title=title)
    score = cand.get("score")
    if score is None:
        return passage
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise LineError(f"{where}.score must be a finite number, got {score!r}")
    return Hit(passage=passage, score=float(score), rank=i + 1)


def parse_request(obj: Any, line: int, *, has_index: bool) -> Request:
    """Turn one decoded JSON value into a :class:`Request`.

    Args:
        obj: The decoded JSON value of the line.
        line: Its 1-based line number.
        has_index: Whether ``--index`` was given (needed by lines without candidates).

    Raises:
        LineError: A field is missing, of the wrong type or empty; the message names it.
    """
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    if "candidates" in obj or isinstance(obj.get("query"), dict):
        q = obj.get("query")
        if not isinstance(q, dict):
            raise LineError("'query' must be an object {\"qid\", \"text\"} when 'candidates' are given")
        for key in ("qid", "text"):
            if key not in q:
                raise LineError(f"query has no '{key}'")
        qid = _id_field(q["qid"], "query.qid")
        text = _text_field(q["text"], "query.text")
        cands = obj.get("candidates")
        if not isinstance(cands, list):
            raise LineError(f"'candidates' must be a list, got {type(cands).__name__}")
        if not cands:
            raise LineError("'candidates' is empty: nothing to rerank")
        parsed = tuple(_candidate(i, c) for i, c in enumerate(cands))
        first: dict[str, int] = {}
        for i, c in enumerate(parsed):
            pid = c.id if hasattr(c, "id") else c.passage.id
            if pid in first:
                raise LineError(f"duplicate docid {pid!r} in candidates[{first[pid]}] and candidates[{i}]")
            first[pid] = i
        return Request(line=line, qid=qid, text=text, candidates=parsed)
    for key in ("qid", "query"):
        if key not in obj:
            raise LineError(
                f'missing field \'{key}\'; a line is {{"qid", "query"}} or '
                '{"query": {"qid", "text"}, "candidates": [...]}'
            )
    qid = _id_field(obj["qid"], "qid")
    text = _text_field(obj["query"], "query")
    if not has_index:
        raise LineError("no 'candidates' and no --index to retrieve them from; pass --index DIR")
    return Request(line=line, qid=qid, text=text, candidates=None)


def _raw_lines(f: IO[bytes], max_bytes: int) -> Iterator[tuple[int, int, bytes | None, int]]:
    """Yield ``(line number, byte offset, line bytes or None when oversized, line length)``.

    An oversized line is never held in memory: it is skipped in chunks.
    """
    lineno = 0
    offset = 0
    while True:
        chunk = f.readline(max_bytes + 1)
        if not chunk:
            return
        lineno += 1
        start = offset
        size = len(chunk)
        if size > max_bytes and not chunk.endswith(b"\n"):
            while not chunk.endswith(b"\n"):
                chunk = f.readline(1 << 20)
                if not chunk:
                    break
                size += len(chunk)
            offset += size
            yield lineno, start, None, size
            continue
        offset += size
        yield lineno, start, chunk, size


def _decode(raw: bytes, line: int, has_index: bool) -> Request | None:
    """Decode one line into a request; None for a blank line.

    Raises:
        LineError: Invalid UTF-8, invalid JSON or a bad record.
    """
    if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineError(
            f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {exc.start}); "
            "re-encode the file as UTF-8"
        ) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    return parse_request(obj, line, has_index=has_index)


# --------------------------------------------------------------------------------------------------
# Output, resume, errors
# --------------------------------------------------------------------------------------------------


def _valid_output_record(raw: bytes) -> str | None:
    """The qid of a complete output line, or None when the line is not a result record."""
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if (
        not isinstance(rec, dict)
        or not isinstance(rec.get("qid"), str)
        or not isinstance(rec.get("ranking"), list)
    ):
        return None
    return rec["qid"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_output(path: Path) -> set[str]:
    """Make an earlier run's output consistent and return the qids it holds.

    A complete line is valid JSON ending with a newline; a partial last line (a crash mid-write) is
    cut away so that its query is redone. Invalid or duplicate complete lines (only possible when the
    file was edited by hand) are dropped by rewriting the file atomically.

    Args:
        path: The output file; a missing file holds nothing.

    Returns:
        The qids with a complete line.
    """
    if not path.exists():
        return set()
    done: set[str] = set()
    good_end = 0
    dropped = 0
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            qid = _valid_output_record(raw)
            if qid is None or qid in done:
                dropped += 1
            else:
                done.add(qid)
            good_end += len(raw)
    size = path.stat().st_size
    if dropped:
        logger.warning("%s: dropping %d invalid or duplicate line(s)", path, dropped)
        tmp = path.with_name(path.name + ".tmp")
        kept: set[str] = set()
        with path.open("rb") as src, tmp.open("wb") as dst:
            read = 0
            for raw in src:
                read += len(raw)
                if read > good_end:
                    break
                qid = _valid_output_record(raw)
                if qid is not None and qid not in kept:
                    kept.add(qid)
                    dst.write(raw)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    elif good_end < size:
        print(
            f"{path}: removing a partial last line ({size - good_end} bytes) left by an interrupted run; "
            "its query is redone",
            file=sys.stderr,
        )
        os.truncate(path, good_end)
        _fsync_dir(path.parent)
    return done


class _LineWriter:
    """Appends result lines crash-safely: one ``write()`` per line, then flush and fsync."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = path.open("ab", buffering=0)
        self._lock()

    def reopen(self) -> None:
        """Reopen the file (after :func:`recover_output` may have replaced it) and lock it again."""
        self._f.close()
        self._f = self.path.open("ab", buffering=0)
        self._lock()

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory lock
            return
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            raise UsageError(
                f"{self.path} is being written by another attn-rerank run; wait for it"
            ) from None

    def write(self, line: str) -> None:
        data = memoryview((line + "\n").encode("utf-8"))
        # FileIO.write is one write(2); a regular file takes it whole, but loop in case it does not.
        while data:
            n = self._f.write(data)
            data = data[n:]
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class _ErrorLog:
    """Reports bad lines on stderr (``FILE:LINE: message``) and in the errors JSONL."""

    def __init__(self, input_path: Path, errors_path: Path) -> None:
        self.input_path = input_path
        self.errors_path = errors_path
        self.count = 0
        self._f: IO[str] | None = None
        self.bar: Any = None
        if errors_path.exists():
            errors_path.unlink()

    def report(self, line: int, message: str, raw: bytes | None) -> None:
        self.count += 1
        msg = f"{self.input_path}:{line}: {message}"
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)
        if self._f is None:
            self.errors_path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.errors_path.open("w", encoding="utf-8")
        preview = (
            raw[: RAW_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")[:RAW_PREVIEW_CHARS] if raw else ""
        )
        rec = {"line": line, "error": message, "raw": preview.rstrip("\r\n")}
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def result_line(qid: str, text: str, ranked: Any) -> str:
    """The output JSON line (without newline) for one ranked list.

    Raises:
        ValueError: A score is NaN or infinite (not representable in JSON).
    """
    ranking = [
        {
            "docid": it.passage.id,
            "score": it.score,
            "rank": it.rank,
            "raw_score": it.raw_score,
            "calibrated_score": it.calibrated_score,
            "prompt_position": it.prompt_position,
        }
        for it in ranked.items
    ]
    return json.dumps({"qid": qid, "query": text, "ranking": ranking}, ensure_ascii=False, allow_nan=False)


def write_trec_run(output: Path, trec: Path, tag: str = "attn-rerank") -> int:
    """Write a TREC run (``qid Q0 docid rank score tag``) from an output file, atomically.

    Returns:
        The number of queries written.
    """
    tmp = trec.with_name(trec.name + ".tmp")
    n = 0
    trec.parent.mkdir(parents=True, exist_ok=True)
    with output.open("rb") as src, tmp.open("w", encoding="utf-8") as dst:
        for raw in src:
            if not raw.endswith(b"\n"):
                break
            rec = json.loads(raw)
            for it in rec["ranking"]:
                dst.write(f"{rec['qid']} Q0 {it['docid']} {it['rank']} {float(it['score'])!r} {tag}\n")
            n += 1
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, trec)
    return n


# --------------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------------


def _load_config(path: Path | None) -> Any:
    from rerank.config import PipelineConfig, load_config

    if path is None:
        return PipelineConfig()
    try:
        return load_config(path)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def cmd_index_build(args: argparse.Namespace) -> int:
    """``index build``: load a corpus, index it with the configured retriever, save the index."""
    from retrievers.corpus import CorpusError, load_corpus
    from retrievers.index import build_retriever, save_retriever

    cfg = _load_config(args.config)
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
        retriever.index(passages, show_progress=not args.no_progress)
    except (KeyError, ValueError, OSError) as exc:
        raise UsageError(f"cannot index with the {cfg.retriever.name} retriever: {exc}") from None
    save_retriever(retriever, out)
    print(
        f"indexed {len(passages)} passages with the {cfg.retriever.name} retriever into {out} "
        f"in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return EXIT_OK


def _scan_input(
    path: Path, args: argparse.Namespace, done: set[str], errors: _ErrorLog
) -> tuple[list[tuple[int, int]], int]:
    """First pass: validate every line.

    Returns:
        ``(line number, byte offset)`` of the lines to process, and the number of lines skipped
        because their qid is already in the output.

    Raises:
        StrictAbort: ``--strict`` and a bad line.
    """
    pending: list[tuple[int, int]] = []
    first_line: dict[str, int] = {}
    skipped = 0
    has_index = args.index is not None
    with path.open("rb") as f:
        for line, offset, raw, size in _raw_lines(f, args.max_line_bytes):
            try:
                if raw is None:
                    raise LineError(
                        f"line is {size} bytes, over the --max-line-bytes limit of {args.max_line_bytes}"
                    )
                req = _decode(raw, line, has_index)
                if req is None:
                    continue
                if req.qid in first_line:
                    raise LineError(f"duplicate qid {req.qid!r} (first on line {first_line[req.qid]})")
            except LineError as exc:
                errors.report(line, str(exc), raw)
                if args.strict:
                    raise StrictAbort(f"{path}:{line}: {exc}") from None
                continue
            first_line[req.qid] = line
            if req.qid in done:
                skipped += 1
            else:
                pending.append((line, offset))
    return pending, skipped


def _read_requests(
    f: IO[bytes], pending: Sequence[tuple[int, int]], args: argparse.Namespace
) -> list[Request]:
    """Re-read and parse the ``(line number, byte offset)`` lines that the first pass validated."""
    reqs = []
    for line, offset in pending:
        f.seek(offset)
        req = _decode(f.readline(args.max_line_bytes + 1), line, args.index is not None)
        if req is None:
            raise RuntimeError(f"line {line} changed while the run was reading the input")
        reqs.append(req)
    return reqs


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
    cfg = _load_config(args.config)

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = _LineWriter(out)  # takes the lock before anything reads or cuts the output
    errors = _ErrorLog(inp, errors_path)
    try:
        done = recover_output(out)
        writer.reopen()  # recovery may have replaced the file: append to the new one
        pending, skipped = _scan_input(inp, args, done, errors)
        processed = _process(args, cfg, inp, pending, writer, errors, tqdm)
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


def _build_pipeline(args: argparse.Namespace, cfg: Any) -> Any:
    from rerank.pipeline import Pipeline

    try:
        pipe = Pipeline.from_config(cfg, index_dir=args.index)
        pipe.reranker  # noqa: B018 - load the model now: a bad config fails before any query
    except (KeyError, ValueError, FileNotFoundError, ImportError) as exc:
        raise UsageError(f"cannot build the pipeline: {exc}") from None
    return pipe


def _process(
    args: argparse.Namespace,
    cfg: Any,
    inp: Path,
    pending: list[tuple[int, int]],
    writer: _LineWriter,
    errors: _ErrorLog,
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
                batch = _read_requests(f, pending[start : start + args.batch_size], args)
                to_retrieve = [r for r in batch if r.candidates is None]
                retrieved: dict[str, list[Any]] = {}
                if to_retrieve:
                    hits = pipe.retriever.search_batch([r.text for r in to_retrieve], k=cfg.retriever.top_k)
                    retrieved = {r.qid: h for r, h in zip(to_retrieve, hits, strict=True)}
                for req in batch:
                    cands = req.candidates if req.candidates is not None else retrieved[req.qid]
                    try:
                        ranked = pipe.rerank(Query(qid=req.qid, text=req.text), cands, top_k=args.top_k)
                        line = result_line(req.qid, req.text, ranked)
                    except ValueError as exc:
                        errors.report(req.line, f"rerank failed: {exc}", None)
                        if args.strict:
                            raise StrictAbort(f"{inp}:{req.line}: rerank failed: {exc}") from None
                    else:
                        writer.write(line)
                        processed += 1
                    bar.update(1)
                    bar.set_postfix(errors=errors.count, refresh=False)
    finally:
        errors.bar = None
        bar.close()
    return processed


def _forward(name: str, argv: Sequence[str]) -> int:
    """Run the ``calibrate`` or ``eval`` command line, imported only now."""
    module = {"calibrate": "rerank.calibrate", "eval": "eval.__main__"}[name]
    try:
        if name == "calibrate":
            from rerank.calibrate import main as calibration_cli

            return int(calibration_cli(list(argv)) or 0)
        from eval.__main__ import main as eval_main

        return int(eval_main(list(argv)) or 0)
    except ModuleNotFoundError as exc:
        if exc.name not in (module, module.rsplit(".", 1)[0]):
            raise
        print(f"error: '{name}' is not available: module {module} is missing", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # their argparse exits on --help or a usage error: return its code
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)
        return 1


# --------------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    p_build.set_defaults(func=cmd_index_build)

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
        "--run-tag", default="attn-rerank", help="last column of the TREC run (default: %(default)s)"
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
        type=_positive_int,
        default=None,
        metavar="N",
        help="keep the best N per query (default: all)",
    )
    p_run.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        metavar="N",
        help="queries read and retrieved together (default: %(default)s)",
    )
    p_run.add_argument(
        "--max-line-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_LINE_BYTES,
        metavar="N",
        help="longer input lines are reported as bad (default: %(default)s = 1 MiB)",
    )
    p_run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_run.set_defaults(func=cmd_run)

    for name, text in (
        ("calibrate", "fit a positional-bias curve (see `attn-rerank calibrate --help`)"),
        ("eval", "run an evaluation suite (see `attn-rerank eval --help`)"),
    ):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(forward=name)
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
    if argv and argv[0] in ("calibrate", "eval"):
        return _forward(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): return the code instead of exiting
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if getattr(args, "forward", None):
        return _forward(args.forward, args.args)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StrictAbort as exc:
        print(f"aborted by --strict at {exc}; nothing more was processed", file=sys.stderr)
        return EXIT_STRICT
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
