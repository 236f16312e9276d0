"""Nested cross-validation of the position sweep: it must find a known signal and its known bias."""

from __future__ import annotations

import numpy as np
import pytest

from eval.position import N, nested_cv, spread_null, summarize


def _lists(rng: np.random.Generator, nq: int, gold_boost: float) -> np.ndarray:
    """(questions, gold slot, prompt slot) scores: a linear slot bias, noise, the gold raised."""
    scores = rng.normal(0.0, 0.1, (nq, N, N)) + np.linspace(2.0, -2.0, N)
    for p in range(N):
        scores[:, p, p] += gold_boost
    return scores


def test_nested_cv_picks_the_informative_score_with_its_bias_removed() -> None:
    rng = np.random.default_rng(0)
    signal = _lists(rng, 12, gold_boost=1.0)
    noise = rng.normal(0.0, 1.0, signal.shape)
    variants = {
        "signal/none": (signal, "none"),
        "signal/subtractive": (signal, "subtractive"),
        "noise/subtractive": (noise, "subtractive"),
    }
    ranks, chosen = nested_cv(variants)
    assert chosen == ["signal/subtractive"] * 5
    assert ranks.shape == (12, N)
    assert (ranks == 1).all()  # the bias is removed exactly: the gold wins at every slot
    # Uncorrected, the same scores put the gold first only near the favoured start of the list.
    uncorrected, _ = nested_cv({"signal/none": (signal, "none")})
    hits = (uncorrected == 1).mean(axis=0)
    assert hits[:3].min() == 1.0 and hits[-5:].max() == 0.0


def test_spread_null_tells_chance_from_a_position_effect() -> None:
    rng = np.random.default_rng(0)
    # Every question hit at all slots or at none: a position-blind ranker with no noise at all.
    solid = np.repeat(rng.random((40, 1)) < 0.6, N, axis=1)
    null = spread_null(solid, 0.0)
    assert null["bin_spread_null_p95"] == 0.0 and null["bin_spread_p"] == 1.0
    # Hits independent of the slot, each question with its own accuracy: the spread is chance's.
    blind = rng.random((40, N)) < rng.uniform(0.3, 1.0, (40, 1))
    blind_spread = summarize({p: list(np.where(blind[:, p], 1, 2)) for p in range(N)})
    assert 0.0 < blind_spread["bin_spread_null_median"] < blind_spread["bin_spread_null_p95"]
    assert blind_spread["bin_spread_p"] > 0.05
    # The gold found only in the first bin: as uneven as it gets, which no shuffle matches.
    biased = np.zeros((40, N), dtype=bool)
    biased[:, :4] = True
    out = summarize({p: list(np.where(biased[:, p], 1, 3)) for p in range(N)})
    assert out["bin_spread"] == 1.0
    assert out["bin_spread_p"] == pytest.approx(1 / 2001, abs=1e-4)
    assert out["bin_spread_null_p95"] < 0.5
