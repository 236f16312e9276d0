"""Suite ``speed``: what the attention probe costs over a plain prefill and over other rerankers.

Model: the embedded SmolLM2-135M-Instruct as :func:`rerank.probe.model.load_model` loads it by default
(bf16 on a CPU with AMX/AVX512-BF16). Prompts: the ICR layout of :func:`rerank.probe.prompt.build_prompt`
over real TREC DL19 BM25 passages (the first query of ``trec-dl19/bm25_top100.json``, passages in BM25 order):

* ``main``: the first passages (each cut to 300 tokens) until the prompt reaches about 2,000 tokens
  (500 under ``--quick``); its figures carry no suffix (``seconds_per_query``, ``peak_rss_mb``);
* a sweep of 10, 20, 50 and 100 passages cut to ``passage_max_tokens`` = 70 tokens, so that 100 of
  them fit SmolLM2's 8,192-token context; suffixed ``@10`` ... ``@100``. ``seconds_per_query@n`` of
  every system over these lengths is the scaling curve.

Systems timed on the same token ids, interleaved round by round, alternating the order, so they share
the machine's noise; the figure is the median over ``repeats`` rounds after one warm-up call:

* ``plain-prefill``: ``model.model`` forward over the whole prompt, sdpa kernel, ``use_cache=True``
  with a fresh ``DynamicCache`` (as the probe runs it), nothing captured.
* ``probe``: :class:`rerank.probe.AttentionProbe` over all layers, ``early_exit=False`` (the full
  forward), no ``N/A`` pass: ``run_prompt(prompt)``, i.e. the prefix pass + the query-suffix pass that
  captures the rows + collecting the per-passage arrays. Extra figures: ``ratio_probe_vs_plain``
  (goal <= 1.10), ``early_exit_seconds_per_query`` (layers ``probe.layers`` of ``configs/default.yaml``
  when it sets them, else 0..23 of 30, forward stopped after the last), ``nacal_seconds_per_query``
  (all layers plus the content-free ``N/A`` pass reusing the prefix's KV cache) and their ratios.
* ``probe-default``: the shipped reranker end to end, :class:`rerank.engines.AttentionReranker` built
  from the ``probe`` and ``calibration`` sections of ``configs/default.yaml`` (its head set, early exit,
  ``N/A`` pass, windows of ``window_size`` passages), ``.rerank(query, passages)`` over the same
  passages. Only ``passage_max_tokens`` is set to the prompt's cap (300 for ``main``, 70 for the sweep),
  so every system reads the same passage text. ``ratio_vs_plain`` compares it with ``plain-prefill``.

Baselines (``--opt baselines=``, default ``icr-reference,listwise,pointwise``): the rerankers registered
under those names in :data:`rerank.engines.PROBE_ENGINES`, each built as ``cls(model, probe_config)``
(``probe_config``: ``configs/default.yaml``'s probe section with the sweep's
``passage_max_tokens``) and timed as ``.rerank(query, passages)`` at ``baseline_lengths`` passages only
(default 20 and 100; they are slow): one warm-up call on the first 2 passages, then ``baseline_repeats``
interleaved rounds (default 1) at each length. A baseline that raises ``ValueError`` at a length (the
``output_attentions`` reference refuses prompts whose N x N attention maps would not fit its memory
limit) gets ``skipped@n`` = the reason instead of figures; the run goes on. A name that is not a
registered engine is refused before the model loads. ``probe`` and ``probe-default`` get
``ratio_probe_vs_<baseline>@n`` and ``ratio_vs_<baseline>@n`` (their seconds / the baseline's, same
run; ``-`` in names becomes ``_``).

Roofline: in the same process, after the model is loaded (same torch thread count), square matmuls of
``roofline_sizes`` (1024, 2048, 4096; 1024 and 2048 under ``--quick``) are timed in bf16 and fp32: one
warm-up, ``roofline_repeats`` calls each, best call per size, best size wins (the peak the machine can
reach; on a shared machine the best call is the least disturbed one). ``matmul_gflops_bf16`` and
``matmul_gflops_fp32`` go into ``config`` and ``machine``. Each prompt's model FLOPs
(:func:`prefill_flops`, also ``config.prompts[label].prefill_gflop``) over the measured seconds give
``prefill_gflops_per_s`` of ``plain-prefill`` and ``probe``, and ``roofline_fraction`` = that rate over the
matmul rate of the dtype the model runs in. The probe's own extra work (fp32 logits of its m query rows)
is not counted: its rate is the model's useful work per second, so overhead shows as a lower fraction.

Memory (``peak_rss_mb``, ``peak_growth_mb``): measured in a *separate, fresh* Python process (one per
prompt length in the full run, one for all lengths under ``--quick``), never the timing process. Before
each call the process returns freed heap to the OS (``malloc_trim``), reads its RSS (baseline) and
resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5); after the call it reads ``VmHWM``.
Each system runs once unmeasured first (the same call for ``plain-prefill``/``probe``/``probe-default``, a
2-passage call for the slow baselines), so one-time allocations (thread pools, kernel caches) are left
out. ``peak_rss_mb`` is that peak (model and interpreter included), ``peak_growth_mb`` = peak - baseline,
the call's own working memory. Where the peak counter cannot be reset, a 5 ms RSS-sampling thread is
used instead (``config.memory_method`` says which). ``memory_linear_fit_r2`` and
``memory_growth_mb_per_1k_tokens`` fit ``peak_growth_mb`` against prompt tokens over all lengths.
The theoretical figures (``capture_*``, ``nxn_*``) compare what the probe allocates per probed layer
(fp32 logits of the ``m`` query rows, heads x m x N x 4 bytes, plus the fp32 repeated keys it multiplies,
heads x N x head_dim x 4) with an N x N attention map (heads x N x N x 4 per layer, or x layers in bf16
for ``output_attentions=True``).

Throughput (``--opt only=throughput``, its own JSON): queries/s of the shipped default on DL19's BM25
top-20 and top-100 with and without ``probe.batch_prompts``, beside a plain prefill of the same prompts,
with nDCG@10 and peak RSS of each; see :mod:`eval.throughput`.

``--quick``: a ~500-token ``main`` prompt and 5 and 10 passages cut to 32 tokens, 1 round, the
baselines at 5 passages only. Options (``--opt key=value``): ``repeats``, ``lengths``
(``10,20,50,100``), ``passage_max_tokens`` (the sweep's), ``fresh_process_per_length``, ``threads``
(torch intra-op threads; 0 = torch's default), ``baselines`` (comma-separated engine names; empty =
none), ``baseline_lengths`` (``20,100``; must be among ``lengths``), ``baseline_repeats`` (1),
``roofline_sizes``, ``roofline_repeats``. On a shared machine, set ``threads`` to the cores left free:
with more threads than free cores, torch's thread barriers stall and timings balloon by 10x or more
(``config.load_average_*`` show what else ran).
Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.common import SuiteError, check_opts, get_opt, machine_info, require_data, write_json

logger = logging.getLogger(__name__)

DATASET = "trec-dl19"
SUITE = "speed"
FULL_LENGTHS = (10, 20, 50, 100)
QUICK_LENGTHS = (5, 10)
SWEEP_PASSAGE_TOKENS = 70
QUICK_SWEEP_PASSAGE_TOKENS = 32
TWO_K_PASSAGE_TOKENS = 300
TWO_K_TARGET_TOKENS = 2000
QUICK_TARGET_TOKENS = 500
DEFAULT_EARLY_LAYERS = (0, 23)
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
# Registered in rerank.engines.PROBE_ENGINES; looked up by name at run time.
BASELINES = ("icr-reference", "listwise", "pointwise")
FULL_BASELINE_LENGTHS = (20, 100)
# The slow baselines warm up on this many passages, not on the measured list (that would double their cost).
BASELINE_WARMUP_PASSAGES = 2
FULL_ROOFLINE_SIZES = (1024, 2048, 4096)
QUICK_ROOFLINE_SIZES = (1024, 2048)
ROOFLINE_REPEATS = 5
QUICK_ROOFLINE_REPEATS = 3
# Larger matmuls are skipped once one call takes this long (bf16 without native support is very slow).
ROOFLINE_MAX_CALL_S = 2.0
MB = 2**20


# ----------------------------------------------------------------------------------------------------
# Memory measurement (used inside the fresh worker process)


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc), so a baseline RSS is not inflated by earlier calls."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    """Reset this process's peak-RSS counter (Linux >= 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def _rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil

    return psutil.Process().memory_info().rss / MB


