"""Answer generation from the reranked context. Generators are registered by name.

``transformers``  greedy decoding with the same loaded model on CPU (or GPU).
``vllm``          the vLLM engine (optional extra ``attn-rerank[vllm]``, GPU only).
``none``          no generation: the pipeline stops after reranking.

Both build the prompt with :class:`rerank.prompt.PromptTemplate`, the layout the probe read, so the
generator sees the passages exactly as they were scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rerank.config import GeneratorConfig
from rerank.model import LoadedModel
from rerank.prompt import PromptTemplate, _chat_wrap, truncate_text
from rerank.records import Passage
from retrievers.registry import Registry


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
    parts = []
    if passages:
        parts.append(template.head)
        for n, p in enumerate(passages, start=1):
            text, _ = truncate_text(tokenizer, p.text, max_passage_tokens)
            parts.append(template.passage.format(n=n, body=template.body(p, text)))
    parts.append(f"{instruction}\n\nQuestion: {question}")
    text, _ = _chat_wrap(tokenizer, "".join(parts), template.system)
    return text


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


__all__ = ["GENERATORS", "answer_prompt_text", "build_generator"]
