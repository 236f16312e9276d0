"""Input of ``attn-rerank run``: JSON lines decoded, validated and turned into requests, with line numbers
for every bad line."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rerank.core.common import StrictAbort

if TYPE_CHECKING:
    from rerank.core.output import ErrorLog

DEFAULT_MAX_LINE_BYTES = 1 << 20
_TEXT_KEYS = ("contents", "text", "segment")


class LineError(ValueError):
    """One input line cannot become a request; the message says what is wrong."""


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
def _valid_unicode(text: str, where: str) -> str:
    from rerank.records import check_text

    try:
        return check_text(text, where)
    except ValueError as exc:
        raise LineError(str(exc)) from None


def _id_field(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise LineError(f"{where} must be a string or an integer, got {type(value).__name__}")
    text = _valid_unicode(str(value), where)
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
    return _valid_unicode(value, where)


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
        title = _valid_unicode(raw_title or "", f"{where}.doc.title")
    else:
        raise LineError(f"{where}.doc must be a string or an object, got {type(doc).__name__}")
    passage = Passage(id=docid, text=text, title=title)
    score = cand.get("score")
    if score is None:
        return passage
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise LineError(f"{where}.score must be a finite number, got {type(score).__name__}")
    try:
        value = float(score)
    except OverflowError:  # an integer too large for a float (e.g. 1 followed by 400 zeros)
        value = math.inf
    if not math.isfinite(value):
        shown = repr(score) if isinstance(score, float) else f"an integer of {len(str(abs(score)))} digits"
        raise LineError(f"{where}.score must be a finite number within the float range, got {shown}")
    return Hit(passage=passage, score=value, rank=i + 1)


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
        # Fusion needs a score for every candidate: a list where only some have one is refused here,
        # not silently fused without scores.
        unscored = [i for i, c in enumerate(parsed) if not hasattr(c, "score")]
        if unscored and len(unscored) < len(parsed):
            scored = next(i for i, c in enumerate(parsed) if hasattr(c, "score"))
            raise LineError(
                f"candidates[{scored}] has a 'score' but candidates[{unscored[0]}] has none "
                f"({len(unscored)} of {len(parsed)} without); give every candidate a score or none"
            )
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
    except RecursionError:
        raise LineError("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal over Python's digit limit
        raise LineError(f"invalid JSON: {exc}") from None
    try:
        return parse_request(obj, line, has_index=has_index)
    except LineError:
        raise
    except (ValueError, TypeError, RecursionError) as exc:  # a record the checks above let through
        raise LineError(f"invalid record: {exc}") from None


def scan_input(
    path: Path,
    done: set[str],
    errors: ErrorLog,
    *,
    has_index: bool,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    strict: bool = False,
) -> tuple[list[tuple[int, int]], int]:
    """First pass: validate every line (``has_index``: a request may leave out its candidates).

    Returns:
        ``(line number, byte offset)`` of the lines to process, and the number of lines skipped
        because their qid is already in the output.

    Raises:
        StrictAbort: ``--strict`` and a bad line.
    """
    pending: list[tuple[int, int]] = []
    first_line: dict[str, int] = {}
    skipped = 0
    with path.open("rb") as f:
        for line, offset, raw, size in _raw_lines(f, max_line_bytes):
            try:
                if raw is None:
                    raise LineError(
                        f"line is {size} bytes, over the --max-line-bytes limit of {max_line_bytes}"
                    )
                req = _decode(raw, line, has_index)
                if req is None:
                    continue
                if req.qid in first_line:
                    raise LineError(f"duplicate qid {req.qid!r} (first on line {first_line[req.qid]})")
            except LineError as exc:
                errors.report(line, str(exc), raw)
                if strict:
                    raise StrictAbort(f"{path}:{line}: {exc}") from None
                continue
            first_line[req.qid] = line
            if req.qid in done:
                skipped += 1
            else:
                pending.append((line, offset))
    return pending, skipped


def read_requests(
    f: IO[bytes],
    pending: Sequence[tuple[int, int]],
    *,
    has_index: bool,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> list[Request]:
    """Re-read and parse the ``(line number, byte offset)`` lines that the first pass validated."""
    reqs = []
    for line, offset in pending:
        f.seek(offset)
        req = _decode(f.readline(max_line_bytes + 1), line, has_index)
        if req is None:
            raise RuntimeError(f"line {line} changed while the run was reading the input")
        reqs.append(req)
    return reqs




def input_queries(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> dict[str, str]:
    """qid -> query text of every valid line of the input (bad lines are left out, not reported)."""
    queries: dict[str, str] = {}
    with path.open("rb") as f:
        for line, _offset, raw, _size in _raw_lines(f, max_line_bytes):
            if raw is None:
                continue
            try:
                req = _decode(raw, line, True)
            except LineError:
                continue
            if req is not None:
                queries.setdefault(req.qid, req.text)
    return queries
