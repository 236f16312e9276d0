"""Pointwise reranking: the model's probability of answering "Yes" to "is this passage relevant?", one
passage per prompt, batched."""

from __future__ import annotations

import logging
from collections.abc import Sequence
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


