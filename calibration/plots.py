"""The PNG written beside a fitted curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from calibration.curve import BiasCurve, _normalise


def plot_curve(curve: BiasCurve, scored: Sequence[tuple[np.ndarray, int]], path: Path) -> None:
    """PNG of raw vs corrected mean distractor score by slot, with the fitted band (20-passage lists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(curve.lengths)
    rows = [s for s, _ in scored if len(s) == n]
    golds = [g for s, g in scored if len(s) == n]

    def per_slot(vals: list[np.ndarray]) -> np.ndarray:
        mat = np.vstack(vals)
        mask = np.ones_like(mat, dtype=bool)
        for i, g in enumerate(golds):
            mask[i, g] = False
        return np.array([mat[mask[:, j], j].mean() for j in range(n)])


    raw = per_slot([_normalise(s, curve.mode) for s in rows])
    cor = per_slot([curve.apply(s) for s in rows])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(1, n + 1)
    ax[0].plot(x, raw, "o-", label="measured (distractors)")
    ax[0].plot(x, curve.mean[n], "-", label="fitted bias b(slot)")
    if n in curve.lower:
        ax[0].fill_between(x, curve.lower[n], curve.upper[n], alpha=0.3, label="95% band")
    kind = {"raw": "raw attention"}.get(
        curve.meta.get("score_kind", "raw"), f"{curve.meta.get('score_kind')} score"
    )
    ax[0].set_title(f"{kind} by slot ({curve.mode})")
    ax[0].set_xlabel("prompt slot (1 = first)")
    ax[0].legend(fontsize=7)
    ax[1].plot(x, cor, "o-", color="C2", label="distractors, corrected")
    if curve.offset:
        ax[1].plot(x, curve.offsets(n), "--", color="C3", label="per-slot offsets (included)")
        ax[1].legend(fontsize=7)
    ax[1].set_title("after correction")
    ax[1].set_xlabel("prompt slot (1 = first)")
    meta = curve.meta
    title = f"{meta.get('model_id', '')} {meta.get('dtype', '')} layers {meta.get('layers')}"
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


