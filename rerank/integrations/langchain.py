"""LangChain adapters: a retriever over a :class:`~rerank.pipeline.Pipeline` and a document compressor.

Needs the ``langchain`` extra (``pip install 'attn-rerank[langchain]'``, i.e. ``langchain-core``)::

    from rerank.integrations.langchain import AttnRerankCompressor, AttnRerankRetriever

    retriever = AttnRerankRetriever(pipeline=pipe)          # retrieve -> rerank -> prune
    docs = retriever.invoke("who wrote Hamlet?")            # best first, metadata["relevance_score"]

    compressor = AttnRerankCompressor(pipeline=pipe)        # rerank another retriever's documents
    docs = compressor.compress_documents(other_docs, "who wrote Hamlet?")

Both return new :class:`~langchain_core.documents.Document` objects best first; the documents passed in
are never modified. Every returned document carries the reranker's view of it in its metadata:
``relevance_score`` (the score the ranking is sorted by), ``rank`` (1-based), ``raw_score``,
``calibrated_score``, ``prompt_position`` (0-based slot in the probe prompt) and ``context_position``
(slot in the generator's context chosen by the order policy; None when the policy is not applied).
"""

from __future__ import annotations

import copy
import logging
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForRetrieverRun,
        CallbackManagerForRetrieverRun,
        Callbacks,
    )
    from langchain_core.documents import BaseDocumentCompressor, Document
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables.config import run_in_executor
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rerank.integrations.langchain needs langchain-core, which is not installed; "
        "install the extra with: pip install 'attn-rerank[langchain]'"
    ) from exc

from rerank.config import PipelineConfig
from rerank.pipeline import Pipeline
from rerank.records import Passage, RankedList, ScoredPassage

__all__ = ["AttnRerankCompressor", "AttnRerankRetriever"]

logger = logging.getLogger(__name__)

