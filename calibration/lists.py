"""Calibration lists: questions, each with one relevant (gold) passage and hard negatives.

A curve is fitted on lists built from these (the gold passage at a chosen slot among negatives), so the
negatives' scores show the model's positional bias and the gold passage shows whether a correction keeps
the relevance signal. Two sources:

* the NQ-open dev lists shipped with the package (:data:`SHIPPED`): 2,300-odd Natural Questions with
  their gold Wikipedia passage and 19 BM25-hard distractors each (other questions' gold passages that
  contain no answer string). The 300 questions the position figures are reported on are not in it.
  Provenance and licence: ``calibration/lists/README.md``.
* the user's own JSONL, one question a line:
  ``{"query": "...", "positive": "text" | {"title", "text"}, "negatives": ["text" | {"title", "text"}, ...]}``
  with at least 19 negatives (a 20-passage list), best-matching first (e.g. a retriever's top hits
  without the positive).
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrievers.records import Passage

#: Negatives each question needs: the longest fitting list and the sweep hold 20 passages.
NEGATIVES = 19
SHIPPED_NAME = "nq-open-dev.json.gz"
FORMAT = "attn-rerank calibration lists"
VERSION = 1


@dataclass(frozen=True)
class CalibrationItem:
    """One question with its gold passage and hard negatives (best-matching first)."""

    qid: str
    question: str
    answers: tuple[str, ...]
    gold: Passage
    distractors: tuple[Passage, ...]

    def with_gold_at(self, pos: int, n: int = 20) -> list[Passage]:
        """The gold passage at 0-based slot ``pos`` of an ``n``-passage list."""
        ds = list(self.distractors[: n - 1])
        if len(ds) < n - 1:
            raise ValueError(f"{self.qid}: only {len(ds)} distractors for a list of {n}")
        return ds[:pos] + [self.gold] + ds[pos:]


def shipped_path() -> Path:
    """The NQ-open dev lists inside the installed package."""
    return Path(str(importlib.resources.files("calibration") / "lists" / SHIPPED_NAME))


def write_items(items: Sequence[CalibrationItem], path: Path, source: dict[str, Any]) -> None:
    """Write items in the shipped format: each passage once, lists as indices into that pool."""
    pool: dict[str, int] = {}
    passages: list[dict[str, str]] = []

    def ref(p: Passage) -> int:
        if p.id not in pool:
            pool[p.id] = len(passages)
            passages.append({"id": p.id, "title": p.title, "text": p.text})
        return pool[p.id]

    rows = [
        {
            "qid": it.qid,
            "question": it.question,
            "answers": list(it.answers),
            "gold": ref(it.gold),
            "negatives": [ref(d) for d in it.distractors],
        }
        for it in items
    ]
    doc = {"format": FORMAT, "version": VERSION, "source": source, "passages": passages, "items": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same items always give the same bytes.
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())


def _read_shipped(path: Path) -> list[CalibrationItem]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError(f"{path}: not {FORMAT} version {VERSION}")
    pool = [Passage(id=p["id"], title=p["title"], text=p["text"]) for p in doc["passages"]]
    return [
        CalibrationItem(
            r["qid"],
            r["question"],
            tuple(r["answers"]),
            pool[r["gold"]],
            tuple(pool[i] for i in r["negatives"]),
        )
        for r in doc["items"]
    ]


def _passage(value: Any, where: str, pid: str) -> Passage:
    if isinstance(value, str) and value.strip():
        return Passage(id=pid, text=value)
    if isinstance(value, dict) and isinstance(value.get("text"), str) and value["text"].strip():
        title = value.get("title") or ""
        if not isinstance(title, str):
            raise ValueError(f"{where}: 'title' must be a string")
        return Passage(id=str(value.get("id") or pid), title=title, text=value["text"])
    raise ValueError(f"{where}: expected a non-empty string or an object with a non-empty 'text'")


def parse_user_items(lines: Iterable[str], name: str = "<lists>") -> list[CalibrationItem]:
    """Items from the user's JSONL lines (see the module docstring).

    Raises:
        ValueError: A bad line; the message names ``name`` and the line number.
    """
    items = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object with query, positive and negatives")
        query = obj.get("query", obj.get("question"))
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"{where}: 'query' must be a non-empty string")
        negs = obj.get("negatives")
        if not isinstance(negs, list) or len(negs) < NEGATIVES:
            got = len(negs) if isinstance(negs, list) else "none"
            raise ValueError(
                f"{where}: 'negatives' must list at least {NEGATIVES} passages (a 20-passage list), got {got}"
            )
        qid = str(obj.get("qid", f"line{n}"))
        gold = _passage(obj.get("positive"), f"{where}: positive", f"{qid}-pos")
        ds = tuple(_passage(v, f"{where}: negatives[{i}]", f"{qid}-neg{i}") for i, v in enumerate(negs))
        answers = obj.get("answers", [])
        items.append(CalibrationItem(qid, query, tuple(map(str, answers)), gold, ds))
    if not items:
        raise ValueError(f"{name}: no calibration questions")
    return items


def load_calibration_items(path: str | Path | None = None) -> list[CalibrationItem]:
    """The shipped NQ-open dev lists (``path`` None), a file in the shipped format (``.json.gz``), or the
    user's JSONL.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A malformed file or line (named in the message).
    """
    p = shipped_path() if path is None else Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration lists not found: {p}")
    if p.name.endswith(".json.gz"):
        return _read_shipped(p)
    with p.open(encoding="utf-8") as f:
        return parse_user_items(f, str(p))


@dataclass(frozen=True)
class FusionList:
    """One list for fitting fusion weights: candidates in the order a reranker is given them.

    Attributes:
        qid / question: The question.
        passages: The candidates, first-stage order (hard lists: the gold passage at a random slot).
        labels: 1 for a relevant candidate (the gold passage, or one holding an answer string), else 0.
        first_stage: The retriever's scores (retrieved lists), or None (hard lists carry none).
        source: ``hard`` or ``retrieved``.
    """

    qid: str
    question: str
    passages: tuple[Passage, ...]
    labels: tuple[int, ...]
    first_stage: tuple[float, ...] | None
    source: str


def _normalise_answer(text: str) -> str:
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def has_answer(text: str, answers: Sequence[str]) -> bool:
    """Whether ``text`` holds one of ``answers`` (lower case, no punctuation or articles, whole words)."""
    norm = f" {_normalise_answer(text)} "
    return any(a and f" {a} " in norm for a in map(_normalise_answer, answers))


def fusion_lists(
    items: Sequence[CalibrationItem],
    n_hard: int = 60,
    n_retrieved: int = 60,
    *,
    length: int = 20,
    seed: int = 17,
    retriever: Any = None,
    show_progress: bool = False,
) -> list[FusionList]:
    """Labelled lists for fitting fusion weights, of two kinds that pull different ways:

    * ``hard``: a question's gold passage at a seeded random slot among its BM25-hard distractors, no
      first-stage scores (the setting of a caller who sends plain strings). Lexical overlap is what
      chose the distractors, so BM25 alone is weak here by construction.
    * ``retrieved``: the top ``length`` of a hybrid (BM25 + dense, RRF) retrieval over every passage of
      the items, with the fused scores as first-stage scores, labelled by gold passage or answer string
      (the setting of the package's own pipeline). Questions whose list has no relevant, or no
      non-relevant, candidate are skipped.

    Hard lists take the last ``n_hard`` items, retrieved lists the items before them, so the two never
    share a question; the curve's fit takes items from the front.
    """
    import random

    rng = random.Random(seed)
    out: list[FusionList] = []
    hard_items = list(items[len(items) - n_hard :]) if n_hard else []
    for it in hard_items:
        pos = rng.randrange(length)
        ps = it.with_gold_at(pos, length)
        labels = tuple(int(p.id == it.gold.id) for p in ps)
        out.append(FusionList(it.qid, it.question, tuple(ps), labels, None, "hard"))
    if not n_retrieved:
        return out
    pool: dict[str, Passage] = {}
    for it in items:
        for p in (it.gold, *it.distractors):
            pool.setdefault(p.id, p)
    if retriever is None:
        from retrievers.hybrid import HybridRetriever

        retriever = HybridRetriever()
        retriever.index(list(pool.values()), show_progress=show_progress)
    rest = list(items[: len(items) - n_hard])
    found = 0
    for it in reversed(rest):
        if found >= n_retrieved:
            break
        hits = retriever.search(it.question, length)
        labels = tuple(
            int(h.passage.id == it.gold.id or has_answer(h.passage.text, it.answers)) for h in hits
        )
        if len(hits) < 2 or not any(labels) or all(labels):
            continue
        ps = tuple(h.passage for h in hits)
        out.append(FusionList(it.qid, it.question, ps, labels, tuple(h.score for h in hits), "retrieved"))
        found += 1
    return out
