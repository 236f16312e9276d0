"""How much each ranking signal is trusted: fusion weights fitted on labelled lists.

The final score of a candidate is a weighted sum of its signals, each standardised (z-scored) within
the list: the probe's calibrated attention, the first-stage score the caller gave, BM25 over the list
itself, and the dense encoder's cosine. The weights are a per-model fact, like the bias curve: a 7-8B
model's attention deserves a large weight, a 135M model's a small one, a random-weight model's none.

Why a linear model over z-scores rather than a rank fusion (RRF): z-scores keep the margin of each
signal (a passage the encoder finds far better than the rest moves further than one that is barely
ahead), they are free of each signal's scale, so one weight per signal transfers between lists, and the
fitted weight is the trust itself: zero means the signal is ignored, which is what a signal that carries
no information must get. RRF has no such knob short of dropping the signal.

The fit is a listwise softmax (ListNet-style cross-entropy against the graded labels) with a small L2
penalty. A bootstrap over lists gives each weight a 95% interval; a signal whose interval reaches zero
or below is dropped and the rest refitted, so a signal is used only where the calibration lists show
that it helps. Model-free: this module sees arrays, never a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Every signal a weight can be fitted for, in the order weights are reported.
SIGNALS = ("probe", "first_stage", "bm25", "dense")
#: L2 penalty on the weights (per list, the loss is a mean): keeps a weight of a useless signal near 0.
L2 = 0.01
FUSION_FORMAT = 1


def standardise(values: Sequence[float] | np.ndarray | None) -> np.ndarray | None:
    """Z-scores of ``values`` within one list; None for a missing or flat signal (nothing to fuse)."""
    if values is None:
        return None
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0 or not np.all(np.isfinite(x)):
        return None
    # Scaled by the largest magnitude first, so scores near the float limit do not overflow the spread.
    top = np.max(np.abs(x))
    if top == 0:
        return None
    x = x / top
    sd = x.std()
    if sd <= 1e-12 * max(1.0, float(np.max(np.abs(x)))):
        return None
    return (x - x.mean()) / sd


def fuse(signals: Mapping[str, np.ndarray | None], weights: Mapping[str, float], n: int) -> np.ndarray:
    """Sum of ``weights[s]`` x z-scored ``signals[s]``; absent or flat signals and zero weights add 0."""
    out = np.zeros(n)
    for name, w in weights.items():
        if w == 0:
            continue
        z = standardise(signals.get(name))
        if z is not None:
            out += w * z
    return out


@dataclass(frozen=True)
class LabelledList:
    """One calibration list: each signal's raw values (None where the list has none) and graded labels."""

    signals: Mapping[str, np.ndarray | None]
    labels: np.ndarray
    source: str = ""


