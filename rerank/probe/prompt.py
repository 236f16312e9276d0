"""The probe prompt: ``[instruction, passages, late instruction + query, assistant header]``.

The same layout feeds the generator, so the probe scores the very context the generator reads.
Token spans come from ONE tokenisation of the full chat-formatted prompt with offset mapping: a
passage's block is every token that overlaps its characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rerank.records import Passage

NA_QUERY = "N/A"
# The query's copy before the passages (``probe.query_position: both``).
EARLY_QUERY = "Query: {query}\n\n"


@dataclass(frozen=True)
class PromptTemplate:
    """Wording of the prompt. ``{query}`` is filled in ``late``, and in ``early`` when it is set: the
    query placed before the passages as well (``probe.query_position: both``)."""

    head: str = "Here are some numbered passages.\n\n"
    passage: str = "[{n}] {body}\n\n"
    late: str = "Find the passages above that are relevant to the following query.\n\nQuery: {query}"
    system: str | None = None
    # Left out of the repr (and so of cache keys and template ids) while unset: templates without it
    # keep the identity they had before it existed.
    early: str | None = field(default=None, repr=False)

    def identity(self) -> dict[str, Any]:
        """The fields that identify this wording (``early`` only when it is set)."""
        d = asdict(self)
        if self.early is None:
            del d["early"]
        return d

    def __repr__(self) -> str:
        extra = "" if self.early is None else f", early={self.early!r}"
        return (
            f"PromptTemplate(head={self.head!r}, passage={self.passage!r}, late={self.late!r}, "
            f"system={self.system!r}{extra})"
        )

    def body(self, passage: Passage, text: str) -> str:
        return f"{passage.title}: {text}" if passage.title else text


@dataclass(frozen=True)
class ProbePrompt:
    """A tokenised probe prompt.

    Attributes:
        input_ids: Token ids of the whole prompt.
        spans: ``[start, end)`` token span of each passage block, in prompt order.
        prefix_len: Tokens before the late instruction; the passages all lie in the prefix, which a
            content-free (``N/A``) pass can reuse from the KV cache.
        text: The prompt text (for inspection and for the generator).
        truncated: Per passage, whether it was cut to the token budget.
        query_start: The first token of the late query text (the late instruction lies between
            ``prefix_len`` and it).
    """

    input_ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    prefix_len: int
    text: str
    truncated: tuple[bool, ...]
    query_start: int = -1

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def query_len(self) -> int:
        return len(self.input_ids) - self.prefix_len


# Characters kept per allowed token before tokenising: far above what any tokenizer packs into one token
# of ordinary text, so the character cut never decides where a passage ends (the token cut does), but a
# multi-megabyte passage is never tokenised whole.
CHARS_PER_TOKEN_BOUND = 64


def truncate_text(tokenizer: Any, text: str, max_tokens: int) -> tuple[str, bool]:
    """Cut ``text`` to its first ``max_tokens`` tokens, at a token boundary in the original string.

    The text is first cut to ``CHARS_PER_TOKEN_BOUND * max_tokens`` characters, so the work does not grow
    with the passage's length.
    """
    bound = CHARS_PER_TOKEN_BOUND * max_tokens
    head = text[:bound]
    enc = tokenizer(head, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= max_tokens:
        return head, len(head) < len(text)
    return text[: offsets[max_tokens - 1][1]], True


def _chat_wrap(tokenizer: Any, content: str, system: str | None) -> tuple[str, int]:
    """Format ``content`` as one user turn plus the assistant header; return text and content offset."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = content + "\n"
    start = text.find(content)
    if start < 0:
        raise ValueError("the chat template altered the prompt content; cannot locate passage spans")
    return text, start


def build_prompt(
    tokenizer: Any,
    query: str,
    passages: Sequence[Passage],
    *,
    max_passage_tokens: int = 300,
    template: PromptTemplate | None = None,
) -> ProbePrompt:
    """Build and tokenise the probe prompt for ``passages`` in the given order.

    Raises:
        ValueError: No passages, or a passage block could not be located in the tokens.
    """
    template = template or PromptTemplate()
    if not passages:
        raise ValueError("build_prompt needs at least one passage")
    pieces = [template.head]
    if template.early is not None:
        pieces.append(template.early.format(query=query))
    char_spans = []
    truncated = []
    pos = sum(len(x) for x in pieces)
    for n, p in enumerate(passages, start=1):
        text, cut = truncate_text(tokenizer, p.text, max_passage_tokens)
        truncated.append(cut)
        block = template.passage.format(n=n, body=template.body(p, text))
        # The span excludes the trailing blank line, which belongs to no passage.
        stripped = block.rstrip("\n")
        char_spans.append((pos, pos + len(stripped)))
        pieces.append(block)
        pos += len(block)
    late_start = pos
    late = template.late.format(query=query)
    cut = template.late.find("{query}")
    query_char = late_start + (len(template.late[:cut].format()) if cut >= 0 else len(late))
    pieces.append(late)
    content = "".join(pieces)
    text, offset = _chat_wrap(tokenizer, content, template.system)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    offsets = enc["offset_mapping"]
    spans = []
    for s, e in char_spans:
        s, e = s + offset, e + offset
        toks = [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
        if not toks:
            raise ValueError("a passage block has no tokens; check the tokenizer's offset mapping")
        spans.append((toks[0], toks[-1] + 1))
    late_char = late_start + offset
    prefix_len = next((i for i, (a, _) in enumerate(offsets) if a >= late_char), len(ids))
    # A token straddling the boundary belongs to the query side; the passages must end before it.
    if spans[-1][1] > prefix_len:
        raise ValueError("last passage overlaps the query section; add a separator to the template")
    # A token that straddles the query's first character counts as the query's.
    query_start = next((i for i, (_, b) in enumerate(offsets) if b > query_char + offset), len(ids))
    query_start = max(query_start, prefix_len)
    return ProbePrompt(tuple(ids), tuple(spans), prefix_len, text, tuple(truncated), query_start)
