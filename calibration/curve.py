"""A positional-bias curve b(position, list length), fitted once per model and probe configuration.

The attention a passage receives mixes relevance with the slot it occupies: the start and the end of
the context draw more attention whatever they hold ("lost in the middle"). The curve is measured on
passages that carry no relevance signal for the query (distractors), so dividing by it (or subtracting
it) removes the slot's share at no extra forward pass.

Model: for each fitted list length n, a per-slot mean ``mu[n][j]`` and spread ``sd[n][j]`` of the
(per-list normalised) score, lightly smoothed along the slots; other lengths interpolate over the
relative position ``j / (n - 1)`` between the nearest fitted lengths.

Removing the slot's mean is not enough to make a ranking position-blind: the gold passage stands out
less at some slots (with SmolLM2, the first two) than at others, so its chance of ranking first still
depends on where it sits. Optional per-slot ``offset[n][j]`` values, added after the correction, trade
that back: they are fitted on lists in which a known relevant passage visits every slot
(:func:`equalise`) so that its recall@1 is as even over the slots as the data allow.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from calibration.fusion import FusionWeights

CURVE_FORMAT_VERSION = 2
# Versions this one reads: 1 had no per-slot offsets.
READABLE_VERSIONS = (1, 2)
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
    "top_m",
    "query_rows",
)


FIT_HINT = "Fit one with `attn-rerank calibrate --model MODEL --out curve.json`."


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
        offset: Per length, per-slot offsets added after the correction (see :func:`equalise`); empty
            for none. Lengths without one interpolate over relative position from those with one.
        meta: The model and probe configuration it belongs to, and the fitting data.
        fusion: The fitted weight of the probe and of each cheap signal for this model (see
            :mod:`calibration.fusion`); None for a curve fitted before weights were.
    """

    mode: str
    lengths: list[int]
    mean: dict[int, np.ndarray]
    sd: dict[int, np.ndarray]
    lower: dict[int, np.ndarray] = field(default_factory=dict)
    upper: dict[int, np.ndarray] = field(default_factory=dict)
    offset: dict[int, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    fusion: FusionWeights | None = None

    def _interp(self, table: dict[int, np.ndarray], n: int) -> np.ndarray:
        if n in table:
            return table[n]
        r = np.linspace(0.0, 1.0, n) if n > 1 else np.array([1.0])
        below = [m for m in table if m < n]
        above = [m for m in table if m > n]
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

    def offsets(self, n: int) -> np.ndarray:
        """The per-slot offsets of an ``n``-passage list (zeros when the curve has none)."""
        if n < 1:
            raise ValueError(f"list length must be >= 1, got {n}")
        return self._interp(self.offset, n) if self.offset else np.zeros(n)

    def apply(self, scores: Sequence[float], positions: Sequence[int] | None = None) -> np.ndarray:
        """Correct ``scores`` of one list; ``positions[i]`` is the 0-based prompt slot of score i.

        Scores are normalised per list the same way as when fitting (divided by their mean for the
        multiplicative mode), so the correction does not depend on the query's overall attention level.
        The curve's per-slot offsets, if any, are added last.
        """
        out = self._correct(scores, positions)
        if self.offset and len(out):
            pos = np.arange(len(out)) if positions is None else np.asarray(positions)
            out = out + self.offsets(len(out))[pos]
        return out

    def _correct(self, scores: Sequence[float], positions: Sequence[int] | None = None) -> np.ndarray:
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
            "offset": tab(self.offset),
            "meta": self.meta,
            **({"fusion": self.fusion.to_json()} if self.fusion is not None else {}),
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
        except (ValueError, RecursionError) as exc:  # bad JSON or bad UTF-8
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a curve file holds a JSON object, got {type(d).__name__}")
        if d.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{path}: curve format version {d.get('format_version')!r}, this version reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}; refit it with `attn-rerank calibrate`"
            )
        if d.get("mode") not in MODES:
            raise ValueError(f"{path}: unknown mode {d.get('mode')!r}; choose one of: {', '.join(MODES)}")
        lengths = _check_lengths(path, d.get("lengths"))
        tables = {}
        for key in ("mean", "sd", "lower", "upper", "offset"):
            required = key in ("mean", "sd")
            tables[key] = _check_table(path, d, key, lengths if key != "offset" else None, required)
        if d["mode"] == "multiplicative":
            _check_sign(path, "mean", tables["mean"], strict=True)
        _check_sign(path, "sd", tables["sd"], strict=False)
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: field 'meta' must be an object, got {type(meta).__name__}")
        return cls(
            mode=d["mode"],
            lengths=lengths,
            mean=tables["mean"],
            sd=tables["sd"],
            lower=tables["lower"],
            upper=tables["upper"],
            offset=tables["offset"],
            meta=meta,
            fusion=FusionWeights.from_json(d["fusion"], f"{path}: fusion") if "fusion" in d else None,
        )


