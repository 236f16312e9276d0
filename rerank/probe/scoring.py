"""From captured attention to one score per passage.

Works on small arrays only: per layer, per head, per passage sums of attention, so any layer range,
head subset and aggregation can be re-scored without another forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCORE_KINDS = ("raw", "nacal", "logratio", "ratio")


@dataclass(frozen=True)
class PassageStats:
    """Attention mass per (layer, head, passage) for the query and the content-free (N/A) pass.

    Attributes:
        layers: The model layer index of each row.
        query: (layers, heads, passages) sum over the passage's tokens of the query tokens' mean attention.
        na: The same for the ``N/A`` query, or None when no content-free pass was run.
        lengths: Tokens per passage block.
        query_tok: Optional (layers, tokens) token-level scores for the ICR token filter.
        na_tok: The same for ``N/A``.
        spans: Token spans, needed with the token-level scores.
    """

    layers: tuple[int, ...]
    query: np.ndarray
    na: np.ndarray | None
    lengths: np.ndarray
    query_tok: np.ndarray | None = None
    na_tok: np.ndarray | None = None
    spans: tuple[tuple[int, int], ...] | None = None

    @property
    def num_passages(self) -> int:
        return int(self.query.shape[-1])


def _layer_index(stats: PassageStats, layers: tuple[int, int] | None) -> list[int]:
    if layers is None:
        return list(range(len(stats.layers)))
    idx = [i for i, layer in enumerate(stats.layers) if layers[0] <= layer <= layers[1]]
    if not idx:
        raise ValueError(
            f"layers {list(layers)} were not probed (probed: {stats.layers[0]}..{stats.layers[-1]})"
        )
    return idx


def passage_scores(
    stats: PassageStats,
    *,
    kind: str = "raw",
    layers: tuple[int, int] | None = None,
    heads: Sequence[int] | None = None,
    aggregation: str = "mean",
    head_set: Sequence[tuple[int, int]] | None = None,
    top_m: int = 16,
) -> np.ndarray:
    """Score each passage (prompt order).

    Args:
        kind: ``raw`` (query attention), ``nacal`` (query minus ``N/A`` attention, token by token) or
            ``logratio`` (per head, log of query over ``N/A`` attention to the passage, standardised
            across the passages, averaged over heads: a multiplicative content-free correction in
            which every selected head votes with equal weight) or ``ratio`` (log of the query's
            attention to the passage over the ``N/A`` query's, each summed over the selected layers
            and heads first: the same correction pooled, so heads weigh by their attention mass).
        layers: Inclusive layer range to sum; None = every probed layer.
        heads: Heads to sum; None = all.
        head_set: Explicit ``(layer, head)`` pairs; overrides ``layers`` and ``heads``.
        aggregation: ``sum`` over the block's tokens, ``mean`` per token (long passages are not favoured),
            ``icr``: drop tokens scoring below mean - 2 std over all passage tokens, then sum, or ``topm``:
            only the ``top_m`` tokens of each block that draw the most query attention (every passage is
            read through the same number of tokens, whatever its length). ``ratio`` scores are the same
            for ``sum`` and ``mean`` (the block's length divides both sides of the ratio); ``topm``
            takes the ratio over the chosen tokens.
        top_m: Tokens per passage that ``topm`` keeps.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind '{kind}'; choose one of: {', '.join(SCORE_KINDS)}")
    if kind != "raw" and stats.na is None:
        raise ValueError("N/A-calibrated scores need the content-free pass (probe with content_free=True)")
    if aggregation == "topm":
        if head_set is not None or kind == "logratio":
            raise ValueError("the topm aggregation reads token scores: not with head_set or logratio scores")
        return _top_m_scores(stats, kind, _layer_index(stats, layers), top_m)
    if head_set is not None:
        return _head_set_scores(stats, kind, head_set)
    li = _layer_index(stats, layers)
    if kind == "logratio":
        hs = range(stats.query.shape[1]) if heads is None else heads
        return _head_set_scores(stats, kind, [(stats.layers[i], h) for i in li for h in hs])
    if kind == "ratio":
        hs = slice(None) if heads is None else list(heads)
        return _log_ratio(stats.query[li][:, hs].sum(axis=(0, 1)), stats.na[li][:, hs].sum(axis=(0, 1)))
    if aggregation == "icr":
        return _icr_scores(stats, kind, li)
    if aggregation not in ("sum", "mean"):
        raise ValueError(f"unknown aggregation '{aggregation}'; choose one of: icr, mean, sum")
    hs = slice(None) if heads is None else list(heads)
    s = stats.query[li][:, hs].sum(axis=(0, 1))
    if kind == "nacal":
        s = s - stats.na[li][:, hs].sum(axis=(0, 1))
    if aggregation == "mean":
        s = s / np.maximum(stats.lengths, 1)
    return s.astype(np.float64)


def _log_ratio(query: np.ndarray, na: np.ndarray) -> np.ndarray:
    # The passage's length and the share of attention its slot draws whatever the query cancel out.
    return np.log(query.astype(np.float64) + 1e-9) - np.log(na.astype(np.float64) + 1e-9)


def _head_set_scores(stats: PassageStats, kind: str, head_set: Sequence[tuple[int, int]]) -> np.ndarray:
    pos = {layer: i for i, layer in enumerate(stats.layers)}
    missing = sorted({layer for layer, _ in head_set if layer not in pos})
    if missing:
        raise ValueError(f"head_set names layers {missing} that were not probed")
    q = np.stack([stats.query[pos[layer], h] for layer, h in head_set])  # (heads, P)
    if kind == "ratio":
        return _log_ratio(
            q.sum(axis=0), np.stack([stats.na[pos[layer], h] for layer, h in head_set]).sum(axis=0)
        )
    if kind == "logratio":
        # log q - log na: the passage's length cancels, and so does the share of attention its slot
        # draws whatever the query (the N/A pass sees the same slots).
        na = np.stack([stats.na[pos[layer], h] for layer, h in head_set])
        per_head = np.log(q + 1e-9) - np.log(na + 1e-9)
        return np.mean([zscore(r) for r in per_head], axis=0)
    s = q.sum(axis=0)
    if kind == "nacal":
        s = s - np.stack([stats.na[pos[layer], h] for layer, h in head_set]).sum(axis=0)
    return (s / np.maximum(stats.lengths, 1)).astype(np.float64)


def _icr_scores(stats: PassageStats, kind: str, li: list[int]) -> np.ndarray:
    if stats.query_tok is None or stats.spans is None:
        raise ValueError("the icr aggregation needs token-level scores; probe with keep_tokens=True")
    tok = stats.query_tok[li].sum(axis=0)
    if kind == "nacal":
        tok = tok - stats.na_tok[li].sum(axis=0)
    body = np.concatenate([tok[s:e] for s, e in stats.spans])
    cut = body.mean() - 2 * body.std()
    return np.array([float(np.where(tok[s:e] >= cut, tok[s:e], 0.0).sum()) for s, e in stats.spans])


def _top_m_scores(stats: PassageStats, kind: str, li: list[int], m: int) -> np.ndarray:
    # Token scores are the probe's: summed over the heads it reads (AttentionProbe's heads).
    if stats.query_tok is None or stats.spans is None or (kind != "raw" and stats.na_tok is None):
        raise ValueError("the topm aggregation needs token-level scores from the probe")
    q = stats.query_tok[li].sum(axis=0).astype(np.float64)
    na = stats.na_tok[li].sum(axis=0).astype(np.float64) if kind != "raw" else None
    out = []
    for s, e in stats.spans:
        keep = s + np.argsort(-q[s:e], kind="stable")[: max(m, 1)]
        if kind == "raw":
            out.append(q[keep].mean())
        elif kind == "nacal":
            out.append((q[keep] - na[keep]).mean())
        else:  # ratio
            out.append(float(_log_ratio(q[keep].sum(), na[keep].sum())))
    return np.array(out, dtype=np.float64)


def zscore(x: np.ndarray) -> np.ndarray:
    """Standardise; a constant vector maps to zeros."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
