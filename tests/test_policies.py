"""Exact-order tests for the order and prune policies in :mod:`rerank.policies`."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rerank.config import PolicyConfig
from rerank.policies import ORDER_POLICIES, PRUNE_POLICIES, apply_policy
from rerank.records import Passage, Query, RankedList, ScoredPassage

ORDER_NAMES = ["best_last", "bias_aligned", "edges", "retriever", "score"]
PRUNE_NAMES = ["mass", "none", "threshold", "token_budget", "top_k"]


def sp(pid: str, score: float, first_stage: float | None = None, rank: int = 1) -> ScoredPassage:
    return ScoredPassage(
        passage=Passage(id=pid, text=f"text of {pid}"), score=score, rank=rank, first_stage_score=first_stage
    )


def items(**scores: float) -> list[ScoredPassage]:
    """Passages named by the keywords, in keyword order, with the given scores."""
    return [sp(pid, s, rank=i + 1) for i, (pid, s) in enumerate(scores.items())]


def ids(xs: list[ScoredPassage]) -> list[str]:
    return [x.passage.id for x in xs]


def ranked(xs: list[ScoredPassage]) -> RankedList:
    return RankedList(query=Query(text="who?"), items=tuple(xs))


def call_order(name: str, xs: list[ScoredPassage]) -> list[ScoredPassage]:
    bias = [float(j) for j in range(len(xs))] if name == "bias_aligned" else None
    return ORDER_POLICIES.get(name)(xs, bias=bias)


def call_prune(name: str, xs: list[ScoredPassage], cfg: PolicyConfig) -> list[ScoredPassage]:
    counts = [10] * len(xs) if name == "token_budget" else None
    return PRUNE_POLICIES.get(name)(xs, cfg, token_counts=counts)


# ---------------------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------------------


def test_registries_hold_exactly_the_documented_policies() -> None:
    assert ORDER_POLICIES.names() == ORDER_NAMES
    assert PRUNE_POLICIES.names() == PRUNE_NAMES
    assert "iterative" not in ORDER_POLICIES  # lives in the pipeline


def test_unknown_order_name_lists_every_choice() -> None:
    with pytest.raises(KeyError) as exc:
        ORDER_POLICIES.get("middle")
    assert (
        "unknown order policy 'middle'; choose one of: best_last, bias_aligned, edges, retriever, score"
        in str(exc.value)
    )


def test_unknown_prune_name_lists_every_choice() -> None:
    with pytest.raises(KeyError) as exc:
        PRUNE_POLICIES.get("topk")
    assert "unknown prune policy 'topk'; choose one of: mass, none, threshold, token_budget, top_k" in str(
        exc.value
    )


@pytest.mark.parametrize("field,kind", [("order", "order policy"), ("prune", "prune policy")])
def test_apply_policy_rejects_unknown_names_even_on_empty_input(field: str, kind: str) -> None:
    cfg = PolicyConfig(**{field: "bogus"})
    with pytest.raises(KeyError, match=f"unknown {kind} 'bogus'; choose one of: "):
        apply_policy(ranked([]), cfg)


# ---------------------------------------------------------------------------------------------------
# Order policies
# ---------------------------------------------------------------------------------------------------


def test_score_is_best_first_with_ties_in_input_order() -> None:
    xs = items(a=3.0, b=5.0, c=3.0, d=-1.0, e=3.0)
    assert ids(ORDER_POLICIES.get("score")(xs)) == ["b", "a", "c", "e", "d"]


def test_best_last_is_the_reverse_of_score() -> None:
    xs = items(a=3.0, b=5.0, c=3.0, d=-1.0)
    # ranks: b, a, c, d (a before c: tie kept in input order) -> reversed, so a sits nearer the question
    assert ids(ORDER_POLICIES.get("best_last")(xs)) == ["d", "c", "a", "b"]


@pytest.mark.parametrize(
    "n,expected",
    [
        (1, ["r1"]),
        (2, ["r2", "r1"]),
        (3, ["r2", "r3", "r1"]),
        (4, ["r2", "r4", "r3", "r1"]),
        (5, ["r2", "r4", "r5", "r3", "r1"]),
        (6, ["r2", "r4", "r6", "r5", "r3", "r1"]),
    ],
)
def test_edges_convention(n: int, expected: list[str]) -> None:
    # input deliberately worst first, so the policy must rank by score
    xs = [sp(f"r{r}", float(-r)) for r in range(n, 0, -1)]
    assert ids(ORDER_POLICIES.get("edges")(xs)) == expected


def test_edges_breaks_ties_by_input_order() -> None:
    xs = items(a=1.0, b=1.0, c=1.0)  # ranks a, b, c
    assert ids(ORDER_POLICIES.get("edges")(xs)) == ["b", "c", "a"]


def test_retriever_sorts_by_first_stage_score() -> None:
    xs = [sp("a", 9.0, first_stage=1.0), sp("b", 0.0, first_stage=7.0), sp("c", 5.0, first_stage=3.0)]
    assert ids(ORDER_POLICIES.get("retriever")(xs)) == ["b", "c", "a"]


def test_retriever_puts_missing_first_stage_scores_last_in_input_order() -> None:
    xs = [sp("a", 9.0), sp("b", 0.0, first_stage=2.0), sp("c", 5.0), sp("d", 1.0, first_stage=2.0)]
    assert ids(ORDER_POLICIES.get("retriever")(xs)) == ["b", "d", "a", "c"]


def test_retriever_keeps_input_order_without_first_stage_scores() -> None:
    xs = items(a=1.0, b=9.0, c=5.0)
    assert ids(ORDER_POLICIES.get("retriever")(xs)) == ["a", "b", "c"]


def test_bias_aligned_puts_best_at_highest_bias_slot() -> None:
    xs = items(c=1.0, a=3.0, b=2.0)  # ranks a, b, c
    # slots by bias: 2 (0.9), 0 (0.5), 1 (0.1) -> a in slot 2, b in slot 0, c in slot 1
    assert ids(ORDER_POLICIES.get("bias_aligned")(xs, bias=[0.5, 0.1, 0.9])) == ["b", "c", "a"]


def test_bias_aligned_rising_bias_equals_best_last() -> None:
    xs = items(a=3.0, b=5.0, c=3.0, d=-1.0)
    got = ORDER_POLICIES.get("bias_aligned")(xs, bias=[0.1, 0.2, 0.3, 0.4])
    assert ids(got) == ids(ORDER_POLICIES.get("best_last")(xs)) == ["d", "c", "a", "b"]


def test_bias_aligned_equal_bias_slots_fill_left_to_right() -> None:
    xs = items(a=3.0, b=2.0, c=1.0)
    assert ids(ORDER_POLICIES.get("bias_aligned")(xs, bias=[1.0, 1.0, 0.0])) == ["a", "b", "c"]
    assert ids(ORDER_POLICIES.get("bias_aligned")(xs, bias=[0.0, 1.0, 1.0])) == ["c", "a", "b"]


def test_bias_aligned_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="bias has 2 values but there are 3 passages"):
        ORDER_POLICIES.get("bias_aligned")(items(a=1.0, b=2.0, c=3.0), bias=[0.1, 0.2])


def test_bias_aligned_requires_bias() -> None:
    with pytest.raises(ValueError, match="'bias_aligned' needs bias"):
        ORDER_POLICIES.get("bias_aligned")(items(a=1.0))


def test_bias_aligned_rejects_nan_bias() -> None:
    with pytest.raises(ValueError, match="NaN"):
        ORDER_POLICIES.get("bias_aligned")(items(a=1.0, b=2.0), bias=[0.1, math.nan])


def test_nan_score_is_rejected() -> None:
    with pytest.raises(ValueError, match="passage 'b' has a NaN score"):
        ORDER_POLICIES.get("score")(items(a=1.0, b=math.nan))


# ---------------------------------------------------------------------------------------------------
# Prune policies
# ---------------------------------------------------------------------------------------------------


def test_none_keeps_all_best_first() -> None:
    xs = items(a=1.0, b=3.0, c=2.0)
    assert ids(PRUNE_POLICIES.get("none")(xs, PolicyConfig())) == ["b", "c", "a"]


@pytest.mark.parametrize(
    "top_k,min_keep,expected",
    [(2, 1, ["b", "c"]), (1, 0, ["b"]), (2, 3, ["b", "c", "a"]), (10, 1, ["b", "c", "a", "d"])],
)
def test_top_k(top_k: int, min_keep: int, expected: list[str]) -> None:
    xs = items(a=1.0, b=3.0, c=2.0, d=0.0)
    assert ids(PRUNE_POLICIES.get("top_k")(xs, PolicyConfig(top_k=top_k, min_keep=min_keep))) == expected


@pytest.mark.parametrize(
    "threshold,min_keep,expected",
    [
        (0.0, 1, ["a", "b", "d"]),  # >= is inclusive: d (0.0) stays, c (-1.0) goes
        (0.5, 1, ["a", "b"]),
        (10.0, 1, ["a"]),  # nothing passes: the min_keep floor keeps the best
        (10.0, 0, []),
        (10.0, 9, ["a", "b", "d", "c"]),  # floor capped at len(items)
        (-5.0, 1, ["a", "b", "d", "c"]),
    ],
)
def test_threshold(threshold: float, min_keep: int, expected: list[str]) -> None:
    xs = items(a=2.0, b=0.5, c=-1.0, d=0.0)
    cfg = PolicyConfig(threshold=threshold, min_keep=min_keep)
    assert ids(PRUNE_POLICIES.get("threshold")(xs, cfg)) == expected


# Softmax weights 6 : 3 : 1 (fractions 0.6, 0.9, 1.0 of the total for prefixes of 1, 2, 3).
MASS_SCORES = {"c": 0.0, "a": math.log(6.0), "b": math.log(3.0)}


@pytest.mark.parametrize(
    "mass,min_keep,expected",
    [
        (0.55, 1, ["a"]),
        (0.55, 0, ["a"]),
        (0.65, 1, ["a", "b"]),
        (0.85, 1, ["a", "b"]),
        (0.95, 1, ["a", "b", "c"]),
        (1.0, 1, ["a", "b", "c"]),
        (0.55, 2, ["a", "b"]),  # floor
    ],
)
def test_mass_softmax_prefix(mass: float, min_keep: int, expected: list[str]) -> None:
    cfg = PolicyConfig(mass=mass, min_keep=min_keep)
    assert ids(PRUNE_POLICIES.get("mass")(items(**MASS_SCORES), cfg)) == expected


@pytest.mark.parametrize("shift", [-100.0, -3.0, 50.0])
def test_mass_is_invariant_to_shifting_scores(shift: float) -> None:
    # Negative calibrated scores are normal; only the gaps between scores matter.
    shifted = {k: v + shift for k, v in MASS_SCORES.items()}
    for mass, expected in [(0.55, ["a"]), (0.65, ["a", "b"]), (0.95, ["a", "b", "c"])]:
        got = PRUNE_POLICIES.get("mass")(items(**shifted), PolicyConfig(mass=mass))
        assert ids(got) == expected


def test_mass_with_equal_scores_keeps_the_needed_fraction_in_input_order() -> None:
    xs = items(a=-2.0, b=-2.0, c=-2.0, d=-2.0)  # equal weights, 0.25 each
    assert ids(PRUNE_POLICIES.get("mass")(xs, PolicyConfig(mass=0.6))) == ["a", "b", "c"]


def test_mass_rejects_infinite_scores() -> None:
    with pytest.raises(ValueError, match="finite scores"):
        PRUNE_POLICIES.get("mass")(items(a=math.inf, b=1.0), PolicyConfig())


# Input order a, b, c; rank order b, c, a; token counts are aligned with the input order.
BUDGET_ITEMS = {"a": 1.0, "b": 3.0, "c": 2.0}
BUDGET_COUNTS = [10, 50, 40]


@pytest.mark.parametrize(
    "budget,min_keep,expected",
    [
        (100, 1, ["b", "c", "a"]),
        (90, 1, ["b", "c"]),  # sum <= budget is inclusive
        (89, 1, ["b"]),  # c does not fit; a (10 tokens) would, but no skip-over
        (60, 1, ["b"]),
        (10, 1, ["b"]),  # b alone exceeds the budget: the floor keeps it
        (10, 0, []),
        (10, 2, ["b", "c"]),
    ],
)
def test_token_budget_prefix_without_skip_over(budget: int, min_keep: int, expected: list[str]) -> None:
    cfg = PolicyConfig(token_budget=budget, min_keep=min_keep)
    got = PRUNE_POLICIES.get("token_budget")(items(**BUDGET_ITEMS), cfg, token_counts=BUDGET_COUNTS)
    assert ids(got) == expected


def test_token_budget_requires_counts() -> None:
    with pytest.raises(ValueError, match="'token_budget' needs token_counts"):
        PRUNE_POLICIES.get("token_budget")(items(**BUDGET_ITEMS), PolicyConfig())


def test_token_budget_rejects_misaligned_counts() -> None:
    with pytest.raises(ValueError, match="token_counts has 2 values but there are 3 passages"):
        PRUNE_POLICIES.get("token_budget")(items(**BUDGET_ITEMS), PolicyConfig(), token_counts=[1, 2])


def test_token_budget_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        PRUNE_POLICIES.get("token_budget")(items(**BUDGET_ITEMS), PolicyConfig(), token_counts=[1, -2, 3])


# ---------------------------------------------------------------------------------------------------
# Empty input and immutability
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ORDER_NAMES)
def test_order_on_empty_input(name: str) -> None:
    assert call_order(name, []) == []


@pytest.mark.parametrize("name", PRUNE_NAMES)
def test_prune_on_empty_input(name: str) -> None:
    assert call_prune(name, [], PolicyConfig(min_keep=3)) == []


@pytest.mark.parametrize("order", ORDER_NAMES)
@pytest.mark.parametrize("prune", PRUNE_NAMES)
def test_apply_policy_on_empty_list(order: str, prune: str) -> None:
    assert apply_policy(ranked([]), PolicyConfig(order=order, prune=prune)) == []


@pytest.mark.parametrize("name", ORDER_NAMES)
def test_order_does_not_mutate_input(name: str) -> None:
    xs = [sp("a", 1.0, first_stage=0.0), sp("b", 3.0, first_stage=2.0), sp("c", 2.0, first_stage=1.0)]
    before = [x.model_dump() for x in xs]
    snapshot = list(xs)
    out = call_order(name, xs)
    assert out is not xs
    assert xs == snapshot and [x.model_dump() for x in xs] == before
    assert ids(xs) == ["a", "b", "c"]


@pytest.mark.parametrize("name", PRUNE_NAMES)
def test_prune_does_not_mutate_input(name: str) -> None:
    xs = items(a=1.0, b=3.0, c=2.0)
    before = [x.model_dump() for x in xs]
    out = call_prune(name, xs, PolicyConfig(top_k=2))
    assert out is not xs
    assert ids(xs) == ["a", "b", "c"] and [x.model_dump() for x in xs] == before


# ---------------------------------------------------------------------------------------------------
# apply_policy
# ---------------------------------------------------------------------------------------------------


def test_apply_policy_prunes_then_orders() -> None:
    rl = ranked(items(a=5.0, b=4.0, c=3.0, d=2.0, e=1.0))
    cfg = PolicyConfig(prune="top_k", top_k=3, order="best_last")
    out = apply_policy(rl, cfg)
    assert ids(out) == ["c", "b", "a"]
    assert ids(list(rl.items)) == ["a", "b", "c", "d", "e"]


def test_apply_policy_calls_bias_with_the_pruned_length() -> None:
    seen: list[int] = []

    def curve(n: int) -> list[float]:
        seen.append(n)
        return [0.2, 0.9, 0.5][:n]

    rl = ranked(items(a=5.0, b=4.0, c=3.0, d=2.0, e=1.0))
    out = apply_policy(rl, PolicyConfig(prune="top_k", top_k=3, order="bias_aligned"), bias=curve)
    assert seen == [3]
    assert ids(out) == ["c", "a", "b"]


def test_apply_policy_bias_sequence_must_match_the_pruned_length() -> None:
    rl = ranked(items(a=5.0, b=4.0, c=3.0, d=2.0))
    cfg = PolicyConfig(prune="top_k", top_k=2, order="bias_aligned")
    with pytest.raises(ValueError, match="bias has 4 values but there are 2 passages"):
        apply_policy(rl, cfg, bias=[0.1, 0.2, 0.3, 0.4])
    assert ids(apply_policy(rl, cfg, bias=[0.9, 0.1])) == ["a", "b"]


def test_apply_policy_token_counts_align_with_ranked_items() -> None:
    rl = ranked(items(a=3.0, b=2.0, c=1.0))
    cfg = PolicyConfig(prune="token_budget", token_budget=30, order="score")
    assert ids(apply_policy(rl, cfg, token_counts=[10, 20, 5])) == ["a", "b"]
    assert ids(apply_policy(rl, cfg, token_counts=[10, 25, 5])) == ["a"]


# ---------------------------------------------------------------------------------------------------
# Properties over random lists
# ---------------------------------------------------------------------------------------------------

scores_st = st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0]), max_size=12)


@given(scores=scores_st)
def test_every_order_is_a_permutation(scores: list[float]) -> None:
    xs = [sp(f"p{i}", s, first_stage=-s) for i, s in enumerate(scores)]
    for name in ORDER_NAMES:
        out = call_order(name, xs)
        assert sorted(ids(out)) == sorted(ids(xs)), name


@given(
    scores=scores_st, min_keep=st.integers(0, 5), top_k=st.integers(1, 6), mass=st.sampled_from([0.3, 0.8])
)
def test_every_prune_keeps_a_best_first_prefix_above_the_floor(
    scores: list[float], min_keep: int, top_k: int, mass: float
) -> None:
    xs = [sp(f"p{i}", s) for i, s in enumerate(scores)]
    full = ids(ORDER_POLICIES.get("score")(xs))
    cfg = PolicyConfig(min_keep=min_keep, top_k=top_k, mass=mass, token_budget=25)
    for name in PRUNE_NAMES:
        out = ids(call_prune(name, xs, cfg))
        assert out == full[: len(out)], name
        assert len(out) >= min(min_keep, len(xs)), name
