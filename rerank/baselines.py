"""Baseline rerankers, registered in :data:`rerank.reranker.PROBE_ENGINES` beside the attention probe.

``icr-reference``  In-Context Reranking as published, written plainly: eager attention with
                   ``output_attentions``, every layer and head, a second full forward for the ``N/A``
                   query, the mean - 2 std token filter. A yardstick for the probe's faster route.
``listwise``       RankGPT-style: the model writes a ranking ``[2] > [1] > ...`` of a window of
                   passages; sliding windows of 20 with step 10 move from the bottom of the list to the
                   top.
``pointwise``      The model's probability of answering "Yes" to "is this passage relevant?", one
                   passage per prompt, batched.
``shuffle``        A seeded random order per query: the floor every reranker must clear.

All take the constructor arguments of :class:`rerank.reranker.AttentionReranker` (``calibration`` is
accepted for a common signature and not used) plus their own keyword options, and return a
:class:`~rerank.records.RankedList` whose ``info`` holds ``seconds`` and the baseline's counters.
torch is imported only inside the methods that run the model.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from rerank.config import PipelineConfig, ProbeConfig
from rerank.model import LoadedModel
from rerank.prompt import NA_QUERY, PromptTemplate, _chat_wrap, build_prompt, truncate_text
from rerank.records import Passage, Query, RankedList, ScoredPassage
from rerank.reranker import (
    PROBE_ENGINES,
    Candidate,
    as_query,
    check_top_k,
    probe_windows,
    prompt_orders,
    prompt_slots,
    rerank_many,
    split_candidates,
)
from rerank.scoring import zscore

logger = logging.getLogger(__name__)

__all__ = [
    "ICRReferenceReranker",
    "ListwiseReranker",
    "ParsedPermutation",
    "PointwiseReranker",
    "ShuffleReranker",
    "attention_kernel",
    "parse_permutation",
    "sliding_windows",
]

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@contextmanager
def attention_kernel(model: LoadedModel, name: str) -> Iterator[None]:
    """Run the block with the model's attention kernel set to ``name``; the previous one is restored."""
    mm = model.model
    old = mm.config._attn_implementation
    if old != name:
        mm.set_attn_implementation(name)
    try:
        yield
    finally:
        if old != name:
            mm.set_attn_implementation(old)


def _context_limit(model: LoadedModel) -> int:
    return int(getattr(model.model.config, "max_position_embeddings", 4096))


@dataclass
class _Scores:
    """What a baseline computes for one list, in candidate order."""

    score: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    raw: np.ndarray | None = None
    calibrated: np.ndarray | None = None
    position: list[int] | None = None


class _Baseline:
    """Shared plumbing: option checking, candidate handling, sorting, timing, batches."""

    name: ClassVar[str] = ""
    #: Keyword options and their defaults; anything else is refused.
    options: ClassVar[dict[str, Any]] = {}
    needs_model: ClassVar[bool] = True

    def __init__(
        self,
        model: LoadedModel | None,
        probe: ProbeConfig | None = None,
        calibration: Any = None,
        *,
        template: PromptTemplate | None = None,
        **kw: Any,
    ) -> None:
        unknown = sorted(set(kw) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for the '{self.name}' reranker; "
                f"it accepts: {known}"
            )
        if self.needs_model and model is None:
            raise ValueError(f"the '{self.name}' reranker needs a loaded model (rerank.model.load_model)")
        self.model = model
        self.cfg = probe or ProbeConfig()
        self.template = template or PromptTemplate()
        self.opts: dict[str, Any] = {**self.options, **kw}
        self._configure()

    def _configure(self) -> None:
        """Validate ``self.opts`` and derive settings; raise ValueError naming the wrong option."""

    def _int_option(self, key: str, low: int) -> int:
        v = self.opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(
                f"option '{key}' of the '{self.name}' reranker must be an integer >= {low}, got {v!r}"
            )
        return v

    @classmethod
    def from_config(cls, cfg: PipelineConfig, model: LoadedModel | None = None) -> _Baseline:
        if model is None and cls.needs_model:
            from rerank.model import load_model

            model = load_model(cfg.model)
        return cls(model, cfg.probe, cfg.calibration)

    def _score(self, query: str, passages: list[Passage]) -> _Scores:
        raise NotImplementedError

    def _empty_info(self) -> dict[str, Any]:
        return {}

    def rerank(
        self, query: str | Query, passages: Sequence[Candidate], top_k: int | None = None
    ) -> RankedList:
        """Rerank ``passages`` (first-stage order, best first) for ``query``; ties keep first-stage order.

        Raises:
            ValueError: Duplicate passage ids, a bad ``top_k``, or a prompt that does not fit the model.
        """
        top_k = check_top_k(top_k)
        q = as_query(query)
        ps, first = split_candidates(passages)
        if not ps:
            return RankedList(query=q, items=(), info={"seconds": 0.0, **self._empty_info()})
        t0 = time.perf_counter()
        res = self._score(q.text, ps)
        order = sorted(range(len(ps)), key=lambda i: (-res.score[i], i))
        items = tuple(
            ScoredPassage(
                passage=ps[i],
                score=float(res.score[i]),
                rank=r + 1,
                raw_score=None if res.raw is None else float(res.raw[i]),
                calibrated_score=None if res.calibrated is None else float(res.calibrated[i]),
                prompt_position=None if res.position is None else res.position[i],
                first_stage_score=None if first is None else first[i],
            )
            for r, i in enumerate(order)
        )
        info = {**res.info, "seconds": time.perf_counter() - t0}
        return RankedList(query=q, items=items[:top_k], info=info)

    def rerank_batch(
        self,
        queries: Sequence[str | Query],
        lists: Sequence[Sequence[Candidate]],
        top_k: int | None = None,
        show_progress: bool = True,
    ) -> list[RankedList]:
        """Rerank many queries, with a progress bar."""
        return rerank_many(self, queries, lists, top_k=top_k, show_progress=show_progress, desc=self.name)


