"""BM25 over two interchangeable backends: ``bm25s`` (precomputed sparse scores, fast) and ``rank_bm25``.

Both backends see the same tokens (:func:`tokenize`) and score with the same BM25 variant, Lucene's
(Lucene >= 8, also ``bm25s`` ``method="lucene"``)::

    score(q, d) = sum over query tokens t of  idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = log(1 + (N - df + 0.5) / (df + 0.5))

``rank_bm25.BM25Okapi`` differs in two ways, both removed here: its idf is ``log((N - df + 0.5) / (df +
0.5))`` with negative values floored at ``epsilon * mean idf`` (so terms in more than half of the
documents score a fixed small constant), and its term weight carries a ``(k1 + 1)`` factor. A subclass
swaps in the Lucene idf and the scores are divided by ``(k1 + 1)``; the two backends then return the
same scores (to float rounding) and the same rankings. A repeated query token counts once per
occurrence in both. Only passages sharing at least one token with the query are returned (Lucene's
idf is always positive, so exactly those score above zero); a search may return fewer than ``k`` hits.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retrievers.base import (
    BaseRetriever,
    IndexFormatError,
    check_queries,
    indexed_text,
    load_guarded,
    load_passages,
    read_meta,
    save_passages,
    seal_index,
    verify_index,
    write_meta,
)
from retrievers.config import RetrieverConfig
from retrievers.records import Hit, Passage

__all__ = ["BACKENDS", "BM25Retriever", "STOPWORDS", "in_list_bm25", "tokenize", "tokenizer_info"]

logger = logging.getLogger(__name__)

BACKENDS = ("bm25s", "rank_bm25")

#: Lucene's (and Elasticsearch's) default English stopword list, as used by the BEIR BM25 baseline.
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there "
    "these they this to was will with".split()
)

_TOKEN_RE = re.compile(r"[^\W_]+")  # runs of Unicode letters and digits
_TOKENIZER_NAME = "lower+alnum+lucene-stop"


@lru_cache(maxsize=1)
def _stemmer() -> Any:
    """The Snowball English stemmer when ``PyStemmer`` is installed, else None (no stemming)."""
    if importlib.util.find_spec("Stemmer") is None:
        return None
    import Stemmer

    return Stemmer.Stemmer("english")


def tokenizer_info() -> dict[str, str]:
    """Identity of :func:`tokenize` in this environment, stored in every saved BM25 index."""
    return {"name": _TOKENIZER_NAME, "stemmer": "snowball-english" if _stemmer() is not None else "none"}


def tokenize(text: str) -> list[str]:
    """Lowercase, split on anything that is not a letter or digit, drop stopwords, stem if possible.

    The same function tokenizes documents and queries for both backends. Stemming (Snowball English)
    happens only when ``PyStemmer`` is installed; :func:`tokenizer_info` records which.
    """
    tokens = [t for t in _TOKEN_RE.findall(text.lower()) if t not in STOPWORDS]
    stemmer = _stemmer()
    return stemmer.stemWords(tokens) if stemmer is not None and tokens else tokens


def _lucene_idf(df: int | np.ndarray, n_docs: int) -> Any:
    return np.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))


def in_list_bm25(query: str, texts: Sequence[str], k1: float = 0.9, b: float = 0.4) -> np.ndarray:
    """BM25 of ``query`` against ``texts`` as a corpus of their own (the "in-list BM25" of a candidate
    list): the same tokens and Lucene variant as :class:`BM25Retriever`, with idf and average length
    taken over ``texts`` only, so it needs no index and no backend.

    Returns:
        One score per text, >= 0 (0 when it shares no token with the query).
    """
    docs = [tokenize(t) for t in texts]
    n = len(docs)
    out = np.zeros(n, dtype=np.float64)
    if n == 0:
        return out
    lengths = np.array([len(d) for d in docs], dtype=np.float64)
    avgdl = lengths.mean() if lengths.mean() > 0 else 1.0
    counts = [dict.fromkeys(d, 0) for d in docs]
    for c, d in zip(counts, docs, strict=True):
        for t in d:
            c[t] += 1
    for t in tokenize(query):  # a repeated query token counts once per occurrence, as in the retriever
        df = sum(1 for c in counts if t in c)
        if df == 0:
            continue
        idf = _lucene_idf(df, n)
        tf = np.array([c.get(t, 0) for c in counts], dtype=np.float64)
        out += idf * tf / (tf + k1 * (1.0 - b + b * lengths / avgdl))
    return out


def _make_rank_bm25(corpus_tokens: list[list[str]], k1: float, b: float) -> Any:
    """A ``rank_bm25.BM25Okapi`` whose idf is Lucene's (see the module docstring)."""
    from rank_bm25 import BM25Okapi

    class _LuceneIdfBM25Okapi(BM25Okapi):
        def _calc_idf(self, nd: dict[str, int]) -> None:
            for word, df in nd.items():
                self.idf[word] = float(_lucene_idf(df, self.corpus_size))
            self.average_idf = float(np.mean(list(self.idf.values()))) if self.idf else 0.0

    return _LuceneIdfBM25Okapi(corpus_tokens, k1=k1, b=b)


