"""Reading corpora, queries and relevance judgements (JSONL files and BEIR folders).

Nothing is dropped silently: a record that cannot become a :class:`~retrievers.records.Passage` stops
loading with a :class:`CorpusError` naming the file and the 1-based line number. Only lines holding
nothing but whitespace are skipped (they carry no record).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retrievers.records import Passage

__all__ = ["CorpusError", "load_corpus", "load_qrels", "load_queries"]

logger = logging.getLogger(__name__)

_ID_KEYS = ("id", "_id")
_TEXT_KEYS = ("text", "contents")


class CorpusError(ValueError):
    """A corpus, query or qrels file is missing or malformed; the message names the file and line."""


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, decoded line)`` for the non-blank lines of a UTF-8 text file."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark some editors write
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(
                    f"{path}:{lineno}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {exc.start} "
                    "of the line); re-encode the file as UTF-8"
                ) from exc
            if line.strip():
                yield lineno, line


def _resolve(path: str | Path, names: tuple[str, ...], what: str) -> Path:
    """Return ``path`` if it is a file, else the first of ``names`` inside the folder ``path``."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        found = ", ".join(sorted(p.name for p in path.iterdir())[:20]) or "nothing"
        raise CorpusError(
            f"{path} is a folder without {' or '.join(names)} (it holds: {found}); "
            f"pass the {what} file itself or a BEIR dataset folder"
        )
    raise CorpusError(f"{what} not found: {path} does not exist; check the path (or --data-dir)")


def _json_record(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorpusError(
            f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
            "each line must be one JSON object"
        ) from exc
    if not isinstance(rec, dict):
        raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
    return rec


def _pick(path: Path, lineno: int, rec: dict[str, Any], keys: tuple[str, ...], what: str) -> tuple[str, Any]:
    """Return ``(key, value)`` of the one field of ``keys`` present in ``rec``."""
    present = [k for k in keys if k in rec]
    if not present:
        raise CorpusError(f"{path}:{lineno}: no {what} field; each record needs one of {' or '.join(keys)!s}")
    if len(present) > 1 and len({json.dumps(rec[k]) for k in present}) > 1:
        raise CorpusError(
            f"{path}:{lineno}: both {' and '.join(present)} are given with different values; keep one"
        )
    return present[0], rec[present[0]]


def _record_id(path: Path, lineno: int, rec: dict[str, Any]) -> str:
    key, value = _pick(path, lineno, rec, _ID_KEYS, "id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise CorpusError(
            f"{path}:{lineno}: {key} must be a string or an integer, got {type(value).__name__}"
        )
    value = str(value)
    if not value.strip():
        raise CorpusError(f"{path}:{lineno}: {key} is empty; every record needs a non-empty id")
    return value


def load_corpus(path: str | Path) -> list[Passage]:
    """Load passages from a JSONL file or a BEIR dataset folder (its ``corpus.jsonl``).

    Each line is a JSON object with ``id`` or ``_id``, ``text`` or ``contents``, and optionally
    ``title``; every other field goes to ``Passage.metadata``.

    Args:
        path: A ``.jsonl`` file or a folder holding ``corpus.jsonl``.

    Returns:
        The passages in file order.

    Raises:
        CorpusError: Missing file, invalid UTF-8, malformed JSON, a record without id or text, an
            empty text, a duplicate id, or no record at all. The message names file and line.
    """
    path = _resolve(path, ("corpus.jsonl",), "corpus")
    passages: list[Passage] = []
    first_line: dict[str, int] = {}
    for lineno, line in _iter_lines(path):
        rec = _json_record(path, lineno, line)
        pid = _record_id(path, lineno, rec)
        if pid in first_line:
            raise CorpusError(
                f"{path}:{lineno}: duplicate id {pid!r} (first seen on line {first_line[pid]}); "
                "ids must be unique"
            )
        first_line[pid] = lineno
        text_key, text = _pick(path, lineno, rec, _TEXT_KEYS, "text")
        if not isinstance(text, str):
            raise CorpusError(f"{path}:{lineno}: {text_key} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise CorpusError(
                f"{path}:{lineno}: {text_key} of id {pid!r} is empty; remove the record or fill it"
            )
        title = rec.get("title")
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise CorpusError(f"{path}:{lineno}: title must be a string, got {type(title).__name__}")
        metadata = {k: v for k, v in rec.items() if k not in _ID_KEYS + _TEXT_KEYS + ("title",)}
        passages.append(Passage(id=pid, text=text, title=title, metadata=metadata))
    if not passages:
        raise CorpusError(f"{path}: the corpus is empty (no JSON lines); a corpus needs at least one passage")
    logger.info("loaded %d passages from %s", len(passages), path)
    return passages


def load_queries(path: str | Path, split: str = "test") -> dict[str, str]:
    """Load queries ``{query id: text}`` from a JSONL file or a BEIR folder.

    Args:
        path: A ``.jsonl`` file (``_id``/``id`` and ``text`` per line) or a BEIR folder, where
            ``queries.<split>.jsonl`` is used when present, else ``queries.jsonl``.
        split: The BEIR split, used only when ``path`` is a folder.

    Raises:
        CorpusError: Same checks as :func:`load_corpus`.
    """
    path = _resolve(path, (f"queries.{split}.jsonl", "queries.jsonl"), "queries")
    queries: dict[str, str] = {}
    for lineno, line in _iter_lines(path):
        rec = _json_record(path, lineno, line)
        qid = _record_id(path, lineno, rec)
        if qid in queries:
            raise CorpusError(f"{path}:{lineno}: duplicate query id {qid!r}; ids must be unique")
        text = rec.get("text")
        if not isinstance(text, str) or not text.strip():
            raise CorpusError(f"{path}:{lineno}: query {qid!r} has no non-empty 'text' string")
        queries[qid] = text
    if not queries:
        raise CorpusError(f"{path}: no queries in the file")
    return queries


def load_qrels(path: str | Path, split: str = "test") -> dict[str, dict[str, int]]:
    """Load relevance judgements ``{query id: {doc id: grade}}``.

    Accepts BEIR TSV (``query-id, corpus-id, score`` with a header line) and TREC qrels
    (``qid 0 docid grade``, whitespace separated).

    Args:
        path: The qrels file or a BEIR folder (``qrels/<split>.tsv`` is used).
        split: The BEIR split, used only when ``path`` is a folder.

    Raises:
        CorpusError: A line with the wrong number of columns or a non-integer grade.
    """
    path = _resolve(path, (f"qrels/{split}.tsv",), "qrels")
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in _iter_lines(path):
        cols = line.split("\t") if "\t" in line else line.split()
        cols = [c.strip() for c in cols]
        if len(cols) == 4:
            cols = [cols[0], cols[2], cols[3]]
        if len(cols) != 3:
            raise CorpusError(
                f"{path}:{lineno}: expected 3 columns (query-id, corpus-id, score) or 4 (TREC), "
                f"got {len(cols)}"
            )
        try:
            grade = int(cols[2])
        except ValueError:
            if lineno == 1:
                continue  # the header line
            raise CorpusError(f"{path}:{lineno}: relevance grade {cols[2]!r} is not an integer") from None
        qrels.setdefault(cols[0], {})[cols[1]] = grade
    if not qrels:
        raise CorpusError(f"{path}: no judgements in the file")
    return qrels
