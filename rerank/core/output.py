"""Durable output of ``attn-rerank run``: result lines written whole and fsynced, recovery of an earlier
run's output after a crash, the errors file, and the TREC run rebuilt from the output."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rerank.core.common import UsageError

logger = logging.getLogger(__name__)

RAW_PREVIEW_CHARS = 200
# How every result line starts (``result_line`` writes "qid" first): a torn last line that starts
# otherwise was not written by this tool and is never cut away.
RESULT_PREFIX = b'{"qid": '


def _output_record(raw: bytes) -> tuple[str, str | None] | None:
    """``(qid, query text)`` of a complete output line, or None when the line is not a result record."""
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, an over-long integer literal
        return None
    if (
        not isinstance(rec, dict)
        or not isinstance(rec.get("qid"), str)
        or not isinstance(rec.get("ranking"), list)
    ):
        return None
    query = rec.get("query")
    return rec["qid"], query if isinstance(query, str) else None


def _valid_output_record(raw: bytes) -> str | None:
    """The qid of a complete output line, or None when the line is not a result record."""
    rec = _output_record(raw)
    return None if rec is None else rec[0]


@dataclass
class OutputScan:
    """What an existing output file holds, read without changing it.

    Attributes:
        queries: qid -> query text (None when the record has none) of each complete result line.
        foreign: 1-based numbers of complete lines that are not result records.
        torn_foreign: The file ends in a partial line that does not start like a result line.
    """

    queries: dict[str, str | None] = field(default_factory=dict)
    foreign: list[int] = field(default_factory=list)
    torn_foreign: bool = False

    @property
    def ours(self) -> bool:
        """Whether every line (the partial last one included) could have been written by this tool."""
        return not self.foreign and not self.torn_foreign


def scan_output(path: Path) -> OutputScan:
    """Read an existing output file (a missing or empty one holds nothing).

    Raises:
        UsageError: The path exists but is not a regular file, or cannot be read.
    """
    scan = OutputScan()
    if not path.exists():
        return scan
    if not path.is_file():
        raise UsageError(f"--output {path} is not a regular file")
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    scan.torn_foreign = not raw.startswith(RESULT_PREFIX)
                    break
                rec = _output_record(raw)
                if rec is None:
                    scan.foreign.append(n)
                else:
                    scan.queries.setdefault(rec[0], rec[1])
    except OSError as exc:
        raise UsageError(f"cannot read --output {path}: {exc.strerror or exc}") from None
    return scan


def _check_own_file(path: Path, flag: str, what: str, is_own: Callable[[bytes], bool]) -> None:
    """Refuse an existing file given as ``flag`` unless every line is ``what`` this tool writes there."""
    if not path.exists():
        return
    if not path.is_file():
        raise UsageError(f"{flag} {path} is not a regular file")
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(f, start=1):
                if not is_own(raw):
                    raise UsageError(
                        f"{path} exists and line {n} is not {what}; the run would replace that file: "
                        f"pass --overwrite to allow it, or choose another {flag}"
                    )
    except OSError as exc:
        raise UsageError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def _is_error_record(raw: bytes) -> bool:
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return isinstance(rec, dict) and "line" in rec and "error" in rec


def _is_trec_line(raw: bytes) -> bool:
    cols = raw.split()
    return len(cols) == 6 and cols[1] == b"Q0"


def check_errors_file(path: Path) -> None:
    """Refuse an existing errors file that this tool did not write (each of its lines is an error record
    ``{"line", "error", ...}``); the run rewrites that file.

    Raises:
        UsageError: The path is not a regular file, or holds a line that is not an error record.
    """
    _check_own_file(path, "--errors", "an attn-rerank error record", _is_error_record)


def check_trec_file(path: Path) -> None:
    """Refuse an existing TREC run file that is not one (six columns, ``Q0`` second); the run replaces it.

    Raises:
        UsageError: The path is not a regular file, or holds a line that is not a TREC run line.
    """
    _check_own_file(path, "--trec-run", "a TREC run line", _is_trec_line)


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
    cut away so that its query is redone. Duplicate complete lines (only possible when the file was
    edited by hand) are dropped by rewriting the file atomically. A file holding anything that this tool
    does not write is refused, never cut or rewritten.

    Args:
        path: The output file; a missing file holds nothing.

    Returns:
        The qids with a complete line.

    Raises:
        UsageError: A line is not a result record (see :func:`scan_output`).
    """
    if not path.exists():
        return set()
    scan = scan_output(path)
    if not scan.ours:
        where = f"line {scan.foreign[0]}" if scan.foreign else "its last line"
        raise UsageError(
            f"{path} exists and {where} is not an attn-rerank result; the run would change that file: "
            "pass --overwrite to replace it, or choose another --output"
        )
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
        logger.warning("%s: dropping %d duplicate line(s)", path, dropped)
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


class LineWriter:
    """Appends result lines crash-safely: one ``write()`` per line, then flush and fsync."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = self._open()
        self._lock()

    def _open(self) -> Any:
        try:
            return self.path.open("ab", buffering=0)
        except OSError as exc:
            raise UsageError(f"cannot write --output {self.path}: {exc.strerror or exc}") from None

    def reopen(self) -> None:
        """Reopen the file (after :func:`recover_output` may have replaced it) and lock it again."""
        self._f.close()
        self._f = self._open()
        self._lock()

    def clear(self) -> None:
        """Empty the file (``--overwrite``), keeping the lock."""
        self._f.truncate(0)
        os.fsync(self._f.fileno())

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


class ErrorLog:
    """Reports bad lines on stderr (``FILE:LINE: message``) and in the errors JSONL."""

    def __init__(self, input_path: Path, errors_path: Path) -> None:
        self.input_path = input_path
        self.errors_path = errors_path
        self.count = 0
        self._f: IO[str] | None = None
        self.bar: Any = None
        try:
            if errors_path.exists():
                errors_path.unlink()
        except OSError as exc:
            raise UsageError(f"cannot replace --errors {errors_path}: {exc.strerror or exc}") from None

    def report(self, line: int, message: str, raw: bytes | None, qid: str | None = None) -> None:
        """Report one bad or failed line; ``qid`` when the line was valid but failed later."""
        self.count += 1
        msg = f"{self.input_path}:{line}: " + (f"qid {qid}: " if qid is not None else "") + message
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)
        if self._f is None:
            self.errors_path.parent.mkdir(parents=True, exist_ok=True)
            # backslashreplace: a message quoting hostile text never fails to be written.
            self._f = self.errors_path.open("w", encoding="utf-8", errors="backslashreplace")
        preview = (
            raw[: RAW_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")[:RAW_PREVIEW_CHARS] if raw else ""
        )
        rec: dict[str, Any] = {"line": line, "error": message, "raw": preview.rstrip("\r\n")}
        if qid is not None:
            rec["qid"] = qid
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


