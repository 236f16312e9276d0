"""Records of the first stage: the corpus passage and a retrieval hit.

``rerank.records`` re-exports :class:`Passage`, so every stage shares one passage type.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Passage(BaseModel):
    """One candidate passage. Frozen: stages return new objects, never mutate this one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    text: str
    title: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("passage text is empty")
        return v


class Hit(BaseModel):
    """A passage returned by a retriever with its score and 1-based rank."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    passage: Passage
    score: float
    rank: int = Field(ge=1)
    #: The components behind a fused score (``dense``: the encoder's cosine), so a reranker can reuse
    #: them instead of computing them again.
    signals: dict[str, float] = Field(default_factory=dict)
