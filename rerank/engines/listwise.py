"""Listwise reranking by generation (RankGPT): the model writes a ranking ``[2] > [1] > ...`` of a
window of passages; sliding windows of 20 with step 10 move from the bottom of the list to the top."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from rerank.engines.base import (
    PROBE_ENGINES,
    _Baseline,
    _context_limit,
    _Scores,
    attention_kernel,
)
from rerank.probe.prompt import _chat_wrap, truncate_text
from rerank.records import Passage

logger = logging.getLogger(__name__)



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


