"""``make demo``: index the bundled corpus, then retrieve, rerank and answer one question.

python -m rerank.demo [--config configs/default.yaml] [--query "..."]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "data" / "demo_corpus.jsonl"
DEFAULT_QUERY = "How do plants turn sunlight into sugar?"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rerank.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    ap.add_argument("--query", default=DEFAULT_QUERY)
    ap.add_argument("--corpus", default=str(CORPUS), help="JSONL corpus (id, title, text)")
    args = ap.parse_args(argv)

    from rerank.pipeline import Pipeline
    from retrievers.corpus import load_corpus

    t0 = time.perf_counter()
    pipe = Pipeline.from_config(args.config)
    passages = load_corpus(args.corpus)
    pipe.index(passages, show_progress=False)
    print(
        f"indexed {len(passages)} passages from {Path(args.corpus).name} in {time.perf_counter() - t0:.1f}s"
    )
    print(f"\nquery: {args.query}\n")
    hits = pipe.retrieve(args.query)
    print(f"first stage ({pipe.config.retriever.name}, top {len(hits)}):")
    for h in hits[:10]:
        print(f"  {h.rank:2d}. [{h.passage.id}] {h.passage.title}")
    answer = pipe.answer(args.query, hits)
    cal = pipe.config.calibration.name
    print(f"\nreranked by attention ({pipe.model.model_id}, {pipe.model.dtype}, calibration: {cal}):")
    w = pipe.config.probe.first_stage_weight
    both = pipe.config.probe.prompt_order == "both"
    print(f"  score = calibrated attention (z) + {w:g} x first-stage score (z)")
    if both:
        print("  calibrated attention: the mean of two prompts, best passage last and best passage first")
    print(f"  slot: place in the {'best-last ' if both else ''}prompt (19 is next to the query)")
    print("  rank  id               score  calibrated      raw  slot  title")
    for it in answer.ranking.items[:10]:
        print(
            f"  {it.rank:4d}  {it.passage.id:14s} {it.score:6.2f} {it.calibrated_score:11.4f} "
            f"{it.raw_score:8.4f} {it.prompt_position:5d}  {it.passage.title}"
        )
    used = ", ".join(p.id for p in answer.passages_used)
    pol = pipe.config.policy
    print(f"\ncontext for the generator (order {pol.order}, prune {pol.prune}): {used}")
    if answer.text is not None:
        print(f"\nanswer: {answer.text}")
    print("\ntimings: " + ", ".join(f"{k} {v:.2f}s" for k, v in answer.timings.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
