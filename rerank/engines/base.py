"""What every reranking engine shares: the engine registry, candidate handling, windows and prompt
orders, batches with a progress bar, and the plumbing of the model-based baselines.

An engine module registers its classes in :data:`PROBE_ENGINES`; :mod:`rerank.engines` imports them all.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from rerank.config import PipelineConfig, ProbeConfig
from rerank.probe.model import LoadedModel
from rerank.probe.prompt import PromptTemplate
from rerank.records import Hit, Passage, Query, RankedList, ScoredPassage, check_text
from retrievers.registry import Registry

logger = logging.getLogger(__name__)

PROBE_ENGINES: Registry[Any] = Registry("probe engine")

Candidate = Passage | Hit | ScoredPassage | str


def as_query(query: str | Query) -> Query:
    return query if isinstance(query, Query) else Query(text=query)


def check_top_k(top_k: int | None) -> int | None:
    """``top_k`` checked before any work: None keeps every candidate, otherwise an integer >= 0."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 0:
        raise ValueError(f"top_k must be None or an integer >= 0, got {top_k!r}")
    return int(top_k)


def _checked_passage(p: Passage, i: int) -> Passage:
    for name in ("id", "text", "title"):
        check_text(getattr(p, name), f"candidate {i} {name}")
    return p


def split_candidates(cands: Sequence[Candidate]) -> tuple[list[Passage], list[float] | None]:
    """Passages and their first-stage scores, in the given order: scores for all or for none.

    A plain string becomes a passage whose id is its index in ``cands``. Every text is checked here, at
    the edge, so that bad input fails with a message rather than inside the model.

    Raises:
        TypeError: ``cands`` is one string, or a candidate of another type.
        ValueError: An empty string, text that is not valid Unicode (a lone surrogate), a first-stage
            score that is NaN or infinite, scores on only some candidates, or duplicate passage ids.
    """
    if isinstance(cands, str):
        raise TypeError("candidates must be a sequence of passages, got one string")
    passages, scores = [], []
    for i, c in enumerate(cands):
        if isinstance(c, str):
            if not c.strip():
                raise ValueError(f"candidate {i} is an empty string")
            passages.append(Passage(id=str(i), text=check_text(c, f"candidate {i}")))
            scores.append(None)
        elif isinstance(c, Passage):
            passages.append(_checked_passage(c, i))
            scores.append(None)
        elif isinstance(c, Hit):
            passages.append(_checked_passage(c.passage, i))
            scores.append(c.score)
        elif isinstance(c, ScoredPassage):
            passages.append(_checked_passage(c.passage, i))
            scores.append(c.first_stage_score if c.first_stage_score is not None else c.score)
        else:
            raise TypeError(f"candidates must be str, Passage, Hit or ScoredPassage, got {type(c).__name__}")
        if scores[-1] is not None and not math.isfinite(scores[-1]):
            raise ValueError(f"candidate {i} has a first-stage score of {scores[-1]!r}; it must be finite")
    ids = [p.id for p in passages]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate passage ids among candidates: {dup[:5]}")
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing and len(missing) < len(scores):
        # Fusing some scores and not others would silently rank on two scales: refuse it.
        raise ValueError(
            f"{len(scores) - len(missing)} of {len(scores)} candidates have a first-stage score but "
            f"candidate {missing[0]} has none; give every candidate a score (Hit) or none (Passage, str)"
        )
    return passages, (None if missing else [float(s) for s in scores])


def given_signals(cands: Sequence[Candidate]) -> list[dict[str, float]] | None:
    """The first stage's component scores each candidate carries (``Hit.signals``); None for none."""
    out = [dict(c.signals) if isinstance(c, Hit) else {} for c in cands]
    return out if any(out) else None


def prompt_orders(probe: ProbeConfig) -> tuple[str, ...]:
    """The prompt orders each window is probed in: ``both`` is ``reversed`` then ``retriever``."""
    return ("reversed", "retriever") if probe.prompt_order == "both" else (probe.prompt_order,)


def _shuffle(n: int, j: int) -> list[int]:
    """The ``shuffleJ`` order of a window of ``n``: a permutation seeded by ``(j, n)`` alone."""
    return [int(x) for x in np.random.default_rng([j, n]).permutation(n)]