def _design(lists: Sequence[LabelledList], names: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per list, the (n, k) matrix of z-scored signals (0 where absent) and the target distribution."""
    out = []
    for lst in lists:
        lab = np.asarray(lst.labels, dtype=np.float64)
        if lab.sum() <= 0 or np.all(lab == lab[0]):
            continue  # a list with no relevant, or only relevant, passages says nothing about order
        x = np.zeros((len(lab), len(names)))
        for j, name in enumerate(names):
            z = standardise(lst.signals.get(name))
            if z is not None:
                x[:, j] = z
        out.append((x, lab / lab.sum()))
    return out


def _loss_grad(
    w: np.ndarray, design: Sequence[tuple[np.ndarray, np.ndarray]], l2: float
) -> tuple[float, np.ndarray]:
    loss, grad = 0.0, np.zeros_like(w)
    for x, target in design:
        s = x @ w
        s = s - s.max()
        p = np.exp(s)
        p /= p.sum()
        loss -= float(target @ np.log(np.maximum(p, 1e-300)))
        grad += x.T @ (p - target)
    n = max(len(design), 1)
    return loss / n + l2 * float(w @ w), grad / n + 2 * l2 * w


def fit_linear(design: Sequence[tuple[np.ndarray, np.ndarray]], k: int, l2: float = L2) -> np.ndarray:
    """The weights minimising the listwise softmax loss (+ L2) over ``design`` (see :func:`_design`)."""
    from scipy.optimize import minimize

    if not design or k == 0:
        return np.zeros(k)
    res = minimize(_loss_grad, np.zeros(k), args=(design, l2), jac=True, method="L-BFGS-B")
    return np.asarray(res.x, dtype=np.float64)


@dataclass(frozen=True)
class FusionWeights:
    """Fitted fusion weights, as stored in a curve JSON's ``fusion`` block.

    Attributes:
        weights: Signal name -> weight (0 for a signal that was dropped).
        ci: Signal name -> 95% bootstrap interval of its weight in the fit with every signal.
        meta: What the weights were fitted on (data, list counts, method).
    """

    weights: dict[str, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    #: The adaptive second-order rule (:func:`fit_second_order`), or None where none was fitted.
    second_order: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FUSION_FORMAT,
            "weights": {k: round(float(v), 6) for k, v in self.weights.items()},
            "ci95": {k: [round(float(a), 6), round(float(b), 6)] for k, (a, b) in self.ci.items()},
            "meta": self.meta,
            **({"second_order": self.second_order} if self.second_order is not None else {}),
        }

    @classmethod
    def from_json(cls, d: Any, where: str = "fusion") -> FusionWeights:
        """Parse a ``fusion`` block.

        Raises:
            ValueError: Not an object, an unknown format, or weights that are not finite numbers for
                known signals (the message names the field).
        """
        if not isinstance(d, dict):
            raise ValueError(f"{where}: must be an object, got {type(d).__name__}")
        if d.get("format") != FUSION_FORMAT:
            raise ValueError(f"{where}.format: expected {FUSION_FORMAT}, got {d.get('format')!r}")
        weights = check_weights(d.get("weights"), f"{where}.weights")
        ci = {}
        for k, v in (d.get("ci95") or {}).items():
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int | float) for x in v)):
                raise ValueError(f"{where}.ci95.{k}: must be [low, high]")
            ci[str(k)] = (float(v[0]), float(v[1]))
        meta = d.get("meta", {})
        second = d.get("second_order")
        if second is not None:
            second = check_second_order(second, f"{where}.second_order")
        return cls(weights=weights, ci=ci, meta=meta if isinstance(meta, dict) else {}, second_order=second)


def check_second_order(d: Any, where: str = "second_order") -> dict[str, Any]:
    """A stored second-order rule: ``margin`` (a finite number >= 0) and ``k`` (an int >= 1).

    Raises:
        ValueError: A missing or malformed field (the message names it).
    """
    if not isinstance(d, dict):
        raise ValueError(f"{where}: must be an object, got {type(d).__name__}")
    m, k = d.get("margin"), d.get("k")
    if isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m) or m < 0:
        raise ValueError(f"{where}.margin: must be a finite number >= 0, got {m!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}.k: must be an integer >= 1, got {k!r}")
    return dict(d)


def ranked(scores: np.ndarray) -> list[int]:
    """Indices by descending score, ties by position (the reranker's order)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def cut_margin(fused: np.ndarray, k: int, probe_weight: float) -> float:
    """How far the fused scores are from changing the kept set: the gap between the ``k``-th and the
    ``k+1``-th best, in units of the probe's weight (the part a second probe reading can move). ``inf``
    when every candidate is kept or the probe has no weight."""
    if len(fused) <= k or probe_weight == 0:
        return math.inf
    s = np.sort(np.asarray(fused, dtype=np.float64))[::-1]
    return float((s[k - 1] - s[k]) / abs(probe_weight))


def fit_second_order(
    pairs: Sequence[tuple[Mapping[str, np.ndarray | None], np.ndarray, np.ndarray]],
    weights: Mapping[str, float],
    *,
    k: int = 3,
    agreement: float = 0.95,
) -> dict[str, Any] | None:
    """The adaptive second-order rule: read a window's second prompt order only when the first order's
    fused :func:`cut_margin` is below ``margin``.

    ``pairs``: per list, the cheap signals, the probe's reading from the first order alone and its
    reading from both orders. ``margin`` is the smallest value for which the kept set (the ``k`` best)
    agrees with the two-order reading's in at least ``agreement`` of the lists. None when the probe has
    no weight (it is not read at all) or there are no lists.
    """
    wp = float(weights.get("probe", 0.0))
    if wp == 0 or not pairs:
        return None
    margins, differ = [], []
    for cheap, one, both in pairs:
        n = len(one)
        f1 = fuse({**cheap, "probe": one}, weights, n)
        f2 = fuse({**cheap, "probe": both}, weights, n)
        margins.append(cut_margin(f1, k, wp))
        differ.append(set(ranked(f1)[:k]) != set(ranked(f2)[:k]))
    m = np.asarray(margins)
    d = np.asarray(differ)
    allowed = int(math.floor((1.0 - agreement) * len(m) + 1e-9))
    wrong = np.sort(m[d])[::-1]  # lists the first order alone gets wrong, surest first
    margin = 0.0 if len(wrong) <= allowed else float(np.nextafter(wrong[allowed], math.inf))
    read = m < margin
    return {
        "k": int(k),
        "margin": margin,
        "agreement_target": agreement,
        "lists": len(m),
        "kept_same_first_order_only": round(float(1.0 - d.mean()), 4),
        "kept_same_adaptive": round(float(1.0 - (d & ~read).mean()), 4),
        "second_order_rate": round(float(read.mean()), 4),
    }


def check_weights(weights: Any, where: str = "weights") -> dict[str, float]:
    """``weights`` as a {signal: float} dict.

    Raises:
        ValueError: Not a mapping, an unknown signal (the message lists the known ones), or a weight that
            is not a finite number.
    """
    if not isinstance(weights, Mapping):
        raise ValueError(f"{where}: must be a mapping of signal to weight, got {type(weights).__name__}")
    out = {}
    for k, v in weights.items():
        if k not in SIGNALS:
            raise ValueError(f"{where}: unknown signal {k!r}; choose from: {', '.join(SIGNALS)}")
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{where}.{k}: must be a finite number, got {v!r}")
        out[str(k)] = float(v)
    return out


def fit_fusion(
    lists: Sequence[LabelledList],
    names: Sequence[str] = SIGNALS,
    *,
    n_bootstrap: int = 200,
    seed: int = 0,
    l2: float = L2,
    meta: Mapping[str, Any] | None = None,
) -> FusionWeights:
    """Fit one weight per signal in ``names`` on labelled lists, dropping signals not shown to help.

    Each round fits every remaining signal, bootstraps the lists (``n_bootstrap`` resamples, ``seed``)
    for 95% intervals, drops the signal with the lowest interval bound when that bound is <= 0, and
    repeats; the intervals reported are those of the first round (every signal in the model).

    Raises:
        ValueError: No list has both relevant and non-relevant passages.
    """
    names = [n for n in names if any(standardise(lst.signals.get(n)) is not None for lst in lists)]
    full = _design(lists, list(SIGNALS))
    if not full:
        raise ValueError("no calibration list has both relevant and non-relevant passages")
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, len(full), len(full)) for _ in range(n_bootstrap)]
    keep = list(names)
    first_ci: dict[str, tuple[float, float]] = {}
    rounds = []
    while keep:
        cols = [SIGNALS.index(n) for n in keep]
        design = [(x[:, cols], t) for x, t in full]
        w = fit_linear(design, len(keep), l2)
        boots = np.array([fit_linear([design[i] for i in idx], len(keep), l2) for idx in picks])
        lo, hi = np.percentile(boots, 2.5, axis=0), np.percentile(boots, 97.5, axis=0)
        ci = {n: (float(lo[j]), float(hi[j])) for j, n in enumerate(keep)}
        rounds.append(
            {
                "signals": list(keep),
                "weights": dict(zip(keep, map(float, w), strict=True)),
                "ci95": {n: [round(a, 6), round(b, 6)] for n, (a, b) in ci.items()},
            }
        )
        if not first_ci:
            first_ci = ci
        worst = int(np.argmin(lo))
        if lo[worst] > 0:
            break
        keep.pop(worst)
    weights = {n: 0.0 for n in names}
    if keep:
        weights.update(rounds[-1]["weights"])
    info = {
        "method": f"listwise softmax over z-scored signals, L2 {l2}; signals whose 95% bootstrap "
        f"interval ({n_bootstrap} resamples of the lists) reaches 0 are dropped and the rest refitted",
        "lists": len(full),
        "rounds": rounds,
        **dict(meta or {}),
    }
    return FusionWeights(weights=weights, ci=first_ci, meta=info)


def ndcg_at(scores: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """nDCG@k of one list ranked by ``scores`` (ties by position), exponential gain as in trec_eval's
    graded runs is not used: gain = label, as ``ir_measures`` nDCG does."""
    order = ranked(scores)[:k]
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float(sum(labels[i] * disc[r] for r, i in enumerate(order)))
    ideal = np.sort(np.asarray(labels, dtype=np.float64))[::-1][:k]
    idcg = float((ideal * disc[: len(ideal)]).sum())
    return dcg / idcg if idcg > 0 else 0.0
