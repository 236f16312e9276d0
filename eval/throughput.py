"""Throughput of the shipped default on DL19 (``python -m eval speed --opt only=throughput``).

The shipped reranker (``configs/default.yaml``: both prompt orders, ``N/A`` pass, BM25 fusion) reranks
DL19's BM25 top-20 (every query, one window) and top-100 (the first ``queries100`` queries, five
windows of 20), each list timed end to end (``.rerank``), under these systems:

* ``default``: the shipped config, each prompt of a window probed one at a time (the second prompt
  order only where the adaptive rule reads it: ``prompts_per_query``);
* ``both-orders``: the same reading both prompt orders of every window (``second_order: always``);
* ``batched``: the same with ``probe.batch_prompts: true`` (the two prompt orders of a window, and
  their ``N/A`` twins, as one batch each);
* ``prefix-reuse``: the default with the probe keeping the previous prompt's KV cache and forwarding
  only what follows the longest common token prefix (the instruction header and chat template, shared
  by every prompt; the Prompt Cache idea);
* ``plain-prefill``: the model's forward over the same prompt (the window in reversed order, every
  layer, nothing captured, fresh cache): what one ordinary prefill of these passages costs.

Systems run query by query, interleaved, the order alternating each query, after one warm-up query,
so they share the machine's noise. Figures per depth (suffix ``@20``, ``@100``): ``queries_per_second``
(queries / the summed seconds of that system), ``ndcg@10`` of the reranked lists (the prefill has
none), ``peak_rss_mb`` (the process's peak RSS sampled every 10 ms while that system ran, model
included), ``ratio_vs_default`` (queries/s over the default's: above 1 is faster),
``cost_vs_plain_prefill`` (seconds per query over one plain prefill's), and for ``batched`` and
``prefix-reuse`` ``max_abs_score_difference`` against ``default`` and ``same_ranking`` (share of queries
with the same order). Options: ``queries20`` (default all 43; quick 2), ``queries100`` (default 10; quick 1),
``threads`` (torch threads; 0 = torch's default), ``systems`` (comma-separated; ``default`` and
``plain-prefill`` are always run). ``queries100=0`` skips the top-100 part.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from eval.common import RssPeak, SuiteError, get_opt, ir_metrics

ALL_SYSTEMS = ("default", "both-orders", "batched", "prefix-reuse", "plain-prefill")


def run_throughput(data_dir: Path, opts: dict[str, Any], quick: bool) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import DynamicCache

    from eval.rerank import load_dl19
    from rerank.config import load_config
    from rerank.engines import AttentionReranker
    from rerank.engines.base import prompt_slots, window_orders
    from rerank.probe.model import load_model
    from rerank.probe.prompt import build_prompt
    from rerank.records import Hit

    n20 = int(get_opt(opts, "queries20", 2 if quick else 0))
    n100 = int(get_opt(opts, "queries100", 1 if quick else 10))
    threads = int(get_opt(opts, "threads", 0))
    wanted = set(str(get_opt(opts, "systems", ",".join(ALL_SYSTEMS))).split(","))
    wanted |= {"default", "plain-prefill"}
    unknown = sorted(wanted - set(ALL_SYSTEMS))
    if unknown:
        raise SuiteError(f"unknown systems {unknown}; choose from: {', '.join(ALL_SYSTEMS)}")
    SYSTEMS = tuple(s for s in ALL_SYSTEMS if s in wanted)
    RERANKERS = SYSTEMS[:-1]
    cfg = load_config("default")
    if threads:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"threads": threads})})
    model = load_model(cfg.model)
    variants = {
        "default": {},
        "both-orders": {"second_order": "always"},
        "batched": {"batch_prompts": True},
        "prefix-reuse": {},
    }
    rerankers = {
        name: AttentionReranker(model, cfg.probe.model_copy(update=variants[name]), cfg.calibration)
        for name in RERANKERS
    }
    if "prefix-reuse" in rerankers:
        rerankers["prefix-reuse"].engine.reuse_prefix = True
    queries, qrels = load_dl19(data_dir)

    def hits(q: dict[str, Any], depth: int) -> list[Hit]:
        return [
            Hit(passage=p, score=s, rank=i + 1)
            for i, (p, s) in enumerate(zip(q["passages"][:depth], q["first_stage"][:depth], strict=True))
        ]

    def plain_prefill(q: dict[str, Any], depth: int) -> None:
        # One ordinary prefill of each window's prompt, in the first order the probe reads it.
        ps = q["passages"][:depth]
        for start in range(0, len(ps), cfg.probe.window_size):
            win = ps[start : start + cfg.probe.window_size]
            order = window_orders(len(win), cfg.probe)[0]
            prompt = build_prompt(
                model.tokenizer,
                q["query"],
                [win[c] for c in prompt_slots(len(win), order)],
                max_passage_tokens=cfg.probe.passage_max_tokens,
            )
            with torch.inference_mode():
                model.model.model(
                    input_ids=torch.tensor([list(prompt.input_ids)], device=model.device),
                    cache=DynamicCache(config=model.model.config),
                    use_cache=True,
                )

    systems: dict[str, dict[str, Any]] = {name: {} for name in SYSTEMS}
    for depth, n in ((20, n20 or len(queries)), (100, n100)):
        if n <= 0:
            continue  # queries100=0 skips the top-100 part
        chosen = queries[:n]
        seconds = {name: 0.0 for name in SYSTEMS}
        peaks = {name: 0.0 for name in SYSTEMS}
        runs: dict[str, dict[str, dict[str, float]]] = {name: {} for name in RERANKERS}
        scores: dict[str, dict[str, dict[str, float]]] = {name: {} for name in RERANKERS}
        prompts: dict[str, int] = {name: 0 for name in RERANKERS}
        warm = queries[-1]
        for rr in rerankers.values():
            rr.rerank(warm["query"], hits(warm, depth))
        plain_prefill(warm, depth)
        for qi, q in enumerate(chosen):
            order = SYSTEMS if qi % 2 == 0 else SYSTEMS[::-1]
            for name in order:
                with RssPeak() as mem:
                    t0 = time.perf_counter()
                    if name == "plain-prefill":
                        plain_prefill(q, depth)
                    else:
                        ranked = rerankers[name].rerank(q["query"], hits(q, depth))
                    seconds[name] += time.perf_counter() - t0
                peaks[name] = max(peaks[name], mem.mb)
                if name != "plain-prefill":
                    # Rank-derived scores: trec_eval would reorder score ties by doc id.
                    runs[name][q["qid"]] = {it.passage.id: 1.0 / it.rank for it in ranked.items}
                    scores[name][q["qid"]] = {it.passage.id: it.score for it in ranked.items}
                    prompts[name] += ranked.info["prompts"]
            print(
                f"@{depth} {qi + 1}/{len(chosen)}: "
                + ", ".join(f"{k} {seconds[k] / (qi + 1):.2f} s/q" for k in SYSTEMS),
                flush=True,
            )
        sfx = f"@{depth}"
        for name in SYSTEMS:
            fig = systems[name]
            fig[f"queries{sfx}"] = len(chosen)
            fig[f"seconds_per_query{sfx}"] = round(seconds[name] / len(chosen), 4)
            fig[f"queries_per_second{sfx}"] = round(len(chosen) / seconds[name], 4)
            fig[f"peak_rss_mb{sfx}"] = round(peaks[name], 1)
            fig[f"ratio_vs_default{sfx}"] = round(seconds["default"] / seconds[name], 4)
            fig[f"cost_vs_plain_prefill{sfx}"] = round(seconds[name] / seconds["plain-prefill"], 4)
            if name in runs:
                fig[f"prompts_per_query{sfx}"] = round(prompts[name] / len(chosen), 3)
                fig[f"ndcg@10{sfx}"] = round(ir_metrics(qrels, runs[name], ["ndcg@10"])["ndcg@10"], 4)
        for name in RERANKERS[1:]:
            diffs = [
                abs(scores[name][qid][pid] - s)
                for qid, per in scores["default"].items()
                for pid, s in per.items()
            ]
            same = [
                sorted(per, key=per.get) == sorted(scores[name][qid], key=scores[name][qid].get)
                for qid, per in scores["default"].items()
            ]
            systems[name][f"max_abs_score_difference{sfx}"] = round(float(np.max(diffs)), 6)
            systems[name][f"same_ranking{sfx}"] = round(float(np.mean(same)), 4)
    return {
        "dataset": "trec-dl19, BM25 top-20 (one window) and top-100 (five windows of 20)",
        "config": {
            "model": model.model_id,
            "dtype": model.dtype,
            "threads": torch.get_num_threads(),
            "probe": cfg.probe.model_dump(mode="json"),
            "calibration": cfg.calibration.model_dump(mode="json"),
            "statistic": "summed seconds per system over the same queries, interleaved query by query "
            "(order alternating), after one warm-up query",
        },
        "systems": systems,
    }
