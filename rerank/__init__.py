"""attn-rerank: training-free reranking for RAG from one LLM prefill.

    from rerank import Pipeline, Passage

    pipe = Pipeline.from_config("default", generator=None)
    ranked = pipe.rerank("Who wrote Hamlet?", ["Hamlet is a tragedy by Shakespeare.", "Paris is in France."])

The names below are the public surface; they load on first use, so ``import rerank`` imports neither
torch nor transformers. Everything else (``rerank.engines``, ``rerank.probe``, ``rerank.cli``) is internal
and may change between releases.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "Pipeline": "rerank.pipeline",
    "Passage": "rerank.records",
    "Query": "rerank.records",
    "Hit": "rerank.records",
    "ScoredPassage": "rerank.records",
    "RankedList": "rerank.records",
    "Answer": "rerank.records",
    "PipelineConfig": "rerank.config",
    "load_config": "rerank.config",
    "build_reranker": "rerank.engines",
    "load_model": "rerank.probe.model",
    "BiasCurve": "calibration.curve",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'rerank' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
