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
``bm25-best_last``     all 20 in BM25 order within the list, best last (no probe: a control)
``bm25+probe-best_last``  the probe over the BM25-ordered list, fused with BM25 as the shipped config
                       does (``first_stage_weight``), best last
``best-policy``        ranking (probe alone, or fused with BM25), order and prune chosen on *dev*
                       questions (never the test questions)
``best-policy-bm25``   the same order and prune driven by BM25 alone: what the probe adds to it

In a real pipeline the first stage hands over its scores; here the list order is random, so the
``probe`` systems rank by attention alone, and the ``bm25`` systems stand in for a first stage that
scored the 20 passages (BM25 is also what chose the distractors, so it is a strong, hard-to-beat
reference on these lists).

Metric: ``accuracy`` = best-subspan exact match (an answer string inside the normalised output), plus
``seconds_per_query`` (probe + generation) and ``gold_in_context`` (how often the gold passage survived
pruning). Generation is batched (left padding) per system; ``seconds_per_query`` is the probe's time
plus the system's generation time divided by the questions. Options (``--opt``): ``questions=N``
(default 300; quick 3), ``dev_questions=N`` (default 40; quick 2), ``config=PATH``,
``max_new_tokens=N`` (default 24), ``passage_max_tokens=N`` (probe and generator; default the
config's, quick 32, which may cut the answer out of a passage), ``batch_size=N`` (default 8),
``curve=PATHS`` (candidate raw-attention curves, comma-separated; ``bias_aligned`` follows the slot
profile of the one fitted for the model's dtype and is left out, with a warning, when none is).

``generator=openai`` also answers every system's contexts through a served model over the
OpenAI-compatible API (the ``openai`` generator: same chat messages, greedy) and reports, beside the local
generator's figures of the same run, ``accuracy_openai``, ``seconds_per_query_openai`` and
``answers_equal_openai`` (the share of answers identical to the local ones). The server comes from the
config's generator section when that is ``openai`` (``config=configs/vllm-served.yaml``), else from
``base_url=URL`` (default ``http://127.0.0.1:8000/v1``) and ``served_model=NAME``, with
``timeout_s=S`` per request (default 600: a benchmark waits for a busy server rather than fail); the dev
choice of ``best-policy`` stays the local generator's. The server answers each prompt alone, unpadded;
the local generator left-pads ``batch_size`` prompts together, which in bf16 changes some greedy answers,
so ``answers_equal_openai`` is 1 only with ``batch_size=1``.

A long run can be split over processes or sessions: ``start=S`` scores test questions ``S`` to
``questions - 1`` only, and ``policy=KEY`` (e.g. ``bm25+probe:best_last/top_k1``) takes the
``best-policy`` choice made on dev by an earlier part instead of repeating the dev runs. Parts over
disjoint question ranges are then combined with ``python -m eval.merge`` (see ``eval/merge.py``).
"""

from __future__ import annotations

import logging
import random
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from calibration.curve import CurveMismatchError
from eval.common import (
    RAW_CURVES,
    REPO_ROOT,
    SuiteError,
    check_opts,
    get_opt,
    get_start,
    load_curve,
    require_data,
    with_passage_tokens,
)

logger = logging.getLogger(__name__)

N = 20
CANDIDATE_POLICIES = [
    ("best_last", "top_k", 1),
    ("best_last", "top_k", 2),
    ("best_last", "top_k", 3),
    ("best_last", "top_k", 5),
    ("score", "top_k", 3),
    ("edges", "top_k", 5),
]
RANKINGS = ("probe", "bm25+probe")


def shuffled_list(item: Any, seed: int) -> tuple[list[Any], int]:
    gold = random.Random(f"{seed}:{item.qid}").randrange(N)
    return item.with_gold_at(gold, N), gold


def run(args: Namespace) -> dict[str, Any]:
    from eval.nq import best_subspan_em, load_nq
    from rerank.config import GeneratorConfig, PolicyConfig, load_config
    from rerank.engines import IdentityReranker
    from rerank.generate import OpenAIGenerator, TransformersGenerator
    from rerank.pipeline import Pipeline
    from rerank.policies import apply_policy
    from rerank.probe.model import load_model
    from retrievers.bm25 import BM25Retriever
    from retrievers.records import Hit

    opts = getattr(args, "opts", {}) or {}
    check_opts(
        opts,
        [
            "questions",
            "start",
            "dev_questions",
            "config",
            "max_new_tokens",
            "batch_size",
            "curve",
            "policy",
            "passage_max_tokens",
            "generator",
            "base_url",
            "served_model",
            "timeout_s",
        ],
    )
    require_data(args.data_dir, "nq-open-oracle")
    n_q = int(get_opt(opts, "questions", 3 if args.quick else 300))
    n_dev = int(get_opt(opts, "dev_questions", 2 if args.quick else 40))
    start = get_start(opts, n_q)
    given_policy = get_opt(opts, "policy", "")
    keys = {f"{r}:{o}/{p}{k}": (r, o, p, k) for r in RANKINGS for o, p, k in CANDIDATE_POLICIES}
    if given_policy and given_policy not in keys:
        raise SuiteError(f"unknown policy={given_policy!r}; choose one of: {', '.join(keys)}")
    config_path = Path(get_opt(opts, "config", str(REPO_ROOT / "configs" / "default.yaml")))
    fused_cfg = with_passage_tokens(load_config(config_path), opts, args.quick)
    if fused_cfg.probe.first_stage_weight <= 0:
        raise ValueError("the config's probe.first_stage_weight must be > 0 for the bm25+probe systems")
    # The random list order carries no first-stage signal: fusing with it (the reranker's stand-in when
    # scores are missing) would only add noise, so the probe-alone systems do not fuse.
    cfg = fused_cfg.model_copy(
        update={"probe": fused_cfg.probe.model_copy(update={"first_stage_weight": 0.0})}
    )
    max_new = int(get_opt(opts, "max_new_tokens", 24))
    model = load_model(cfg.model)
    pipe = Pipeline(cfg, model=model)
    fused = Pipeline(fused_cfg, model=model)
    gen = TransformersGenerator(
        model, GeneratorConfig(max_new_tokens=max_new), pipe.reranker.template, cfg.probe.passage_max_tokens
    )
    served = None
    which = get_opt(opts, "generator", "transformers")
    if which not in ("transformers", "openai"):
        raise SuiteError(f"unknown generator={which!r}; choose transformers or openai")
    if which == "openai":
        g = cfg.generator if cfg.generator.name == "openai" else None
        served_model = get_opt(opts, "served_model", g.model if g else "")
        if not served_model:
            raise SuiteError(
                "generator=openai needs served_model=NAME (or a config whose generator is openai)"
            )
        base = g.model_dump() if g else {}
        served_cfg = GeneratorConfig.model_validate(
            base
            | {
                "name": "openai",
                "base_url": get_opt(opts, "base_url", g.base_url if g else "http://127.0.0.1:8000/v1"),
                "model": served_model,
                "max_new_tokens": max_new,
                "instruction": gen.cfg.instruction,
                "timeout_s": get_opt(opts, "timeout_s", g.timeout_s if g else 600.0),
            }
        )
        served = OpenAIGenerator(model, served_cfg, pipe.reranker.template, cfg.probe.passage_max_tokens)
    # bias_aligned needs the model's attention-by-slot profile: a raw-attention curve of its dtype (any
    # probe settings: it only orders passages, it does not correct this probe's scores).
    try:
        curve = load_curve(get_opt(opts, "curve", RAW_CURVES), model, cfg.probe, "curve", model_only=True)
    except (FileNotFoundError, CurveMismatchError) as exc:
        logger.warning("bias_aligned left out: %s", exc)
        curve = None
    test, dev = load_nq(args.data_dir)
    test, dev = test[start:n_q], dev[:n_dev]

    def bm25_hits(question: str, passages: list[Any]) -> list[Any]:
        bm = BM25Retriever(backend="bm25s")
        bm.index(passages, show_progress=False)
        s = np.asarray(bm.scores(question), dtype=np.float64)
        order = sorted(range(len(passages)), key=lambda i: (-s[i], i))
        return [Hit(passage=passages[i], score=float(s[i]), rank=r + 1) for r, i in enumerate(order)]

    def contexts(item: Any, seed: int) -> tuple[dict[str, list[Any]], dict[str, float], Any]:
        passages, gold = shuffled_list(item, seed)
        t0 = time.perf_counter()
        ranked = pipe.rerank(item.question, passages)
        t1 = time.perf_counter()
        hits = bm25_hits(item.question, passages)
        t2 = time.perf_counter()
        # The probe reads the list in BM25 order (its best last, as configured) and fuses with BM25.
        rankings = {"probe": ranked, "bm25+probe": fused.rerank(item.question, hits)}
        t3 = time.perf_counter()
        bm25_ranked = IdentityReranker().rerank(item.question, hits)
        timing = {"probe": t1 - t0, "bm25": t2 - t1, "bm25+probe": t3 - t1}
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
        ctx["bm25-best_last"] = [
            it.passage for it in apply_policy(bm25_ranked, PolicyConfig(order="best_last", prune="none"))
        ]
        ctx["bm25+probe-best_last"] = [
            it.passage
            for it in apply_policy(rankings["bm25+probe"], PolicyConfig(order="best_last", prune="none"))
        ]
        for order, prune, k in CANDIDATE_POLICIES:
            pol = PolicyConfig(order=order, prune=prune, top_k=k)
            for name, rk in [*rankings.items(), ("bm25", bm25_ranked)]:
                ctx[f"{name}:{order}/{prune}{k}"] = [it.passage for it in apply_policy(rk, pol)]
        return ctx, timing, item.gold

    from tqdm.auto import tqdm

    bs = int(get_opt(opts, "batch_size", 8))

    def answer_all(
        items: list[Any], ctxs: list[dict[str, list[Any]]], key: str, g: Any = gen
    ) -> tuple[list[float], float, list[str]]:
        t0 = time.perf_counter()
        outs = g.generate_batch([it.question for it in items], [c[key] for c in ctxs], batch_size=bs)
        dt = (time.perf_counter() - t0) / max(len(items), 1)
        return [best_subspan_em(o, it.answers) for o, it in zip(outs, items, strict=True)], dt, outs

    dev_acc: dict[str, list[float]] = {}
    best_key = given_policy
    if not best_key:
        # Choose the best order/prune combination on dev questions.
        dev_ctx = [contexts(item, seed=1)[0] for item in tqdm(dev, desc="qa dev probe", unit="q")]
        for key in keys:
            dev_acc[key], _, _ = answer_all(dev, dev_ctx, key)
        # Ties go to the smaller context, then to the probe alone (the cheaper ranking).
        best_key = max(keys, key=lambda key: (np.mean(dev_acc[key]), -keys[key][3]))
    best = keys[best_key]
    best_bm25_key = f"bm25:{best[1]}/{best[2]}{best[3]}"

    names = ["closed-book", "gold-only", "retriever-order", "score", "best_last"]
    names += ["bias_aligned"] if curve is not None else []
    names += ["top5-pruned", "bm25-best_last", "bm25+probe-best_last", "best-policy", "best-policy-bm25"]
    # Which ranking's time each system pays for (beyond its generation).
    ranking_of = {n: "probe" for n in ("score", "best_last", "bias_aligned", "top5-pruned")}
    ranking_of |= {"bm25-best_last": "bm25", "bm25+probe-best_last": "bm25+probe"}
    ranking_of |= {"best-policy": best[0], "best-policy-bm25": "bm25"}
    test_ctx, rank_t = [], []
    for item in tqdm(test, desc="qa test probe", unit="q"):
        ctx, timing, gold = contexts(item, seed=0)
        ctx["best-policy"] = ctx[best_key]
        ctx["best-policy-bm25"] = ctx[best_bm25_key]
        ctx["closed-book"] = []
        ctx["gold-only"] = [gold]
        test_ctx.append(ctx)
        rank_t.append(timing)
    acc: dict[str, list[float]] = {}
    secs: dict[str, float] = {}
    gold_in: dict[str, list[float]] = {}
    served_figures: dict[str, dict[str, float]] = {}
    for name in tqdm(names, desc="qa generate", unit="system"):
        acc[name], dt, outs = answer_all(test, test_ctx, name)
        r = ranking_of.get(name)
        rank_s = float(np.mean([t[r] for t in rank_t])) if r else 0.0
        secs[name] = dt + rank_s
        if served is not None:
            # The same contexts through the server: the local answers above are the reference.
            s_acc, s_dt, s_outs = answer_all(test, test_ctx, name, served)
            served_figures[name] = {
                "accuracy_openai": round(float(np.mean(s_acc)), 4),
                "seconds_per_query_openai": round(s_dt + rank_s, 4),
                "answers_equal_openai": round(
                    float(np.mean([a == b for a, b in zip(outs, s_outs, strict=True)])), 4
                ),
            }
        gold_in[name] = [
            float(any(p.id == it.gold.id for p in c[name])) for it, c in zip(test, test_ctx, strict=True)
        ]
    systems = {
        n: {
            "accuracy": round(float(np.mean(acc[n])), 4),
            "seconds_per_query": round(secs[n], 4),
            "gold_in_context": round(float(np.mean(gold_in[n])), 4),
        }
        | served_figures.get(n, {})
        for n in names
    }
    systems["best-policy"]["chosen"] = best_key  # type: ignore[assignment]
    systems["best-policy-bm25"]["chosen"] = best_bm25_key  # type: ignore[assignment]
    return {
        "dataset": f"nq-open-oracle test split ({len(test)} questions, gold at a random slot of 20)",
        "questions": {"start": start, "stop": start + len(test)},
        "config": {
            "model": model.model_id,
            "dtype": model.dtype,
            "probe": cfg.probe.model_dump(),
            "bm25+probe_first_stage_weight": fused_cfg.probe.first_stage_weight,
            "calibration": cfg.calibration.model_dump(),
            "max_new_tokens": max_new,
            "dev_questions": 0 if given_policy else len(dev),
            "dev_accuracy": {k: round(float(np.mean(v)), 4) for k, v in dev_acc.items()},
            "best_policy_source": "given (policy=)" if given_policy else "chosen on dev",
            **(
                {"served_generator": {"base_url": served.base_url, "model": served.cfg.model}}
                if served is not None
                else {}
            ),
        },
        "systems": systems,
    }
