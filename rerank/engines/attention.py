"""The attention probe as a reranker: one prefill per window of passages, read in one or two prompt
orders, corrected for positional bias and optionally fused with the first-stage scores."""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import importlib.resources
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.curve import MATCH_KEYS, BiasCurve, pick_compatible
from calibration.fusion import SIGNALS, cut_margin, fuse, ranked, standardise
from rerank.config import CalibrationConfig, PipelineConfig, ProbeConfig
from rerank.engines.base import (
    PROBE_ENGINES,
    BatchReranker,
    Candidate,
    as_query,
    check_top_k,
    given_signals,
    probe_windows,
    prompt_orders,
    prompt_slots,
    split_candidates,
    to_candidate_order,
    window_orders,
)
from rerank.engines.signals import DenseSignal, cheap_signals
from rerank.interrupt import check as check_interrupt
from rerank.probe.calibrators import CALIBRATORS, ScoreSettings
from rerank.probe.model import LoadedModel
from rerank.probe.prompt import EARLY_QUERY, PromptTemplate
from rerank.probe.scoring import zscore
from rerank.records import Passage, Query, RankedList, ScoredPassage

logger = logging.getLogger(__name__)

CURVES_DIR = Path(str(importlib.resources.files("calibration") / "curves"))


def resolve_curve_path(name: str) -> Path:
    """A curve file: one shipped in the package's curves folder, else a path (absolute or relative to the
    working directory)."""
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


def first_stage_signal(
    query: str, passages: Sequence[Passage], first: Sequence[float] | None
) -> np.ndarray | None:
    """What the probe's scores are fused with: the given first-stage scores; without them, BM25 of the
    query over the candidates themselves (in-list BM25: title and text, idf over the list). None when
    the signal is flat (every candidate scores the same, e.g. none shares a word with the query): then
    nothing is fused.

    The candidates' order is never used as a score: with a 2-passage list, the z-scored rank is +-1, the
    same size as the probe's own z-scores, so it would cancel the probe and no pair would ever reorder.
    """
    if first is not None:
        fs = np.asarray(first, dtype=np.float64)
    else:
        from retrievers.bm25 import in_list_bm25
        from retrievers.index import indexed_text

        fs = in_list_bm25(query, [indexed_text(p) for p in passages])
    if len(fs) == 0 or fs.min() == fs.max():
        return None
    # z-scoring is scale-free; dividing by the largest magnitude first keeps scores near the float limit
    # (1e308) from overflowing into inf/NaN in the mean and spread.
    return fs / np.max(np.abs(fs))


