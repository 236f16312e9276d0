"""Suite ``profile``: where one DL19 query's rerank time goes, with the shipped default.

``torch.profiler`` over ``AttentionReranker.rerank`` of DL19 queries' BM25 top-20 (default: the first 3
queries, after one warm-up query), grouped by what the time is spent on:

* ``matmul``: the linear layers (``aten::mm``/``addmm``/``bmm``/``matmul``/``linear``);
* ``attention``: the sdpa kernel of every layer;
* ``probe_rows``: the probe's own softmax rows for the query tokens (``rerank.probe.capture._probe_rows``,
  timed under a profiler label);
* ``prompt``: building and tokenising the prompts (``build_prompt``, timed under a label);
* ``other_ops``: every other aten op (norms, RoPE, activations, copies, softmax outside the probe);
* ``python_and_rest``: wall time not inside any op above (Python, the model's module calls, scoring).

Each row: seconds per query and share of the wall time. Self CPU time of ops is summed, so nested ops
are not counted twice. The profiler itself adds overhead; the shares, not the seconds, are the result.
Options (``--opt``): ``queries=N`` (default 3; quick 1), ``passage_max_tokens=N``.
"""

from __future__ import annotations

import re
import time
from argparse import Namespace
from typing import Any

from eval.common import check_opts, get_opt, with_passage_tokens

GROUPS = (
    ("matmul", re.compile(r"^aten::(mm|addmm|bmm|matmul|linear|_addmm_activation)$")),
    ("attention", re.compile(r"scaled_dot_product|flash_attention|_efficient_attention")),
)


def run(args: Namespace) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import rerank.probe.capture as capture
    from eval.rerank import load_dl19
    from rerank.config import load_config
    from rerank.engines import AttentionReranker
    from rerank.probe.model import load_model
    from rerank.records import Hit

    opts = getattr(args, "opts", {}) or {}
    check_opts(opts, ["queries", "passage_max_tokens"])
    n = int(get_opt(opts, "queries", 1 if args.quick else 3))
    cfg = with_passage_tokens(load_config("default"), opts, args.quick)
    model = load_model(cfg.model)
    rr = AttentionReranker(model, cfg.probe, cfg.calibration)
    queries, _ = load_dl19(args.data_dir)

    def hits(q: dict[str, Any]) -> list[Any]:
        return [
            Hit(passage=p, score=s, rank=i + 1)
            for i, (p, s) in enumerate(zip(q["passages"][:20], q["first_stage"][:20], strict=True))
        ]

    # Labels around two functions of the probe, for the profiler only; restored afterwards.
    rows_fn, build_fn = capture._probe_rows, capture.build_prompt

    def rows_labelled(*a: Any, **k: Any) -> Any:
        with record_function("probe_rows"):
            return rows_fn(*a, **k)

    def build_labelled(*a: Any, **k: Any) -> Any:
        with record_function("prompt"):
            return build_fn(*a, **k)

    rr.rerank(queries[-1]["query"], hits(queries[-1]))  # warm-up
    capture._probe_rows = rows_labelled
    capture.build_prompt = build_labelled
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            tokens = 0
            for q in queries[:n]:
                ranked = rr.rerank(q["query"], hits(q))
                tokens += ranked.info.get("prompts", 0)
            wall = time.perf_counter() - t0
    finally:
        capture._probe_rows = rows_fn
        capture.build_prompt = build_fn
    spent = {"matmul": 0.0, "attention": 0.0, "probe_rows": 0.0, "prompt": 0.0, "other_ops": 0.0}
    for ev in prof.key_averages():
        sec = ev.self_cpu_time_total / 1e6
        if ev.key in ("probe_rows", "prompt"):
            # A label's own self time is what ran inside it outside aten ops (Python, the tokenizer).
            spent[ev.key] += sec
            continue
        if not ev.key.startswith("aten::") and not ev.key.startswith("aten"):
            continue
        group = next((g for g, rx in GROUPS if rx.search(ev.key)), "other_ops")
        spent[group] += sec
    # Ops called inside the probe's rows were counted under their own groups; move them to probe_rows.
    for ev in prof.events():
        if ev.name == "probe_rows":
            for child in ev.cpu_children:
                sec = child.cpu_time_total / 1e6
                group = next((g for g, rx in GROUPS if rx.search(child.name)), "other_ops")
                spent[group] -= sec
                spent["probe_rows"] += sec
    spent["python_and_rest"] = max(wall - sum(spent.values()), 0.0)
    systems = {
        name: {"seconds_per_query": round(sec / n, 4), "share": round(sec / wall, 4)}
        for name, sec in spent.items()
    }
    systems["total"] = {"seconds_per_query": round(wall / n, 4), "share": 1.0}
    return {
        "dataset": f"trec-dl19, BM25 top-20 of the first {n} queries (one warm-up query before)",
        "config": {
            "model": model.model_id,
            "dtype": model.dtype,
            "threads": torch.get_num_threads(),
            "prompts_per_query": tokens / n,
            "passage_max_tokens": cfg.probe.passage_max_tokens,
            "note": "self CPU time per op group under torch.profiler; shares of the profiled wall time",
        },
        "systems": systems,
    }