def prompt_slots(n: int, order: str) -> list[int]:
    """Prompt slot -> candidate index for a window of ``n`` candidates in retriever order (best first).

    ``reversed`` puts the best one last, next to the query; ``retriever`` keeps the order; ``rotateK``
    is the ``reversed`` order shifted cyclically by ``K`` slots (the ``rotations_up_to`` reading);
    ``shuffleJ`` a permutation seeded by ``J`` and ``n`` (the ``extra_orders`` reading).
    """
    if order.startswith("rotate") and order[6:].isdigit():
        k = int(order[6:]) % max(n, 1)
        base = list(range(n))[::-1]
        return base[k:] + base[:k]
    if order.startswith("shuffle") and order[7:].isdigit():
        return _shuffle(n, int(order[7:]))
    if order not in ("reversed", "retriever"):
        raise ValueError(
            f"unknown prompt order {order!r}; a single prompt is 'reversed', 'retriever', 'rotateK' or "
            "'shuffleJ'"
        )
    return list(range(n))[::-1] if order == "reversed" else list(range(n))


def window_orders(n: int, probe: ProbeConfig) -> tuple[str, ...]:
    """The prompt orders a window of ``n`` candidates is probed in (with ``probe.orders_early_exit``,
    the most it is probed in).

    One passage reads the same prompt in any order, so it is probed once. A window of 2 to
    ``probe.rotations_up_to`` candidates is read in all ``n`` cyclic rotations: every passage then sits
    in every slot exactly once, so whatever the slots add is the same for all of them, and a rotation
    of the input gives the same set of prompts (the same scores), at ``n`` prefills per window.
    Otherwise ``prompt_order``'s orders, then ``probe.extra_orders`` seeded shuffles that differ from
    every order before them (fewer where a short window has no more distinct orders).
    """
    if n < 2:
        return prompt_orders(probe)[:1]
    if n <= probe.rotations_up_to:
        return tuple(f"rotate{k}" for k in range(n))
    orders = list(prompt_orders(probe))
    if probe.extra_orders:
        seen = {tuple(prompt_slots(n, o)) for o in orders}
        room = min(probe.extra_orders, math.factorial(min(n, 10)) - len(seen))
        j = 0
        while room > 0 and j < 64 * probe.extra_orders:
            j += 1
            slots = tuple(_shuffle(n, j))
            if slots not in seen:
                seen.add(slots)
                orders.append(f"shuffle{j}")
                room -= 1
    return tuple(orders)


def to_candidate_order(in_slot_order: np.ndarray, order: str) -> np.ndarray:
    """Values given per prompt slot of a prompt in ``order``, rearranged into candidate order."""
    out = np.empty(len(in_slot_order))
    out[prompt_slots(len(in_slot_order), order)] = in_slot_order
    return out


def probe_windows(n: int, probe: ProbeConfig) -> list[range]:
    """Consecutive windows of at most ``probe.window_size`` candidates that share one prompt each."""
    w = probe.window_size
    return [range(i, min(i + w, n)) for i in range(0, n, w)]


def rerank_many(
    reranker: Any,
    queries: Sequence[str | Query],
    lists: Sequence[Sequence[Candidate]],
    *,
    top_k: int | None = None,
    show_progress: bool = True,
    desc: str = "rerank",
) -> list[RankedList]:
    """``reranker.rerank`` over paired queries and candidate lists, with a progress bar.

    Raises:
        ValueError: The two sequences differ in length.
    """
    from tqdm.auto import tqdm

    if len(queries) != len(lists):
        raise ValueError(f"{len(queries)} queries but {len(lists)} candidate lists")
    it = zip(queries, lists, strict=True)
    return [
        reranker.rerank(q, c, top_k=top_k)
        for q, c in tqdm(it, total=len(queries), desc=desc, unit="q", disable=not show_progress)
    ]






@contextmanager
def attention_kernel(model: LoadedModel, name: str) -> Iterator[None]:
    """Run the block with the model's attention kernel set to ``name``; the previous one is restored."""
    mm = model.model
    old = mm.config._attn_implementation
    if old != name:
        mm.set_attn_implementation(name)
    try:
        yield
    finally:
        if old != name:
            mm.set_attn_implementation(old)


