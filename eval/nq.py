"""NQ-open oracle lists: a question's gold passage among hard distractors, as in "lost in the middle".

Distractors are other questions' gold passages with the highest BM25 score for this question that
contain none of its answer strings. Questions are split once, by a seeded shuffle, into a ``test``
part (position sweep and QA figures) and a ``dev`` part (curve fitting and policy choice), so nothing
reported is tuned on the questions it is reported on.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import string
import unicodedata
from pathlib import Path

from calibration.lists import CalibrationItem
from rerank.records import Passage

N_TEST = 300
SPLIT_SEED = 13


# The dev lists ship with the package in this form (calibration/lists/); the test part stays here.
NQItem = CalibrationItem


def normalize_answer(s: str) -> str:
    """Lower-case, strip punctuation, articles and extra whitespace (SQuAD-style normalisation)."""
    s = unicodedata.normalize("NFD", s)
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def best_subspan_em(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    """1.0 when some normalised answer appears inside the normalised prediction, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) and normalize_answer(a) in pred for a in answers))


def load_nq(data_dir: Path, n_distractors: int = 19) -> tuple[list[NQItem], list[NQItem]]:
    """Return ``(test, dev)`` items with hard distractors.

    Raises:
        FileNotFoundError: The data file is missing (the message names it).
    """
    from retrievers.bm25 import BM25Retriever

    path = Path(data_dir) / "nq-open-oracle" / "nq-open-oracle.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"NQ-open oracle data not found at {path}; pass --data-dir")
    rows = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    golds = [
        Passage(id=f"nq{i}", title=r["ctxs"][0]["title"], text=r["ctxs"][0]["text"])
        for i, r in enumerate(rows)
    ]
    bm25 = BM25Retriever(backend="bm25s")
    bm25.index(golds, show_progress=False)
    items = []
    hits_all = bm25.search_batch([r["question"] for r in rows], k=80)
    # Each passage's normalised text, once (not once per question whose hits it appears in).
    body = {g.id: normalize_answer(g.title + " " + g.text) for g in golds}
    for i, (r, hits) in enumerate(zip(rows, hits_all, strict=True)):
        answers = tuple(r["answers"])
        norm_answers = [normalize_answer(a) for a in answers]
        ds = []
        for h in hits:
            if h.passage.id == golds[i].id:
                continue
            if any(a and a in body[h.passage.id] for a in norm_answers):
                continue
            ds.append(h.passage)
            if len(ds) == n_distractors:
                break
        if len(ds) < n_distractors:
            continue
        items.append(NQItem(f"nq{i}", r["question"], answers, golds[i], tuple(ds)))
    order = list(range(len(items)))
    random.Random(SPLIT_SEED).shuffle(order)
    test = [items[j] for j in order[:N_TEST]]
    dev = [items[j] for j in order[N_TEST:]]
    return test, dev


def write_dev_lists(data_dir: Path, out: Path) -> int:
    """Write the dev part as the calibration lists shipped with the package; returns the number of items."""
    _, dev = load_nq(data_dir)
    from calibration.lists import write_items

    source = {
        "data": "nq-open-oracle.jsonl.gz (2,655 NQ-open questions, one gold Wikipedia passage each)",
        "from": "nelson-liu/lost-in-the-middle @ 29b8a6d, qa_data/",
        "licence": "NQ: CC BY-SA 3.0; lost-in-the-middle code: MIT",
        "split": f"questions shuffled with seed {SPLIT_SEED}; the first {N_TEST} are the test part and "
        "are left out; these are the rest (dev), in that order",
        "negatives": "other questions' gold passages with the highest BM25 score for the question that "
        "contain none of its answer strings",
        "made_by": "python -m eval.nq --data-dir DATA --out calibration/lists/nq-open-dev.json.gz",
    }
    write_items(dev, out, source)
    return len(dev)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m eval.nq", description=write_dev_lists.__doc__)
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    ap.add_argument("--data-dir", type=Path, default=shared)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    print(f"wrote {write_dev_lists(a.data_dir, a.out)} items to {a.out}")
