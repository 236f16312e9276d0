"""A positional-bias curve b(position, list length), fitted once per model and probe configuration.

The attention a passage receives mixes relevance with the slot it occupies: the start and the end of
the context draw more attention whatever they hold ("lost in the middle"). The curve is measured on
passages that carry no relevance signal for the query (distractors), so dividing by it (or subtracting
it) removes the slot's share at no extra forward pass.

Model: for each fitted list length n, a per-slot mean ``mu[n][j]`` and spread ``sd[n][j]`` of the
(per-list normalised) score, lightly smoothed along the slots; other lengths interpolate over the
relative position ``j / (n - 1)`` between the nearest fitted lengths.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CURVE_FORMAT_VERSION = 1
MODES = ("multiplicative", "subtractive", "zscore")
# Metadata keys that must match between the curve and the probe that applies it.
MATCH_KEYS = (
    "model_id",
    "weights_hash",
    "dtype",
    "layers",
    "heads",
    "head_set",
    "aggregation",
    "score_kind",
    "template",
)


FIT_HINT = "Fit one with `attn-rerank calibrate --config YOUR.yaml --out curve.json`."


class CurveMismatchError(ValueError):
    """The curve was fitted for another model or probe configuration."""


def _mismatch(diffs: Sequence[str]) -> CurveMismatchError:
    return CurveMismatchError(
        f"bias curve does not match this model/probe configuration ({'; '.join(diffs)}). {FIT_HINT}"
    )


def pick_compatible(
    candidates: Sequence[tuple[str, BiasCurve]],
    probe_meta: Mapping[str, Any],
    keys: Sequence[str] = MATCH_KEYS,
) -> BiasCurve:
    """The first of ``(name, curve)`` candidates fitted for this model and probe configuration.

    A configuration may list one curve per dtype (bf16 where the CPU or GPU computes it natively,
    fp32 elsewhere): the one that matches the loaded model is applied, and no other. ``keys`` narrows
    the match (a caller that only wants the model's slot profile may match the model alone).

    Raises:
        CurveMismatchError: No candidate matches; the message names each one's differences.
    """
    if not candidates:
        raise ValueError("no bias curve given")
    reasons = []
    for name, curve in candidates:
        diffs = curve.mismatches(probe_meta, keys)
        if not diffs:
            return curve
        reasons.append(f"{name}: " + "; ".join(diffs))
    if len(candidates) == 1:
        raise _mismatch(diffs)
    raise CurveMismatchError(
        "no bias curve matches this model/probe configuration (" + " | ".join(reasons) + f"). {FIT_HINT}"
    )


@dataclass
class BiasCurve:
    """A fitted curve.

    Attributes:
        mode: ``multiplicative`` (score / b), ``subtractive`` (score - b) or ``zscore`` ((score - b) / sd).
        lengths: The list lengths it was fitted on.
        mean: Per length, the per-slot bias (len n).
        sd: Per length, the per-slot spread.
        lower / upper: Per length, a 95% bootstrap band of ``mean``.
        meta: The model and probe configuration it belongs to, and the fitting data.
    """

    mode: str
    lengths: list[int]
    mean: dict[int, np.ndarray]
    sd: dict[int, np.ndarray]
    lower: dict[int, np.ndarray] = field(default_factory=dict)
    upper: dict[int, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def _interp(self, table: dict[int, np.ndarray], n: int) -> np.ndarray:
        if n in table:
            return table[n]
        r = np.linspace(0.0, 1.0, n) if n > 1 else np.array([1.0])
        below = [m for m in self.lengths if m < n]
        above = [m for m in self.lengths if m > n]
        lo = max(below) if below else min(above)
        hi = min(above) if above else max(below)

        def at(m: int) -> np.ndarray:
            return np.interp(r, np.linspace(0.0, 1.0, m), table[m])

        if lo == hi:
            return at(lo)
        w = (n - lo) / (hi - lo)
        return (1 - w) * at(lo) + w * at(hi)

    def bias(self, n: int) -> np.ndarray:
        """The bias of each slot of an ``n``-passage list (higher = more attention for free)."""
        if n < 1:
            raise ValueError(f"list length must be >= 1, got {n}")
        return self._interp(self.mean, n)

    def apply(self, scores: Sequence[float], positions: Sequence[int] | None = None) -> np.ndarray:
        """Correct ``scores`` of one list; ``positions[i]`` is the 0-based prompt slot of score i.

        Scores are normalised per list the same way as when fitting (divided by their mean for the
        multiplicative mode), so the correction does not depend on the query's overall attention level.
        """
        s = np.asarray(scores, dtype=np.float64)
        n = len(s)
        if n == 0:
            return s
        pos = np.arange(n) if positions is None else np.asarray(positions)
        if sorted(pos.tolist()) != list(range(n)):
            raise ValueError(f"positions must be a permutation of 0..{n - 1}")
        b = self.bias(n)[pos]
        if self.mode == "multiplicative":
            return _normalise(s, self.mode) / np.maximum(b, 1e-12)
        if self.mode == "subtractive":
            return _normalise(s, self.mode) - b
        sd = self._interp(self.sd, n)[pos]
        return (_normalise(s, self.mode) - b) / np.maximum(sd, 1e-12)

    def mismatches(self, probe_meta: Mapping[str, Any], keys: Sequence[str] = MATCH_KEYS) -> list[str]:
        """Each metadata key (of ``keys``) on which this curve and ``probe_meta`` differ, with both values."""
        diffs = []
        for k in keys:
            mine, theirs = _canon(self.meta.get(k)), _canon(probe_meta.get(k))
            if mine != theirs:
                diffs.append(f"{k}: curve has {mine!r}, probe has {theirs!r}")
        return diffs

    def check_compatible(self, probe_meta: Mapping[str, Any]) -> None:
        """Refuse to apply this curve to a probe whose model or configuration differs.

        Raises:
            CurveMismatchError: Names each differing key with both values and how to fix it.
        """
        diffs = self.mismatches(probe_meta)
        if diffs:
            raise _mismatch(diffs)

    def to_json(self) -> dict[str, Any]:
        def tab(t: dict[int, np.ndarray]) -> dict[str, list[float]]:
            return {str(n): [round(float(v), 8) for v in t[n]] for n in sorted(t)}

        return {
            "format_version": CURVE_FORMAT_VERSION,
            "mode": self.mode,
            "lengths": self.lengths,
            "mean": tab(self.mean),
            "sd": tab(self.sd),
            "lower": tab(self.lower),
            "upper": tab(self.upper),
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> BiasCurve:
        """Load a curve JSON.

        Raises:
            FileNotFoundError / ValueError: Missing file, malformed JSON, or another format version.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"bias curve not found: {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        if d.get("format_version") != CURVE_FORMAT_VERSION:
            raise ValueError(
                f"{path}: curve format version {d.get('format_version')!r}, this version reads "
                f"{CURVE_FORMAT_VERSION}; refit it with `attn-rerank calibrate`"
            )
        if d.get("mode") not in MODES:
            raise ValueError(f"{path}: unknown mode {d.get('mode')!r}; choose one of: {', '.join(MODES)}")

        def tab(t: dict[str, list[float]]) -> dict[int, np.ndarray]:
            return {int(n): np.asarray(v, dtype=np.float64) for n, v in t.items()}

        return cls(
            mode=d["mode"],
            lengths=[int(n) for n in d["lengths"]],
            mean=tab(d["mean"]),
            sd=tab(d["sd"]),
            lower=tab(d.get("lower", {})),
            upper=tab(d.get("upper", {})),
            meta=d.get("meta", {}),
        )


def _canon(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    return v


def _normalise(scores: np.ndarray, mode: str) -> np.ndarray:
    # Multiplicative: divide by the list mean, so a query that draws more attention overall
    # does not shift the curve. Additive modes: centre on the list mean.
    if mode == "multiplicative":
        m = scores.mean()
        return scores / m if m > 0 else scores
    return scores - scores.mean()


def _smooth(v: np.ndarray) -> np.ndarray:
    # Savitzky-Golay keeps the sharp rise at the ends (where the bias lives); a moving average flattens it.
    if len(v) < 7:
        return v
    from scipy.signal import savgol_filter

    return savgol_filter(v, window_length=5, polyorder=2, mode="interp")


def fit_curve(
    samples: Sequence[tuple[Sequence[float], Sequence[int], Sequence[bool]]],
    *,
    mode: str = "multiplicative",
    meta: Mapping[str, Any] | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> BiasCurve:
    """Fit a curve from lists scored by the probe.

    Args:
        samples: One entry per probed list: ``(scores, positions, use)``, where ``scores[i]`` is the
            score of the passage in slot ``positions[i]`` and ``use[i]`` marks passages that carry no
            relevance signal (distractors); only those enter the curve, but normalisation uses the
            whole list, exactly as :meth:`BiasCurve.apply` will.
        mode: Correction form, one of ``multiplicative``, ``subtractive``, ``zscore``.
        meta: Model and probe identity, stored with the curve (see ``MATCH_KEYS``).
        n_bootstrap: Resamples of the lists for the 95% band (0: no band, for quick refits).

    Raises:
        ValueError: Unknown mode, no samples, or a slot with no distractor observation.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
    if not samples:
        raise ValueError("fit_curve needs at least one sample")
    by_len: dict[int, list[np.ndarray]] = {}
    for scores, positions, use in samples:
        s = _normalise(np.asarray(scores, dtype=np.float64), mode)
        n = len(s)
        row = np.full(n, np.nan)
        for v, p, u in zip(s, positions, use, strict=True):
            if u:
                row[int(p)] = v
        by_len.setdefault(n, []).append(row)
    rng = np.random.default_rng(seed)
    mean, sd, lower, upper = {}, {}, {}, {}
    for n, rows in sorted(by_len.items()):
        mat = np.vstack(rows)
        if np.isnan(mat).all(axis=0).any():
            raise ValueError(f"list length {n}: some slot has no distractor observation; use more samples")
        mean[n] = _smooth(np.nanmean(mat, axis=0))
        sd[n] = _smooth(np.nanstd(mat, axis=0))
        if n_bootstrap <= 0:
            continue
        with warnings.catch_warnings():
            # A resample can miss a slot's only observations; that resample gives NaN there and is skipped.
            warnings.simplefilter("ignore", RuntimeWarning)
            boots = np.vstack(
                [np.nanmean(mat[rng.integers(0, len(mat), len(mat))], axis=0) for _ in range(n_bootstrap)]
            )
        lower[n] = np.nanpercentile(boots, 2.5, axis=0)
        upper[n] = np.nanpercentile(boots, 97.5, axis=0)
    meta = dict(meta or {})
    meta.setdefault("fit", {})
    meta["fit"] = {
        **meta["fit"],
        "lists": len(samples),
        "lists_per_length": {str(n): len(r) for n, r in by_len.items()},
    }
    return BiasCurve(mode=mode, lengths=sorted(by_len), mean=mean, sd=sd, lower=lower, upper=upper, meta=meta)
