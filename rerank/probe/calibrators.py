"""Calibrators: how raw attention becomes a position-fair score. Registered by name.

``none``                 raw query attention.
``content-free``         query attention minus the attention of a content-free ``N/A`` query over the
                         same passages (ICR; one extra short pass that reuses the passages' KV cache).
``curve``                raw attention corrected by a positional-bias curve fitted once per model
                         (no extra pass).
``curve+content-free``   the ``N/A``-calibrated score corrected by a curve fitted on such scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from calibration.curve import BiasCurve
from rerank.probe.scoring import PassageStats, passage_scores
from retrievers.registry import Registry


@dataclass(frozen=True)
class ScoreSettings:
    layers: tuple[int, int] | None
    heads: tuple[int, ...] | None
    aggregation: str
    head_set: tuple[tuple[int, int], ...] | None = None
    nacal_form: str = "difference"
    top_m: int = 16

    @classmethod
    def of(cls, probe: Any) -> ScoreSettings:
        """The scoring part of a :class:`rerank.config.ProbeConfig`."""
        return cls(
            probe.layers, probe.heads, probe.aggregation, probe.head_set, probe.nacal_form, probe.top_m
        )

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`rerank.probe.scoring.passage_scores` for these settings."""
        return {
            "layers": self.layers,
            "heads": self.heads,
            "aggregation": self.aggregation,
            "head_set": self.head_set,
            "top_m": self.top_m,
        }

    def kind(self, score_kind: str) -> str:
        """``nacal`` calibrators use the configured N/A form."""
        return self.nacal_form if score_kind == "nacal" and self.nacal_form != "difference" else score_kind


class Calibrator(Protocol):
    needs_content_free: bool
    score_kind: str
    uses_curve: bool

    def __call__(
        self, stats: PassageStats, positions: Sequence[int], settings: ScoreSettings, curve: BiasCurve | None
    ) -> tuple[np.ndarray, np.ndarray]: ...


CALIBRATORS: Registry[Calibrator] = Registry("calibrator")


@dataclass(frozen=True)
class _Calibrator:
    needs_content_free: bool
    score_kind: str
    uses_curve: bool

    def __call__(
        self, stats: PassageStats, positions: Sequence[int], settings: ScoreSettings, curve: BiasCurve | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(raw, calibrated)`` scores in prompt order."""
        kw = settings.kwargs()
        raw = passage_scores(stats, kind="raw", **kw)
        score = raw if self.score_kind == "raw" else passage_scores(stats, kind=settings.kind("nacal"), **kw)
        if self.uses_curve:
            if curve is None:
                raise ValueError("this calibrator needs a fitted curve: set calibration.curve in the config")
            score = curve.apply(score, positions)
        return raw, score


CALIBRATORS.register("none")(_Calibrator(needs_content_free=False, score_kind="raw", uses_curve=False))
CALIBRATORS.register("content-free")(
    _Calibrator(needs_content_free=True, score_kind="nacal", uses_curve=False)
)
CALIBRATORS.register("curve")(_Calibrator(needs_content_free=False, score_kind="raw", uses_curve=True))
CALIBRATORS.register("curve+content-free")(
    _Calibrator(needs_content_free=True, score_kind="nacal", uses_curve=True)
)
