"""The reranker API: ``rerank(query, passages, top_k) -> RankedList``. Probe engines are registered.

``attention``  the attention probe (one prefill per window of passages).
``identity``   keeps the retriever's order: the control every figure should be read against.

Baselines (``icr-reference``, ``listwise``, ``pointwise``, ``shuffle``) live in :mod:`rerank.baselines`
and register themselves when this module is imported.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from calibration.curve import MATCH_KEYS, BiasCurve, pick_compatible
from rerank.calibrators import CALIBRATORS, ScoreSettings
from rerank.config import CalibrationConfig, PipelineConfig, ProbeConfig
from rerank.model import LoadedModel
from rerank.prompt import PromptTemplate
from rerank.records import Hit, Passage, Query, RankedList, ScoredPassage
from rerank.scoring import zscore
from retrievers.registry import Registry

logger = logging.getLogger(__name__)

PROBE_ENGINES: Registry[Any] = Registry("probe engine")
CURVES_DIR = Path(__file__).resolve().parent.parent / "calibration" / "curves"

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


def split_candidates(cands: Sequence[Candidate]) -> tuple[list[Passage], list[float] | None]:
    """Passages and (when every candidate has one) first-stage scores, in the given order.

    A plain string becomes a passage whose id is its index in ``cands``.
    """
    if isinstance(cands, str):
        raise TypeError("candidates must be a sequence of passages, got one string")
    passages, scores = [], []
    for i, c in enumerate(cands):
        if isinstance(c, str):
            if not c.strip():
                raise ValueError(f"candidate {i} is an empty string")
            passages.append(Passage(id=str(i), text=c))
            scores.append(None)
        elif isinstance(c, Passage):
            passages.append(c)
            scores.append(None)
        elif isinstance(c, Hit):
            passages.append(c.passage)
            scores.append(c.score)
        elif isinstance(c, ScoredPassage):
            passages.append(c.passage)
            scores.append(c.first_stage_score if c.first_stage_score is not None else c.score)
        else:
            raise TypeError(f"candidates must be str, Passage, Hit or ScoredPassage, got {type(c).__name__}")
    ids = [p.id for p in passages]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate passage ids among candidates: {dup[:5]}")
    return passages, (None if any(s is None for s in scores) else [float(s) for s in scores])


def resolve_curve_path(name: str) -> Path:
    p = Path(name)
    for cand in (CURVES_DIR / p, CURVES_DIR / p.name, p):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"bias curve '{name}' not found in {CURVES_DIR} or the working directory")


def load_matching_curve(
    names: Sequence[str], probe_meta: Mapping[str, Any], keys: Sequence[str] = MATCH_KEYS
) -> BiasCurve:
    """Load the curve files ``names``; the first fitted for ``probe_meta`` (see ``pick_compatible``)."""
    return pick_compatible([(n, BiasCurve.load(resolve_curve_path(n))) for n in names], probe_meta, keys)


def fuse_first_stage(merged: np.ndarray, first_stage: np.ndarray, weight: float) -> np.ndarray:
    """The reranker's final score: standardised probe scores + ``weight`` x z-scored first-stage scores."""
    return merged + weight * zscore(first_stage)


def template_id(template: PromptTemplate) -> str:
    return hashlib.sha256(repr(asdict(template)).encode()).hexdigest()[:12]


def prompt_orders(probe: ProbeConfig) -> tuple[str, ...]:
    """The prompt orders each window is probed in: ``both`` is ``reversed`` then ``retriever``."""
    return ("reversed", "retriever") if probe.prompt_order == "both" else (probe.prompt_order,)


def prompt_slots(n: int, order: str) -> list[int]:
    """Prompt slot -> candidate index for a window of ``n`` candidates in retriever order (best first);
    ``reversed`` puts the best one last, next to the query; ``retriever`` keeps the order."""
    if order not in ("reversed", "retriever"):
        raise ValueError(f"unknown prompt order {order!r}; a single prompt is 'reversed' or 'retriever'")
    return list(range(n))[::-1] if order == "reversed" else list(range(n))


def window_orders(n: int, probe: ProbeConfig) -> tuple[str, ...]:
    """The prompt orders a window of ``n`` candidates is probed in: one passage reads the same prompt in
    either order, so it is probed once."""
    return prompt_orders(probe)[:1] if n < 2 else prompt_orders(probe)


def to_candidate_order(in_slot_order: np.ndarray, order: str) -> np.ndarray:
    """Values given per prompt slot of a prompt in ``order``, rearranged into candidate order."""
    out = np.empty(len(in_slot_order))
    out[prompt_slots(len(in_slot_order), order)] = in_slot_order
    return out


