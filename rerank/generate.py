"""Answer generation from the reranked context. Generators are registered by name.

``transformers``  greedy decoding with the same loaded model on CPU (or GPU).
``openai``        a served model over the OpenAI-compatible ``/v1/chat/completions`` (``vllm serve``, TGI,
                  llama.cpp's server, Ollama, ``transformers serve``, a hosted API); optional extra
                  ``attn-rerank[openai]``. The recommended way to generate with vLLM.
``vllm``          the vLLM engine in-process (optional extra ``attn-rerank[vllm]``, GPU only).
``none``          no generation: the pipeline stops after reranking.

All build the prompt with :class:`rerank.probe.prompt.PromptTemplate`, the layout the probe read, so the
generator sees the passages exactly as they were scored. The local generators render the chat template
themselves; ``openai`` sends the same system and user messages (:func:`answer_messages`) and the server
renders them with the model's own template.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rerank.config import GeneratorConfig
from rerank.probe.model import LoadedModel
from rerank.probe.prompt import PromptTemplate, _chat_wrap, truncate_text
from rerank.records import Passage
from retrievers.registry import Registry

logger = logging.getLogger(__name__)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """Token id lists as one left-padded batch: ``(ids, attention_mask)``, both (batch, longest) long.

    Left padding keeps every sequence's last token in the last column, where the next token is read.
    """
    import torch

    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, x in enumerate(seqs):
        if len(x):
            ids[r, width - len(x) :] = torch.tensor(list(x))
            mask[r, width - len(x) :] = 1
    return ids, mask


GENERATORS: Registry[Any] = Registry("generator")


def _answer_content(
    tokenizer: Any,
    question: str,
    passages: Sequence[Passage],
    template: PromptTemplate,
    instruction: str,
    max_passage_tokens: int,
) -> str:
    parts = []
    if passages:
        parts.append(template.head)
        for n, p in enumerate(passages, start=1):
            text, _ = truncate_text(tokenizer, p.text, max_passage_tokens)
            parts.append(template.passage.format(n=n, body=template.body(p, text)))
    parts.append(f"{instruction}\n\nQuestion: {question}")
    return "".join(parts)


def answer_messages(
    tokenizer: Any,
    question: str,
    passages: Sequence[Passage],
    *,
    template: PromptTemplate,
    instruction: str,
    max_passage_tokens: int = 300,
) -> list[dict[str, str]]:
    """The answer prompt as chat messages: the template's system line, then one user turn.

    The user turn holds the probe's passage layout (each passage cut to ``max_passage_tokens`` tokens of
    ``tokenizer``) and the question; no passages = closed book. Rendered with the model's chat template
    these messages give exactly :func:`answer_prompt_text`.
    """
    content = _answer_content(tokenizer, question, passages, template, instruction, max_passage_tokens)
    messages = [{"role": "user", "content": content}]
    if template.system is not None:
        messages.insert(0, {"role": "system", "content": template.system})
    return messages


def answer_prompt_text(
    tokenizer: Any,
    question: str,
    passages: Sequence[Passage],
    *,
    template: PromptTemplate,
    instruction: str,
    max_passage_tokens: int = 300,
) -> str:
    """Chat-formatted prompt: the probe's passage layout, then the question. No passages = closed book."""
    content = _answer_content(tokenizer, question, passages, template, instruction, max_passage_tokens)
    text, _ = _chat_wrap(tokenizer, content, template.system)
    return text


@dataclass(frozen=True)
class Generation:
    """One generated answer and what it cost.

    Attributes:
        text: The answer, stripped.
        info: ``model``, ``latency_s`` (wall time, retries included), ``attempts``, ``finish_reason``
            and the server's token counts ``prompt_tokens``, ``completion_tokens``, ``total_tokens``.
    """

    text: str
    info: dict[str, Any] = field(default_factory=dict)


class GenerationError(RuntimeError):
    """A served generator gave up: the server is unreachable, too slow, or refused the request."""


@GENERATORS.register("none")
class NoGenerator:
    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def generate(self, question: str, passages: Sequence[Passage]) -> str | None:
        return None


