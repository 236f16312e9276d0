"""Typed, frozen records shared by every stage of the pipeline."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from retrievers.records import Hit, Passage

__all__ = ["Answer", "Hit", "Passage", "Query", "RankedList", "ScoredPassage", "check_text"]


def check_text(value: str, what: str) -> str:
    """``value`` unchanged when it is valid Unicode text, else a ValueError naming ``what``.

    A lone surrogate (``"\\ud800"`` in JSON) is a valid Python string but not valid Unicode: no
    tokenizer or UTF-8 writer accepts it, so it is refused where text enters the package rather than
    deep inside a model call.

    Raises:
        ValueError: ``value`` holds a lone surrogate code point; the message gives its offset.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid Unicode: a lone surrogate U+{ord(value[exc.start]):04X} at character "
            f"{exc.start}"
        ) from None
    return value


class Query(BaseModel):
    """A user query. ``qid`` identifies it in runs and result files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    qid: str = "q0"
    text: str

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query text is empty")
        return check_text(v, "query text")

    @field_validator("qid")
    @classmethod
    def _qid_valid(cls, v: str) -> str:
        return check_text(v, "query id")


class ScoredPassage(BaseModel):
    """A passage with the reranker's view of it.

    Attributes:
        score: The score the list is ordered by (the calibrated score after reranking).
        rank: 1-based rank by ``score``.
        raw_score: Attention the query paid to the passage, before any bias correction.
        calibrated_score: The score after positional-bias correction.
        prompt_position: 0-based slot of the passage in the probe prompt (None when not probed; with
            ``prompt_order: both``, its slot in the first, best-last, prompt).
        first_stage_score: The retriever's score, kept for fusion and for inspection.
        signals: Each fused signal's raw value for this passage (``probe``: the probe's score
            standardised within its window; ``first_stage``, ``bm25``, ``dense``: see
            :mod:`rerank.engines.signals`), before the final score standardises and weights them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    passage: Passage
    score: float
    rank: int = Field(ge=1)
    raw_score: float | None = None
    calibrated_score: float | None = None
    prompt_position: int | None = None
    first_stage_score: float | None = None
    signals: dict[str, float] = Field(default_factory=dict)


class RankedList(BaseModel):
    """The result of ranking passages for one query, best first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    query: Query
    items: tuple[ScoredPassage, ...]
    info: dict[str, Any] = Field(default_factory=dict)

    def top_k(self, k: int) -> RankedList:
        """Return the best ``k`` items as a new list."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        return self.model_copy(update={"items": self.items[:k]})

    @property
    def passages(self) -> list[Passage]:
        return [it.passage for it in self.items]

    @property
    def ids(self) -> list[str]:
        return [it.passage.id for it in self.items]

    def __len__(self) -> int:
        return len(self.items)


class Answer(BaseModel):
    """What :meth:`rerank.pipeline.Pipeline.run` returns for one query.

    ``info["generation"]`` is the generator's report where it gives one: for ``openai`` the server's
    ``prompt_tokens``, ``completion_tokens`` and ``total_tokens``, ``latency_s`` (retries included),
    ``attempts``, ``model`` and ``finish_reason``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    query: Query
    text: str | None
    passages_used: tuple[Passage, ...]
    ranking: RankedList
    timings: dict[str, float] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)

    @property
    def scores(self) -> dict[str, float]:
        return {it.passage.id: it.score for it in self.ranking.items}