def _read_vocab(path: Path) -> list[str]:
    """``vocab.json``: a JSON list of distinct strings, the index's terms in term-id order."""
    terms = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
        raise ValueError(f"{path.name} must be a JSON list of strings")
    if len(set(terms)) != len(terms):
        raise ValueError(f"{path.name} lists a term twice")
    return terms


def _import_bm25s() -> Any:
    """Import bm25s, quieting its logger: it sets itself to DEBUG, so every index build would be printed
    by any application that configures logging."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


class BM25Retriever(BaseRetriever):
    """BM25 retrieval with a choice of backend; both give the same scores.

    Args:
        backend: ``bm25s`` (sparse precomputed scores, fast) or ``rank_bm25`` (reference implementation,
            scans every document per query token).
        k1: Term-frequency saturation.
        b: Length normalisation.
    """

    kind = "bm25"

    def __init__(self, backend: str = "bm25s", k1: float = 0.9, b: float = 0.4) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown BM25 backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
        if importlib.util.find_spec(backend) is None:
            raise ImportError(
                f"BM25 backend {backend!r} needs the package {backend.replace('_', '-')}: "
                f"pip install {backend.replace('_', '-')} (or choose the other backend)"
            )
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.backend = backend
        self.k1 = float(k1)
        self.b = float(b)
        self._model: Any = None
        self._vocab: dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg: RetrieverConfig) -> BM25Retriever:
        """Create an empty retriever from ``cfg.bm25_backend``, ``cfg.bm25_k1`` and ``cfg.bm25_b``."""
        return cls(backend=cfg.bm25_backend, k1=cfg.bm25_k1, b=cfg.bm25_b)

    def __repr__(self) -> str:
        return f"BM25Retriever(backend={self.backend!r}, k1={self.k1}, b={self.b}, passages={len(self)})"

    # ---------------------------------------------------------------------------------------------

    def index(self, passages: Sequence[Passage], show_progress: bool = True) -> None:
        """Tokenize and index ``passages`` (title and text), replacing any previous index."""
        self._set_passages(passages)
        corpus_tokens = [
            tokenize(indexed_text(p))
            for p in tqdm(self._passages, desc="BM25 tokenize", disable=not show_progress, leave=False)
        ]
        vocab: dict[str, int] = {}
        for toks in corpus_tokens:
            for t in toks:
                vocab.setdefault(t, len(vocab))
        if not vocab:
            raise ValueError(
                "no passage has an indexable token (all text is stopwords or punctuation); "
                "BM25 cannot index it"
            )
        self._vocab = vocab
        if self.backend == "bm25s":
            ids = [[vocab[t] for t in toks] for toks in corpus_tokens]
            self._build_bm25s(ids, show_progress)
        else:
            self._model = _make_rank_bm25(corpus_tokens, self.k1, self.b)
        logger.info("BM25 (%s) indexed %d passages, %d terms", self.backend, len(self), len(vocab))

    def _build_bm25s(self, corpus_ids: list[list[int]], show_progress: bool) -> None:
        bm25s = _import_bm25s()

        # float64 so that scores match rank_bm25's (numpy float64) beyond float32 rounding.
        model = bm25s.BM25(k1=self.k1, b=self.b, method="lucene", dtype="float64")
        model.index((corpus_ids, dict(self._vocab)), show_progress=show_progress)
        self._model = model

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every indexed passage for ``query`` (index order)."""
        self._check_ready()
        tokens = tokenize(query)
        if self.backend == "bm25s":
            ids = [self._vocab[t] for t in tokens if t in self._vocab]
            if not ids:
                return np.zeros(len(self), dtype=np.float64)
            return np.asarray(self._model.get_scores_from_ids(ids), dtype=np.float64)
        return np.asarray(self._model.get_scores(tokens), dtype=np.float64) / (self.k1 + 1.0)

    def search_batch(
        self, queries: Sequence[str], k: int = 10, show_progress: bool = False
    ) -> list[list[Hit]]:
        """Return the ``k`` best passages for each query, best first, ties broken by passage id."""
        queries = check_queries(queries)
        self._check_k(k)
        self._check_ready()
        return [
            self._top_k(self.scores(q), k, positive_only=True)
            for q in tqdm(
                queries, desc=f"BM25 ({self.backend}) search", disable=not show_progress, leave=False
            )
        ]

    # ---------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the index to ``directory`` (JSON, JSONL and numpy arrays; no pickle).

        Layout: ``meta.json``, ``passages.jsonl``, ``vocab.json`` and either ``bm25s/`` (bm25s's own
        save, ``allow_pickle=False``) or ``tokens.npz`` (per-document term counts, CSR) for rank_bm25.
        """
        self._check_ready()
        directory = write_meta(
            directory,
            self.kind,
            backend=self.backend,
            k1=self.k1,
            b=self.b,
            variant="lucene",
            tokenizer=tokenizer_info(),
            n_passages=len(self),
        )
        save_passages(directory, self._passages)
        terms = sorted(self._vocab, key=self._vocab.__getitem__)
        (directory / "vocab.json").write_text(json.dumps(terms, ensure_ascii=False), encoding="utf-8")
        if self.backend == "bm25s":
            self._model.save(str(directory / "bm25s"), allow_pickle=False, show_progress=False)
        else:
            ptr = [0]
            term_ids: list[int] = []
            counts: list[int] = []
            for freqs in self._model.doc_freqs:
                for term, c in freqs.items():
                    term_ids.append(self._vocab[term])
                    counts.append(c)
                ptr.append(len(term_ids))
            np.savez_compressed(
                directory / "tokens.npz",
                doc_ptr=np.asarray(ptr, dtype=np.int64),
                term_ids=np.asarray(term_ids, dtype=np.int64),
                counts=np.asarray(counts, dtype=np.int32),
            )
        seal_index(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path, show_progress: bool = False) -> BM25Retriever:
        """Load an index written by :meth:`save`.

        Raises:
            IndexFormatError: Not a BM25 index, another format version, or tokens made by another
                tokenizer (e.g. saved with stemming, loaded where ``PyStemmer`` is missing).
        """
        directory = Path(directory)
        meta = read_meta(directory, kind=cls.kind)
        verify_index(directory, meta)
        for key, kind in (("backend", str), ("k1", float | int), ("b", float | int), ("n_passages", int)):
            if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), kind):
                raise IndexFormatError(
                    f"{directory / 'meta.json'}: '{key}' is missing or of the wrong type "
                    f"(got {meta.get(key)!r}); rebuild the index"
                )
        if meta.get("tokenizer") != tokenizer_info():
            raise IndexFormatError(
                f"{directory}: index tokenized with {meta.get('tokenizer')}, "
                f"but this environment tokenizes with "
                f"{tokenizer_info()}; install/uninstall PyStemmer to match, or rebuild the index"
            )
        self = cls(backend=meta["backend"], k1=meta["k1"], b=meta["b"])
        self._set_passages(
            load_guarded(directory, "passages.jsonl", lambda: load_passages(directory, meta["n_passages"]))
        )
        terms = load_guarded(directory, "vocab.json", lambda: _read_vocab(directory / "vocab.json"))
        self._vocab = {t: i for i, t in enumerate(terms)}
        if self.backend == "bm25s":
            bm25s = _import_bm25s()

            self._model = load_guarded(
                directory,
                "bm25s/",
                lambda: bm25s.BM25.load(
                    str(directory / "bm25s"), allow_pickle=False, show_progress=show_progress
                ),
            )
        else:

            def read_tokens() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
                with np.load(directory / "tokens.npz", allow_pickle=False) as z:
                    return z["doc_ptr"], z["term_ids"], z["counts"]

            ptr, term_ids, counts = load_guarded(directory, "tokens.npz", read_tokens)
            if len(ptr) != len(self) + 1:
                raise IndexFormatError(
                    f"{directory}: tokens.npz holds {len(ptr) - 1} documents, expected {len(self)}"
                )
            # BM25 ignores token order, so each document is rebuilt as its terms repeated by count.
            corpus_tokens = [
                [terms[t] for t, c in zip(term_ids[s:e], counts[s:e], strict=True) for _ in range(c)]
                for s, e in tqdm(
                    zip(ptr[:-1], ptr[1:], strict=True), total=len(self), disable=not show_progress
                )
            ]
            self._model = _make_rank_bm25(corpus_tokens, self.k1, self.b)
        return self
