"""Reranking engines, each registered by name in :data:`PROBE_ENGINES`.

``attention``      the attention probe (:mod:`rerank.engines.attention`), the product.
``icr-reference``  In-Context Reranking as published (:mod:`rerank.engines.icr_reference`).
``listwise``       RankGPT-style generation of a ranking (:mod:`rerank.engines.listwise`).
``pointwise``      P(Yes) to a relevance question, one passage per prompt (:mod:`rerank.engines.pointwise`).
``identity``, ``shuffle``  controls that need no model (:mod:`rerank.engines.controls`).

All share :mod:`rerank.engines.base`; importing this package registers every engine (torch is imported
only when an engine runs).
"""

from __future__ import annotations

from typing import Any

from rerank.config import PipelineConfig
from rerank.engines import attention, controls, icr_reference, listwise, pointwise  # noqa: F401 (register)
from rerank.engines.attention import AttentionReranker
from rerank.engines.base import PROBE_ENGINES, Candidate, rerank_many
from rerank.engines.controls import IdentityReranker


def build_reranker(cfg: PipelineConfig, model: Any = None) -> Any:
    """The engine named by ``cfg.probe.engine``, built from ``cfg`` (``model``: a loaded model to share)."""
    engine = PROBE_ENGINES.get(cfg.probe.engine)
    if engine is IdentityReranker:
        return IdentityReranker()
    return engine.from_config(cfg, model)


__all__ = [
    "PROBE_ENGINES",
    "AttentionReranker",
    "Candidate",
    "IdentityReranker",
    "build_reranker",
    "rerank_many",
]
