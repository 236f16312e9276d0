"""GPU timing of the attention probe on a random-weight model of Llama-3.1-8B's shape.

``python -m eval.gpu_speed --out DIR [--tiny] [--passages 100] [--passage-tokens 400] [--repeats 3]``

Nothing is downloaded: the model is a ``LlamaForCausalLM`` built from a config written here (hidden 4096,
32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256, rope theta 500,000, 131,072
positions) directly on the GPU in bf16 with random weights (their values do not change the timing).
The prompt is random token ids laid out like the probe's ICR prompt (:mod:`rerank.probe.prompt`): a chat
header and instruction, ``passages`` blocks of ``[n] `` + ``passage_tokens`` tokens + a blank line
(300 words are about 400 Llama-3 tokens, so 100 passages are about 40k tokens), then the late
instruction + query + assistant header as the query suffix. The :class:`rerank.probe.prompt.ProbePrompt`
is built directly, so no tokenizer is needed.

Systems, timed with ``torch.cuda.synchronize`` (median of ``repeats`` interleaved rounds after one
warm-up call each; the order alternates every round):

* ``plain-prefill``: the base model's forward over the whole prompt, sdpa, ``use_cache=True``;
* ``probe``: :class:`rerank.probe.AttentionProbe` over all 32 layers, ``early_exit=False``, no ``N/A``
  pass (the single-pass cost); ``ratio_probe_vs_plain`` (goal <= 1.10);
* ``probe-early-exit``: layers 0..19, forward stopped after layer 19;
* ``probe-nacal``: all layers plus the content-free ``N/A`` pass reusing the prefix's KV cache.

``peak_gpu_mem_gb`` is ``torch.cuda.max_memory_allocated`` over that system's calls (weights
included); ``peak_gpu_growth_gb`` subtracts what was allocated before the call. A second, shorter
prompt (``--short-passages``, default 20) gives the ``@20`` figures. The JSON follows the project's
measurement contract and is written to ``DIR/gpu_speed.json`` and printed. ``--tiny`` runs a small
shape on whatever device is present (a CPU smoke test of the script).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

LLAMA31_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
}
TINY = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "vocab_size": 4096,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
}
# Token counts of the ICR layout around the passages (Llama-3 chat template): what precedes the first
# passage, the "[n] " marker, the blank line after each block, and the query suffix for a ~10-token
# query and for "N/A".
HEAD_TOKENS = 12
MARKER_TOKENS = 3
SEP_TOKENS = 1
QUERY_SUFFIX_TOKENS = 30
NA_SUFFIX_TOKENS = 21


def build_model(shape: dict[str, Any], device: str) -> Any:
    """A random-weight ``LlamaForCausalLM`` of ``shape`` in bf16, constructed on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, attn_implementation="sdpa", tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def synthetic_prompts(passages: int, passage_tokens: int, vocab: int, seed: int = 0) -> tuple[Any, Any]:
    """A query prompt and its ``N/A`` twin (same prefix), random ids in the ICR layout."""
    import random

    from rerank.probe.prompt import ProbePrompt

    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    tokens = ids(HEAD_TOKENS)
    spans = []
    for _ in range(passages):
        start = len(tokens)
        tokens += ids(MARKER_TOKENS + passage_tokens)
        spans.append((start, len(tokens)))
        tokens += ids(SEP_TOKENS)
    prefix = len(tokens)
    query = ProbePrompt(
        tuple(tokens + ids(QUERY_SUFFIX_TOKENS)), tuple(spans), prefix, "", (False,) * passages
    )
    na = ProbePrompt(tuple(tokens + ids(NA_SUFFIX_TOKENS)), tuple(spans), prefix, "", (False,) * passages)
    return query, na