@contextlib.contextmanager
def _peak_meter() -> Iterator[dict[str, Any]]:
    """Measure one call: yields a dict filled with ``baseline_mb``, ``peak_mb`` and ``method`` on exit."""
    _malloc_trim()
    res: dict[str, Any] = {"baseline_mb": _rss_mb()}
    if _reset_hwm():
        res["method"] = "VmHWM reset via /proc/self/clear_refs"
        yield res
        res["peak_mb"] = max((_status_kb("VmHWM") or 0) / 1024, _rss_mb())
        return
    res["method"] = "RSS sampled every 5 ms"
    stop = threading.Event()
    peak = [res["baseline_mb"]]

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield res
    finally:
        stop.set()
        thread.join()
        res["peak_mb"] = max(peak[0], _rss_mb())


# ----------------------------------------------------------------------------------------------------
# FLOPs and the matmul roofline


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder that decide its prefill FLOPs (read from a ``transformers`` config).

    Attributes:
        layers: Decoder layers.
        hidden: Model width ``d``.
        heads: Query heads ``Hq``.
        kv_heads: Key/value heads ``Hkv`` (grouped-query attention when < ``heads``).
        head_dim: Width of one head ``hd`` (not always ``hidden / heads``, e.g. Gemma).
        intermediate: MLP width ``I``.
        vocab: Vocabulary size ``V`` (the LM head's output width).
        gated_mlp: Gate/up/down MLP (llama, qwen, mistral, gemma, phi3, olmo2, granite: every
            architecture the probe supports) rather than a two-matrix up/down MLP.
        windows: Per layer, the sliding-window size, or None for full causal attention.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool = True
    windows: tuple[int | None, ...] = ()

    @classmethod
    def of(cls, cfg: Any) -> ModelShape:
        """Read the shape from a ``transformers`` config (or anything with the same attributes)."""
        heads = int(cfg.num_attention_heads)
        layers = int(cfg.num_hidden_layers)
        # transformers 5 configs list ``layer_types`` (Gemma-3: 5 sliding layers per full one); older ones
        # and llama have none, which means full attention everywhere.
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * layers
        window = getattr(cfg, "sliding_window", None)
        return cls(
            layers=layers,
            hidden=int(cfg.hidden_size),
            heads=heads,
            kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
            intermediate=int(cfg.intermediate_size),
            vocab=int(cfg.vocab_size),
            windows=tuple(
                int(window) if window and t == "sliding_attention" else None for t in types[:layers]
            ),
        )


def _causal_pairs(tokens: int, window: int | None) -> int:
    """(query, key) pairs a causal prefill of ``tokens`` scores: row i sees min(i + 1, window) keys."""
    if window is None or window >= tokens:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


def prefill_flops(shape: ModelShape, tokens: int, *, lm_head_tokens: int = 0) -> int:
    """Floating-point operations of one prefill of ``tokens`` tokens (a multiply-add counts as 2).

    With ``N`` tokens, width ``d``, ``Hq`` query heads and ``Hkv`` key/value heads of width ``hd``, MLP
    width ``I`` and vocabulary ``V``, each layer costs

    * projections: ``2 N d (Hq hd)`` for q, ``2 N d (Hkv hd)`` each for k and v (grouped KV heads make
      them narrower), ``2 N (Hq hd) d`` for o;
    * MLP: ``3 x 2 N d I`` (gate, up, down; ``2 x`` for a two-matrix MLP);
    * attention: scores ``q k^T`` and the weighted sum of values, ``2 hd`` each per (query, key) pair and
      query head. A causal prompt has ``P = N (N + 1) / 2`` pairs (row i sees i + 1 keys: about half of
      N^2); a sliding-window layer of width w has ``w (w + 1) / 2 + (N - w) w`` when ``N > w``. So
      ``2 x 2 hd Hq P``. Grouped KV heads do not shrink this: every query head scores every key.

    plus ``2 lm_head_tokens d V`` for the LM head on the positions whose logits are computed (0 for
    this suite's prefill, which runs the base model without the LM head). Elementwise work (norms, RoPE,
    softmax, activations, residual adds) is O(N d) per layer, under 1% here, and is not counted. Splitting
    the prompt into passes over one KV cache (prefix, then query suffix) gives the same total.

    Args:
        shape: The model's dimensions (:meth:`ModelShape.of`).
        tokens: Prompt length ``N``.
        lm_head_tokens: Positions whose logits the LM head computes.

    Returns:
        The FLOP count, an exact integer.
    """
    n, d, hd = tokens, shape.hidden, shape.head_dim
    q_width, kv_width = shape.heads * hd, shape.kv_heads * hd
    proj = 2 * n * d * q_width + 2 * (2 * n * d * kv_width) + 2 * n * q_width * d
    mlp = (3 if shape.gated_mlp else 2) * 2 * n * d * shape.intermediate
    windows = shape.windows or (None,) * shape.layers
    attn = sum(2 * 2 * hd * shape.heads * _causal_pairs(n, w) for w in windows)
    return shape.layers * (proj + mlp) + attn + 2 * lm_head_tokens * d * shape.vocab


def measure_matmul_gflops(
    dtype: str,
    sizes: Sequence[int],
    repeats: int,
    device: str = "cpu",
    max_call_s: float = ROOFLINE_MAX_CALL_S,
) -> dict[str, Any]:
    """Best achieved GFLOP/s of square ``n x n @ n x n`` matmuls (``2 n^3`` FLOPs) in ``dtype``.

    Uses torch's current thread count. Per size: one warm-up call (oneDNN picks and JITs its kernel on
    the first call of a shape), then ``repeats`` calls, keeping the fastest. A warm-up call over
    ``max_call_s`` is not repeated (its own time is the figure: at that length the JIT is noise), and
    sizes after one whose call took over ``max_call_s`` are skipped.

    Returns:
        ``{"gflops": best over sizes, "per_size": {n: GFLOP/s}}``.
    """
    import torch

    tdtype = getattr(torch, dtype)
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    per_size: dict[int, float] = {}
    with torch.inference_mode():
        for n in sizes:
            gen = torch.Generator(device=device).manual_seed(n)
            a = torch.randn(n, n, generator=gen, device=device).to(tdtype)
            b = torch.randn(n, n, generator=gen, device=device).to(tdtype)
            out = torch.empty(n, n, dtype=tdtype, device=device)
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            sync()
            warm = time.perf_counter() - t0
            best = warm if warm > max_call_s else float("inf")
            for _ in range(0 if warm > max_call_s else repeats):
                t0 = time.perf_counter()
                torch.matmul(a, b, out=out)
                sync()
                best = min(best, time.perf_counter() - t0)
            per_size[n] = 2 * n**3 / best / 1e9
            del a, b, out
            if best > max_call_s:
                break
    return {"gflops": max(per_size.values()), "per_size": per_size}


def _dtype_key(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(dtype, dtype)


# ----------------------------------------------------------------------------------------------------
# The systems


class Runner:
    """The timed callables over one loaded model: plain prefill, probe, early-exit probe, N/A probe."""

    def __init__(self, loaded: Any, early_layers: tuple[int, int]) -> None:
        from rerank.probe.capture import AttentionProbe

        self.m = loaded
        self.probe_all = AttentionProbe(loaded, layers=None, early_exit=False)
        self.probe_early = AttentionProbe(loaded, layers=early_layers, early_exit=True)

    def _set_kernel(self, name: str) -> None:
        mm = self.m.model
        if mm.config._attn_implementation != name:
            mm.set_attn_implementation(name)

    def plain(self, prompt: Any) -> None:
        """One forward of the base model over all prompt tokens with sdpa and a fresh KV cache."""
        import torch
        from transformers import DynamicCache

        self._set_kernel("sdpa")
        mm = self.m.model
        cache = DynamicCache(config=mm.config)
        x = torch.tensor([list(prompt.input_ids)], device=self.m.device)
        pos = torch.arange(x.shape[1], device=self.m.device)[None]
        with torch.inference_mode():
            mm.model(input_ids=x, cache=cache, use_cache=True, position_ids=pos)

    def probe(self, prompt: Any) -> None:
        from rerank.probe.capture import ATTN_NAME

        self._set_kernel(ATTN_NAME)
        self.probe_all.run_prompt(prompt)

    def early(self, prompt: Any) -> None:
        from rerank.probe.capture import ATTN_NAME

        self._set_kernel(ATTN_NAME)
        self.probe_early.run_prompt(prompt)

    def nacal(self, prompt: Any, na_prompt: Any) -> None:
        from rerank.probe.capture import ATTN_NAME

        self._set_kernel(ATTN_NAME)
        self.probe_all.run_prompt(prompt, na_prompt)


@dataclass(frozen=True)
class RerankSpec:
    """How to build one reranker-level system, in this process or in the memory worker (picklable).

    Attributes:
        name: The system's name in the JSON.
        engine: Its key in :data:`rerank.engines.PROBE_ENGINES`.
        probe: Probe settings it is built with (``passage_max_tokens`` is set per prompt).
        calibration: Calibration settings, for the ``attention`` engine only (baselines take
            ``cls(model, probe_config)``).
    """

    name: str
    engine: str
    probe: Any
    calibration: Any = None

    def build(self, loaded: Any, passage_max_tokens: int) -> Any:
        from rerank.engines import PROBE_ENGINES, AttentionReranker

        probe = self.probe.model_copy(update={"passage_max_tokens": passage_max_tokens})
        if self.engine == "attention":
            return AttentionReranker(loaded, probe, self.calibration)
        return PROBE_ENGINES.get(self.engine)(loaded, probe)


class RerankSystems:
    """Reranker-level systems over one loaded model, built lazily once per (system, passage cap)."""

    def __init__(self, loaded: Any, specs: dict[str, RerankSpec]) -> None:
        self.m = loaded
        self.specs = specs
        self._built: dict[tuple[str, int], tuple[Any, str]] = {}

    def call(self, name: str, query: str, passages: Sequence[Any], cap: int) -> None:
        """``.rerank(query, passages)`` of system ``name`` with passages cut to ``cap`` tokens."""
        mm = self.m.model
        key = (name, cap)
        if key not in self._built:
            # Build each system from the model's default kernel and remember the kernel its constructor
            # left (the probe's own for AttentionReranker, eager if a baseline needs it): the other
            # systems switch kernels between calls, and each must run with the one it chose.
            if mm.config._attn_implementation != "sdpa":
                mm.set_attn_implementation("sdpa")
            reranker = self.specs[name].build(self.m, cap)
            self._built[key] = (reranker, mm.config._attn_implementation)
        reranker, kernel = self._built[key]
        if mm.config._attn_implementation != kernel:
            mm.set_attn_implementation(kernel)
        reranker.rerank(query, passages)


def _skip_reason(exc: ValueError) -> str:
    return f"{type(exc).__name__}: {exc}"[:400]


def _memory_worker(jobs_file: Path, out_file: Path) -> None:
    """Entry point of the fresh memory process: measure every system once per prompt, ascending size.

    Each job is ``{"label", "prompt", "query", "passages", "cap", "rerank": [system names]}``; the
    reranker-level systems are built from ``spec["specs"]``. A reranker that raises ``ValueError`` (one
    that refuses the input, e.g. too large for ``output_attentions``) is recorded as ``{"skipped": why}``.
    """
    from rerank.config import ModelConfig
    from rerank.probe.model import load_model

    with jobs_file.open("rb") as fh:
        spec = pickle.load(fh)
    specs: dict[str, RerankSpec] = spec["specs"]
    if any(s.engine != "attention" for s in specs.values()):
        import rerank.engines  # noqa: F401  (registers the engines the parent checked)
    loaded = load_model(ModelConfig(threads=spec["threads"] or None))
    runner = Runner(loaded, DEFAULT_EARLY_LAYERS)
    rerankers = RerankSystems(loaded, specs)
    results: dict[str, dict[str, Any]] = {}
    for job in spec["jobs"]:
        prompt, row = job["prompt"], {}
        for system, fn in (("plain-prefill", runner.plain), ("probe", runner.probe)):
            fn(prompt)  # warm-up: one-time allocations (thread pools, kernel caches) are not the call's
            with _peak_meter() as mem:
                fn(prompt)
            row[system] = mem
        query, passages, cap = job["query"], job["passages"], job["cap"]
        for name in job["rerank"]:
            # The shipped probe warms up on the measured call like the systems above; the slow
            # baselines on a short list (the one-time allocations do not depend on the length).
            warm = passages if specs[name].engine == "attention" else passages[:BASELINE_WARMUP_PASSAGES]
            try:
                rerankers.call(name, query, warm, cap)
                with _peak_meter() as mem:
                    rerankers.call(name, query, passages, cap)
            except ValueError as exc:
                row[name] = {"skipped": _skip_reason(exc)}
                continue
            row[name] = mem
        results[job["label"]] = row
    out_file.write_text(json.dumps(results))


def _measure_memory(
    jobs: list[dict[str, Any]],
    specs: dict[str, RerankSpec],
    fresh_per_length: bool,
    threads: int = 0,
) -> dict[str, dict[str, Any]]:
    """Run :func:`_memory_worker` in fresh subprocesses (one per job, or one for all) and merge results."""
    groups = [[job] for job in jobs] if fresh_per_length else [jobs]
    merged: dict[str, dict[str, Any]] = {}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="speed-mem-") as tmp:
        for i, group in enumerate(groups):
            jobs_file, out_file = Path(tmp) / f"jobs{i}.pkl", Path(tmp) / f"out{i}.json"
            with jobs_file.open("wb") as fh:
                pickle.dump({"threads": threads, "jobs": group, "specs": specs}, fh)
            cmd = [sys.executable, "-m", "eval.speed", "--memory-worker", str(jobs_file), str(out_file)]
            proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"memory worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            merged.update(json.loads(out_file.read_text()))
    return merged


# ----------------------------------------------------------------------------------------------------
# Prompts and timing


def _load_dl19(data_dir: Path) -> tuple[str, str, list[Any]]:
    from rerank.records import Passage

    path = require_data(data_dir, DATASET) / "bm25_top100.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (RankGPT-format BM25 top-100 of TREC DL19)")
    rows = json.loads(path.read_text(encoding="utf-8"))
    row = next(r for r in rows if len(r["hits"]) >= max(FULL_LENGTHS))
    passages = [Passage(id=str(h["docid"]), text=h["content"]) for h in row["hits"] if h["content"].strip()]
    return str(row["hits"][0].get("qid", "")), row["query"], passages


