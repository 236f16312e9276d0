"""Configuration of the first stage (part of the pipeline config, see ``rerank.config``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RetrieverConfig(BaseModel):
    """How candidates are retrieved.

    Attributes:
        name: Registered retriever: ``bm25``, ``dense`` or ``hybrid``.
        bm25_backend: ``bm25s`` (sparse matrices, fast) or ``rank_bm25`` (reference implementation).
        encoder: Sentence-transformers model folder or ``embedded`` for the bundled all-MiniLM-L6-v2.
        encoder_dtype: ``auto`` (bf16 autocast on a CPU with native bf16, AMX or AVX512-BF16, else
            float32), ``float32`` or ``bfloat16``. Under bf16 autocast the weights stay float32 and the
            matmuls run in bf16: 2.4x the passages/s of float32 on an AMX CPU, vectors at cosine >= 0.9999
            to the float32 ones (``python -m eval retrieval``).
        faiss_index: ``flat`` (exact inner product), ``hnsw`` or ``ivf`` (approximate, for large corpora).
        fusion: ``rrf`` (reciprocal-rank fusion) or ``weighted`` (min-max normalised scores).
        rrf_k: The RRF constant; 60 as in Cormack et al. 2009.
        weights: Weights of the BM25 and dense lists in fusion.
        depth: How many hits each component list contributes to fusion.
        top_k: Candidates handed to the reranker.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["bm25", "dense", "hybrid"] = "hybrid"
    bm25_backend: Literal["bm25s", "rank_bm25"] = "bm25s"
    bm25_k1: float = 0.9
    bm25_b: float = 0.4
    encoder: str = "embedded"
    encoder_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    faiss_index: Literal["flat", "hnsw", "ivf"] = "flat"
    batch_size: int = Field(default=64, ge=1)
    fusion: Literal["rrf", "weighted"] = "rrf"
    rrf_k: int = Field(default=60, ge=1)
    weights: tuple[float, float] = (0.5, 0.5)
    depth: int = Field(default=100, ge=1)
    top_k: int = Field(default=20, ge=1)
