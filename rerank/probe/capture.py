"""Reading query-to-passage attention during a prefill, without an N x N attention tensor.

A registered ``transformers`` attention function (``attn_probe``) runs the normal sdpa kernel for every
layer and, for the layers being probed, also computes ``softmax(q . K^T * scale)`` for the last ``m``
query rows only (the query tokens), against all keys: m x N memory instead of N x N. Once the last
probed layer has been read, the forward pass is stopped (early exit): later layers never run.

One probe of a prompt is one or two forward calls sharing one KV cache:
  1. the whole prompt (instruction + passages + late instruction + query + assistant header), reading
     the rows of the query section only;
  2. optionally the query section again with the content-free query ``N/A``, after cropping the cache
     back to the prefix (ICR's calibration pass), reading its rows.
(Sliding-window caches cannot be cropped, so for them the prefix is a call of its own and its cache is
copied for the ``N/A`` pass.)

With ``reuse_prefix``, the prefix's KV cache is kept after a probe, and the next prompt forwards only
the tokens after the longest common token prefix of the two (the cache is cropped back to it). Lists
that differ late (one passage moved through the slots of the same list, the same instruction header
for every query) then cost a fraction of a full prefill.
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from rerank.probe.model import LoadedModel
from rerank.probe.prompt import NA_QUERY, ProbePrompt, PromptTemplate, build_prompt
from rerank.probe.scoring import PassageStats
from rerank.records import Passage

ATTN_NAME = "attn_probe"

# Architectures whose attention layers call the pluggable attention interface with the arguments this
# probe relies on (module.layer_idx, a scaling, post-RoPE keys). Tested: llama, qwen2, mistral, gemma3.
SUPPORTED_MODEL_TYPES = frozenset(
    {
        "llama",
        "qwen2",
        "qwen3",
        "mistral",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3_text",
        "phi3",
        "olmo2",
        "granite",
    }
)


class _StopForward(Exception):
    """Raised after the last probed layer to skip the rest of the forward pass."""


@dataclass
class _Capture:
    layers: frozenset[int]
    stop_after: int | None
    # layer -> (heads, kv_len) mean over captured rows, float32
    out: dict[int, torch.Tensor]
    capture: bool = True
    rows: int | None = None  # how many trailing query rows of this call to read (None = all)
    total: int = 0  # absolute sequence length at this call (past + new tokens)


_ACTIVE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("attn_probe_capture", default=None)


def _probe_rows(
    module: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax attention of all query rows of this call against all keys: (batch, heads, kv_len), mean
    over rows.

    Shapes: query (B, Hq, m, d); key (B, Hkv, N, d), already rotated (post-RoPE). Grouped KV heads are
    repeated to match the query heads. Rows are upcast to fp32 first: bf16 logits lose precision. The
    batch rows of one call are prompts of equal length (no padding), so they share one mask.
    """
    groups = query.shape[1] // key.shape[1]
    k = repeat_kv(key, groups) if groups > 1 else key
    logits = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling  # (B, H, m, N)
    m, n = logits.shape[-2], logits.shape[-1]
    if attention_mask is not None:
        mask = attention_mask[:, :, -m:, :n]
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    else:
        # Causal: row i of this call sits at absolute position n - m + i.
        rows = torch.arange(n - m, n, device=logits.device)[:, None]
        cols = torch.arange(n, device=logits.device)[None, :]
        logits = logits.masked_fill(cols > rows, float("-inf"))
    soft_cap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if soft_cap:
        logits = torch.tanh(logits / soft_cap) * soft_cap
    return torch.softmax(logits, dim=-1).mean(dim=2)  # (B, H, N)


def _attn_probe_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    cap = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    soft_cap = kwargs.pop("softcap", None)
    if cap is not None and cap.capture and layer in cap.layers:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        q = query if cap.rows is None else query[:, :, -cap.rows :]
        rows = _probe_rows(module, q, key, attention_mask, scale)
        # A sliding-window cache hands over only the most recent keys; earlier positions got no attention.
        if rows.shape[-1] < cap.total:
            rows = torch.nn.functional.pad(rows, (cap.total - rows.shape[-1], 0))
        cap.out[layer] = rows
    if cap is not None and cap.stop_after is not None and layer == cap.stop_after:
        # The forward stops here: the layer's attention output would never be read.
        raise _StopForward
    if soft_cap is not None:
        out = _eager_softcap(module, query, key, value, attention_mask, scaling, soft_cap)
    else:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    return out


