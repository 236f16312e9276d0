"""Suite ``speed``: what the attention probe costs over a plain prefill, and how its memory grows.

Model: the embedded SmolLM2-135M-Instruct as :func:`rerank.model.load_model` loads it by default (bf16 on
a CPU with AMX/AVX512-BF16). Prompts: the ICR layout of :func:`rerank.prompt.build_prompt` over real TREC
DL19 BM25 passages (the first query of ``trec-dl19/bm25_top100.json``, passages in BM25 order):

* ``main``: the first passages (each cut to 300 tokens) until the prompt reaches about 2,000 tokens
  (1,000 under ``--quick``); its figures carry no suffix (``seconds_per_query``, ``peak_rss_mb``);
* a sweep of 10, 20, 50 and 100 passages cut to ``passage_max_tokens`` = 70 tokens, so that 100 of
  them fit SmolLM2's 8,192-token context; suffixed ``@10`` ... ``@100``.

Systems (timed on the same token ids, interleaved round by round, alternating the order, so they share
the machine's noise; the figure is the median over ``repeats`` rounds after one warm-up call):

* ``plain-prefill``: ``model.model`` forward over the whole prompt, sdpa kernel, ``use_cache=True``
  with a fresh ``DynamicCache`` (as the probe runs it), nothing captured.
* ``probe``: :class:`rerank.probe.AttentionProbe` over all layers, ``early_exit=False`` (the full
  forward), no ``N/A`` pass: ``run_prompt(prompt)``, i.e. the prefix pass + the query-suffix pass that
  captures the rows + collecting the per-passage arrays. Extra figures: ``ratio_probe_vs_plain``
  (goal <= 1.10), ``early_exit_seconds_per_query`` (layers ``probe.layers`` of ``configs/default.yaml``
  when it sets them, else 0..23 of 30, forward stopped after the last), ``nacal_seconds_per_query``
  (all layers plus the content-free ``N/A`` pass reusing the prefix's KV cache) and their ratios.

Memory (``peak_rss_mb``, ``peak_growth_mb``): measured in a *separate, fresh* Python process (one per
prompt length in the full run, one for all lengths under ``--quick``), never the timing process. Before
each call the process returns freed heap to the OS (``malloc_trim``), reads its RSS (baseline) and
resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5); after the call it reads ``VmHWM``.
Each system runs once unmeasured first, so one-time allocations (thread pools, kernel caches) are left out.
``peak_rss_mb`` is that peak (model and interpreter included), ``peak_growth_mb`` = peak - baseline,
the call's own working memory. Where the peak counter cannot be reset, a 5 ms RSS-sampling thread is
used instead (``config.memory_method`` says which). ``memory_linear_fit_r2`` and
``memory_growth_mb_per_1k_tokens`` fit ``peak_growth_mb`` against prompt tokens over all lengths.
The theoretical figures (``capture_*``, ``nxn_*``) compare what the probe allocates per probed layer
(fp32 logits of the ``m`` query rows, heads x m x N x 4 bytes, plus the fp32 repeated keys it multiplies,
heads x N x head_dim x 4) with an N x N attention map (heads x N x N x 4 per layer, or x layers in bf16
for ``output_attentions=True``).

``--quick``: a ~1,000-token ``main`` prompt and 5 and 10 passages, 1 round. Options (``--opt key=value``):
``repeats``, ``lengths`` (``10,20,50,100``), ``passage_max_tokens``, ``fresh_process_per_length``,
``threads`` (torch intra-op threads; 0 = torch's default). On a shared machine, set ``threads`` to the
cores left free: with more threads than free cores, torch's thread barriers stall and timings balloon
by 10x or more (``config.load_average_*`` show what else ran).
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
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATASET = "trec-dl19"
SUITE = "speed"
FULL_LENGTHS = (10, 20, 50, 100)
QUICK_LENGTHS = (5, 10)
SWEEP_PASSAGE_TOKENS = 70
TWO_K_PASSAGE_TOKENS = 300
TWO_K_TARGET_TOKENS = 2000
QUICK_TARGET_TOKENS = 1000
DEFAULT_EARLY_LAYERS = (0, 23)
REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 2**20

try:  # The shared helpers, when the eval package has them; private equivalents otherwise.
    from eval.common import SuiteError, check_opts, get_opt, machine_info, require_data, write_json
except ImportError:  # pragma: no cover - only while eval/common.py is being written
    SuiteError = ValueError  # type: ignore[misc,assignment]

    def check_opts(opts: Any, known: Any) -> None:  # type: ignore[misc]
        unknown = sorted(set(opts) - set(known))
        if unknown:
            raise ValueError(f"unknown --opt {', '.join(unknown)}; this suite knows: {', '.join(known)}")

    def get_opt(opts: Any, key: str, default: Any) -> Any:  # type: ignore[misc]
        if key not in opts:
            return default
        if isinstance(default, bool):
            return opts[key].lower() in {"1", "true", "yes"}
        if isinstance(default, tuple):
            return tuple(float(x) for x in opts[key].split(","))
        return type(default)(opts[key])

    def machine_info() -> dict[str, Any]:  # type: ignore[misc]
        return {
            "cores_logical": os.cpu_count(),
            "os": platform.platform(),
            "python": platform.python_version(),
        }

    def require_data(data_dir: Path, dataset: str) -> Path:  # type: ignore[misc]
        path = Path(data_dir) / dataset
        if not path.exists():
            raise FileNotFoundError(f"dataset {dataset!r} not found in {data_dir}")
        return path

    def write_json(path: str | Path, data: Any) -> Path:  # type: ignore[misc]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path


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
# The systems


class Runner:
    """The timed callables over one loaded model: plain prefill, probe, early-exit probe, N/A probe."""

    def __init__(self, loaded: Any, early_layers: tuple[int, int]) -> None:
        from rerank.probe import AttentionProbe

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
            mm.model(input_ids=x, past_key_values=cache, use_cache=True, position_ids=pos)

    def probe(self, prompt: Any) -> None:
        from rerank.probe import ATTN_NAME

        self._set_kernel(ATTN_NAME)
        self.probe_all.run_prompt(prompt)

    def early(self, prompt: Any) -> None:
        from rerank.probe import ATTN_NAME

        self._set_kernel(ATTN_NAME)
        self.probe_early.run_prompt(prompt)

    def nacal(self, prompt: Any, na_prompt: Any) -> None:
        from rerank.probe import ATTN_NAME

        self._set_kernel(ATTN_NAME)
        self.probe_all.run_prompt(prompt, na_prompt)


def _memory_worker(jobs_file: Path, out_file: Path) -> None:
    """Entry point of the fresh memory process: measure plain and probe once per prompt, ascending size."""
    from rerank.config import ModelConfig
    from rerank.model import load_model

    with jobs_file.open("rb") as fh:
        spec = pickle.load(fh)
    jobs = spec["jobs"]
    loaded = load_model(ModelConfig(threads=spec["threads"] or None))
    runner = Runner(loaded, DEFAULT_EARLY_LAYERS)
    results: dict[str, dict[str, Any]] = {}
    for label, prompt in jobs:
        row: dict[str, Any] = {}
        for system, fn in (("plain-prefill", runner.plain), ("probe", runner.probe)):
            fn(prompt)  # warm-up: one-time allocations (thread pools, kernel caches) are not the call's
            with _peak_meter() as mem:
                fn(prompt)
            row[system] = mem
        results[label] = row
    out_file.write_text(json.dumps(results))


def _measure_memory(
    jobs: list[tuple[str, Any]], fresh_per_length: bool, threads: int = 0
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
                pickle.dump({"threads": threads, "jobs": group}, fh)
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


def _time_rounds(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function: one warm-up, then ``repeats`` interleaved rounds."""
    names = list(fns)
    for name in names:
        fns[name]()
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
    """Theoretical bytes (MiB) of the probe's capture vs an N x N attention map, for one prompt."""
    cfg = loaded.model.config
    heads, layers = loaded.num_heads, loaded.num_layers
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    n, m = prompt.num_tokens, prompt.query_len
    return {
        "capture_transient_mb_per_layer": heads * n * (m + head_dim) * 4 / MB,
        "capture_kept_mb_all_layers": layers * heads * n * 4 / MB,
        "nxn_attention_mb_per_layer": heads * n * n * 4 / MB,
        "nxn_attention_mb_all_layers_bf16": layers * heads * n * n * 2 / MB,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the suite; returns the measurement contract (see the module docstring)."""
    from rerank.config import ModelConfig
    from rerank.model import load_model
    from rerank.prompt import NA_QUERY, build_prompt

    opts = dict(getattr(args, "opts", None) or {})
    check_opts(opts, ["repeats", "lengths", "passage_max_tokens", "fresh_process_per_length", "threads"])
    quick = bool(args.quick)
    repeats = int(get_opt(opts, "repeats", 1 if quick else 3))
    target = QUICK_TARGET_TOKENS if quick else TWO_K_TARGET_TOKENS
    lengths = tuple(int(x) for x in get_opt(opts, "lengths", QUICK_LENGTHS if quick else FULL_LENGTHS))
    sweep_tokens = int(get_opt(opts, "passage_max_tokens", SWEEP_PASSAGE_TOKENS))
    fresh = bool(get_opt(opts, "fresh_process_per_length", not quick))
    threads = int(get_opt(opts, "threads", 0))
    if repeats < 1 or not lengths or min(lengths) < 1:
        raise SuiteError("repeats and lengths must be >= 1")

    qid, query, passages = _load_dl19(Path(args.data_dir))
    if max(lengths) > len(passages):
        raise SuiteError(f"lengths up to {max(lengths)} but the query has {len(passages)} passages")
    started = time.perf_counter()
    load_before = os.getloadavg()
    loaded = load_model(ModelConfig(threads=threads or None))
    tok = loaded.tokenizer
    early, early_src = _early_layers(loaded.num_layers)
    runner = Runner(loaded, early)

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
    for label, (p, na, _, _) in prompts.items():
        logger.info("timing %s (%d tokens)", label, p.num_tokens)
        timing[label] = _time_rounds(
            {
                "plain": lambda p=p: runner.plain(p),
                "probe": lambda p=p: runner.probe(p),
                "early": lambda p=p: runner.early(p),
                "nacal": lambda p=p, na=na: runner.nacal(p, na),
            },
            repeats,
        )

    # Memory, in fresh processes, smallest prompt first.
    order = sorted(prompts, key=lambda lab: prompts[lab][0].num_tokens)
    memory = _measure_memory([(lab, prompts[lab][0]) for lab in order], fresh, threads)
    method = next(iter(memory.values()))["probe"]["method"]

    plain_sys: dict[str, float] = {}
    probe_sys: dict[str, float] = {}
    for label in prompts:
        sfx = "" if label == "main" else label
        t, mem, p = timing[label], memory[label], prompts[label][0]
        plain_sys[f"seconds_per_query{sfx}"] = round(t["plain"], 4)
        plain_sys[f"peak_rss_mb{sfx}"] = round(mem["plain-prefill"]["peak_mb"], 1)
        plain_sys[f"peak_growth_mb{sfx}"] = round(
            mem["plain-prefill"]["peak_mb"] - mem["plain-prefill"]["baseline_mb"], 1
        )
        probe_sys[f"seconds_per_query{sfx}"] = round(t["probe"], 4)
        probe_sys[f"ratio_probe_vs_plain{sfx}"] = round(t["probe"] / t["plain"], 4)
        probe_sys[f"early_exit_seconds_per_query{sfx}"] = round(t["early"], 4)
        probe_sys[f"ratio_early_exit_vs_plain{sfx}"] = round(t["early"] / t["plain"], 4)
        probe_sys[f"nacal_seconds_per_query{sfx}"] = round(t["nacal"], 4)
        probe_sys[f"ratio_nacal_vs_plain{sfx}"] = round(t["nacal"] / t["plain"], 4)
        probe_sys[f"peak_rss_mb{sfx}"] = round(mem["probe"]["peak_mb"], 1)
        probe_sys[f"peak_growth_mb{sfx}"] = round(mem["probe"]["peak_mb"] - mem["probe"]["baseline_mb"], 1)
        for name, value in _theory(loaded, p).items():
            probe_sys[f"{name}{sfx}"] = round(value, 3)

    tokens = [prompts[lab][0].num_tokens for lab in order]
    for system_name, sysd in (("plain-prefill", plain_sys), ("probe", probe_sys)):
        growth = [
            memory[lab][system_name]["peak_mb"] - memory[lab][system_name]["baseline_mb"] for lab in order
        ]
        slope, r2 = _linear_fit(tokens, growth)
        sysd["memory_growth_mb_per_1k_tokens"] = round(slope * 1000, 3)
        sysd["memory_linear_fit_r2"] = round(r2, 4)

    import torch

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
        "systems": {"plain-prefill": plain_sys, "probe": probe_sys},
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
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