@GENERATORS.register("transformers")
class TransformersGenerator:
    """Greedy generation with a ``transformers`` model.

    Args:
        model: Loaded model (the probe's, by default: one copy of the weights in memory).
        cfg: Generation settings.
        template: Prompt layout shared with the probe.
    """

    def __init__(
        self,
        model: LoadedModel,
        cfg: GeneratorConfig | None = None,
        template: PromptTemplate | None = None,
        max_passage_tokens: int = 300,
    ) -> None:
        self.m = model
        self.cfg = cfg or GeneratorConfig()
        self.template = template or PromptTemplate()
        self.max_passage_tokens = max_passage_tokens

    def prompt(self, question: str, passages: Sequence[Passage]) -> str:
        return answer_prompt_text(
            self.m.tokenizer,
            question,
            passages,
            template=self.template,
            instruction=self.cfg.instruction,
            max_passage_tokens=self.max_passage_tokens,
        )

    def generate(self, question: str, passages: Sequence[Passage]) -> str:
        return self.generate_batch([question], [passages], batch_size=1)[0]

    def generate_batch(
        self,
        questions: Sequence[str],
        lists: Sequence[Sequence[Passage]],
        batch_size: int = 8,
        show_progress: bool = False,
    ) -> list[str]:
        """Greedy answers for many questions; prompts are left-padded into batches of ``batch_size``."""
        import torch
        from tqdm.auto import tqdm

        prompts = [self.prompt(q, ps) for q, ps in zip(questions, lists, strict=True)]
        tok = self.m.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # Sort by length so each batch pads little; answers are returned in the input order.
        enc = [tok(t, add_special_tokens=False)["input_ids"] for t in prompts]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        out: list[str] = [""] * len(enc)
        mm = self.m.model
        # The probe switches the attention kernel; generation needs the plain one.
        old = mm.config._attn_implementation
        if old != "sdpa":
            mm.set_attn_implementation("sdpa")
        try:
            starts = range(0, len(order), batch_size)
            for b in tqdm(starts, desc="generate", unit="batch", disable=not show_progress):
                idx = order[b : b + batch_size]
                ids, mask = left_pad([enc[i] for i in idx], pad_id)
                width = ids.shape[1]
                with torch.inference_mode():
                    gen = mm.generate(
                        ids.to(self.m.device),
                        attention_mask=mask.to(self.m.device),
                        max_new_tokens=self.cfg.max_new_tokens,
                        do_sample=False,
                        pad_token_id=pad_id,
                    )
                for r, i in enumerate(idx):
                    out[i] = tok.decode(gen[r, width:], skip_special_tokens=True).strip()
        finally:
            if old != "sdpa":
                mm.set_attn_implementation(old)
        return out


# Statuses worth another try: the request may succeed later (overload, restart, transient failure).
_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 8.0


def _backoff_s(attempt: int, exc: BaseException) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): the server's ``Retry-After``, else jittered 2^n."""
    response = getattr(exc, "response", None)
    header = response.headers.get("retry-after") if response is not None else None
    if header is not None:
        try:
            return min(max(float(header), 0.0), _BACKOFF_MAX_S * 4)
        except ValueError:
            pass  # an HTTP date: fall back to our own schedule
    base = min(_BACKOFF_FIRST_S * 2 ** (attempt - 1), _BACKOFF_MAX_S)
    return base * (0.75 + 0.5 * random.random())