def _eager_softcap(module, query, key, value, attention_mask, scaling, soft_cap):  # type: ignore[no-untyped-def]
    # sdpa has no logit soft-capping (Gemma-2); compute that layer plainly.
    groups = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    w = torch.matmul(query, k.transpose(2, 3)) * scale
    w = torch.tanh(w / soft_cap) * soft_cap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            w = w.masked_fill(~attention_mask[..., : k.shape[-2]], float("-inf"))
        else:
            w = w + attention_mask[..., : k.shape[-2]]
    w = torch.softmax(w.float(), dim=-1).to(query.dtype)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, _attn_probe_forward)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _crop_to(cache: Any, length: int) -> None:
    """Drop cached states after the first ``length`` tokens (``crop`` takes a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _is_sliding(cache: Any) -> bool:
    return any("Sliding" in type(layer).__name__ for layer in getattr(cache, "layers", []))


def _shares_prefix(prompt: ProbePrompt, na_prompt: ProbePrompt) -> bool:
    """Whether the ``N/A`` twin holds the query prompt's prefix (so its pass can reuse that KV cache)."""
    return na_prompt.prefix_len == prompt.prefix_len and tuple(
        na_prompt.input_ids[: na_prompt.prefix_len]
    ) == tuple(prompt.input_ids[: prompt.prefix_len])


def _align_tokens(na_tok: np.ndarray, na_prompt: ProbePrompt, prompt: ProbePrompt) -> np.ndarray:
    """The ``N/A`` pass's token scores moved onto the query prompt's token positions (its passages sit
    elsewhere when the query also precedes them); tokens outside the passages get 0."""
    out = np.zeros((na_tok.shape[0], prompt.prefix_len), dtype=na_tok.dtype)
    for (s, e), (ns, ne) in zip(prompt.spans, na_prompt.spans, strict=True):
        if e - s != ne - ns:
            raise RuntimeError("a passage tokenises differently in the N/A prompt; cannot align its scores")
        out[:, s:e] = na_tok[:, ns:ne]
    return out