def _time_rounds(
    fns: dict[str, Callable[[], None]],
    repeats: int,
    warmups: dict[str, Callable[[], None]] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each function: one warm-up, then ``repeats`` interleaved rounds.

    ``warmups`` replaces the warm-up calls (a cheaper call per name, or ``{}`` for none); by default
    each function is called once.
    """
    names = list(fns)
    for fn in (fns if warmups is None else warmups).values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            gc.collect()
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def _linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope and R^2 of ``ys`` against ``xs`` (R^2 = 1 for a perfect line)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    syy = sum((y - my) ** 2 for y in ys)
    slope = sxy / sxx if sxx else 0.0
    r2 = (sxy * sxy) / (sxx * syy) if sxx and syy else 1.0
    return slope, r2


def _early_layers(num_layers: int) -> tuple[tuple[int, int], str]:
    path = REPO_ROOT / "configs" / "default.yaml"
    if path.is_file():
        try:
            from rerank.config import load_config

            layers = load_config(path).probe.layers
        except (ValueError, FileNotFoundError) as exc:
            logger.warning(
                "could not read %s (%s); early exit uses layers %s", path, exc, DEFAULT_EARLY_LAYERS
            )
            layers = None
        if layers is not None and layers[1] < num_layers:
            return (int(layers[0]), int(layers[1])), str(path.relative_to(REPO_ROOT))
    return DEFAULT_EARLY_LAYERS, "default 0..23 (configs/default.yaml sets no probe.layers)"


def _theory(loaded: Any, prompt: Any) -> dict[str, float]:
    """Theory for one prompt: its prefill's model GFLOPs, and MiB of the probe's capture vs N x N maps."""
    shape = ModelShape.of(loaded.model.config)
    heads, layers, head_dim = shape.heads, shape.layers, shape.head_dim
    n, m = prompt.num_tokens, prompt.query_len
    return {
        # Both timed systems run the base model (``model.model``): no LM head.
        "prefill_gflop": prefill_flops(shape, n, lm_head_tokens=0) / 1e9,
        "capture_transient_mb_per_layer": heads * n * (m + head_dim) * 4 / MB,
        "capture_kept_mb_all_layers": layers * heads * n * 4 / MB,
        "nxn_attention_mb_per_layer": heads * n * n * 4 / MB,
        "nxn_attention_mb_all_layers_bf16": layers * heads * n * n * 2 / MB,
    }


def _default_specs(sweep_tokens: int) -> tuple[RerankSpec, Any]:
    """``probe-default`` from ``configs/default.yaml``, and the probe settings to build the baselines with."""
    from rerank.config import load_config

    cfg = load_config(DEFAULT_CONFIG)
    spec = RerankSpec("probe-default", "attention", cfg.probe, cfg.calibration)
    return spec, cfg.probe.model_copy(update={"passage_max_tokens": sweep_tokens})


def _baseline_specs(names: Sequence[str], probe_cfg: Any) -> dict[str, RerankSpec]:
    """Specs of the named baselines.

    Raises:
        SuiteError: A name that is not a registered probe engine; the message lists those that are.
    """
    import rerank.engines  # noqa: F401  (registers the baselines)
    from rerank.engines import PROBE_ENGINES

    unknown = [n for n in names if n not in PROBE_ENGINES]
    if unknown:
        raise SuiteError(
            f"unknown baselines {', '.join(unknown)}; registered engines: {', '.join(PROBE_ENGINES)}"
        )
    return {name: RerankSpec(name, name, probe_cfg) for name in names}


def _time_baselines(
    rerankers: RerankSystems,
    names: Sequence[str],
    query: str,
    passages: Sequence[Any],
    lengths: Sequence[int],
    cap: int,
    repeats: int,
) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, str]]]:
    """Seconds per query of each baseline at each length, and the ``ValueError`` of each refused call."""
    seconds: dict[str, dict[int, float]] = {name: {} for name in names}
    skipped: dict[str, dict[int, str]] = {name: {} for name in names}

    def guarded(name: str, n: int) -> Callable[[], None]:
        def call() -> None:
            if n in skipped[name]:
                return
            try:
                rerankers.call(name, query, passages[:n], cap)
            except ValueError as exc:
                skipped[name][n] = _skip_reason(exc)
                logger.warning("%s at %d passages skipped: %s", name, n, skipped[name][n])

        return call

    for i, n in enumerate(sorted(lengths)):
        logger.info("timing baselines %s at %d passages", ", ".join(names), n)
        warm = {name: guarded(name, BASELINE_WARMUP_PASSAGES) for name in names} if i == 0 else {}
        fns = {name: guarded(name, n) for name in names}
        for name, t in _time_rounds(fns, repeats, warmups=warm).items():
            if n not in skipped[name]:
                seconds[name][n] = t
    return seconds, skipped


def _ratio_key(name: str) -> str:
    return name.replace("-", "_")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the suite; returns the measurement contract (see the module docstring)."""
    import torch

    from rerank.config import ModelConfig
    from rerank.probe.model import load_model
    from rerank.probe.prompt import NA_QUERY, build_prompt

    opts = dict(getattr(args, "opts", None) or {})
    if opts.get("only") == "throughput":
        from eval.throughput import run_throughput

        check_opts(opts, ["only", "queries20", "queries100", "threads", "systems"])
        started = time.perf_counter()
        out = run_throughput(Path(args.data_dir), opts, bool(args.quick))
        out["config"]["wall_seconds"] = round(time.perf_counter() - started, 1)
        out["config"]["quick"] = bool(args.quick)
        return {
            "suite": SUITE,
            **out,
            "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
        }
    opts.pop("only", None) if opts.get("only") in ("", "all") else None
    check_opts(
        opts,
        [
            "repeats",
            "lengths",
            "passage_max_tokens",
            "fresh_process_per_length",
            "threads",
            "baselines",
            "baseline_lengths",
            "baseline_repeats",
            "roofline_sizes",
            "roofline_repeats",
        ],
    )
    quick = bool(args.quick)
    repeats = int(get_opt(opts, "repeats", 1 if quick else 3))
    target = QUICK_TARGET_TOKENS if quick else TWO_K_TARGET_TOKENS
    lengths = tuple(int(x) for x in get_opt(opts, "lengths", QUICK_LENGTHS if quick else FULL_LENGTHS))
    sweep_tokens = int(
        get_opt(opts, "passage_max_tokens", QUICK_SWEEP_PASSAGE_TOKENS if quick else SWEEP_PASSAGE_TOKENS)
    )
    fresh = bool(get_opt(opts, "fresh_process_per_length", not quick))
    threads = int(get_opt(opts, "threads", 0))
    baseline_names = [
        b.strip() for b in get_opt(opts, "baselines", ",".join(BASELINES)).split(",") if b.strip()
    ]
    # Quick: the baselines at the shortest length only; full: 20 and 100 where the sweep has them.
    default_bl = (min(lengths),) if quick else tuple(n for n in FULL_BASELINE_LENGTHS if n in lengths)
    baseline_lengths = tuple(sorted({int(x) for x in get_opt(opts, "baseline_lengths", default_bl)}))
    baseline_repeats = int(get_opt(opts, "baseline_repeats", 1))
    roof_sizes = tuple(
        int(x)
        for x in get_opt(opts, "roofline_sizes", QUICK_ROOFLINE_SIZES if quick else FULL_ROOFLINE_SIZES)
    )
    roof_repeats = int(
        get_opt(opts, "roofline_repeats", QUICK_ROOFLINE_REPEATS if quick else ROOFLINE_REPEATS)
    )
    if repeats < 1 or baseline_repeats < 1 or roof_repeats < 1 or not lengths or min(lengths) < 1:
        raise SuiteError("repeats, baseline_repeats, roofline_repeats and lengths must be >= 1")
    if not roof_sizes or min(roof_sizes) < 1:
        raise SuiteError("roofline_sizes must be matrix sizes >= 1, e.g. 1024,2048")
    # Their ratios to the probe need the probe timed on the same prompt.
    stray = sorted(set(baseline_lengths) - set(lengths))
    if stray:
        raise SuiteError(
            f"baseline_lengths {stray} are not among lengths {list(lengths)}; add them to --opt lengths"
        )

    default_spec, baseline_probe = _default_specs(sweep_tokens)
    baseline_specs = _baseline_specs(baseline_names, baseline_probe)
    qid, query, passages = _load_dl19(Path(args.data_dir))
    if max(lengths) > len(passages):
        raise SuiteError(f"lengths up to {max(lengths)} but the query has {len(passages)} passages")
    started = time.perf_counter()
    load_before = os.getloadavg()
    loaded = load_model(ModelConfig(threads=threads or None))
    tok = loaded.tokenizer
    early, early_src = _early_layers(loaded.num_layers)
    runner = Runner(loaded, early)
    specs = {default_spec.name: default_spec, **baseline_specs}
    rerankers = RerankSystems(loaded, specs)

    # Roofline: after load_model, so with the thread count every timing below runs with.
    roofline: dict[str, dict[str, Any]] = {}
    for dt in dict.fromkeys(["bfloat16", "float32", loaded.dtype]):
        roofline[_dtype_key(dt)] = measure_matmul_gflops(dt, roof_sizes, roof_repeats, loaded.device)
        logger.info("matmul roofline %s: %.0f GFLOP/s", dt, roofline[_dtype_key(dt)]["gflops"])
    peak_gflops = roofline[_dtype_key(loaded.dtype)]["gflops"]

    # Prompts: label -> (prompt, N/A prompt, passages, passage_max_tokens).
    prompts: dict[str, tuple[Any, Any, int, int]] = {}
    k = 1
    while True:
        p = build_prompt(tok, query, passages[:k], max_passage_tokens=TWO_K_PASSAGE_TOKENS)
        if p.num_tokens >= target or k == len(passages):
            break
        k += 1
    na = build_prompt(tok, NA_QUERY, passages[:k], max_passage_tokens=TWO_K_PASSAGE_TOKENS)
    prompts["main"] = (p, na, k, TWO_K_PASSAGE_TOKENS)
    for n in lengths:
        p = build_prompt(tok, query, passages[:n], max_passage_tokens=sweep_tokens)
        na = build_prompt(tok, NA_QUERY, passages[:n], max_passage_tokens=sweep_tokens)
        if p.num_tokens > runner.probe_all.max_tokens:
            raise SuiteError(
                f"{n} passages of <= {sweep_tokens} tokens make {p.num_tokens} tokens, over the model's "
                f"{runner.probe_all.max_tokens}; lower --opt passage_max_tokens"
            )
        prompts[f"@{n}"] = (p, na, n, sweep_tokens)

    # Timing, in this process.
    timing: dict[str, dict[str, float]] = {}
    for label, (p, na, n, cap) in prompts.items():
        logger.info("timing %s (%d tokens)", label, p.num_tokens)
        timing[label] = _time_rounds(
            {
                "plain": lambda p=p: runner.plain(p),
                "probe": lambda p=p: runner.probe(p),
                "early": lambda p=p: runner.early(p),
                "nacal": lambda p=p, na=na: runner.nacal(p, na),
                "default": lambda n=n, cap=cap: rerankers.call(default_spec.name, query, passages[:n], cap),
            },
            repeats,
        )
    bl_seconds, bl_skipped = _time_baselines(
        rerankers, list(baseline_specs), query, passages, baseline_lengths, sweep_tokens, baseline_repeats
    )

    # Memory, in fresh processes, smallest prompt first.
    order = sorted(prompts, key=lambda lab: prompts[lab][0].num_tokens)
    jobs = []
    for lab in order:
        p, _, n, cap = prompts[lab]
        on_baselines = lab != "main" and n in baseline_lengths
        names = [default_spec.name, *(baseline_specs if on_baselines else [])]
        jobs.append(
            {"label": lab, "prompt": p, "query": query, "passages": passages[:n], "cap": cap, "rerank": names}
        )
    memory = _measure_memory(jobs, specs, fresh, threads)
    method = next(iter(memory.values()))["probe"]["method"]

    def mem_figures(mem: dict[str, Any], sfx: str) -> dict[str, float]:
        return {
            f"peak_rss_mb{sfx}": round(mem["peak_mb"], 1),
            f"peak_growth_mb{sfx}": round(mem["peak_mb"] - mem["baseline_mb"], 1),
        }

    plain_sys: dict[str, Any] = {}
    probe_sys: dict[str, Any] = {}
    default_sys: dict[str, Any] = {}
    prefill_gflop: dict[str, float] = {}
    for label in prompts:
        sfx = "" if label == "main" else label
        t, mem, p = timing[label], memory[label], prompts[label][0]
        theory = _theory(loaded, p)
        gflop = prefill_gflop[label] = theory.pop("prefill_gflop")
        plain_sys[f"seconds_per_query{sfx}"] = round(t["plain"], 4)
        plain_sys[f"prefill_gflops_per_s{sfx}"] = round(gflop / t["plain"], 2)
        plain_sys[f"roofline_fraction{sfx}"] = round(gflop / t["plain"] / peak_gflops, 4)
        plain_sys.update(mem_figures(mem["plain-prefill"], sfx))
        probe_sys[f"seconds_per_query{sfx}"] = round(t["probe"], 4)
        probe_sys[f"ratio_probe_vs_plain{sfx}"] = round(t["probe"] / t["plain"], 4)
        probe_sys[f"prefill_gflops_per_s{sfx}"] = round(gflop / t["probe"], 2)
        probe_sys[f"roofline_fraction{sfx}"] = round(gflop / t["probe"] / peak_gflops, 4)
        probe_sys[f"early_exit_seconds_per_query{sfx}"] = round(t["early"], 4)
        probe_sys[f"ratio_early_exit_vs_plain{sfx}"] = round(t["early"] / t["plain"], 4)
        probe_sys[f"nacal_seconds_per_query{sfx}"] = round(t["nacal"], 4)
        probe_sys[f"ratio_nacal_vs_plain{sfx}"] = round(t["nacal"] / t["plain"], 4)
        probe_sys.update(mem_figures(mem["probe"], sfx))
        for name, value in theory.items():
            probe_sys[f"{name}{sfx}"] = round(value, 3)
        default_sys[f"seconds_per_query{sfx}"] = round(t["default"], 4)
        default_sys[f"ratio_vs_plain{sfx}"] = round(t["default"] / t["plain"], 4)
        default_sys.update(mem_figures(mem[default_spec.name], sfx))

    tokens = [prompts[lab][0].num_tokens for lab in order]
    for system_name, sysd in (("plain-prefill", plain_sys), ("probe", probe_sys)):
        growth = [
            memory[lab][system_name]["peak_mb"] - memory[lab][system_name]["baseline_mb"] for lab in order
        ]
        slope, r2 = _linear_fit(tokens, growth)
        sysd["memory_growth_mb_per_1k_tokens"] = round(slope * 1000, 3)
        sysd["memory_linear_fit_r2"] = round(r2, 4)

    systems: dict[str, dict[str, Any]] = {
        "plain-prefill": plain_sys,
        "probe": probe_sys,
        default_spec.name: default_sys,
    }
    for name in baseline_specs:
        sysd = systems[name] = {}
        for n in baseline_lengths:
            mem = memory[f"@{n}"][name]
            why = bl_skipped[name].get(n) or mem.get("skipped")
            if why is not None:
                sysd[f"skipped@{n}"] = why
                continue
            secs = bl_seconds[name][n]
            sysd[f"seconds_per_query@{n}"] = round(secs, 4)
            sysd.update(mem_figures(mem, f"@{n}"))
            probe_sys[f"ratio_probe_vs_{_ratio_key(name)}@{n}"] = round(timing[f"@{n}"]["probe"] / secs, 4)
            default_sys[f"ratio_vs_{_ratio_key(name)}@{n}"] = round(timing[f"@{n}"]["default"] / secs, 4)
        if BASELINE_WARMUP_PASSAGES in bl_skipped[name]:  # even its short warm-up call was refused
            sysd[f"skipped@{BASELINE_WARMUP_PASSAGES}"] = bl_skipped[name][BASELINE_WARMUP_PASSAGES]

    matmul = {f"matmul_gflops_{key}": round(r["gflops"], 1) for key, r in roofline.items()}
    config = {
        "model": loaded.model_id,
        "dtype": loaded.dtype,
        "device": loaded.device,
        "torch_threads": torch.get_num_threads(),
        "qid": qid,
        "query": query,
        "prompts": {
            lab: {
                "passages": n,
                "passage_max_tokens": cap,
                "tokens": p.num_tokens,
                "query_tokens": p.query_len,
                "na_query_tokens": na.query_len,
                "prefill_gflop": round(prefill_gflop[lab], 3),
            }
            for lab, (p, na, n, cap) in prompts.items()
        },
        "lengths": list(lengths),
        "repeats": repeats,
        "warmup": 1,
        "statistic": "median over interleaved rounds (order alternates each round)",
        "probe_layers": [0, loaded.num_layers - 1],
        "probe_early_exit": False,
        "early_exit_layers": list(early),
        "early_exit_layers_source": early_src,
        "probe_default_config": {
            "source": str(DEFAULT_CONFIG.relative_to(REPO_ROOT)),
            "probe": default_spec.probe.model_dump(mode="json"),
            "calibration": default_spec.calibration.model_dump(mode="json"),
            "passage_max_tokens": "set to each prompt's cap (300 main, the sweep's cap @n)",
        },
        "baselines": list(baseline_specs),
        "baseline_lengths": list(baseline_lengths),
        "baseline_repeats": baseline_repeats,
        "baseline_warmup": f"one call on the first {BASELINE_WARMUP_PASSAGES} passages",
        "baseline_probe_config": baseline_probe.model_dump(mode="json"),
        **matmul,
        "matmul_roofline": {
            "sizes": list(roof_sizes),
            "repeats": roof_repeats,
            "statistic": "fastest call per size after one warm-up; best size",
            "torch_threads": torch.get_num_threads(),
            "per_size_gflops": {
                key: {str(n): round(g, 1) for n, g in r["per_size"].items()} for key, r in roofline.items()
            },
            "roofline_fraction_uses": f"matmul_gflops_{_dtype_key(loaded.dtype)} (the model's dtype)",
            "flops_counted": "model prefill FLOPs, no LM head (see eval.speed.prefill_flops)",
        },
        "memory_method": method,
        "memory_process": "fresh subprocess per prompt length"
        if fresh
        else "one fresh subprocess, ascending",
        "main_prompt_target_tokens": target,
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return {
        "suite": SUITE,
        "dataset": DATASET,
        "config": config,
        "systems": systems,
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads(), **matmul},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m eval.speed [--quick] [--output FILE]``; also the memory worker's entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--memory-worker"]:
        _memory_worker(Path(argv[1]), Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m eval.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "results" / "speed.json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    args.opts = dict(pair.split("=", 1) for pair in args.opt)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run(args)
    print(f"wrote {write_json(args.output, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
