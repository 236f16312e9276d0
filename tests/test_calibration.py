"""Positional-bias curves: fitting, persistence, refusal on mismatch, and correction of a known bias."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.curve import CURVE_FORMAT_VERSION, BiasCurve, CurveMismatchError, fit_curve

REPO = Path(__file__).resolve().parent.parent

META = {
    "model_id": "m",
    "weights_hash": "abc",
    "dtype": "bfloat16",
    "layers": [0, 5],
    "heads": None,
    "head_set": None,
    "aggregation": "mean",
    "score_kind": "raw",
    "template": "t1",
}


def _biased_lists(n_lists: int, n: int, seed: int, mode: str):
    """Lists whose scores are relevance (gold = 1.0 vs noise) shaped by a U-shaped slot bias."""
    rng = np.random.default_rng(seed)
    bias = 1.0 + 3.0 * (np.linspace(-1, 1, n) ** 2)  # start and end draw 4x the middle
    out = []
    for _ in range(n_lists):
        gold = int(rng.integers(n))
        rel = np.full(n, 1.0) + rng.normal(0, 0.05, n)
        rel[gold] = 1.6
        scores = rel * bias if mode == "multiplicative" else rel + bias
        out.append((scores, list(range(n)), [j != gold for j in range(n)], gold))
    return out


@pytest.mark.parametrize("mode", ["multiplicative", "subtractive", "zscore"])
def test_correction_recovers_the_gold_passage(mode):
    gen = "multiplicative" if mode == "multiplicative" else "additive"
    fit = _biased_lists(300, 20, 0, gen)
    test = _biased_lists(200, 20, 1, gen)
    curve = fit_curve([(s, p, u) for s, p, u, _ in fit], mode=mode, meta=META)
    raw_hits = np.mean([np.argmax(s) == g for s, _, _, g in test])
    cor_hits = np.mean([np.argmax(curve.apply(s)) == g for s, _, _, g in test])
    assert raw_hits < 0.5, "the synthetic bias must actually hide the gold passage"
    assert cor_hits > 0.95
    # The fitted curve has the U shape that was put in.
    b = curve.bias(20)
    assert b[0] > b[10] and b[-1] > b[10]


def test_round_trip_and_interpolated_lengths(tmp_path):
    curve = fit_curve([(s, p, u) for s, p, u, _ in _biased_lists(100, 10, 0, "multiplicative")], meta=META)
    curve20 = fit_curve([(s, p, u) for s, p, u, _ in _biased_lists(100, 20, 0, "multiplicative")], meta=META)
    curve.mean.update(curve20.mean)
    curve.sd.update(curve20.sd)
    curve.lengths = [10, 20]
    path = tmp_path / "c.json"
    curve.save(path)
    back = BiasCurve.load(path)
    assert back.mode == curve.mode and back.lengths == [10, 20] and back.meta["model_id"] == "m"
    np.testing.assert_allclose(back.bias(10), curve.bias(10), atol=1e-7)
    s = np.linspace(1, 2, 10)
    np.testing.assert_allclose(back.apply(s), curve.apply(s), atol=1e-6)
    mid = back.bias(15)  # between the fitted lengths: interpolated over relative position
    assert len(mid) == 15 and np.all(np.isfinite(mid))
    assert back.bias(15)[0] > back.bias(15)[7]
    assert len(back.bias(40)) == 40  # beyond: the nearest length's profile, stretched


def test_mismatch_is_refused_with_the_differences_named():
    curve = fit_curve([(s, p, u) for s, p, u, _ in _biased_lists(50, 5, 0, "multiplicative")], meta=META)
    curve.check_compatible(META)  # same configuration: accepted
    with pytest.raises(CurveMismatchError, match=r"weights_hash.*'abc'.*'other'"):
        curve.check_compatible({**META, "weights_hash": "other"})
    with pytest.raises(CurveMismatchError, match="layers"):
        curve.check_compatible({**META, "layers": [0, 29]})


def test_bad_files_are_refused(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps({"format_version": CURVE_FORMAT_VERSION + 1, "mode": "multiplicative"}))
    with pytest.raises(ValueError, match="format version"):
        BiasCurve.load(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BiasCurve.load(p)
    with pytest.raises(FileNotFoundError):
        BiasCurve.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown mode"):
        fit_curve([(np.ones(3), [0, 1, 2], [True] * 3)], mode="cubic")
    curve = fit_curve([(np.ones(3) + np.arange(3), [0, 1, 2], [True] * 3)])
    with pytest.raises(ValueError, match="permutation"):
        curve.apply([1.0, 2.0, 3.0], positions=[0, 0, 1])


@pytest.mark.parametrize(
    "path", ["configs/default.yaml", "configs/fit-curve-raw.yaml", "configs/fit-curve-nacal.yaml"]
)
def test_shipped_curves_fit_the_configs_that_use_them(smol_model, path):
    """Changing the default probe settings without refitting its curve must fail here, not for users."""
    from rerank.config import load_config
    from rerank.reranker import AttentionReranker, resolve_curve_path

    cfg = load_config(REPO / path)
    if cfg.calibration.curve is None:  # a fitting config: its output is the shipped curve of that name
        name = "smollm2-135m-raw.json" if cfg.calibration.name == "curve" else "smollm2-135m-nacal.json"
        cfg = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={"curve": name})})
    rr = AttentionReranker(smol_model, cfg.probe, cfg.calibration)  # raises CurveMismatchError otherwise
    assert rr.curve is not None
    assert resolve_curve_path(cfg.calibration.curve).parent.name == "curves"