def check_supported(model: Any) -> None:
    """Raise a clear error for a model the probe cannot read."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"'{cfg.model_type}' is an encoder-decoder model; the probe needs a decoder-only LM")
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type '{cfg.model_type}' is not supported by the attention probe; supported: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )


@dataclass
class ProbeOutput:
    """What one probe of one prompt yields.

    Attributes:
        layers: The probed layer indices, in order.
        query_tok: (layers, prefix_len) attention each prefix token receives from the query tokens,
            averaged over query tokens and summed over the selected heads.
        na_tok: The same for the content-free ``N/A`` query, or None.
        query_head: (layers, heads, passages) attention per passage block per head (sum over its tokens).
        na_head: The same for ``N/A``, or None.
        spans: Token span of each passage block, in prompt order.
        prompt: The prompt that was probed.
    """

    layers: tuple[int, ...]
    query_tok: np.ndarray
    na_tok: np.ndarray | None
    query_head: np.ndarray
    na_head: np.ndarray | None
    spans: tuple[tuple[int, int], ...]
    prompt: ProbePrompt


class AttentionProbe:
    """Runs probe passes over a loaded model.

    Args:
        model: The loaded model (its attention kernel is switched to ``attn_probe``).
        layers: Inclusive ``(first, last)`` range to read; None = all layers.
        heads: Head indices summed into the token scores; None = all heads.
        early_exit: Stop the forward pass after the last probed layer.
        reuse_prefix: Keep the prefix's KV cache between prompts and forward only what differs from
            the previous prompt's prefix (not for sliding-window caches, which cannot be cropped back).
        rows: ``all`` reads every token row after the passages (late instruction, query, assistant
            header); ``query`` reads the rows from the query's first token on.
        memo: A dict that keeps each prompt's output by its tokens and the layers and heads read, so a
            prompt probed again (one evaluation comparing settings that share prompts, several probes
            sharing the dict) is answered without a forward pass. None = nothing kept.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        layers: tuple[int, int] | None = None,
        heads: Sequence[int] | None = None,
        early_exit: bool = True,
        reuse_prefix: bool = False,
        rows: str = "all",
        memo: dict[Any, ProbeOutput] | None = None,
    ) -> None:
        check_supported(model.model)
        self.m = model
        n = model.num_layers
        first, last = layers if layers is not None else (0, n - 1)
        if last >= n:
            raise ValueError(f"layers [{first}, {last}] out of range: the model has {n} layers (0..{n - 1})")
        self.layers = tuple(range(first, last + 1))
        if heads is not None:
            bad = [h for h in heads if not 0 <= h < model.num_heads]
            if bad:
                raise ValueError(f"head indices {bad} out of range: the model has {model.num_heads} heads")
        self.heads = tuple(heads) if heads is not None else None
        self.early_exit = early_exit
        self.reuse_prefix = reuse_prefix
        if rows not in ("all", "query"):
            raise ValueError(f"rows is 'all' or 'query', got {rows!r}")
        self.rows = rows
        self.memo = memo
        self._kept: tuple[tuple[int, ...], Any] | None = None  # (prefix ids, their KV cache)
        self.reused_tokens = 0  # prefix tokens taken from the kept cache, over this probe's life
        if model.model.config._attn_implementation != ATTN_NAME:
            model.model.set_attn_implementation(ATTN_NAME)

    @property
    def max_tokens(self) -> int:
        return int(getattr(self.m.model.config, "max_position_embeddings", 4096))

    def _forward(
        self, ids: Sequence[Sequence[int]], cache: Any, capture: bool, rows: int | None = None
    ) -> dict[int, torch.Tensor]:
        """Forward a batch of equal-length ``ids`` rows after ``cache``; with ``capture``, read the last
        ``rows`` rows of each (default all): ``{layer: (batch, heads, kv_len)}``."""
        past = cache.get_seq_length() if cache is not None else 0
        x = torch.tensor([list(r) for r in ids], device=self.m.device)
        cap = _Capture(
            layers=frozenset(self.layers),
            stop_after=self.layers[-1] if self.early_exit else None,
            out={},
            capture=capture,
            rows=rows,
            total=past + x.shape[1],
        )
        token = _ACTIVE.set(cap)
        try:
            pos = torch.arange(past, past + x.shape[1], device=self.m.device)[None].expand(x.shape[0], -1)
            with torch.inference_mode():
                try:
                    self.m.model.model(input_ids=x, cache=cache, use_cache=True, position_ids=pos)
                except _StopForward:
                    pass
        finally:
            _ACTIVE.reset(token)
        return cap.out

    def _read_rows(self, prompt: ProbePrompt) -> int:
        """How many trailing rows of ``prompt`` are read."""
        first = prompt.query_start if self.rows == "query" and prompt.query_start >= 0 else prompt.prefix_len
        return prompt.num_tokens - first

    def _check_fits(self, prompt: ProbePrompt) -> None:
        if prompt.num_tokens > self.max_tokens:
            raise ValueError(
                f"prompt has {prompt.num_tokens} tokens but the model's context is {self.max_tokens}; "
                "lower probe.window_size or probe.passage_max_tokens"
            )

    def run_prompt(self, prompt: ProbePrompt, na_prompt: ProbePrompt | None = None) -> ProbeOutput:
        """Probe one tokenised prompt (and optionally its ``N/A`` twin, reusing the prefix's KV cache)."""
        if self.memo is None:
            return self._run_prompt(prompt, na_prompt)
        key = (
            prompt.input_ids,
            prompt.prefix_len,
            prompt.spans,
            None if na_prompt is None else na_prompt.input_ids,
            self.layers,
            self.heads,
            self.rows,
            id(self.m.model),
        )
        if key not in self.memo:
            self.memo[key] = self._run_prompt(prompt, na_prompt)
        return self.memo[key]

    def _run_prompt(self, prompt: ProbePrompt, na_prompt: ProbePrompt | None) -> ProbeOutput:
        from transformers import DynamicCache

        self._check_fits(prompt)
        p = prompt.prefix_len
        prefix = tuple(prompt.input_ids[:p])
        cache, start = self._take_kept(prefix)
        if cache is None:
            cache = DynamicCache(config=self.m.model.config)
        # Sliding-window cache layers drop old states and cannot be cropped back: the N/A pass then needs
        # a copy of the prefix's cache, taken between a prefix call and a query call. Otherwise prefix and
        # query go through in one call, capturing only the query rows (a second call's fixed cost is a
        # noticeable share of a short prompt's prefill).
        sliding = _is_sliding(cache)
        shared = na_prompt is not None and _shares_prefix(prompt, na_prompt)
        spare = None
        if shared and sliding:
            self._forward([prefix[start:]], cache, capture=False)
            spare = copy.deepcopy(cache)
            start = p
        q_rows = self._forward([prompt.input_ids[start:]], cache, capture=True, rows=self._read_rows(prompt))
        na_rows = None
        if na_prompt is not None and shared:
            if spare is not None:
                cache = spare
            else:
                _crop_to(cache, p)
            na_rows = self._forward(
                [na_prompt.input_ids[p:]], cache, capture=True, rows=self._read_rows(na_prompt)
            )
        if self.reuse_prefix and not sliding:
            _crop_to(cache, p)
            self._kept = (prefix, cache)
        if na_prompt is not None and not shared:
            # The twin differs before the passages end (the query is also placed before them): a full pass.
            self._check_fits(na_prompt)
            fresh = DynamicCache(config=self.m.model.config)
            na_rows = self._forward(
                [na_prompt.input_ids], fresh, capture=True, rows=self._read_rows(na_prompt)
            )
        return self._collect(prompt, q_rows, na_rows, 0, na_prompt)

    def run_prompts(
        self, prompts: Sequence[ProbePrompt], na_prompts: Sequence[ProbePrompt] | None = None
    ) -> list[ProbeOutput]:
        """Probe several prompts as one batch: one forward over all of them, then one over their
        ``N/A`` twins after cropping the batch's cache back to the shared prefix length.

        The prompts must have the same length and prefix length (the prompt orders of one window do,
        whenever the tokenizer splits every order alike); otherwise, and with ``reuse_prefix`` or a
        sliding-window cache, they are probed one at a time. Results equal :meth:`run_prompt`'s per
        prompt up to the kernels' rounding (a batch may take other matmul blocking).
        """
        from transformers import DynamicCache

        na_list = list(na_prompts) if na_prompts is not None else None
        if na_list is not None and len(na_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(na_list)} N/A prompts")
        first = prompts[0] if prompts else None
        batchable = (
            first is not None
            and len(prompts) > 1
            and not self.reuse_prefix
            and all(
                (q.num_tokens, q.prefix_len, q.query_start)
                == (first.num_tokens, first.prefix_len, first.query_start)
                for q in prompts
            )
            and (
                na_list is None
                or (
                    len({(n.num_tokens, n.query_start) for n in na_list}) == 1
                    and all(_shares_prefix(q, n) for q, n in zip(prompts, na_list, strict=True))
                )
            )
        )
        cache = DynamicCache(config=self.m.model.config) if batchable else None
        if not batchable or _is_sliding(cache):
            nas = na_list if na_list is not None else [None] * len(prompts)
            return [self.run_prompt(q, n) for q, n in zip(prompts, nas, strict=True)]
        assert first is not None
        self._check_fits(first)
        p = first.prefix_len
        q_rows = self._forward(
            [q.input_ids for q in prompts], cache, capture=True, rows=self._read_rows(first)
        )
        na_rows = None
        if na_list is not None:
            _crop_to(cache, p)
            na_rows = self._forward(
                [n.input_ids[p:] for n in na_list], cache, capture=True, rows=self._read_rows(na_list[0])
            )
        return [
            self._collect(q, q_rows, na_rows, b, na_list[b] if na_list is not None else None)
            for b, q in enumerate(prompts)
        ]

    def _take_kept(self, prefix: tuple[int, ...]) -> tuple[Any, int]:
        """The kept cache cropped to its common token prefix with ``prefix``, and that length."""
        if not self.reuse_prefix or self._kept is None:
            return None, 0
        ids, cache = self._kept
        self._kept = None
        n = 0
        for a, b in zip(ids, prefix, strict=False):
            if a != b:
                break
            n += 1
        if n == 0:
            return None, 0
        _crop_to(cache, n)
        self.reused_tokens += n
        return cache, n

    def _collect(
        self,
        prompt: ProbePrompt,
        q_rows: dict[int, torch.Tensor],
        na_rows: dict[int, torch.Tensor] | None,
        b: int,
        na_prompt: ProbePrompt | None = None,
    ) -> ProbeOutput:
        def stack(rows: dict[int, torch.Tensor], pr: ProbePrompt) -> tuple[np.ndarray, np.ndarray]:
            per_head = torch.stack([rows[layer][b, :, : pr.prefix_len] for layer in self.layers])  # (L, H, p)
            sel = per_head if self.heads is None else per_head[:, list(self.heads)]
            tok = sel.sum(dim=1).cpu().numpy()
            head = np.stack(
                [per_head[:, :, s:e].sum(dim=-1).cpu().numpy() for s, e in pr.spans], axis=-1
            )  # (L, H, P)
            return tok, head

        q_tok, q_head = stack(q_rows, prompt)
        na_tok = na_head = None
        if na_rows is not None:
            assert na_prompt is not None
            na_tok, na_head = stack(na_rows, na_prompt)
            if na_prompt.spans != prompt.spans:
                na_tok = _align_tokens(na_tok, na_prompt, prompt)
        return ProbeOutput(self.layers, q_tok, na_tok, q_head, na_head, prompt.spans, prompt)

    def probe(
        self,
        query: str,
        passages: Sequence[Passage],
        *,
        content_free: bool = True,
        max_passage_tokens: int = 300,
        template: PromptTemplate | None = None,
    ) -> ProbeOutput:
        """Build the prompt for ``passages`` (in the given order) and probe it."""
        return self.probe_orders(
            query,
            [passages],
            content_free=content_free,
            max_passage_tokens=max_passage_tokens,
            template=template,
        )[0]

    def probe_orders(
        self,
        query: str,
        orders: Sequence[Sequence[Passage]],
        *,
        content_free: bool = True,
        max_passage_tokens: int = 300,
        template: PromptTemplate | None = None,
        batch: bool = False,
    ) -> list[ProbeOutput]:
        """Probe the same query over several passage lists (e.g. the prompt orders of one window): one
        prompt each, probed one after another, or with ``batch`` as one batch (:meth:`run_prompts`)."""

        def build(q: str, passages: Sequence[Passage]) -> ProbePrompt:
            return build_prompt(
                self.m.tokenizer, q, passages, max_passage_tokens=max_passage_tokens, template=template
            )

        prompts = [build(query, ps) for ps in orders]
        nas = [build(NA_QUERY, ps) for ps in orders] if content_free else None
        if batch:
            return self.run_prompts(prompts, nas)
        return [self.run_prompt(q, nas[i] if nas is not None else None) for i, q in enumerate(prompts)]


def reference_rows(model: LoadedModel, ids: Sequence[int], m: int) -> dict[int, torch.Tensor]:
    """Eager-attention reference for tests: (heads, N) mean of the last ``m`` rows, every layer.

    Uses ``output_attentions`` with the eager kernel (N x N memory), so only for short prompts.
    """
    mm = model.model
    old = mm.config._attn_implementation
    mm.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = mm(input_ids=torch.tensor([list(ids)], device=model.device), output_attentions=True)
    finally:
        mm.set_attn_implementation(old)
    return {i: a[0, :, -m:, :].float().mean(dim=1) for i, a in enumerate(out.attentions)}


def stats_of(out: ProbeOutput) -> PassageStats:
    """The per-passage arrays of a probe, for scoring."""
    lengths = np.array([e - s for s, e in out.spans], dtype=np.float64)
    return PassageStats(
        layers=out.layers,
        query=out.query_head,
        na=out.na_head,
        lengths=lengths,
        query_tok=out.query_tok,
        na_tok=out.na_tok,
        spans=out.spans,
    )
