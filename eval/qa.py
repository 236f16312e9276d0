"""Suite ``qa``: end-to-end answer accuracy on NQ-open with 19 hard distractors per question.

The gold passage sits at a seeded random slot of a 20-passage list (``retriever-order``). The probe
reranks the list once per question (configs/default.yaml settings); each system then hands the
generator (the same embedded model, greedy) a different context:

``closed-book``        no passages (floor)
``gold-only``          only the gold passage (ceiling)
``retriever-order``    all 20 in the given order
``score``              all 20, best first
``best_last``          all 20, best last (next to the question)
``bias_aligned``       all 20, best at the slots the fitted curve gives most attention
``top5-pruned``        the best 5, best last
``best-policy``        order and prune chosen on *dev* questions (never the test questions)

Metric: ``accuracy`` = best-subspan exact match (an answer string inside the normalised output), plus
``seconds_per_query`` (probe + generation) and ``gold_in_context`` (how often the gold passage survived
pruning). Generation is batched (left padding) per system; ``seconds_per_query`` is the probe's time
plus the system's generation time divided by the questions. Options (``--opt``): ``questions=N``
(default 300; quick 3), ``dev_questions=N`` (default 40; quick 2), ``config=PATH``,
``max_new_tokens=N`` (default 24), ``batch_size=N`` (default 8), ``curve=PATH`` (the raw-attention
curve whose slot profile ``bias_aligned`` follows; the system is left out when the file is missing).
"""

from __future__ import annotations

import random
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from eval.common import REPO_ROOT, check_opts, get_opt, require_data

N = 20
CANDIDATE_POLICIES = [
    ("best_last", "top_k", 1),
    ("best_last", "top_k", 2),
    ("best_last", "top_k", 3),
    ("best_last", "top_k", 5),
    ("score", "top_k", 3),
    ("edges", "top_k", 5),
]


def shuffled_list(item: Any, seed: int) -> tuple[list[Any], int]:
    gold = random.Random(f"{seed}:{item.qid}").randrange(N)
    return item.with_gold_at(gold, N), gold


