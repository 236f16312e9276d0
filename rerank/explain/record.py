"""The explanation of one rerank call, as frozen records: what the page shows and the JSON holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

#: The sentence every page and JSON file starts with.
NOTICE = (
    "Attention is a correlational signal: a passage the query attended to is not proof that an answer "
    "came from it, and a small model's attention is a weak signal. Read the table against the "
    "first-stage ranks and the bias strip."
)

EXPLANATION_FORMAT_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OrderReading(_Frozen):
    """How one prompt read a passage (one per prompt order).

    Attributes:
        order: ``reversed`` (best first-stage passage last) or ``retriever``.
        slot: 0-based slot in that prompt.
        raw: Raw attention score in that prompt.
        uncorrected: The score the bias curve corrects (e.g. the N/A ratio), before the curve.
        calibrated: After the curve (and its per-slot offset).
    """

    order: str
    slot: int
    raw: float
    uncorrected: float
    calibrated: float


class TokenView(_Frozen):
    """A passage's tokens as the prompt held them, with the query's attention to each.

    Attributes:
        tokens: The text of each token of the passage's block (``[n] `` marker included), in order;
            joined they give the block's text.
        raw: Attention the query tokens paid to each token, summed over the scored layers and heads.
        corrected: ``raw`` minus the attention the content-free ``N/A`` query paid to the same token
            (ICR's token-level calibration); equals ``raw`` when the config runs no ``N/A`` pass.
        top: Indices of the tokens with the highest corrected values, best first.
        truncated: Whether the passage was cut to ``probe.passage_max_tokens`` for the prompt.
        dropped_tokens: How many of the passage's tokens the prompt did not hold (counted on at most
            20,000 characters of the cut-away text).
        dropped_text: The text that was cut away (shown greyed after the cut; at most 20,000 characters).
    """

    tokens: tuple[str, ...]
    raw: tuple[float, ...]
    corrected: tuple[float, ...]
    top: tuple[int, ...]
    truncated: bool = False
    dropped_tokens: int = 0
    dropped_text: str = ""


class PassageView(_Frozen):
    """One passage's figures, as the reranker produced them.

    Attributes:
        id, title, text: The passage.
        rank: Final rank (1 = best).
        first_stage_rank: 1-based position in the candidate list as given.
        first_stage_score: The retriever's score, when the candidates carried one.
        raw_score, calibrated_score, score: Exactly the reranker's ``ScoredPassage`` fields (``score`` is
            the fused score the list is ordered by).
        prompt_position: The reranker's reported slot (the first prompt's).
        na_score: The content-free (``N/A``) counterpart of ``raw_score`` (same aggregation, mean over
            orders); None without an ``N/A`` pass.
        window: Index of the prompt window that held it.
        readings: One per prompt order.
        kept: Whether the configured prune policy keeps it for the generator.
        context_position: Its 0-based place in the generator's context when kept.
        rank_change: ``first_stage_rank - rank`` (positive = moved up).
        layer_scores: Per probed layer, what that layer alone scores (same kind as the score).
        layer_share: Per probed layer, its share of the passage's query attention (sums to 1).
        tokens: The token heatmap data.
    """

    id: str
    title: str = ""
    text: str
    rank: int
    first_stage_rank: int
    first_stage_score: float | None
    raw_score: float | None
    calibrated_score: float | None
    score: float
    prompt_position: int | None
    na_score: float | None
    window: int
    readings: tuple[OrderReading, ...]
    kept: bool
    context_position: int | None
    rank_change: int
    layer_scores: tuple[float, ...]
    layer_share: tuple[float, ...]
    tokens: TokenView


class BiasPanel(_Frozen):
    """The positional-bias strip of one prompt order.

    Attributes:
        order: The prompt order.
        length: List length the curve is drawn for (the longest window).
        mean, sd, offset: The curve's per-slot bias, spread and offset for that length (empty
            without a curve).
        mode: The curve's mode (``zscore``, ``subtractive``, ``multiplicative``), or ``none``.
        points: One per passage: ``{"id", "rank", "window", "slot", "uncorrected", "calibrated"}``;
            ``uncorrected`` normalised per window the way the curve normalises before correcting.
    """

    order: str
    length: int
    mode: str
    mean: tuple[float, ...] = ()
    sd: tuple[float, ...] = ()
    offset: tuple[float, ...] = ()
    points: tuple[dict[str, Any], ...] = ()


class Counterfactual(_Frozen):
    """The top passage moved to the other end of its prompt (one extra probe of its window).

    Attributes:
        id: The passage.
        order: The prompt order that was altered.
        slot_before, slot_after: Its slot in the original and in the altered prompt.
        calibrated_before, calibrated_after: Its calibrated score in each.
        raw_before, raw_after: Its raw score in each.
        window_rank_before, window_rank_after: Its rank by calibrated score within the window in each.
    """

    id: str
    order: str
    slot_before: int
    slot_after: int
    calibrated_before: float
    calibrated_after: float
    raw_before: float
    raw_after: float
    window_rank_before: int
    window_rank_after: int


class Explanation(_Frozen):
    """Why each passage of one rerank call landed where it did.

    Build one with :meth:`rerank.pipeline.Pipeline.explain`; write it with :meth:`to_html` (one
    self-contained page) or :meth:`to_json`.

    Attributes:
        format_version: Version of this record's layout.
        notice: The plain sentence the page opens with.
        query: The query text; ``qid`` its id.
        passages: Per passage, in final rank order.
        layers: The probed layer indices (columns of ``layer_scores``).
        layer_kind: What a ``layer_scores`` value is.
        bias: One strip per prompt order.
        counterfactual: Present when asked for.
        facts: Model, dtype, template, token counts, windows, timings, config.
    """

    format_version: int = EXPLANATION_FORMAT_VERSION
    notice: str = NOTICE
    query: str
    qid: str
    passages: tuple[PassageView, ...]
    layers: tuple[int, ...]
    layer_kind: str
    bias: tuple[BiasPanel, ...]
    counterfactual: Counterfactual | None = None
    facts: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The explanation as plain JSON-ready data."""
        return self.model_dump(mode="json")

    def to_json(self, path: str | Path | None = None, *, indent: int | None = None) -> str:
        """The explanation as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def to_html(self, path: str | Path | None = None) -> str:
        """One self-contained HTML page (inline CSS, JS and SVG; nothing fetched); also written to ``path``.

        Passage and query text is only ever inserted as text, never parsed as markup.
        """
        from rerank.explain.render import render_html

        page = render_html(self.to_dict())
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page