def template_id(template: PromptTemplate) -> str:
    return hashlib.sha256(repr(template.identity()).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ProbeTrace:
    """One probed prompt, kept while :func:`trace_probes` is active (for the explain view).

    Attributes:
        passages: The passages in prompt order.
        output: The probe output (token-level rows of the query and ``N/A`` passes, spans, prompt).
        stats: The per-passage arrays the scores were computed from.
        raw: Raw scores, prompt order.
        calibrated: Calibrated scores, prompt order.
    """

    passages: tuple[Passage, ...]
    output: Any
    stats: Any
    raw: np.ndarray
    calibrated: np.ndarray


# Off by default: the probe's outputs are dropped once scored. Only a caller inside trace_probes() (this
# thread or task) keeps them; the token rows are computed by every probe anyway, so keeping them costs
# memory (2 x layers x prompt tokens floats per prompt), not time.
_TRACE: contextvars.ContextVar[list[ProbeTrace] | None] = contextvars.ContextVar("probe_trace", default=None)


@contextmanager
def trace_probes() -> Iterator[list[ProbeTrace]]:
    """Keep every prompt the attention reranker probes inside the block, in probing order."""
    kept: list[ProbeTrace] = []
    token = _TRACE.set(kept)
    try:
        yield kept
    finally:
        _TRACE.reset(token)


def merge_orders(per_order: Sequence[np.ndarray]) -> np.ndarray:
    """One window's calibrated scores (candidate order) from its prompts: a single prompt's as they are,
    several prompts' standardised and averaged (``prompt_order: both``)."""
    if len(per_order) == 1:
        return per_order[0]
    return np.mean([zscore(c) for c in per_order], axis=0)


def _second_order_test(
    adaptive: tuple[Mapping[str, np.ndarray | None], Mapping[str, float], float, int], idx: Sequence[int]
) -> Callable[[np.ndarray], bool]:
    """The adaptive rule for the window ``idx``: given the first order's calibrated scores, whether the
    fused margin at the cut of the kept set is small enough to read the second order."""
    cheap, weights, margin, cut = adaptive
    sub = {s: (v[list(idx)] if v is not None else None) for s, v in cheap.items()}

    def more(first: np.ndarray) -> bool:
        fused = fuse({**sub, "probe": first}, weights, len(first))
        return cut_margin(fused, cut, weights["probe"]) < margin

    return more


@PROBE_ENGINES.register("attention")
class AttentionReranker(BatchReranker):
    """Reranks passages by calibrated query-to-passage attention.

    Args:
        model: A loaded model (see :func:`rerank.probe.model.load_model`).
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
        from rerank.probe.capture import AttentionProbe

        self.model = model
        self.cfg = probe or ProbeConfig()
        self.cal_cfg = calibration or CalibrationConfig()
        self.calibrator = CALIBRATORS.get(self.cal_cfg.name)
        self.template = template or PromptTemplate()
        if self.cfg.query_position == "both" and self.template.early is None:
            self.template = dataclasses.replace(self.template, early=EARLY_QUERY)
        self.engine = AttentionProbe(
            model, layers=self.cfg.layer_range, heads=self.cfg.heads, rows=self.cfg.query_rows
        )
        self.curve = curve
        #: The dense encoder for the ``dense`` signal; a pipeline sets it to its retriever's.
        self.dense = DenseSignal()
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
        from rerank.probe.model import load_model

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
            # Recorded only off their defaults, so curves fitted before these settings existed still match.
            **({"top_m": self.cfg.top_m} if self.cfg.aggregation == "topm" else {}),
            **({"query_rows": self.cfg.query_rows} if self.cfg.query_rows != "all" else {}),
        }

    def _probe_scores(
        self, query: str, prompt_orders: Sequence[Sequence[Passage]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Raw and calibrated scores of each passage list, probed in exactly the given prompt order
        (several lists as one batch with ``probe.batch_prompts``)."""
        from rerank.probe.capture import stats_of

        outs = self.engine.probe_orders(
            query,
            prompt_orders,
            content_free=self.calibrator.needs_content_free,
            max_passage_tokens=self.cfg.passage_max_tokens,
            template=self.template,
            batch=self.cfg.batch_prompts,
        )
        scored = []
        kept = _TRACE.get()
        for prompt_passages, out in zip(prompt_orders, outs, strict=True):
            slots = list(range(len(prompt_passages)))
            stats = stats_of(out)
            raw, cal = self.calibrator(stats, slots, ScoreSettings.of(self.cfg), self.curve)
            if kept is not None:
                kept.append(ProbeTrace(tuple(prompt_passages), out, stats, raw, cal))
            scored.append((raw, cal))
        return scored

    def score_window(
        self, query: str, passages: Sequence[Passage]
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Probe one window. Returns raw and calibrated scores and prompt slots, in candidate order.

        With ``prompt_order: both`` the window is probed once per order (a passage sits at slot ``i`` in
        one prompt and ``n - 1 - i`` in the other); the calibrated score is the mean of the passes'
        standardised calibrated scores, the raw score the mean of their raw scores, and the slot the one
        in the first (``reversed``) prompt. ``extra_orders`` adds seeded shuffles to the average. A
        window of one passage is probed once.
        """
        return self._read_window(query, passages)[:3]

    def _read_window(
        self,
        query: str,
        passages: Sequence[Passage],
        more: Callable[[np.ndarray], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[int], int]:
        """:meth:`score_window`, and how many prompts were read. ``more``: with ``prompt_order: both``,
        called with the first order's calibrated scores (candidate order); the second order is read only
        when it returns True (the adaptive rule)."""
        n = len(passages)
        orders = window_orders(n, self.cfg)
        pos = [int(x) for x in to_candidate_order(np.arange(n), orders[0])]
        if more is not None and orders == prompt_orders(self.cfg) and len(orders) == 2:
            raws, cals = self._read_orders(query, passages, orders[:1])
            if more(cals[0]):
                r, c = self._read_orders(query, passages, orders[1:])
                raws, cals = raws + r, cals + c
            return np.mean(raws, axis=0), merge_orders(cals), pos, len(cals)
        extras = sum(o.startswith("shuffle") for o in orders)
        early = self.cfg.orders_early_exit and extras > 0
        raws: list[np.ndarray] = []
        cals: list[np.ndarray] = []

        def read(batch: Sequence[str]) -> None:
            r, c = self._read_orders(query, passages, batch)
            raws.extend(r)
            cals.extend(c)

        read(orders[: len(orders) - extras] if early else orders)
        if early and len({int(np.argmax(c)) for c in cals}) > 1:
            # The base orders disagree on the top passage: read more until one leaves the average's top.
            top = int(np.argmax(merge_orders(cals)))
            for order in orders[len(orders) - extras :]:
                read([order])
                now = int(np.argmax(merge_orders(cals)))
                if now == top:
                    break
                top = now
        return np.mean(raws, axis=0), merge_orders(cals), pos, len(cals)

    def _read_orders(
        self, query: str, passages: Sequence[Passage], orders: Sequence[str]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Raw and calibrated scores of each prompt order (candidate order)."""
        n = len(passages)
        scored = self._probe_scores(query, [[passages[c] for c in prompt_slots(n, o)] for o in orders])
        raws = [to_candidate_order(r, o) for o, (r, _) in zip(orders, scored, strict=True)]
        cals = [to_candidate_order(c, o) for o, (_, c) in zip(orders, scored, strict=True)]
        return raws, cals

    def second_order_rule(
        self, weights: Mapping[str, float] | None, top_k: int | None
    ) -> tuple[float, int] | None:
        """``(margin, k)`` of the adaptive second-order rule, or None where every order is read
        (``second_order: always``, one prompt order, fixed fusion, or a probe of weight 0).

        Raises:
            ValueError: ``second_order: adaptive`` without ``second_order_margin`` and a curve with no
                fitted rule.
        """
        if (
            self.cfg.second_order != "adaptive"
            or self.cfg.prompt_order != "both"
            or self.cfg.extra_orders
            or weights is None
            or weights.get("probe", 0) == 0
        ):
            return None
        fitted = self.curve.fusion.second_order if self.curve is not None and self.curve.fusion else None
        if self.cfg.second_order_margin is not None:
            margin = self.cfg.second_order_margin
        elif fitted is not None:
            margin = float(fitted["margin"])
        else:
            raise ValueError(
                "probe.second_order is 'adaptive' but the curve has no fitted second-order rule; refit it "
                "with `attn-rerank calibrate`, set probe.second_order_margin, or use second_order: always"
            )
        k = top_k if top_k is not None else int(fitted["k"]) if fitted is not None else 3
        return margin, k

    def score_in_prompt_order(self, query: str, passages: Sequence[Passage]) -> np.ndarray:
        """Calibrated scores of ``passages`` probed in exactly the given prompt order (iterative sorting)."""
        return self._probe_scores(query, [passages])[0][1]

    def fusion_weights(self) -> dict[str, float] | None:
        """The weights the final score fuses the signals with: ``probe.weights``, else with ``fusion:
        fitted`` the curve's fitted ones; None for the fixed fusion (``first_stage_weight``)."""
        if self.cfg.weights is not None:
            return {s: float(self.cfg.weights.get(s, 0.0)) for s in SIGNALS}
        if self.cfg.fusion == "fixed":
            return None
        fitted = self.curve.fusion if self.curve is not None else None
        if fitted is None:
            raise ValueError(
                "probe.fusion is 'fitted' but the curve has no fitted weights; refit it with "
                "`attn-rerank calibrate`, set probe.weights, or use probe.fusion: fixed"
            )
        return dict(fitted.weights)

    def _probe_windows(
        self,
        query: str,
        ps: Sequence[Passage],
        adaptive: tuple[Mapping[str, np.ndarray | None], Mapping[str, float], float, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], int, int]:
        """Raw, calibrated and merged (standardised per window) probe scores, prompt slots, windows and
        prompts read, in candidate order. ``adaptive``: the cheap signals of ``ps``, the weights, the
        margin and ``k`` of the second-order rule (see :meth:`second_order_rule`)."""
        raw = np.empty(len(ps))
        cal = np.empty(len(ps))
        merged = np.empty(len(ps))
        pos = [0] * len(ps)
        windows = probe_windows(len(ps), self.cfg)
        prompts = 0
        for win in windows:
            check_interrupt()  # a caller that has gone stops the work at a window boundary
            idx = list(win)
            more = None
            if adaptive is not None:
                more = _second_order_test(adaptive, idx)
            r, c, p, k = self._read_window(query, [ps[i] for i in idx], more)
            prompts += k
            raw[idx], cal[idx] = r, c
            # A window of one passage has no spread to standardise by: zscore puts it at the mean (0).
            merged[idx] = zscore(c) if self.cfg.window_merge == "zscore" else c
            for i, slot in zip(idx, p, strict=True):
                pos[i] = slot
        return raw, cal, merged, pos, len(windows), prompts

    def score_only(self, query: str, passages: Sequence[Candidate]) -> np.ndarray:
        """The probe's merged scores of ``passages`` (candidate order), without any fusion."""
        ps, _ = split_candidates(passages)
        return self._probe_windows(query, ps)[2]

    def rerank(
        self,
        query: str | Query,
        passages: Sequence[Candidate],
        top_k: int | None = None,
    ) -> RankedList:
        """Rerank ``passages`` (given in first-stage order, best first) for ``query``.

        More candidates than ``probe.window_size`` are split into consecutive windows that share the
        query; each window's calibrated scores are standardised (``window_merge: zscore``) so that windows
        compare. The final score fuses them with the cheap signals (see :meth:`fusion_weights`); with
        ``cascade``, only the window the cheap signals rank best is probed. A probe weight of 0 skips the
        probe altogether.

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
        weights = self.fusion_weights()
        n = len(ps)
        raw = np.full(n, np.nan)
        cal = np.full(n, np.nan)
        pos: list[int | None] = [None] * n
        info: dict[str, Any] = {}
        if weights is None:
            raw, cal, merged, pos, windows, prompts = self._probe_windows(q.text, ps)
            final = merged.copy()
            fused = "none"
            if self.cfg.first_stage_weight > 0:
                fs = first_stage_signal(q.text, ps, first)
                if fs is not None:
                    fused = "scores" if first is not None else "in-list-bm25"
                    final = fuse_first_stage(final, fs, self.cfg.first_stage_weight)
            signals: dict[str, np.ndarray | None] = {"probe": merged}
            info["first_stage"] = fused
            info["weights"] = {
                "probe": 1.0,
                **({fused: self.cfg.first_stage_weight} if fused != "none" else {}),
            }
        else:
            cheap_names = [s for s in SIGNALS if s != "probe" and weights.get(s, 0) != 0]
            signals, sources, secs = cheap_signals(
                q.text,
                ps,
                first,
                given_signals(passages),
                cheap_names,
                first_stage=self.cfg.first_stage,
                dense=self.dense,
            )
            info["signals"] = sources
            info["signal_seconds"] = secs
            final = fuse(signals, weights, n)
            windows = prompts = 0
            if weights.get("probe", 0) != 0:
                if self.cfg.cascade and n > self.cfg.window_size:
                    # The cheap order picks the window; the probe reads it best first, as a first stage.
                    top = ranked(final)[: self.cfg.window_size]
                else:
                    top = list(range(n))
                rule = self.second_order_rule(weights, top_k)
                adaptive = None
                if rule is not None:
                    cheap = {k: (v[top] if v is not None else None) for k, v in signals.items()}
                    adaptive = (cheap, weights, *rule)
                r, c, m, p, windows, prompts = self._probe_windows(
                    q.text, [ps[i] for i in top], adaptive
                )
                if rule is not None:
                    info["second_order"] = {"margin": rule[0], "k": rule[1], "read": prompts - windows}
                raw[top], cal[top] = r, c
                probe = np.full(n, np.nan)
                probe[top] = m
                signals["probe"] = probe
                for i, slot in zip(top, p, strict=True):
                    pos[i] = slot
                if len(top) < n:
                    # Fused within the probed window (its signals standardised there, as in the fit);
                    # the rest keep their cheap scores, shifted to sit below the window's lowest.
                    sub = {k: (v[top] if v is not None else None) for k, v in signals.items()}
                    win = fuse(sub, weights, len(top))
                    probed = set(top)
                    rest = [i for i in range(n) if i not in probed]
                    shift = min(win) - max(final[rest]) - 1.0
                    final[rest] += shift
                    final[top] = win
                    info["cascade"] = {"probed": len(top), "of": n}
                else:
                    final = fuse(signals, weights, n)
            # What the ranking's best candidates were fused from: the probed window's signals when
            # the cascade cut the list (the probe's are NaN outside it).
            shown = sub if "cascade" in info else signals
            used = {
                k: weights[k]
                for k in SIGNALS
                if weights.get(k, 0) != 0 and standardise(shown.get(k)) is not None
            }
            info["first_stage"] = self.cfg.first_stage if "first_stage" in used else "none"
            info["weights"] = used
        order = ranked(final)
        items = tuple(
            ScoredPassage(
                passage=ps[i],
                score=float(final[i]),
                rank=r + 1,
                raw_score=None if np.isnan(raw[i]) else float(raw[i]),
                calibrated_score=None if np.isnan(cal[i]) else float(cal[i]),
                prompt_position=pos[i],
                first_stage_score=None if first is None else first[i],
                signals={k: float(v[i]) for k, v in signals.items() if v is not None and not np.isnan(v[i])},
            )
            for r, i in enumerate(order)
        )
        info = {"windows": windows, "prompts": prompts, **info, "seconds": time.perf_counter() - t0}
        return RankedList(query=q, items=items[:top_k], info=info)