@GENERATORS.register("openai")
class OpenAIGenerator:
    """Answers from a served model over the OpenAI-compatible chat completions API.

    Sends the same system and user messages as :class:`TransformersGenerator` (passages cut with the
    loaded model's tokenizer, so the probe and the served model must share a tokenizer for the
    contexts to match), with ``temperature`` 0 = greedy. Retries timeouts, refused connections, 429s
    and 5xx responses ``cfg.max_retries`` times with backoff, then raises :class:`GenerationError`
    naming the URL. Needs the extra ``attn-rerank[openai]``.

    Args:
        model: Loaded model; only its tokenizer is used (to cut passages as the probe did).
        cfg: Generation settings; ``base_url`` and ``model`` are required.
        template: Prompt layout shared with the probe.
        max_passage_tokens: Each passage is cut to this many tokens.

    Raises:
        ImportError: The ``openai`` package is missing.
        ValueError: ``cfg.api_key_env`` names a variable that is not set.
    """

    def __init__(
        self,
        model: LoadedModel,
        cfg: GeneratorConfig | None = None,
        template: PromptTemplate | None = None,
        max_passage_tokens: int = 300,
    ) -> None:
        try:
            import openai
        except ImportError as exc:
            raise ImportError(
                "the 'openai' generator needs the openai SDK: pip install 'attn-rerank[openai]'"
            ) from exc
        cfg = cfg or GeneratorConfig()
        if cfg.name != "openai" or not cfg.base_url or not cfg.model:
            raise ValueError(
                "OpenAIGenerator needs GeneratorConfig(name='openai', base_url=..., model=...); "
                f"got name={cfg.name!r}, base_url={cfg.base_url!r}, model={cfg.model!r}"
            )
        self.cfg = cfg
        self.tokenizer = model.tokenizer
        self.template = template or PromptTemplate()
        self.max_passage_tokens = max_passage_tokens
        self.base_url = cfg.base_url.rstrip("/")
        self._api_key = self._read_key(cfg.api_key_env)
        self._openai = openai
        # Retries are ours (counted, logged, same rules sync and async); the SDK's own are switched off.
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=self._api_key, timeout=cfg.timeout_s, max_retries=0
        )
        # An async client and its semaphore belong to one event loop; asyncio.run() makes a new loop
        # each time, so they are made per loop.
        self._async: weakref.WeakKeyDictionary[Any, tuple[Any, asyncio.Semaphore]] = (
            weakref.WeakKeyDictionary()
        )
        self._async_lock = threading.Lock()

    @staticmethod
    def _read_key(env: str | None) -> str:
        if env is None:
            # The SDK refuses an empty key; servers started without --api-key ignore this one.
            return "no-key"
        key = os.environ.get(env)
        if not key:
            raise ValueError(f"generator.api_key_env is {env!r} but that environment variable is not set")
        return key

    def messages(self, question: str, passages: Sequence[Passage]) -> list[dict[str, str]]:
        """The chat messages sent for ``question`` over ``passages`` (in the order given)."""
        return answer_messages(
            self.tokenizer,
            question,
            passages,
            template=self.template,
            instruction=self.cfg.instruction,
            max_passage_tokens=self.max_passage_tokens,
        )

    def _request(self, question: str, passages: Sequence[Passage]) -> dict[str, Any]:
        return {
            "model": self.cfg.model,
            "messages": self.messages(question, passages),
            "max_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature,
        }

    def _result(self, resp: Any, started: float, attempts: int) -> Generation:
        choice = resp.choices[0] if resp.choices else None
        text = (choice.message.content or "") if choice is not None else ""
        usage = resp.usage
        info: dict[str, Any] = {
            "model": resp.model,
            "latency_s": time.perf_counter() - started,
            "attempts": attempts,
            "finish_reason": choice.finish_reason if choice is not None else None,
            "prompt_tokens": usage.prompt_tokens if usage is not None else None,
            "completion_tokens": usage.completion_tokens if usage is not None else None,
            "total_tokens": usage.total_tokens if usage is not None else None,
        }
        return Generation(text.strip(), info)

    def _retry_after(self, exc: Exception, attempt: int) -> float | None:
        """Seconds to wait before another try, or None when ``exc`` is final (raised as GenerationError)."""
        o = self._openai
        retryable = isinstance(exc, o.APIConnectionError) or (
            isinstance(exc, o.APIStatusError) and exc.status_code in _RETRY_STATUS
        )
        if not retryable or attempt > self.cfg.max_retries:
            return None
        wait = _backoff_s(attempt, exc)
        logger.warning(
            "%s: %s; retry %d of %d in %.1f s",
            self.base_url,
            self._describe(exc),
            attempt,
            self.cfg.max_retries,
            wait,
        )
        return wait

    def _describe(self, exc: Exception) -> str:
        o = self._openai
        if isinstance(exc, o.APITimeoutError):
            return f"no answer within timeout_s={self.cfg.timeout_s:g} s"
        if isinstance(exc, o.APIConnectionError):
            cause = exc.__cause__ or exc
            return f"cannot connect ({type(cause).__name__}: {cause})"
        if isinstance(exc, o.APIStatusError):
            body = exc.response.text[:300] if exc.response is not None else ""
            return f"HTTP {exc.status_code}: {body}"
        return f"{type(exc).__name__}: {exc}"

    def _error(self, exc: Exception, attempts: int) -> GenerationError:
        o = self._openai
        hint = ""
        if isinstance(exc, o.APITimeoutError):
            hint = "; raise generator.timeout_s, or lower generator.concurrency if the server is overloaded"
        elif isinstance(exc, o.APIConnectionError):
            hint = "; is the server running there? (e.g. `vllm serve MODEL`), or fix generator.base_url"
        elif isinstance(exc, o.NotFoundError):
            hint = f"; check generator.model ({self.cfg.model!r}) against GET {self.base_url}/models"
        elif isinstance(exc, (o.AuthenticationError, o.PermissionDeniedError)):
            hint = "; set generator.api_key_env to the variable holding the server's API key"
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        where = f"{self.base_url}/chat/completions"
        return GenerationError(f"generation at {where} failed after {tries}: {self._describe(exc)}{hint}")

    def generate_with_info(self, question: str, passages: Sequence[Passage]) -> Generation:
        """One answer with its token usage and latency.

        Raises:
            GenerationError: The server stayed unreachable, slow or failing after the retries, or
                refused the request (4xx other than 408/409/429).
        """
        req = self._request(question, passages)
        started = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self.client.chat.completions.create(**req)
            except self._openai.OpenAIError as exc:
                wait = self._retry_after(exc, attempt)
                if wait is None:
                    raise self._error(exc, attempt) from exc
                time.sleep(wait)
                continue
            return self._result(resp, started, attempt)

    def generate(self, question: str, passages: Sequence[Passage]) -> str:
        return self.generate_with_info(question, passages).text

    def _async_state(self) -> tuple[Any, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        with self._async_lock:
            state = self._async.get(loop)
            if state is None:
                client = self._openai.AsyncOpenAI(
                    base_url=self.base_url, api_key=self._api_key, timeout=self.cfg.timeout_s, max_retries=0
                )
                state = (client, asyncio.Semaphore(self.cfg.concurrency))
                self._async[loop] = state
        return state

    async def agenerate_with_info(self, question: str, passages: Sequence[Passage]) -> Generation:
        """Async :meth:`generate_with_info`; at most ``cfg.concurrency`` requests of this generator in
        flight per event loop (waiting for a slot counts toward ``latency_s``)."""
        client, slots = self._async_state()
        req = self._request(question, passages)
        started = time.perf_counter()
        attempt = 0
        async with slots:
            while True:
                attempt += 1
                try:
                    resp = await client.chat.completions.create(**req)
                except self._openai.OpenAIError as exc:
                    wait = self._retry_after(exc, attempt)
                    if wait is None:
                        raise self._error(exc, attempt) from exc
                    await asyncio.sleep(wait)
                    continue
                return self._result(resp, started, attempt)

    async def agenerate(self, question: str, passages: Sequence[Passage]) -> str:
        return (await self.agenerate_with_info(question, passages)).text

    def generate_batch_with_info(
        self,
        questions: Sequence[str],
        lists: Sequence[Sequence[Passage]],
        show_progress: bool = False,
    ) -> list[Generation]:
        """Answers for many questions, ``cfg.concurrency`` requests in flight, returned in input order.

        Raises:
            GenerationError: The first request that failed for good (the others still finish).
        """
        from tqdm.auto import tqdm

        pairs = list(zip(questions, lists, strict=True))
        # Threads rather than an event loop: works the same inside a caller's running loop (notebooks).
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, max(len(pairs), 1))) as pool:
            futures = [pool.submit(self.generate_with_info, q, ps) for q, ps in pairs]
            bar = tqdm(total=len(futures), desc="generate", unit="q", disable=not show_progress)
            try:
                out = []
                for f in futures:
                    out.append(f.result())
                    bar.update(1)
            finally:
                bar.close()
        return out

    def generate_batch(
        self,
        questions: Sequence[str],
        lists: Sequence[Sequence[Passage]],
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> list[str]:
        """Answers for many questions (see :meth:`generate_batch_with_info`).

        ``batch_size`` is accepted for the local generators' signature and ignored: the server batches,
        and ``cfg.concurrency`` bounds the requests in flight.
        """
        return [g.text for g in self.generate_batch_with_info(questions, lists, show_progress)]

    def close(self) -> None:
        """Close the sync client's connections (async clients close with their event loop's objects)."""
        self.client.close()


@GENERATORS.register("vllm")
class VLLMGenerator:
    """Greedy generation with vLLM (GPU). Same prompt text as the ``transformers`` generator.

    Raises:
        ImportError: vLLM is not installed; install the extra ``attn-rerank[vllm]`` on a CUDA machine.
    """

    def __init__(
        self,
        model: LoadedModel,
        cfg: GeneratorConfig | None = None,
        template: PromptTemplate | None = None,
        max_passage_tokens: int = 300,
        model_path: str | None = None,
    ) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ImportError(
                "the 'vllm' generator needs vLLM: pip install 'attn-rerank[vllm]' (CUDA machines only)"
            ) from exc
        self.helper = TransformersGenerator(model, cfg, template, max_passage_tokens)
        self.cfg = self.helper.cfg
        self.llm = LLM(model=model_path or model.model_id, dtype=model.dtype)
        self.params = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_new_tokens)

    def generate(self, question: str, passages: Sequence[Passage]) -> str:
        return self.generate_batch([question], [passages])[0]

    def generate_batch(self, questions: Sequence[str], lists: Sequence[Sequence[Passage]]) -> list[str]:
        prompts = [self.helper.prompt(q, ps) for q, ps in zip(questions, lists, strict=True)]
        outs = self.llm.generate(prompts, self.params)
        return [o.outputs[0].text.strip() for o in outs]


def build_generator(
    cfg: GeneratorConfig, model: LoadedModel | None, template: PromptTemplate | None = None, **kw: Any
) -> Any:
    cls = GENERATORS.get(cfg.name)
    if cls is NoGenerator:
        return NoGenerator()
    if model is None:
        raise ValueError(f"generator '{cfg.name}' needs a loaded model")
    return cls(model, cfg, template, **kw)


__all__ = [
    "GENERATORS",
    "Generation",
    "GenerationError",
    "OpenAIGenerator",
    "answer_messages",
    "answer_prompt_text",
    "build_generator",
]
