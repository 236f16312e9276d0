"""The whole flow as one object: retrieve -> probe -> calibrate -> order/prune -> generate.

    pipe = Pipeline.from_config("configs/default.yaml")
    pipe.index(passages)                      # or Pipeline.from_config(..., index_dir="my_index")
    answer = pipe.run("who wrote Hamlet?")    # Answer(text, passages_used, ranking, timings)
    answer = await pipe.arun("who wrote Hamlet?")   # the same from async code

Every stage is chosen by name from its registry; any of them can also be passed in as an object.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rerank.config import PipelineConfig, load_config, with_overrides
from rerank.policies import ORDER_POLICIES, PRUNE_POLICIES, apply_policy
from rerank.records import Answer, Hit, Passage, Query, RankedList, ScoredPassage

if TYPE_CHECKING:
    from rerank.engines import Candidate
    from rerank.explain import Explanation

logger = logging.getLogger(__name__)

# Reentrant: building the reranker loads the model, building the generator reads the reranker.
_LOAD_LOCK = threading.RLock()


class Pipeline:
    """Retrieval, attention reranking, context policy and generation.

    Args:
        config: The pipeline config (defaults: the embedded CPU setup).
        retriever: A retriever object; default built from ``config.retriever`` when :meth:`index` or
            ``index_dir`` provides passages.
        reranker: A probe engine; default built from ``config.probe``/``config.calibration``.
        generator: A generator; default built from ``config.generator``.
        model: A loaded model shared by the reranker and the generator.
    """

    def __init__(
        self,
        config: PipelineConfig | None = None,
        *,
        retriever: Any = None,
        reranker: Any = None,
        generator: Any = None,
        model: Any = None,
    ) -> None:
        self.config = config or PipelineConfig()
        # Resolve names now so a typo fails at construction, not after minutes of work.
        if self.config.policy.order != "iterative":
            ORDER_POLICIES.get(self.config.policy.order)
        PRUNE_POLICIES.get(self.config.policy.prune)
        self.retriever = retriever
        self._model = model
        self._reranker = reranker
        self._generator = generator
        # One model, one user at a time: the probe swaps attention kernels, so async and threaded callers
        # take turns for every local stage; only requests to a served generator overlap.
        self._model_lock = threading.Lock()

    @classmethod
    def from_config(
        cls,
        config: str | Path | PipelineConfig = "default",
        *,
        index_dir: str | Path | None = None,
        **overrides: Any,
    ) -> Pipeline:
        """Build from a config: a shipped name (``"default"``), a YAML path or a config object.

        Args:
            config: Which config; the shipped ``default`` when omitted.
            index_dir: A saved retriever index to load (``attn-rerank index build``).
            **overrides: Sections of the config to change, by name (``retriever``, ``model``, ``probe``,
                ``calibration``, ``policy``, ``generator``), each a dict of fields merged into that
                section; ``generator=None`` stops after reranking. E.g.
                ``Pipeline.from_config("default", generator=None, model={"dtype": "float32"})``.

        Raises:
            ValueError: An unknown section or field, or an invalid value (the message names it).
        """
        cfg = config if isinstance(config, PipelineConfig) else load_config(config)
        if overrides:
            cfg = with_overrides(cfg, overrides)
        retriever = None
        if index_dir is not None:
            from retrievers.index import load_retriever

            retriever = load_retriever(index_dir)
        return cls(cfg, retriever=retriever)

    # -- lazily built stages ---------------------------------------------------------------------
    # Built once, under one process-wide lock: concurrent first calls wait for the first load instead of
    # loading the model again (and importing transformers from several threads at once, which fails).
    @property
    def model(self) -> Any:
        if self._model is None:
            with _LOAD_LOCK:
                if self._model is None:
                    from rerank.probe.model import load_model

                    self._model = load_model(self.config.model)
        return self._model

    @property
    def reranker(self) -> Any:
        if self._reranker is None:
            with _LOAD_LOCK:
                if self._reranker is None:
                    from rerank.engines import PROBE_ENGINES, build_reranker

                    needs_model = getattr(PROBE_ENGINES.get(self.config.probe.engine), "needs_model", True)
                    self._reranker = build_reranker(self.config, self.model if needs_model else None)
        return self._reranker

    @property
    def generator(self) -> Any:
        if self._generator is None:
            with _LOAD_LOCK:
                if self._generator is None:
                    from rerank.generate import build_generator

                    needs_model = self.config.generator.name != "none"
                    self._generator = build_generator(
                        self.config.generator,
                        self.model if needs_model else None,
                        getattr(self.reranker, "template", None),
                        max_passage_tokens=self.config.probe.passage_max_tokens,
                    )
        return self._generator

    # -- stages ----------------------------------------------------------------------------------
    def index(self, passages: Sequence[Passage], show_progress: bool = True) -> Pipeline:
        """Index ``passages`` with the configured retriever (replaces any current index)."""
        from retrievers.index import build_retriever

        self.retriever = build_retriever(self.config.retriever)
        self.retriever.index(list(passages), show_progress=show_progress)
        return self

    def retrieve(self, query: str | Query, k: int | None = None) -> list[Hit]:
        """First-stage candidates, best first."""
        if self.retriever is None:
            raise RuntimeError("no index: call Pipeline.index(passages) or pass index_dir= to from_config")
        text = query.text if isinstance(query, Query) else query
        return self.retriever.search(text, k or self.config.retriever.top_k)

    def rerank(
        self,
        query: str | Query,
        passages: Sequence[Candidate],
        top_k: int | None = None,
    ) -> RankedList:
        """Rerank candidates (given best first) with the configured probe and calibrator.

        Plain strings are accepted as candidates; their ids are their indices in ``passages``.
        """
        rr = self.reranker
        dense = getattr(rr, "dense", None)
        own = getattr(
            self.retriever,
            "dense",
            self.retriever if getattr(self.retriever, "kind", "") == "dense" else None,
        )
        if dense is not None and dense.retriever is None and own is not None:
            dense.retriever = own  # the dense signal uses the retriever's encoder: one model in memory
        return rr.rerank(query, passages, top_k=top_k)

    def explain(self, query: str | Query, passages: Sequence[Candidate], **kw: Any) -> Explanation:
        """Rerank ``passages`` and explain the result (see :mod:`rerank.explain`).

        Keyword options go to :func:`rerank.explain.build.build_explanation` (``counterfactual``,
        ``top_tokens``). The explanation's scores, ranks and slots are this call's ranking.
        """
        from rerank.explain import build_explanation

        return build_explanation(self, query, passages, **kw)

    def select(self, ranked: RankedList) -> list[ScoredPassage]:
        """Apply the prune and order policies; returns the passages in the order the generator reads."""
        pol = self.config.policy
        counts = self._token_counts(ranked) if pol.prune == "token_budget" else None
        if pol.order == "iterative":
            kept = PRUNE_POLICIES.get(pol.prune)(list(ranked.items), pol, token_counts=counts)
            return self._iterative(ranked.query, kept)
        curve = getattr(self.reranker, "curve", None)
        bias = curve.bias if curve is not None else None
        if pol.order == "bias_aligned" and bias is None:
            raise ValueError("order 'bias_aligned' needs a fitted curve: set calibration.curve")
        return apply_policy(ranked, pol, bias=bias, token_counts=counts)

    def _token_counts(self, ranked: RankedList) -> list[int]:
        tok = self.model.tokenizer
        cap = self.config.probe.passage_max_tokens
        return [
            min(len(tok(it.passage.text, add_special_tokens=False)["input_ids"]), cap) for it in ranked.items
        ]

    def _iterative(self, query: Query, kept: list[ScoredPassage]) -> list[ScoredPassage]:
        # Attention sorting: probe the current context order, move the most-attended passages next to
        # the question, repeat.
        order = sorted(kept, key=lambda it: it.score)  # best last
        rr = self.reranker
        for _ in range(self.config.policy.iterations):
            if len(order) < 2 or not hasattr(rr, "score_in_prompt_order"):
                break
            scores = rr.score_in_prompt_order(query.text, [it.passage for it in order])
            order = [order[i] for i in np.argsort(scores, kind="stable")]
        return order

    def run(self, query: str | Query) -> Answer:
        """Retrieve, rerank, select and generate for one query."""
        q = query if isinstance(query, Query) else Query(text=query)
        t = {}
        t0 = time.perf_counter()
        hits = self.retrieve(q)
        t["retrieve"] = time.perf_counter() - t0
        return self.answer(q, hits, timings=t)

    def answer(
        self, query: str | Query, candidates: Sequence[Passage | Hit | ScoredPassage], **kw: Any
    ) -> Answer:
        """Rerank given candidates, select the context and generate (no retrieval)."""
        q = query if isinstance(query, Query) else Query(text=query)
        ranked, context, t = self._rerank_select(q, candidates, kw.get("timings"))
        t0 = time.perf_counter()
        text, info = self._generate(self.generator, q.text, [it.passage for it in context])
        t["generate"] = time.perf_counter() - t0
        return self._answer(q, ranked, context, t, text, info)

    def _rerank_select(
        self, q: Query, candidates: Sequence[Passage | Hit | ScoredPassage], timings: dict[str, float] | None
    ) -> tuple[RankedList, list[ScoredPassage], dict[str, float]]:
        t = dict(timings or {})
        t0 = time.perf_counter()
        ranked = self.rerank(q, candidates)
        t["rerank"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        context = self.select(ranked)
        t["select"] = time.perf_counter() - t0
        return ranked, context, t

    @staticmethod
    def _generate(gen: Any, question: str, passages: list[Passage]) -> tuple[str | None, dict[str, Any]]:
        """The answer, and the generator's report (token usage, latency) when it gives one."""
        if hasattr(gen, "generate_with_info"):
            g = gen.generate_with_info(question, passages)
            return g.text, {"generation": g.info}
        return gen.generate(question, passages), {}

    @staticmethod
    def _answer(
        q: Query,
        ranked: RankedList,
        context: Sequence[ScoredPassage],
        t: dict[str, float],
        text: str | None,
        info: dict[str, Any] | None = None,
    ) -> Answer:
        return Answer(
            query=q,
            text=text,
            passages_used=tuple(it.passage for it in context),
            ranking=ranked,
            timings=t,
            info=info or {},
        )

    def run_batch(self, queries: Sequence[str | Query], show_progress: bool = True) -> list[Answer]:
        """:meth:`run` for many queries, answers in input order.

        With a served generator (one with ``agenerate``, e.g. ``openai``) the next query is reranked while
        earlier answers are being generated, with at most ``generator.concurrency`` requests in flight;
        local generators run one query after another.
        """
        from tqdm.auto import tqdm

        bar = tqdm(queries, desc="pipeline", unit="q", disable=not show_progress)
        if not hasattr(self.generator, "agenerate"):
            return [self.run(q) for q in bar]
        gen = self.generator
        width = self.config.generator.concurrency
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="generate") as pool:
            pending: list[tuple[Query, RankedList, list[ScoredPassage], dict[str, float], Future[Any]]] = []
            for query in bar:
                q = query if isinstance(query, Query) else Query(text=query)
                t0 = time.perf_counter()
                hits = self.retrieve(q)
                ranked, context, t = self._rerank_select(q, hits, {"retrieve": time.perf_counter() - t0})
                # Queued behind at most `width` running requests: the retrieval side never waits for them.
                fut = pool.submit(self._timed, self._generate, gen, q.text, [it.passage for it in context])
                pending.append((q, ranked, context, t, fut))
            out = []
            for q, ranked, context, t, fut in pending:
                (text, info), t["generate"] = fut.result()
                out.append(self._answer(q, ranked, context, t, text, info))
        return out

    @staticmethod
    def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        return fn(*args), time.perf_counter() - t0

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._model_lock:
            return fn(*args)

    async def arun(self, query: str | Query) -> Answer:
        """Async :meth:`run`: retrieval and reranking run in a worker thread (one query at a time on the
        model), and a served generator's request is awaited, so many ``arun`` calls overlap their
        generation (up to ``generator.concurrency`` requests in flight)."""
        q = query if isinstance(query, Query) else Query(text=query)
        t0 = time.perf_counter()
        hits = await asyncio.to_thread(self._locked, self.retrieve, q)
        return await self.aanswer(q, hits, timings={"retrieve": time.perf_counter() - t0})

    async def aanswer(
        self, query: str | Query, candidates: Sequence[Passage | Hit | ScoredPassage], **kw: Any
    ) -> Answer:
        """Async :meth:`answer` (see :meth:`arun`)."""
        q = query if isinstance(query, Query) else Query(text=query)

        def prepare() -> tuple[Any, RankedList, list[ScoredPassage], dict[str, float]]:
            # The generator is built here too: building the local one loads the model.
            return self.generator, *self._rerank_select(q, candidates, kw.get("timings"))

        gen, ranked, context, t = await asyncio.to_thread(self._locked, prepare)
        passages = [it.passage for it in context]
        t0 = time.perf_counter()
        if hasattr(gen, "agenerate_with_info"):
            g = await gen.agenerate_with_info(q.text, passages)
            text, info = g.text, {"generation": g.info}
        else:
            text, info = await asyncio.to_thread(self._locked, self._generate, gen, q.text, passages)
        t["generate"] = time.perf_counter() - t0
        return self._answer(q, ranked, context, t, text, info)

    def rerank_batch(
        self,
        queries: Sequence[str | Query],
        lists: Sequence[Sequence[Passage | Hit | ScoredPassage]],
        **kw: Any,
    ) -> list[RankedList]:
        return self.reranker.rerank_batch(queries, lists, **kw)