class Timer:
    """Interleaved timing and peak-memory bookkeeping on one device."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def call(self, fn: Callable[[], None]) -> tuple[float, float, float]:
        """Run ``fn`` once: (seconds, peak bytes during it, bytes allocated before it)."""
        gc.collect()
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            before = float(self.torch.cuda.memory_allocated())
        else:
            before = 0.0
        t0 = time.perf_counter()
        fn()
        self.sync()
        dt = time.perf_counter() - t0
        if self.cuda:
            peak = float(self.torch.cuda.max_memory_allocated())
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
        return dt, peak, before

    def rounds(self, fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, dict[str, float]]:
        """Per function: median seconds over ``repeats`` rounds after one warm-up, and peak memory."""
        names = list(fns)
        out: dict[str, dict[str, Any]] = {n: {"times": [], "peak": 0.0, "growth": 0.0} for n in names}
        for n in names:
            self.call(fns[n])
        for r in range(repeats):
            for n in names if r % 2 == 0 else reversed(names):
                dt, peak, before = self.call(fns[n])
                out[n]["times"].append(dt)
                out[n]["peak"] = max(out[n]["peak"], peak)
                out[n]["growth"] = max(out[n]["growth"], peak - before)
        return {
            n: {"seconds": statistics.median(v["times"]), "peak": v["peak"], "growth": v["growth"]}
            for n, v in out.items()
        }


def _plain_fn(loaded: Any, prompt: Any) -> Callable[[], None]:
    import torch
    from transformers import DynamicCache

    def fn() -> None:
        mm = loaded.model
        if mm.config._attn_implementation != "sdpa":
            mm.set_attn_implementation("sdpa")
        try:
            cache = DynamicCache(config=mm.config)
        except TypeError:  # transformers < 4.56
            cache = DynamicCache()
        x = torch.tensor([list(prompt.input_ids)], device=loaded.device)
        pos = torch.arange(x.shape[1], device=loaded.device)[None]
        with torch.inference_mode():
            mm.model(input_ids=x, past_key_values=cache, use_cache=True, position_ids=pos)

    return fn


def _probe_fn(loaded: Any, probe: Any, prompt: Any, na: Any | None) -> Callable[[], None]:
    from rerank.probe.capture import ATTN_NAME

    def fn() -> None:
        mm = loaded.model
        if mm.config._attn_implementation != ATTN_NAME:
            mm.set_attn_implementation(ATTN_NAME)
        probe.run_prompt(prompt, na)

    return fn


def _machine(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": device,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model and prompts, time every system, return the measurement-contract dict."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = TINY if args.tiny else LLAMA31_8B
    passages = args.passages if args.passages is not None else (10 if args.tiny else 100)
    passage_tokens = args.passage_tokens if args.passage_tokens is not None else (30 if args.tiny else 400)
    short = args.short_passages if args.short_passages is not None else (4 if args.tiny else 20)
    early_last = args.early_last if args.early_last is not None else (1 if args.tiny else 19)
    errors: dict[str, str] = {}
    machine = _machine(device)
    print(json.dumps(machine), flush=True)

    t0 = time.perf_counter()
    model = build_model(shape, device)
    build_s = time.perf_counter() - t0
    print(f"built model in {build_s:.1f}s", flush=True)

    model_id = "random-weight LlamaForCausalLM, Llama-3.1-8B shape"
    loaded: Any = SimpleNamespace(model=model, device=device, model_id=model_id)
    probe_all = probe_early = None
    try:
        from rerank.probe.capture import AttentionProbe
        from rerank.probe.model import wrap_model

        loaded = wrap_model(model, None, model_id=model_id)

        probe_all = AttentionProbe(loaded, layers=None, early_exit=False)
        probe_early = AttentionProbe(loaded, layers=(0, early_last), early_exit=True)
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, plain prefill still timed
        errors["probe_setup"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()

    prompts = {"": synthetic_prompts(passages, passage_tokens, shape["vocab_size"], seed=0)}
    if short and short != passages:
        prompts[f"@{short}"] = synthetic_prompts(short, passage_tokens, shape["vocab_size"], seed=1)

    systems: dict[str, dict[str, float]] = {
        "plain-prefill": {},
        "probe": {},
        "probe-early-exit": {},
        "probe-nacal": {},
    }
    gb = 2**30
    for sfx, (prompt, na) in prompts.items():
        fns: dict[str, Callable[[], None]] = {"plain-prefill": _plain_fn(loaded, prompt)}
        if probe_all is not None and probe_early is not None:
            fns["probe"] = _probe_fn(loaded, probe_all, prompt, None)
            fns["probe-early-exit"] = _probe_fn(loaded, probe_early, prompt, None)
            fns["probe-nacal"] = _probe_fn(loaded, probe_all, prompt, na)
        print(f"timing {prompt.num_tokens} tokens ({len(prompt.spans)} passages)", flush=True)
        try:
            res = Timer(device).rounds(fns, args.repeats)
        except Exception as exc:  # noqa: BLE001 - keep whatever else was measured
            errors[f"timing{sfx or '@' + str(passages)}"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            continue
        plain_s = res["plain-prefill"]["seconds"]
        for name, r in res.items():
            sysd = systems[name]
            sysd[f"seconds_per_query{sfx}"] = round(r["seconds"], 4)
            if name != "plain-prefill":
                key = "ratio_probe_vs_plain" if name == "probe" else "ratio_vs_plain"
                sysd[f"{key}{sfx}"] = round(r["seconds"] / plain_s, 4)
            if device.startswith("cuda"):
                sysd[f"peak_gpu_mem_gb{sfx}"] = round(r["peak"] / gb, 3)
                sysd[f"peak_gpu_growth_gb{sfx}"] = round(r["growth"] / gb, 3)
            else:
                sysd[f"peak_rss_mb{sfx}"] = round(r["peak"] / 2**20, 1)
        print(json.dumps({k: {m: v for m, v in d.items() if m.endswith(sfx)} for k, d in systems.items()}))

    heads = shape["num_attention_heads"]
    head_dim = shape["hidden_size"] // heads
    main_prompt = prompts[""][0]
    n, m = main_prompt.num_tokens, main_prompt.query_len
    config = {
        "model": loaded.model_id,
        "shape": shape,
        "dtype": "bfloat16",
        "tiny": bool(args.tiny),
        "weights": "random (timing only)",
        "model_build_seconds": round(build_s, 1),
        "prompts": {
            sfx or f"@{len(p.spans)}": {
                "passages": len(p.spans),
                "passage_tokens": passage_tokens,
                "tokens": p.num_tokens,
                "query_tokens": p.query_len,
                "na_query_tokens": na.query_len,
            }
            for sfx, (p, na) in prompts.items()
        },
        "layout_tokens": {
            "head": HEAD_TOKENS,
            "marker": MARKER_TOKENS,
            "separator": SEP_TOKENS,
            "query_suffix": QUERY_SUFFIX_TOKENS,
            "na_suffix": NA_SUFFIX_TOKENS,
        },
        "repeats": args.repeats,
        "warmup": 1,
        "statistic": "median over interleaved rounds (order alternates each round)",
        "probe_layers": [0, shape["num_hidden_layers"] - 1],
        "probe_early_exit": False,
        "early_exit_layers": [0, early_last],
        "goals": {"ratio_probe_vs_plain": 1.10, "seconds_per_query": 1.0},
        "capture_transient_mb_per_layer": round(heads * n * (m + head_dim) * 4 / 2**20, 1),
        "nxn_attention_mb_per_layer": round(heads * n * n * 4 / 2**20, 1),
        "errors": errors,
    }
    return {
        "suite": "gpu-speed",
        "dataset": "synthetic: random token ids in the ICR prompt layout (100 passages x ~300 words)",
        "config": config,
        "systems": {k: v for k, v in systems.items() if v},
        "machine": machine,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; writes ``OUT/gpu_speed.json`` and prints it. Exit 1 when a system failed."""
    parser = argparse.ArgumentParser(prog="python -m eval.gpu_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_speed.json")
    parser.add_argument("--tiny", action="store_true", help="small shape: a smoke test on CPU")
    parser.add_argument("--passages", type=int, default=None)
    parser.add_argument("--passage-tokens", type=int, default=None, help="tokens per passage body")
    parser.add_argument("--short-passages", type=int, default=None, help="second, shorter prompt (0 = none)")
    parser.add_argument("--early-last", type=int, default=None, help="last layer of the early-exit probe")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--vendor", type=Path, default=None, help="extra folder put last on sys.path (e.g. unpacked wheels)"
    )
    args = parser.parse_args(argv)
    if args.vendor is not None:
        sys.path.append(str(args.vendor.resolve()))
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_speed.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 1 if result["config"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
