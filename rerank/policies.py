"""Order and prune policies: how a ranked list becomes the context the generator reads.

A :class:`~rerank.records.RankedList` holds passages best first by calibrated ``score``. A *prune*
policy decides which of them reach the generator; an *order* policy decides where each one sits in the
prompt. Both are pure functions registered by name (``PolicyConfig.prune`` / ``PolicyConfig.order``);
they never mutate their inputs and return new lists of the same (frozen) records.

Ranks and ties, shared by every policy: an item's rank is its position in a *stable* sort by ``score``,
descending. Among equal scores the item that comes earlier in the input therefore ranks higher (a
``RankedList`` is already best first, so its order is kept). Every policy places items by that rank,
so all outputs are deterministic.

The ``iterative`` order (attention sorting repeated with fresh probes) needs the model and lives in the
pipeline, not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from rerank.config import PolicyConfig
from rerank.records import RankedList, ScoredPassage
from retrievers.registry import Registry

__all__ = [
    "ORDER_POLICIES",
    "PRUNE_POLICIES",
    "OrderPolicy",
    "PrunePolicy",
    "apply_policy",
]


class OrderPolicy(Protocol):
    """Returns ``items`` in prompt order: element 0 is read first, the last one sits next to the question."""

    def __call__(
        self, items: Sequence[ScoredPassage], *, bias: Sequence[float] | None = None
    ) -> list[ScoredPassage]: ...


class PrunePolicy(Protocol):
    """Returns the kept items best first; never fewer than ``min(cfg.min_keep, len(items))``."""

    def __call__(
        self, items: Sequence[ScoredPassage], cfg: PolicyConfig, *, token_counts: Sequence[int] | None = None
    ) -> list[ScoredPassage]: ...


ORDER_POLICIES: Registry[OrderPolicy] = Registry("order policy")
PRUNE_POLICIES: Registry[PrunePolicy] = Registry("prune policy")


def _rank_order(items: Sequence[ScoredPassage]) -> list[int]:
    """Indices of ``items`` best first: stable sort by ``score`` descending (ties keep input order).

    Raises:
        ValueError: A score is NaN (it would make the sort order arbitrary).
    """
    for it in items:
        if math.isnan(it.score):
            raise ValueError(f"passage '{it.passage.id}' has a NaN score; policies need comparable scores")
    # sorted(..., reverse=True) stays stable: equal keys keep their input order.
    return sorted(range(len(items)), key=lambda i: items[i].score, reverse=True)


def _ranked(items: Sequence[ScoredPassage]) -> list[ScoredPassage]:
    return [items[i] for i in _rank_order(items)]


def _floor(kept: int, n: int, cfg: PolicyConfig) -> int:
    """Number of items to keep once the ``min_keep`` floor is applied."""
    return max(kept, min(cfg.min_keep, n))


# --------------------------------------------------------------------------------------------------
# Order policies
# --------------------------------------------------------------------------------------------------


@ORDER_POLICIES.register("retriever")
def order_retriever(
    items: Sequence[ScoredPassage], *, bias: Sequence[float] | None = None
) -> list[ScoredPassage]:
    """The first-stage order, the control that ignores the reranker.

    Items are sorted by ``first_stage_score`` descending (stable: ties keep input order). Items without a
    first-stage score go after all scored ones, in input order; when none has one the input order is
    returned unchanged.

    Args:
        items: The passages to place.
        bias: Ignored.

    Returns:
        A new list in prompt order.
    """
    with_score = [it for it in items if it.first_stage_score is not None]
    without = [it for it in items if it.first_stage_score is None]
    with_score.sort(key=lambda it: it.first_stage_score, reverse=True)
    return with_score + without


@ORDER_POLICIES.register("score")
def order_score(
    items: Sequence[ScoredPassage], *, bias: Sequence[float] | None = None
) -> list[ScoredPassage]:
    """Best first (rank 1 at the start of the context).

    Args:
        items: The passages to place.
        bias: Ignored.

    Returns:
        A new list in prompt order.
    """
    return _ranked(items)


@ORDER_POLICIES.register("best_last")
def order_best_last(
    items: Sequence[ScoredPassage], *, bias: Sequence[float] | None = None
) -> list[ScoredPassage]:
    """Best last, next to the question (Attention Sorting): the exact reverse of ``score``.

    Being the reverse of the rank order, tied items appear in *reverse* input order: the one that ranks
    higher (earlier in the input) sits closer to the question.

    Args:
        items: The passages to place.
        bias: Ignored.

    Returns:
        A new list in prompt order.
    """
    return _ranked(items)[::-1]


@ORDER_POLICIES.register("edges")
def order_edges(
    items: Sequence[ScoredPassage], *, bias: Sequence[float] | None = None
) -> list[ScoredPassage]:
    """Strongest passages at both ends, weakest in the middle (lost-in-the-middle mitigation).

    Convention: rank 1 goes last, rank 2 first, rank 3 second-to-last, rank 4 second, and so on; i.e.
    the prompt is ``[r2, r4, r6, ..., r5, r3, r1]``. For five items: ``[r2, r4, r5, r3, r1]``. Like
    LangChain's ``LongContextReorder`` but driven by the scores, and with rank 1 always at the end,
    next to the question.

    Args:
        items: The passages to place.
        bias: Ignored.

    Returns:
        A new list in prompt order.
    """
    ranked = _ranked(items)
    front = ranked[1::2]  # ranks 2, 4, 6, ... fill the start left to right
    back = ranked[0::2]  # ranks 1, 3, 5, ... fill the end right to left
    return front + back[::-1]


@ORDER_POLICIES.register("bias_aligned")
def order_bias_aligned(
    items: Sequence[ScoredPassage], *, bias: Sequence[float] | None = None
) -> list[ScoredPassage]:
    """Best passages at the slots the model attends to most (AttnRank / Attention Basin).

    ``bias[j]`` is the attention the model pays to prompt slot ``j`` in a list of ``len(items)``
    passages (from a fitted positional curve; higher = more attention). Slots are ranked by bias,
    descending; rank 1 goes to the first slot in that order, rank 2 to the second, etc. Slots with equal
    bias are taken left to right (stable), so a flat bias reproduces the ``score`` order.

    Args:
        items: The passages to place.
        bias: One value per slot, ``len(bias) == len(items)``.

    Returns:
        A new list in prompt order.

    Raises:
        ValueError: ``bias`` is missing, has the wrong length, or holds a NaN.
    """
    n = len(items)
    if bias is None:
        raise ValueError(
            "order policy 'bias_aligned' needs bias: one attention value per prompt slot "
            "(pass the fitted positional curve evaluated for this list length)"
        )
    bias = list(bias)
    if len(bias) != n:
        raise ValueError(
            f"order policy 'bias_aligned': bias has {len(bias)} values but there are {n} passages; "
            f"evaluate the positional curve for a list of {n}"
        )
    if any(math.isnan(b) for b in bias):
        raise ValueError("order policy 'bias_aligned': bias contains NaN")
    slots = sorted(range(n), key=lambda j: bias[j], reverse=True)
    out: list[ScoredPassage | None] = [None] * n
    for slot, item in zip(slots, _ranked(items), strict=True):
        out[slot] = item
    return [it for it in out if it is not None]


# --------------------------------------------------------------------------------------------------
# Prune policies
# --------------------------------------------------------------------------------------------------


@PRUNE_POLICIES.register("none")
def prune_none(
    items: Sequence[ScoredPassage], cfg: PolicyConfig, *, token_counts: Sequence[int] | None = None
) -> list[ScoredPassage]:
    """Keep every item.

    Args:
        items: The candidates.
        cfg: Unused.
        token_counts: Ignored.

    Returns:
        All items, best first.
    """
    return _ranked(items)


@PRUNE_POLICIES.register("top_k")
def prune_top_k(
    items: Sequence[ScoredPassage], cfg: PolicyConfig, *, token_counts: Sequence[int] | None = None
) -> list[ScoredPassage]:
    """Keep the best ``cfg.top_k`` items (at least ``cfg.min_keep``).

    Args:
        items: The candidates.
        cfg: Supplies ``top_k`` and ``min_keep``.
        token_counts: Ignored.

    Returns:
        The kept items, best first.
    """
    ranked = _ranked(items)
    return ranked[: _floor(cfg.top_k, len(ranked), cfg)]


@PRUNE_POLICIES.register("threshold")
def prune_threshold(
    items: Sequence[ScoredPassage], cfg: PolicyConfig, *, token_counts: Sequence[int] | None = None
) -> list[ScoredPassage]:
    """Keep the items with ``score >= cfg.threshold`` (at least ``cfg.min_keep``).

    Args:
        items: The candidates.
        cfg: Supplies ``threshold`` and ``min_keep``.
        token_counts: Ignored.

    Returns:
        The kept items, best first.
    """
    ranked = _ranked(items)
    passing = sum(1 for it in ranked if it.score >= cfg.threshold)
    return ranked[: _floor(passing, len(ranked), cfg)]


@PRUNE_POLICIES.register("mass")
def prune_mass(
    items: Sequence[ScoredPassage], cfg: PolicyConfig, *, token_counts: Sequence[int] | None = None
) -> list[ScoredPassage]:
    """Keep the smallest best-first prefix holding at least ``cfg.mass`` of the total weight.

    Weights are a softmax (temperature 1) over the scores. Calibrated scores are differences (query
    attention minus a bias estimate), so they can be negative and their offset is arbitrary; the softmax
    gives non-negative weights and is invariant to adding a constant to every score, so only the score
    gaps matter. (Shifting by the minimum instead would always give the weakest item zero weight and
    make the cut depend on it.) Temperature 1 suits z-scored scores (``ProbeConfig.window_merge``);
    raw scores on another scale give a sharper or flatter cut.

    Args:
        items: The candidates.
        cfg: Supplies ``mass`` and ``min_keep``.
        token_counts: Ignored.

    Returns:
        The kept items, best first.

    Raises:
        ValueError: A score is infinite or NaN.
    """
    ranked = _ranked(items)
    if not ranked:
        return []
    scores = [it.score for it in ranked]
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(
            "prune policy 'mass' needs finite scores (softmax of an infinite score is undefined)"
        )
    top = scores[0]  # the maximum: subtracting it keeps exp() from overflowing
    weights = [math.exp(s - top) for s in scores]
    target = cfg.mass * math.fsum(weights)
    kept = len(ranked)  # mass = 1.0 keeps everything; fsum of the full prefix equals the total exactly
    for k in range(1, len(ranked) + 1):
        if math.fsum(weights[:k]) >= target:
            kept = k
            break
    return ranked[: _floor(kept, len(ranked), cfg)]


@PRUNE_POLICIES.register("token_budget")
def prune_token_budget(
    items: Sequence[ScoredPassage], cfg: PolicyConfig, *, token_counts: Sequence[int] | None = None
) -> list[ScoredPassage]:
    """Keep the best-first prefix whose token counts sum to at most ``cfg.token_budget``.

    The walk stops at the first item that does not fit: a smaller, weaker item after it is *not* taken
    (no skip-over), so the context is always a prefix of the ranking. The ``min_keep`` floor wins over
    the budget: the best ``min_keep`` items are kept even if they exceed it.

    Args:
        items: The candidates.
        cfg: Supplies ``token_budget`` and ``min_keep``.
        token_counts: Tokens of each item, aligned with ``items`` (input order, not rank order).

    Returns:
        The kept items, best first.

    Raises:
        ValueError: ``token_counts`` is missing, misaligned with ``items`` or holds a negative count.
    """
    if token_counts is None:
        raise ValueError(
            "prune policy 'token_budget' needs token_counts: the token length of each passage, "
            "aligned with the items"
        )
    counts = list(token_counts)
    if len(counts) != len(items):
        raise ValueError(
            f"prune policy 'token_budget': token_counts has {len(counts)} values but there are "
            f"{len(items)} passages; pass one count per passage, in the same order"
        )
    if any(c < 0 for c in counts):
        raise ValueError("prune policy 'token_budget': token_counts must be >= 0")
    order = _rank_order(items)
    used = 0
    kept = 0
    for i in order:
        if used + counts[i] > cfg.token_budget:
            break
        used += counts[i]
        kept += 1
    return [items[i] for i in order[: _floor(kept, len(items), cfg)]]


# --------------------------------------------------------------------------------------------------
# Prune, then order
# --------------------------------------------------------------------------------------------------


def apply_policy(
    ranked: RankedList,
    cfg: PolicyConfig,
    *,
    bias: Sequence[float] | Callable[[int], Sequence[float]] | None = None,
    token_counts: Sequence[int] | None = None,
) -> list[ScoredPassage]:
    """Prune ``ranked`` with ``cfg.prune``, then order what is kept with ``cfg.order``.

    Both policy names are resolved before anything else, so a misspelt name fails even on an empty list.

    Args:
        ranked: The reranked list, best first.
        cfg: Names the policies and holds their parameters.
        bias: For ``bias_aligned``: either a sequence with one value per slot of the *pruned* list, or a
            callable ``bias(n)`` returning that sequence for ``n`` passages (the natural form of a fitted
            positional curve, since the pruned length is only known here). A callable is called once,
            with the pruned length, whenever it is given. Other orders ignore it.
        token_counts: For ``token_budget``: token lengths aligned with ``ranked.items``.

    Returns:
        The passages to show the generator, in prompt order; ``[]`` for an empty list.

    Raises:
        KeyError: An unknown policy name; the message lists the registered ones.
        ValueError: A policy's input is missing or malformed (see the policies).
    """
    prune = PRUNE_POLICIES.get(cfg.prune)
    order = ORDER_POLICIES.get(cfg.order)
    if not ranked.items:
        return []
    kept = prune(ranked.items, cfg, token_counts=token_counts)
    slot_bias = bias(len(kept)) if callable(bias) else bias
    return order(kept, bias=slot_bias)