def merge_orders(per_order: Sequence[np.ndarray]) -> np.ndarray:
    """One window's calibrated scores (candidate order) from its prompts: a single prompt's as they are,
    several prompts' standardised and averaged (``prompt_order: both``)."""
    if len(per_order) == 1:
        return per_order[0]
    return np.mean([zscore(c) for c in per_order], axis=0)


def probe_windows(n: int, probe: ProbeConfig) -> list[range]:
    """Consecutive windows of at most ``probe.window_size`` candidates that share one prompt each."""
    w = probe.window_size
    return [range(i, min(i + w, n)) for i in range(0, n, w)]


@PROBE_ENGINES.register("identity")
class IdentityReranker:
    """Keeps the first-stage order (a control)."""

    needs_model = False

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def rerank(
        self, query: str | Query, passages: Sequence[Candidate], top_k: int | None = None
    ) -> RankedList:
        t0 = time.perf_counter()
        top_k = check_top_k(top_k)
        q = as_query(query)
        ps, fs = split_candidates(passages)
        n = len(ps)
        items = tuple(
            ScoredPassage(
                passage=p, score=float(n - i), rank=i + 1, first_stage_score=None if fs is None else fs[i]
            )
            for i, p in enumerate(ps)
        )
        info = {"seconds": time.perf_counter() - t0}
        return RankedList(query=q, items=items[:top_k], info=info)

    def rerank_batch(
        self,
        queries: Sequence[str | Query],
        lists: Sequence[Sequence[Candidate]],
        top_k: int | None = None,
        show_progress: bool = False,
    ) -> list[RankedList]:
        return [self.rerank(q, c, top_k=top_k) for q, c in zip(queries, lists, strict=True)]