# A fitted curve holds per-list normalised scores, of order 1; anything this far out is not a curve.
MAX_CURVE_VALUE = 1e6


def _check_lengths(path: Path, value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path}: field 'lengths' must be a non-empty list of list lengths, got {value!r}")
    for n in value:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{path}: field 'lengths' holds {n!r}; each must be an integer >= 1")
    if len(set(value)) != len(value):
        raise ValueError(f"{path}: field 'lengths' lists a length twice: {value}")
    return list(value)


def _check_table(
    path: Path, d: dict[str, Any], key: str, lengths: list[int] | None, required: bool
) -> dict[int, np.ndarray]:
    """One per-length table: a list of ``n`` finite numbers (within ``MAX_CURVE_VALUE``) for each length
    ``n``; ``lengths`` given: exactly those lengths; None: any lengths (the offsets)."""
    if key not in d:
        if required:
            raise ValueError(f"{path}: required field '{key}' is missing")
        return {}
    table = d[key]
    if not isinstance(table, dict):
        raise ValueError(
            f"{path}: field '{key}' must be an object {{length: [values]}}, got {type(table).__name__}"
        )
    if not table and not required:
        return {}
    out: dict[int, np.ndarray] = {}
    for k, values in table.items():
        where = f"{path}: field '{key}.{k}'"
        try:
            n = int(k)
        except ValueError:
            raise ValueError(f"{where}: the key must be a list length (an integer)") from None
        if n < 1:
            raise ValueError(f"{where}: the key must be a list length >= 1")
        if lengths is not None and n not in lengths:
            raise ValueError(f"{where}: length {n} is not in 'lengths' {lengths}")
        if not isinstance(values, list) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
            raise ValueError(f"{where}: expected a list of {n} numbers (one per slot), got {got}")
        for j, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"{where}[{j}]: expected a number, got {v!r}")
            try:
                ok = math.isfinite(float(v)) and abs(float(v)) <= MAX_CURVE_VALUE
            except OverflowError:
                ok = False
            if not ok:
                raise ValueError(
                    f"{where}[{j}]: {v!r} is not a finite number within +-{MAX_CURVE_VALUE:g}; "
                    "the curve file is damaged, refit it"
                )
        out[n] = np.asarray(values, dtype=np.float64)
    if lengths is not None and required:
        missing = [n for n in lengths if n not in out]
        if missing:
            raise ValueError(f"{path}: field '{key}' has no values for length(s) {missing}")
    return out


def _check_sign(path: Path, key: str, table: dict[int, np.ndarray], strict: bool) -> None:
    for n, v in table.items():
        bad = np.flatnonzero(v <= 0) if strict else np.flatnonzero(v < 0)
        if len(bad):
            need = "> 0" if strict else ">= 0"
            raise ValueError(f"{path}: field '{key}.{n}'[{bad[0]}] is {v[bad[0]]}; it must be {need}")


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


def equalise_lengths(
    curve: BiasCurve, sweeps: Mapping[int, np.ndarray], note: Mapping[str, Any] | None = None
) -> BiasCurve:
    """A copy of ``curve`` with per-slot offsets at each length of ``sweeps`` (``{n: (questions, n, n)}``
    sweep scores), each fitted by :func:`equalise` with as many bins as slots, up to 5. The curve's
    other offsets, and the record of how they were fitted (``meta.fit.offset``), are kept; each
    length's figures go to ``meta.fit.offsets_by_length``."""
    original = dict(curve.meta.get("fit", {}))
    records = dict(original.get("offsets_by_length", {}))
    for n in sorted(sweeps):
        curve = equalise(curve, sweeps[n], bins=min(5, n), note=note)
        records[str(n)] = curve.meta["fit"]["offset"]
    fit = {**curve.meta["fit"], "offsets_by_length": records}
    if "offset" in original:
        fit["offset"] = original["offset"]
    else:
        fit.pop("offset", None)
    return replace(curve, meta={**curve.meta, "fit": fit})


def sweep_recall(corrected: np.ndarray) -> np.ndarray:
    """Per-slot recall@1 of the relevant passage over a sweep.

    ``corrected[q, g, j]``: the score at prompt slot ``j`` of question ``q``'s list whose relevant passage
    sits at slot ``g``. Ties count against the relevant passage.
    """
    n = corrected.shape[1]
    idx = np.arange(n)
    gold = corrected[:, idx, idx]
    others = np.where(np.eye(n, dtype=bool)[None], -np.inf, corrected).max(axis=2)
    return (gold > others).mean(axis=0)


def sweep_samples(sweep: np.ndarray) -> list[tuple[np.ndarray, list[int], list[bool]]]:
    """:func:`fit_curve` samples of a sweep (questions, gold slot, prompt slot): its distractor slots."""
    n = sweep.shape[1]
    return [(row[g], list(range(n)), [j != g for j in range(n)]) for row in sweep for g in range(n)]