def _context_limit(model: LoadedModel) -> int:
    return int(getattr(model.model.config, "max_position_embeddings", 4096))


@dataclass
class _Scores:
    """What a baseline computes for one list, in candidate order."""

    score: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    raw: np.ndarray | None = None
    calibrated: np.ndarray | None = None
    position: list[int] | None = None


class BatchReranker:
    """``rerank_batch`` for an engine that defines ``rerank``: a progress bar over the queries."""

    name: ClassVar[str] = "rerank"

    def rerank(
        self, query: str | Query, passages: Sequence[Candidate], top_k: int | None = None
    ) -> RankedList:
        raise NotImplementedError

    def rerank_batch(
        self,
        queries: Sequence[str | Query],
        lists: Sequence[Sequence[Candidate]],
        top_k: int | None = None,
        show_progress: bool = True,
    ) -> list[RankedList]:
        """Rerank many queries, with a progress bar."""
        return rerank_many(self, queries, lists, top_k=top_k, show_progress=show_progress, desc=self.name)


class _Baseline(BatchReranker):
    """Shared plumbing: option checking, candidate handling, sorting, timing, batches."""

    name: ClassVar[str] = ""
    #: Keyword options and their defaults; anything else is refused.
    options: ClassVar[dict[str, Any]] = {}
    needs_model: ClassVar[bool] = True

    def __init__(
        self,
        model: LoadedModel | None,
        probe: ProbeConfig | None = None,
        calibration: Any = None,
        *,
        template: PromptTemplate | None = None,
        **kw: Any,
    ) -> None:
        unknown = sorted(set(kw) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for the '{self.name}' reranker; "
                f"it accepts: {known}"
            )
        if self.needs_model and model is None:
            raise ValueError(f"the '{self.name}' reranker needs a loaded model (see load_model)")
        self.model = model
        self.cfg = probe or ProbeConfig()
        self.template = template or PromptTemplate()
        self.opts: dict[str, Any] = {**self.options, **kw}
        self._configure()

    def _configure(self) -> None:
        """Validate ``self.opts`` and derive settings; raise ValueError naming the wrong option."""

    def _int_option(self, key: str, low: int) -> int:
        v = self.opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(
                f"option '{key}' of the '{self.name}' reranker must be an integer >= {low}, got {v!r}"
            )
        return v

    @classmethod
    def from_config(cls, cfg: PipelineConfig, model: LoadedModel | None = None) -> _Baseline:
        if model is None and cls.needs_model:
            from rerank.probe.model import load_model

            model = load_model(cfg.model)
        return cls(model, cfg.probe, cfg.calibration)

    def _score(self, query: str, passages: list[Passage]) -> _Scores:
        raise NotImplementedError

    def _empty_info(self) -> dict[str, Any]:
        return {}

    def rerank(
        self, query: str | Query, passages: Sequence[Candidate], top_k: int | None = None
    ) -> RankedList:
        """Rerank ``passages`` (first-stage order, best first) for ``query``; ties keep first-stage order.

        Raises:
            ValueError: Duplicate passage ids, a bad ``top_k``, or a prompt that does not fit the model.
        """
        top_k = check_top_k(top_k)
        q = as_query(query)
        ps, first = split_candidates(passages)
        if not ps:
            return RankedList(query=q, items=(), info={"seconds": 0.0, **self._empty_info()})
        t0 = time.perf_counter()
        res = self._score(q.text, ps)
        order = sorted(range(len(ps)), key=lambda i: (-res.score[i], i))
        items = tuple(
            ScoredPassage(
                passage=ps[i],
                score=float(res.score[i]),
                rank=r + 1,
                raw_score=None if res.raw is None else float(res.raw[i]),
                calibrated_score=None if res.calibrated is None else float(res.calibrated[i]),
                prompt_position=None if res.position is None else res.position[i],
                first_stage_score=None if first is None else first[i],
            )
            for r, i in enumerate(order)
        )
        info = {**res.info, "seconds": time.perf_counter() - t0}
        return RankedList(query=q, items=items[:top_k], info=info)