@PROBE_ENGINES.register("attention")
class AttentionReranker:
    """Reranks passages by calibrated query-to-passage attention.

    Args:
        model: A loaded model (see :func:`rerank.model.load_model`).
        probe: Probe settings (layers, heads, aggregation, windows).
        calibration: Which calibrator, and the curve file for the curve calibrators.
        template: Prompt wording (shared with the generator).
        curve: An already loaded curve (overrides ``calibration.curve``).

    Raises:
        KeyError: Unknown calibrator (the message lists the choices).
        CurveMismatchError: The curve was fitted for another model or probe configuration.
    """

    def __init__(
        self,
        model: LoadedModel,
        probe: ProbeConfig | None = None,
        calibration: CalibrationConfig | None = None,
        *,
        template: PromptTemplate | None = None,
        curve: BiasCurve | None = None,
    ) -> None:
        from rerank.probe import AttentionProbe

        self.model = model
        self.cfg = probe or ProbeConfig()
        self.cal_cfg = calibration or CalibrationConfig()
        self.calibrator = CALIBRATORS.get(self.cal_cfg.name)
        self.template = template or PromptTemplate()
        self.engine = AttentionProbe(model, layers=self.cfg.layer_range, heads=self.cfg.heads)
        self.curve = curve
        if self.curve is None and self.calibrator.uses_curve:
            if not self.cal_cfg.curve:
                raise ValueError(
                    f"calibrator '{self.cal_cfg.name}' needs calibration.curve (a fitted curve file)"
                )
            self.curve = load_matching_curve(self.cal_cfg.curves, self.probe_meta())
        elif self.curve is not None and self.calibrator.uses_curve:
            self.curve.check_compatible(self.probe_meta())

    @classmethod
    def from_config(cls, cfg: PipelineConfig, model: LoadedModel | None = None) -> AttentionReranker:
        from rerank.model import load_model

        return cls(model or load_model(cfg.model), cfg.probe, cfg.calibration)

    def probe_meta(self) -> dict[str, Any]:
        """Identity of the model and probe settings, as recorded in (and checked against) a curve."""
        layers = self.engine.layers
        return {
            "model_id": self.model.model_id,
            "weights_hash": self.model.weights_hash,
            "dtype": self.model.dtype,
            "layers": [layers[0], layers[-1]],
            "heads": list(self.cfg.heads) if self.cfg.heads is not None else None,
            "head_set": [list(p) for p in self.cfg.head_set] if self.cfg.head_set is not None else None,
            "aggregation": self.cfg.aggregation,
            "score_kind": ScoreSettings.of(self.cfg).kind(self.calibrator.score_kind),
            "template": template_id(self.template),
        }

    def _probe_scores(self, query: str, prompt_passages: Sequence[Passage]) -> tuple[np.ndarray, np.ndarray]:
        """Raw and calibrated scores of passages probed in exactly the given prompt order."""
        from rerank.probe import stats_of

        out = self.engine.probe(
            query,
            prompt_passages,
            content_free=self.calibrator.needs_content_free,
            max_passage_tokens=self.cfg.passage_max_tokens,
            template=self.template,
        )
        slots = list(range(len(prompt_passages)))
        return self.calibrator(stats_of(out), slots, ScoreSettings.of(self.cfg), self.curve)

    def score_window(
        self, query: str, passages: Sequence[Passage]
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Probe one window. Returns raw and calibrated scores and prompt slots, in candidate order.

        With ``prompt_order: both`` the window is probed once per order (a passage sits at slot ``i`` in
        one prompt and ``n - 1 - i`` in the other); the calibrated score is the mean of the two passes'
        standardised calibrated scores, the raw score the mean of their raw scores, and the slot the one
        in the first (``reversed``) prompt. A window of one passage is probed once.
        """
        orders = window_orders(len(passages), self.cfg)
        raws, cals = [], []
        for order in orders:
            raw_s, cal_s = self._probe_scores(
                query, [passages[c] for c in prompt_slots(len(passages), order)]
            )
            raws.append(to_candidate_order(raw_s, order))
            cals.append(to_candidate_order(cal_s, order))
        pos = [int(x) for x in to_candidate_order(np.arange(len(passages)), orders[0])]
        return np.mean(raws, axis=0), merge_orders(cals), pos

    def score_in_prompt_order(self, query: str, passages: Sequence[Passage]) -> np.ndarray:
        """Calibrated scores of ``passages`` probed in exactly the given prompt order (iterative sorting)."""
        return self._probe_scores(query, passages)[1]

    def rerank(
        self,
        query: str | Query,
        passages: Sequence[Candidate],
        top_k: int | None = None,
    ) -> RankedList:
        """Rerank ``passages`` (given in first-stage order, best first) for ``query``.

        More candidates than ``probe.window_size`` are split into consecutive windows that share the
        query; each window's calibrated scores are standardised (``window_merge: zscore``) so that windows
        compare, then optionally fused with the standardised first-stage scores.

        Raises:
            ValueError: Duplicate passage ids, a bad ``top_k``, or a window that cannot fit the
                model's context.
        """
        top_k = check_top_k(top_k)
        q = as_query(query)
        ps, first = split_candidates(passages)
        if not ps:
            return RankedList(query=q, items=(), info={"windows": 0})
        t0 = time.perf_counter()
        raw = np.empty(len(ps))
        cal = np.empty(len(ps))
        merged = np.empty(len(ps))
        pos = [0] * len(ps)
        windows = probe_windows(len(ps), self.cfg)
        for win in windows:
            idx = list(win)
            r, c, p = self.score_window(q.text, [ps[i] for i in idx])
            raw[idx], cal[idx] = r, c
            # A window of one passage has no spread to standardise by: zscore puts it at the mean (0).
            merged[idx] = zscore(c) if self.cfg.window_merge == "zscore" else c
            for i, slot in zip(idx, p, strict=True):
                pos[i] = slot
        final = merged.copy()
        fused = "none"
        if self.cfg.first_stage_weight > 0:
            # Without first-stage scores, the retriever's rank stands in for them.
            fused = "order" if first is None else "scores"
            fs = np.asarray(first) if first is not None else -np.arange(len(ps), dtype=np.float64)
            final = fuse_first_stage(final, fs, self.cfg.first_stage_weight)
        order = sorted(range(len(ps)), key=lambda i: (-final[i], i))
        items = tuple(
            ScoredPassage(
                passage=ps[i],
                score=float(final[i]),
                rank=r + 1,
                raw_score=float(raw[i]),
                calibrated_score=float(cal[i]),
                prompt_position=pos[i],
                first_stage_score=None if first is None else first[i],
            )
            for r, i in enumerate(order)
        )
        info = {
            "windows": len(windows),
            "prompts": sum(len(window_orders(len(w), self.cfg)) for w in windows),
            "first_stage": fused,
            "seconds": time.perf_counter() - t0,
        }
        return RankedList(query=q, items=items[:top_k], info=info)

    def rerank_batch(
        self,
        queries: Sequence[str | Query],
        lists: Sequence[Sequence[Candidate]],
        top_k: int | None = None,
        show_progress: bool = True,
    ) -> list[RankedList]:
        """Rerank many queries, with a progress bar."""
        return rerank_many(self, queries, lists, top_k=top_k, show_progress=show_progress)


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


def build_reranker(cfg: PipelineConfig, model: LoadedModel | None = None) -> Any:
    """The probe engine named by ``cfg.probe.engine``."""
    engine = PROBE_ENGINES.get(cfg.probe.engine)
    if engine is IdentityReranker:
        return IdentityReranker()
    return engine.from_config(cfg, model)


__all__ = ["PROBE_ENGINES", "AttentionReranker", "IdentityReranker", "build_reranker", "rerank_many"]

# The baselines register in PROBE_ENGINES on import; importing them here makes every engine name
# resolvable wherever the registry is used. They import torch only when they run.
import rerank.baselines  # noqa: E402, F401
