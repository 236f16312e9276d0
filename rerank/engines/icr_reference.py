"""In-Context Reranking as published, written plainly: eager attention with ``output_attentions``, every
layer and head, a second full forward for the ``N/A`` query, the mean - 2 std token filter. A yardstick
for the probe's faster route."""

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
    probe_windows,
    prompt_orders,
    prompt_slots,
)
from rerank.probe.prompt import NA_QUERY, build_prompt
from rerank.probe.scoring import zscore
from rerank.records import Passage

logger = logging.getLogger(__name__)

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}



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