def bin_spread(per_slot: np.ndarray, bins: int = 5) -> float:
    """Max - min of the mean over ``bins`` groups of neighbouring slots."""
    groups = [float(per_slot[g].mean()) for g in np.array_split(np.arange(len(per_slot)), bins)]
    return max(groups) - min(groups)


def evenness_objective(per_slot: np.ndarray, bins: int = 5) -> float:
    """Mean recall@1 minus the spread (max - min) over ``bins`` groups of neighbouring slots."""
    return float(per_slot.mean() - bin_spread(per_slot, bins))


def equalise(
    curve: BiasCurve,
    sweep: np.ndarray,
    *,
    bins: int = 5,
    knots: Sequence[int] | None = None,
    steps: int = 31,
    rounds: int = 2,
    note: Mapping[str, Any] | None = None,
) -> BiasCurve:
    """A copy of ``curve`` with per-slot offsets that even out the relevant passage's recall@1 over slots.

    Args:
        curve: The fitted curve (its mean and spread stay as they are).
        sweep: Scores of shape (questions, n, n): ``sweep[q, g, j]`` is the probe's score at prompt slot
            ``j`` of question ``q``'s list in which the relevant passage sits at slot ``g``; every
            question's relevant passage visits every slot of an ``n``-passage list.
        bins: Groups of neighbouring slots over which the spread is measured.
        knots: 0-based slots at which offsets are fitted, linearly interpolated between them (fewer
            values to fit from few questions); None fits every slot and smooths the result.
        steps / rounds: Offsets are searched one value at a time (coordinate ascent) over ``steps``
            values within +-1.5 distractor spreads of the corrected score, ``rounds`` passes.
        note: Recorded in ``meta['fit']['offset']`` with the fit's figures (say what the sweep was).

    The objective is mean recall@1 minus the spread over ``bins`` (see :func:`evenness_objective`). A
    slot whose relevant passage stands out less than elsewhere gets a higher offset; the price is that
    a distractor in that slot wins a little more often when the relevant passage is elsewhere, so the
    mean recall may fall slightly. The offsets are centred on zero (a common shift changes no ranking).

    Raises:
        ValueError: ``sweep`` is not (questions, n, n) with at least one question, or bad ``knots``.
    """
    sweep = np.asarray(sweep, dtype=np.float64)
    if sweep.ndim != 3 or sweep.shape[1] != sweep.shape[2] or sweep.shape[0] < 1:
        raise ValueError(f"sweep must have shape (questions, n, n), got {sweep.shape}")
    q, n, _ = sweep.shape
    if n < bins:
        raise ValueError(f"a sweep over {n} slots cannot be split into {bins} bins")
    at = np.arange(n) if knots is None else np.asarray(sorted(set(knots)))
    if at[0] != 0 or at[-1] != n - 1:
        raise ValueError(f"knots must include the first and last slot (0 and {n - 1}), got {list(at)}")
    # The correction without any offsets: the ones fitted here replace those the curve may have.
    corrected = np.array([[curve._correct(sweep[i, g]) for g in range(n)] for i in range(q)])
    distractors = corrected[:, ~np.eye(n, dtype=bool)]
    span = 1.5 * float(np.median(distractors.std(axis=0)))
    # Closest to zero first, so that a slot whose offset does not matter keeps none.
    grid = sorted(np.linspace(-span, span, steps), key=abs)
    values = np.zeros(len(at))

    def spread_out(v: np.ndarray) -> np.ndarray:
        return np.interp(np.arange(n), at, v)

    def score(v: np.ndarray) -> float:
        return evenness_objective(sweep_recall(corrected + spread_out(v)[None, None, :]), bins)

    best = score(values)
    for _ in range(rounds):
        for j in range(len(at)):
            for v in grid:
                trial = values.copy()
                trial[j] = v
                s = score(trial)
                if s > best + 1e-12:
                    best, values = s, trial
    offsets = _smooth(values) if knots is None else spread_out(values)
    offsets -= offsets.mean()
    before, after = sweep_recall(corrected), sweep_recall(corrected + offsets[None, None, :])

    def figures(per_slot: np.ndarray) -> dict[str, float]:
        return {
            "recall@1": round(float(per_slot.mean()), 4),
            "bin_spread": round(bin_spread(per_slot, bins), 4),
        }

    meta = dict(curve.meta)
    meta["fit"] = {
        **meta.get("fit", {}),
        "offset": {
            **(note or {}),
            "questions": q,
            "length": n,
            "knots": None if knots is None else [int(k) for k in at],
            "before": figures(before),
            "after": figures(after),
        },
    }
    return BiasCurve(
        curve.mode,
        curve.lengths,
        curve.mean,
        curve.sd,
        lower=curve.lower,
        upper=curve.upper,
        offset={**curve.offset, n: offsets},
        meta=meta,
    )