def run(args: Namespace) -> dict[str, Any]:
    from eval.nq import best_subspan_em, load_nq
    from rerank.config import GeneratorConfig, PolicyConfig, load_config
    from rerank.generate import TransformersGenerator
    from rerank.model import load_model
    from rerank.pipeline import Pipeline
    from rerank.policies import apply_policy

    opts = getattr(args, "opts", {}) or {}
    check_opts(opts, ["questions", "dev_questions", "config", "max_new_tokens", "batch_size", "curve"])
    require_data(args.data_dir, "nq-open-oracle")
    n_q = int(get_opt(opts, "questions", 3 if args.quick else 300))
    n_dev = int(get_opt(opts, "dev_questions", 2 if args.quick else 40))
    cfg = load_config(Path(get_opt(opts, "config", str(REPO_ROOT / "configs" / "default.yaml"))))
    # The lists come in a random order with no first-stage scores: fusing with that order (the
    # reranker's stand-in when scores are missing) would only add noise, so the probe ranks alone.
    cfg = cfg.model_copy(update={"probe": cfg.probe.model_copy(update={"first_stage_weight": 0.0})})
    max_new = int(get_opt(opts, "max_new_tokens", 24))
    model = load_model(cfg.model)
    pipe = Pipeline(cfg, model=model)
    gen = TransformersGenerator(
        model, GeneratorConfig(max_new_tokens=max_new), pipe.reranker.template, cfg.probe.passage_max_tokens
    )
    # bias_aligned needs the model's attention-by-slot profile: the raw-attention curve.
    from calibration.curve import BiasCurve

    curve_path = Path(
        get_opt(opts, "curve", str(REPO_ROOT / "calibration" / "curves" / "smollm2-135m-raw.json"))
    )
    curve = BiasCurve.load(curve_path) if curve_path.is_file() else None
    test, dev = load_nq(args.data_dir)
    test, dev = test[:n_q], dev[:n_dev]

    def contexts(item: Any, seed: int) -> tuple[dict[str, list[Any]], float, Any]:
        passages, gold = shuffled_list(item, seed)
        t0 = time.perf_counter()
        ranked = pipe.rerank(item.question, passages)
        t_probe = time.perf_counter() - t0
        ctx = {"retriever-order": passages}
        for name, order, prune, k in [
            ("score", "score", "none", 5),
            ("best_last", "best_last", "none", 5),
            ("top5-pruned", "best_last", "top_k", 5),
        ] + ([("bias_aligned", "bias_aligned", "none", 5)] if curve is not None else []):
            sel = apply_policy(
                ranked, PolicyConfig(order=order, prune=prune, top_k=k), bias=curve.bias if curve else None
            )
            ctx[name] = [it.passage for it in sel]
        for order, prune, k in CANDIDATE_POLICIES:
            sel = apply_policy(ranked, PolicyConfig(order=order, prune=prune, top_k=k))
            ctx[f"{order}/{prune}{k}"] = [it.passage for it in sel]
        return ctx, t_probe, item.gold

    from tqdm.auto import tqdm

    bs = int(get_opt(opts, "batch_size", 8))

    def answer_all(items: list[Any], ctxs: list[dict[str, list[Any]]], key: str) -> tuple[list[float], float]:
        t0 = time.perf_counter()
        outs = gen.generate_batch([it.question for it in items], [c[key] for c in ctxs], batch_size=bs)
        dt = (time.perf_counter() - t0) / max(len(items), 1)
        return [best_subspan_em(o, it.answers) for o, it in zip(outs, items, strict=True)], dt

    # Choose the best order/prune combination on dev questions.
    dev_ctx = [contexts(item, seed=1)[0] for item in tqdm(dev, desc="qa dev probe", unit="q")]
    dev_acc: dict[str, list[float]] = {}
    for order, prune, k in CANDIDATE_POLICIES:
        key = f"{order}/{prune}{k}"
        dev_acc[key], _ = answer_all(dev, dev_ctx, key)
    best = max(CANDIDATE_POLICIES, key=lambda c: (np.mean(dev_acc[f"{c[0]}/{c[1]}{c[2]}"]), -c[2]))
    best_key = f"{best[0]}/{best[1]}{best[2]}"

    names = ["closed-book", "gold-only", "retriever-order", "score", "best_last"]
    names += ["bias_aligned"] if curve is not None else []
    names += ["top5-pruned", "best-policy"]
    test_ctx, probe_t = [], []
    for item in tqdm(test, desc="qa test probe", unit="q"):
        ctx, t_probe, gold = contexts(item, seed=0)
        ctx["best-policy"] = ctx[best_key]
        ctx["closed-book"] = []
        ctx["gold-only"] = [gold]
        test_ctx.append(ctx)
        probe_t.append(t_probe)
    acc: dict[str, list[float]] = {}
    secs: dict[str, float] = {}
    gold_in: dict[str, list[float]] = {}
    for name in tqdm(names, desc="qa generate", unit="system"):
        acc[name], dt = answer_all(test, test_ctx, name)
        uses_probe = name not in ("closed-book", "gold-only", "retriever-order")
        secs[name] = dt + (float(np.mean(probe_t)) if uses_probe else 0.0)
        gold_in[name] = [
            float(any(p.id == it.gold.id for p in c[name])) for it, c in zip(test, test_ctx, strict=True)
        ]
    systems = {
        n: {
            "accuracy": round(float(np.mean(acc[n])), 4),
            "seconds_per_query": round(secs[n], 4),
            "gold_in_context": round(float(np.mean(gold_in[n])), 4),
        }
        for n in names
    }
    systems["best-policy"]["chosen"] = best_key  # type: ignore[assignment]
    return {
        "dataset": f"nq-open-oracle test split ({len(test)} questions, gold at a random slot of 20)",
        "config": {
            "model": model.model_id,
            "dtype": model.dtype,
            "probe": cfg.probe.model_dump(),
            "calibration": cfg.calibration.model_dump(),
            "max_new_tokens": max_new,
            "dev_questions": len(dev),
            "dev_accuracy": {k: round(float(np.mean(v)), 4) for k, v in dev_acc.items()},
        },
        "systems": systems,
    }