# --------------------------------------------------------------------------------------------------
# In-Context Reranking, the published recipe
# --------------------------------------------------------------------------------------------------


def icr_filter_sum(tok: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """ICR's passage score: drop tokens below mean - 2 std over all passage tokens, sum the rest."""
    body = np.concatenate([tok[s:e] for s, e in spans])
    cut = body.mean() - 2 * body.std()
    return np.array([float(tok[s:e][tok[s:e] >= cut].sum()) for s, e in spans])


@PROBE_ENGINES.register("icr-reference")
class ICRReferenceReranker(_Baseline):
    """In-Context Reranking (Chen et al., ICLR 2025) implemented plainly, as a reference.

    Per window: the ICR prompt (passages in ``probe.prompt_order``, best last by default; ``both`` reads the
    best-last prompt only) runs once with
    the eager kernel and ``output_attentions=True``; each token's score is the attention it receives
    from the query tokens (late instruction to the end), averaged over those rows and summed over all
    heads and layers. The content-free prompt (query ``N/A``) runs as a second full forward, without
    reusing the KV cache. Token score = query minus ``N/A``; tokens below mean - 2 std are dropped and
    the rest summed per passage. Windows of ``probe.window_size`` are z-scored within the window
    (``probe.window_merge``). ``probe.layers``, ``heads``, ``head_set``, ``aggregation``, ``nacal_form``
    and ``first_stage_weight`` are ignored: the recipe reads everything and fuses nothing.

    Options:
        max_attention_gib: Refuse a prompt whose attention tensors (layers x heads x N x N) exceed this.
    """

    name = "icr-reference"
    options: ClassVar[dict[str, Any]] = {"max_attention_gib": 8.0}

    def _configure(self) -> None:
        v = self.opts["max_attention_gib"]
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise ValueError(f"option 'max_attention_gib' must be a positive number of GiB, got {v!r}")

    def attention_bytes(self, num_tokens: int) -> int:
        """Memory of ``output_attentions`` for a prompt: layers x heads x N x N in the model's dtype."""
        assert self.model is not None
        size = _ITEMSIZE.get(self.model.dtype, 4)
        return self.model.num_layers * self.model.num_heads * num_tokens * num_tokens * size

    def _check_size(self, num_tokens: int) -> None:
        assert self.model is not None
        limit = _context_limit(self.model)
        if num_tokens > limit:
            raise ValueError(
                f"prompt has {num_tokens} tokens but the model's context is {limit}; "
                "lower probe.window_size or probe.passage_max_tokens"
            )
        need = self.attention_bytes(num_tokens) / 2**30
        cap = float(self.opts["max_attention_gib"])
        if need > cap:
            raise ValueError(
                f"icr-reference would hold about {need:.1f} GiB of attention weights for a "
                f"{num_tokens}-token prompt ({self.model.num_layers} layers x {self.model.num_heads} heads "
                f"x N^2 x {_ITEMSIZE.get(self.model.dtype, 4)} bytes), over the limit of {cap:g} GiB; lower "
                f"probe.window_size (now {self.cfg.window_size}) or probe.passage_max_tokens, or raise the "
                "option max_attention_gib if the memory is there"
            )

    def token_scores(self, ids: Sequence[int], query_start: int) -> np.ndarray:
        """(N,) attention each token receives from the rows ``query_start:`` (the query tokens).

        Mean over those rows, sum over heads and layers. Must run under the eager kernel (the caller
        switches it).
        """
        import torch

        assert self.model is not None
        x = torch.tensor([list(ids)], device=self.model.device)
        with torch.inference_mode():
            # The base model: the recipe needs no logits, and a vocab x N logit matrix is large.
            out = self.model.model.base_model(input_ids=x, output_attentions=True)
            total = torch.zeros(len(ids), dtype=torch.float64)
            for a in out.attentions:  # (1, heads, N, N) per layer, rows = queries, columns = keys
                total += a[0, :, query_start:, :].float().mean(dim=1).sum(dim=0).double().cpu()
        return total.numpy()

    def _score(self, query: str, passages: list[Passage]) -> _Scores:
        n = len(passages)
        raw = np.empty(n)
        cal = np.empty(n)
        final = np.empty(n)
        pos = [0] * n
        windows = probe_windows(n, self.cfg)
        tokens = 0
        peak = 0.0
        assert self.model is not None
        with attention_kernel(self.model, "eager"):
            for idx in windows:
                slots = [idx[j] for j in prompt_slots(len(idx), prompt_orders(self.cfg)[0])]
                prompt_ps = [passages[c] for c in slots]
                kw = {"max_passage_tokens": self.cfg.passage_max_tokens, "template": self.template}
                pr = build_prompt(self.model.tokenizer, query, prompt_ps, **kw)
                na = build_prompt(self.model.tokenizer, NA_QUERY, prompt_ps, **kw)
                if pr.input_ids[: pr.prefix_len] != na.input_ids[: na.prefix_len] or pr.spans != na.spans:
                    raise RuntimeError("the N/A prompt does not share the query prompt's passage tokens")
                self._check_size(max(pr.num_tokens, na.num_tokens))
                peak = max(peak, self.attention_bytes(max(pr.num_tokens, na.num_tokens)) / 2**30)
                q_tok = self.token_scores(pr.input_ids, pr.prefix_len)
                na_tok = self.token_scores(na.input_ids, na.prefix_len)
                p = pr.prefix_len
                # Both prompts share the first p tokens, so their token positions line up there.
                r = icr_filter_sum(q_tok[:p], pr.spans)
                c = icr_filter_sum(q_tok[:p] - na_tok[:p], pr.spans)
                # A lone passage standardises to 0 (the window average), not to its unscaled score.
                z = zscore(c) if self.cfg.window_merge == "zscore" else c
                for slot, cand in enumerate(slots):
                    raw[cand], cal[cand], final[cand], pos[cand] = r[slot], c[slot], z[slot], slot
                tokens += pr.num_tokens + na.num_tokens
        info = {
            "windows": len(windows),
            "forwards": 2 * len(windows),
            "tokens": tokens,
            "attention_gib": peak,
        }
        return _Scores(final, info, raw=raw, calibrated=cal, position=pos)

    def _empty_info(self) -> dict[str, Any]:
        return {"windows": 0, "forwards": 0, "tokens": 0, "attention_gib": 0.0}


# --------------------------------------------------------------------------------------------------
# Listwise generation (RankGPT)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedPermutation:
    """A generated ranking turned into a permutation.

    Attributes:
        order: 0-based passage indices, best first: a permutation of ``range(n)``.
        found: Identifiers taken from the text (in range, first occurrence).
        out_of_range: Integers in the text outside ``1..n`` (dropped).
        duplicates: Repeats of an identifier already taken (dropped).
        missing: Passages the text never named (appended in their original order).
    """

    order: tuple[int, ...]
    found: int
    out_of_range: int
    duplicates: int
    missing: int

    @property
    def failed(self) -> bool:
        """Nothing usable in the text: the window keeps its order."""
        return self.found == 0 and len(self.order) > 0

    @property
    def repaired(self) -> bool:
        """Usable, but something had to be dropped or appended."""
        return not self.failed and bool(self.out_of_range or self.duplicates or self.missing)


_INT = re.compile(r"[0-9]+")
_BRACKETED = re.compile(r"\[\s*([0-9]+)\s*\]")
# A bare list of numbers: digits with only separators between them ("3, 1, 2", "2 > 1 > 3").
_BARE_RANKING = re.compile(r"^[\s0-9,;>|-]*$")


def parse_permutation(text: str, n: int) -> ParsedPermutation:
    """Read a ranking like ``[2] > [1] > [3]`` of ``n`` passages from generated text.

    Identifiers are the bracketed numbers ``[k]`` in order; a text without any is read as a bare list of
    numbers only when it holds nothing but digits and separators (``3, 1, 2``). Anything else (a small
    model often copies passage text, numbers and all) yields no identifiers: a parse failure, and the
    window keeps its order. Identifiers outside ``1..n`` and repeats are dropped; passages never named
    are appended in their original order. So any text yields a permutation, and the counters say how
    much repair it took.

    Raises:
        ValueError: ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ids = [m.group(1) for m in _BRACKETED.finditer(text)]
    if not ids and _BARE_RANKING.match(text):
        ids = [m.group() for m in _INT.finditer(text)]
    order: list[int] = []
    seen: set[int] = set()
    oor = dup = 0
    for token in ids:
        k = int(token) - 1
        if not 0 <= k < n:
            oor += 1
        elif k in seen:
            dup += 1
        else:
            seen.add(k)
            order.append(k)
    found = len(order)
    order += [i for i in range(n) if i not in seen]
    return ParsedPermutation(tuple(order), found, oor, dup, n - found)


def sliding_windows(n: int, window: int, step: int) -> list[tuple[int, int]]:
    """RankGPT's windows ``[start, end)`` over ``n`` ranks, from the bottom of the list to the top.

    Each window moves ``step`` ranks up, so strong passages found low in the list can climb to the top
    in one sweep; the last window always starts at rank 0.
    """
    if window < 1 or not 1 <= step <= window:
        raise ValueError(f"need window >= 1 and 1 <= step <= window, got window={window}, step={step}")
    if n <= 0:
        return []
    out = []
    end = n
    while True:
        start = max(end - window, 0)
        out.append((start, end))
        if start == 0:
            return out
        end -= step


@PROBE_ENGINES.register("listwise")
class ListwiseReranker(_Baseline):
    """Listwise reranking by generation with the same model (RankGPT, Sun et al. 2023).

    One chat prompt per window shows its passages as ``[1]..[m]`` (in the window's current order) and
    asks for the identifiers ranked ``[2] > [1] > ...``; greedy decoding writes the ranking, which
    :func:`parse_permutation` reads and repairs. Windows slide from the bottom of the first-stage list
    to the top (:func:`sliding_windows`). A passage's score is its final rank, reversed (n for the
    best, 1 for the worst).

    Options:
        window: Passages per prompt; None = ``probe.window_size`` (20).
        step: Ranks each window moves up; None = half the window (10).
        tokens_per_passage: Generation budget per passage (``[12] >`` is about 5 tokens); 10 more on top.
    """

    name = "listwise"
    options: ClassVar[dict[str, Any]] = {"window": None, "step": None, "tokens_per_passage": 6}

    def _configure(self) -> None:
        if self.opts["window"] is None:
            self.opts["window"] = self.cfg.window_size
        self.window = self._int_option("window", 1)
        if self.opts["step"] is None:
            self.opts["step"] = max(1, self.window // 2)
        self.step = self._int_option("step", 1)
        if self.step > self.window:
            raise ValueError(f"option 'step' ({self.step}) must not exceed 'window' ({self.window})")
        self.tokens_per_passage = self._int_option("tokens_per_passage", 1)

    def prompt_text(self, query: str, passages: Sequence[Passage]) -> str:
        """The chat-formatted ranking prompt for ``passages`` shown as ``[1]..[m]``."""
        assert self.model is not None
        tok = self.model.tokenizer
        m = len(passages)
        parts = [
            f"I will give you {m} passages, each marked with an identifier in brackets, and a search query. "
            f"Rank the passages by their relevance to the query.\n\nQuery: {query}\n\n"
        ]
        for n, p in enumerate(passages, start=1):
            text, _ = truncate_text(tok, p.text, self.cfg.passage_max_tokens)
            parts.append(f"[{n}] {self.template.body(p, text)}\n\n")
        parts.append(
            f"Search query: {query}\n\nRank the {m} passages above by their relevance to the search query, "
            "most relevant first. Answer with the identifiers only, in the form [2] > [1] > [3], and do not "
            "explain."
        )
        text, _ = _chat_wrap(tok, "".join(parts), self.template.system)
        return text

    def generate(self, query: str, passages: Sequence[Passage]) -> tuple[str, int]:
        """Greedy ranking text for one window, and the number of tokens generated."""
        import torch

        assert self.model is not None
        tok = self.model.tokenizer
        ids = tok(self.prompt_text(query, passages), add_special_tokens=False)["input_ids"]
        budget = self.tokens_per_passage * len(passages) + 10
        limit = _context_limit(self.model)
        if len(ids) + budget > limit:
            raise ValueError(
                f"listwise prompt has {len(ids)} tokens plus {budget} to generate, over the model's context "
                f"of {limit}; lower the window option or probe.passage_max_tokens"
            )
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        x = torch.tensor([ids], device=self.model.device)
        with attention_kernel(self.model, "sdpa"), torch.inference_mode():
            out = self.model.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=budget,
                do_sample=False,
                pad_token_id=pad_id,
            )
        new = out[0, len(ids) :]
        return tok.decode(new, skip_special_tokens=True), int(new.shape[0])

    def _score(self, query: str, passages: list[Passage]) -> _Scores:
        n = len(passages)
        order = list(range(n))  # rank -> candidate index
        info = {
            "windows": 0,
            "parse_failures": 0,
            "repaired": 0,
            "out_of_range": 0,
            "duplicates": 0,
            "missing": 0,
            "generated_tokens": 0,
        }
        for start, end in sliding_windows(n, self.window, self.step):
            seg = order[start:end]
            if len(seg) < 2:
                continue
            text, n_new = self.generate(query, [passages[i] for i in seg])
            parsed = parse_permutation(text, len(seg))
            logger.debug("listwise window [%d, %d): %r", start, end, text)
            order[start:end] = [seg[j] for j in parsed.order]
            info["windows"] += 1
            info["generated_tokens"] += n_new
            info["parse_failures"] += int(parsed.failed)
            info["repaired"] += int(parsed.repaired)
            info["out_of_range"] += parsed.out_of_range
            info["duplicates"] += parsed.duplicates
            info["missing"] += parsed.missing
        score = np.empty(n)
        for rank, cand in enumerate(order):
            score[cand] = float(n - rank)
        return _Scores(score, info)

    def _empty_info(self) -> dict[str, Any]:
        keys = ("windows", "parse_failures", "repaired", "out_of_range", "duplicates", "missing")
        return {**dict.fromkeys(keys, 0), "generated_tokens": 0}


# --------------------------------------------------------------------------------------------------
# Pointwise relevance question
# --------------------------------------------------------------------------------------------------


def answer_token_id(tokenizer: Any, prompt_text: str, word: str) -> int:
    """The token a tokenizer uses for ``word`` as the first token of the answer after ``prompt_text``.

    Tokenising the prompt with and without the word settles whether this tokenizer writes it with a
    leading-space marker there (``Yes`` vs ``ĠYes``/``▁Yes``). When the word merges with the prompt's
    last token, the first token of the word alone (or with a leading space) is used instead.
    """
    base = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt_text + word, add_special_tokens=False)["input_ids"]
    if len(full) > len(base) and full[: len(base)] == base:
        return int(full[len(base)])
    for variant in (word, " " + word):
        ids = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
    return int(tokenizer(word, add_special_tokens=False)["input_ids"][0])


@PROBE_ENGINES.register("pointwise")
class PointwiseReranker(_Baseline):
    """Scores each passage by the model's P(Yes) to a relevance question (one prompt per passage).

    The chat prompt is ``Passage: ... Query: ... Is this passage relevant to the query? Answer Yes or
    No.``; the next-token logits at the assistant position, restricted to the "Yes" and "No" tokens,
    give ``P(Yes) = softmax([yes, no])[0]``. Prompts are sorted by length and left-padded into batches;
    the two logits are computed in fp32 from the last hidden state.

    Options:
        batch_size: Prompts per forward pass.
    """

    name = "pointwise"
    options: ClassVar[dict[str, Any]] = {"batch_size": 16}

    def _configure(self) -> None:
        self.batch_size = self._int_option("batch_size", 1)
        assert self.model is not None
        probe_text, _ = _chat_wrap(self.model.tokenizer, "x", self.template.system)
        self.yes_id = answer_token_id(self.model.tokenizer, probe_text, "Yes")
        self.no_id = answer_token_id(self.model.tokenizer, probe_text, "No")
        if self.yes_id == self.no_id:
            raise ValueError(
                "the tokenizer maps 'Yes' and 'No' to the same first token; pointwise cannot work"
            )

    def prompt_text(self, query: str, passage: Passage) -> str:
        assert self.model is not None
        text, _ = truncate_text(self.model.tokenizer, passage.text, self.cfg.passage_max_tokens)
        content = (
            f"Passage: {self.template.body(passage, text)}\n\nQuery: {query}\n\n"
            "Is this passage relevant to the query? Answer Yes or No."
        )
        chat, _ = _chat_wrap(self.model.tokenizer, content, self.template.system)
        return chat

    def _answer_logits(self, hidden: Any) -> Any:
        """(batch, 2) logits of "Yes" and "No" from final hidden states, computed in fp32.

        Only the two rows of the output layer are needed. In bf16 the full logits are rounded to steps of
        ~0.06, which would tie many passages' P(Yes) and hand their order to the tie-break.
        """
        import torch

        assert self.model is not None
        head = self.model.model.get_output_embeddings()
        rows = [self.yes_id, self.no_id]
        logits = hidden.float() @ head.weight[rows].float().T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[rows].float()
        cap = getattr(self.model.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def p_yes(self, query: str, passages: Sequence[Passage]) -> tuple[np.ndarray, int]:
        """P(Yes) per passage (input order) and the number of forward passes."""
        import torch

        from rerank.generate import left_pad

        assert self.model is not None
        tok = self.model.tokenizer
        enc = [tok(self.prompt_text(query, p), add_special_tokens=False)["input_ids"] for p in passages]
        limit = _context_limit(self.model)
        longest = max(len(e) for e in enc)
        if longest > limit:
            raise ValueError(
                f"a pointwise prompt has {longest} tokens but the model's context is {limit}; "
                "lower probe.passage_max_tokens"
            )
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # Sorted by length so each batch pads little; results go back to the input order.
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        out = np.empty(len(enc))
        batches = 0
        dev = self.model.device
        base = self.model.model.base_model
        with attention_kernel(self.model, "sdpa"), torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                ids, mask = left_pad([enc[i] for i in idx], pad_id)
                # Left padding: positions count real tokens only, as in an unpadded prompt.
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                hidden = base(
                    input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev)
                ).last_hidden_state[:, -1]
                logits = self._answer_logits(hidden)
                p = torch.softmax(logits, dim=-1)[:, 0].cpu().numpy()
                for r, i in enumerate(idx):
                    out[i] = float(p[r])
                batches += 1
        return out, batches

    def _score(self, query: str, passages: list[Passage]) -> _Scores:
        p, batches = self.p_yes(query, passages)
        return _Scores(p, {"forwards": batches, "prompts": len(passages)}, raw=p)

    def _empty_info(self) -> dict[str, Any]:
        return {"forwards": 0, "prompts": 0}


# --------------------------------------------------------------------------------------------------
# Random control
# --------------------------------------------------------------------------------------------------


@PROBE_ENGINES.register("shuffle")
class ShuffleReranker(_Baseline):
    """A random order, the same for the same query text and seed (a control; needs no model).

    Options:
        seed: Mixed with the query text into the random generator's seed.
    """

    name = "shuffle"
    options: ClassVar[dict[str, Any]] = {"seed": 0}
    needs_model = False

    def _configure(self) -> None:
        self.seed = self._int_option("seed", 0)

    def _score(self, query: str, passages: list[Passage]) -> _Scores:
        # A hash, not Python's hash(): stable across processes (PYTHONHASHSEED) and machines.
        digest = hashlib.sha256(f"{self.seed}\x00{query}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        n = len(passages)
        perm = rng.permutation(n)  # rank -> candidate index
        score = np.empty(n)
        score[perm] = np.arange(n, 0, -1, dtype=np.float64)
        return _Scores(score, {"seed": self.seed})

    def _empty_info(self) -> dict[str, Any]:
        return {"seed": self.seed}