# One lock per pipeline: async callers run the pipeline on executor threads, and the model's fast
# tokenizer refuses concurrent use ("Already borrowed"); the CPU probe is compute-bound anyway, so
# serialising costs nothing.
_LOCKS: weakref.WeakKeyDictionary[Pipeline, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _pipeline_lock(pipeline: Pipeline) -> threading.Lock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(pipeline)
        if lock is None:
            lock = _LOCKS[pipeline] = threading.Lock()
        return lock


def _choose(
    pipeline: Pipeline, ranked: RankedList, use_policy: bool
) -> list[tuple[ScoredPassage, int | None]]:
    """The kept items, best first, each with its slot in the generator's context (None without policy)."""
    if not use_policy:
        return [(it, None) for it in ranked.items]
    context = pipeline.select(ranked)
    return sorted(((it, pos) for pos, it in enumerate(context)), key=lambda pair: pair[0].rank)


def _scores(item: ScoredPassage, context_position: int | None) -> dict[str, Any]:
    return {
        "relevance_score": item.score,
        "rank": item.rank,
        "raw_score": item.raw_score,
        "calibrated_score": item.calibrated_score,
        "prompt_position": item.prompt_position,
        "context_position": context_position,
    }


def _in_order(
    chosen: list[tuple[ScoredPassage, int | None]], context_order: bool
) -> list[tuple[ScoredPassage, int | None]]:
    if context_order and all(pos is not None for _, pos in chosen):
        return sorted(chosen, key=lambda pair: pair[1])
    return chosen


class AttnRerankRetriever(BaseRetriever):
    """Retrieve with the pipeline's index, rerank by calibrated attention, prune by the config's policy.

    Attributes:
        pipeline: A pipeline with an index (``Pipeline.from_config(cfg, index_dir=...)`` or
            ``pipeline.index(passages)``).
        k: First-stage candidates to rerank; None = ``retriever.top_k`` of the pipeline's config.
        use_policy: Apply the config's prune (and order) policy; False returns every candidate.
        context_order: Return documents in the order the generator would read them (the order policy)
            instead of best first.

    Example:
        >>> retriever = AttnRerankRetriever(pipeline=pipe)  # doctest: +SKIP
        >>> docs = retriever.invoke("who wrote Hamlet?")  # doctest: +SKIP
        >>> docs[0].metadata["relevance_score"]  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pipeline: Pipeline
    k: int | None = Field(default=None, ge=1)
    use_policy: bool = True
    context_order: bool = False

    @classmethod
    def from_config(
        cls, config: str | Path | PipelineConfig, *, index_dir: str | Path, **kwargs: Any
    ) -> AttnRerankRetriever:
        """Build the pipeline from a YAML path (or config) and a saved index directory.

        Args:
            config: Path of a pipeline YAML, or a :class:`~rerank.config.PipelineConfig`.
            index_dir: An index directory written by ``attn-rerank index build`` or ``save_retriever``.
            **kwargs: Other fields of the retriever (``k``, ``use_policy``, ``context_order``).
        """
        return cls(pipeline=Pipeline.from_config(config, index_dir=index_dir), **kwargs)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        pipe = self.pipeline
        with _pipeline_lock(pipe):
            hits = pipe.retrieve(query, self.k)
            ranked = pipe.rerank(query, hits)
            chosen = _choose(pipe, ranked, self.use_policy)
        docs = []
        for item, pos in _in_order(chosen, self.context_order):
            p = item.passage
            meta = {
                **copy.deepcopy(p.metadata),
                "id": p.id,
                "title": p.title,
                "first_stage_score": item.first_stage_score,
                **_scores(item, pos),
            }
            docs.append(Document(page_content=p.text, metadata=meta, id=p.id))
        return docs

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        # The probe is a blocking forward pass: run it on an executor thread, off the event loop.
        return await run_in_executor(
            None, self._get_relevant_documents, query, run_manager=run_manager.get_sync()
        )


class AttnRerankCompressor(BaseDocumentCompressor):
    """Rerank (and prune) the documents of any retriever by calibrated attention.

    Documents are probed in the order given (the first-stage order, best first). The result holds
    copies of the kept documents, best first, with the reranker's scores added to their metadata
    (``relevance_score``, ``rank``, ``raw_score``, ``calibrated_score``, ``prompt_position``,
    ``context_position``); the documents passed in are never modified. Documents with blank
    ``page_content`` carry nothing to rank and are dropped.

    Attributes:
        pipeline: The pipeline whose reranker and policies are used (no index needed).
        top_n: Keep at most this many after the policy; None = no extra cap.
        use_policy: Apply the config's prune (and order) policy; False keeps every document.
        context_order: Return documents in the order the generator would read them instead of best first.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pipeline: Pipeline
    top_n: int | None = Field(default=None, ge=1)
    use_policy: bool = True
    context_order: bool = False

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Rerank ``documents`` for ``query`` and return copies of the kept ones.

        Args:
            documents: Candidates, best first by the first stage.
            query: The query.
            callbacks: Unused (accepted for the LangChain interface).

        Returns:
            New documents, best first (or in context order), with the scores in their metadata.

        Raises:
            TypeError: An element of ``documents`` is not a LangChain ``Document``.
            ValueError: The query is empty.
        """
        docs = list(documents)
        passages: list[Passage] = []
        for i, d in enumerate(docs):
            if not isinstance(d, Document):
                raise TypeError(f"documents[{i}] is a {type(d).__name__}, not a langchain Document")
            if not d.page_content.strip():
                logger.debug("dropping documents[%d]: blank page_content", i)
                continue
            title = d.metadata.get("title")
            # The position in ``documents`` is the passage id: ids from metadata may be missing or
            # repeated (e.g. an ensemble of retrievers), and the reranker needs unique ids.
            passages.append(
                Passage(id=str(i), text=d.page_content, title=title if isinstance(title, str) else "")
            )
        if not passages:
            return []
        pipe = self.pipeline
        with _pipeline_lock(pipe):
            ranked = pipe.rerank(query, passages)
            chosen = _choose(pipe, ranked, self.use_policy)
        if self.top_n is not None:
            chosen = chosen[: self.top_n]
        out = []
        for item, pos in _in_order(chosen, self.context_order):
            src = docs[int(item.passage.id)]
            meta = {**copy.deepcopy(src.metadata), **_scores(item, pos)}
            out.append(src.model_copy(update={"metadata": meta}))
        return out

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents`, run on an executor thread (the probe blocks)."""
        return await run_in_executor(None, self.compress_documents, documents, query, callbacks)
