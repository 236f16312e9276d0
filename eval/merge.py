"""Combine result JSONs of one suite run in parts over disjoint question ranges.

    python -m eval.merge --output docs/results/qa.json PART.json PART.json ...

A long run (the 300-question QA benchmark takes hours on two CPU cores) can be split with the suite's
``start=`` and ``questions=`` options and run in several processes or sessions. Every metric of such a
suite is a mean over questions (``accuracy``, ``gold_in_context``, ``seconds_per_query``), so the
combined figure is the question-weighted mean of the parts' figures: exactly what one run over all the
questions would report, except that each part's seconds were measured under its own machine load.

``position`` parts are merged the same way, with two differences. The bin spread and the position-blind
null beside it are not means: they are computed again, from every question's gold ranks where each
part kept them (``per_question``), else the spread from the merged bins and no null. ``probe-cv`` is
left out: each part chose its variants on its own questions; a run over the whole range from the
suite's cache of passes reports it.

Parts must come from the same suite with the same configuration (options that only choose the question
range, the batch size or a best policy already chosen on dev may differ), cover contiguous,
non-overlapping question ranges and report the same systems; anything else is refused.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.common import SuiteError, write_json

MERGEABLE = {"qa", "position"}
#: Config keys that may differ between parts: run bookkeeping, not the experiment.
PART_KEYS = {
    "opts",
    "wall_seconds",
    "dev_questions",
    "dev_accuracy",
    "best_policy_source",
    "timing_lists",
    "cv",
}
#: Systems chosen on each part's own questions, which a merge cannot combine.
PER_PART_CHOICE = {"position": {"probe-cv"}}
#: Per-system values that are means over questions.
MEAN_METRICS = {"accuracy", "gold_in_context", "seconds_per_query", "recall@1", "mrr"}


def _is_mean(key: str) -> bool:
    return key in MEAN_METRICS or re.fullmatch(r"recall@1@(pos|bin)\d+", key) is not None


def question_range(part: dict[str, Any], path: str) -> tuple[int, int]:
    """``(start, stop)`` of a part's test questions; older files only record ``--opt questions=N``."""
    if "questions" in part:
        return int(part["questions"]["start"]), int(part["questions"]["stop"])
    opts = part.get("config", {}).get("opts", {})
    if "questions" not in opts or "start" in opts:
        raise SuiteError(f"{path}: the question range is not recorded; re-run it with this version")
    return 0, int(opts["questions"])


def merge_parts(parts: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Combine ``(path, result)`` parts into one result in the suite's JSON contract, with ``parts``.

    Raises:
        SuiteError: Fewer than two parts, another suite, differing configurations or systems, a gap or
            an overlap between question ranges.
    """
    if len(parts) < 2:
        raise SuiteError("merge needs at least two parts")
    suites = {p["suite"] for _, p in parts}
    if len(suites) != 1 or not suites <= MERGEABLE:
        raise SuiteError(
            f"parts come from suites {sorted(suites)}; merge combines one of {sorted(MERGEABLE)}"
        )

    def experiment(cfg: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cfg.items() if k not in PART_KEYS}

    suite = next(iter(suites))
    left_out = PER_PART_CHOICE.get(suite, set())
    parts = [
        (path, {**p, "systems": {k: v for k, v in p["systems"].items() if k not in left_out}})
        for path, p in parts
    ]
    ref_path, ref = parts[0]
    for path, p in parts[1:]:
        a, b = experiment(ref["config"]), experiment(p["config"])
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise SuiteError(f"{path} differs from {ref_path} in config: {', '.join(diff)}")
        if set(p["systems"]) != set(ref["systems"]):
            raise SuiteError(f"{path} reports other systems than {ref_path}")
        for name, s in p["systems"].items():
            if s.get("chosen") != ref["systems"][name].get("chosen"):
                raise SuiteError(
                    f"{path}: {name} uses {s.get('chosen')!r}, {ref_path} uses "
                    f"{ref['systems'][name].get('chosen')!r}; pass the same policy= to every part"
                )
    ranged = sorted(((*question_range(p, path), path, p) for path, p in parts), key=lambda r: r[0])
    for (_, e0, p0, _), (s1, _, p1, _) in zip(ranged, ranged[1:], strict=False):
        if s1 != e0:
            what = "overlaps" if s1 < e0 else "leaves a gap after"
            raise SuiteError(f"{p1} (from question {s1}) {what} {p0} (to question {e0})")
    total = sum(e - s for s, e, _, _ in ranged)
    systems: dict[str, dict[str, Any]] = {}
    for name in ref["systems"]:
        # (questions, figures) of each part, in question order.
        figs = [(e - st, p["systems"][name]) for st, e, _, p in ranged]
        out: dict[str, Any] = {}
        for key in dict.fromkeys(k for _, f in figs for k in f):
            # A part run without timing (position's timing_lists=0) has no seconds: the mean is over
            # the parts that have the key, and any other value is the first part's that has it.
            have = [(w, f[key]) for w, f in figs if key in f]
            if _is_mean(key):
                out[key] = round(sum(w * v for w, v in have) / sum(w for w, _ in have), 4)
            else:
                out[key] = have[0][1]
        systems[name] = out
    per_question = None
    if suite == "position":
        per_question = _position_recompute(systems, [p for *_, p in ranged])
    dev = [p for _, p in parts if p["config"].get("dev_accuracy")]
    config = {k: v for k, v in ref["config"].items() if k not in PART_KEYS}
    if dev:
        config["dev_questions"] = dev[0]["config"]["dev_questions"]
        config["dev_accuracy"] = dev[0]["config"]["dev_accuracy"]
    start, stop = ranged[0][0], ranged[-1][1]
    # "(150 questions, ..." in the first part's description becomes the merged count.
    dataset = re.sub(r"\(\d+ questions", f"({total} questions", ranged[0][3]["dataset"], count=1)
    # A part of a split run names its range ("..., questions 149-182"): name the merged one instead.
    dataset = re.sub(r", questions \d+-\d+$", f", questions {start}-{stop - 1}" if start else "", dataset)
    return {
        "suite": ref["suite"],
        "dataset": dataset,
        "config": config,
        "systems": systems,
        "machine": ranged[0][3].get("machine", {}),
        "questions": {"start": start, "stop": stop},
        "parts": [
            {
                "file": str(path),
                "questions": {"start": s, "stop": e},
                "wall_seconds": p["config"].get("wall_seconds"),
                "opts": p["config"].get("opts", {}),
                "thread_env": p.get("machine", {}).get("thread_env"),
            }
            for s, e, path, p in ranged
        ],
        **(
            {"left_out": {k: "chosen on each part's own questions" for k in sorted(left_out)}}
            if left_out
            else {}
        ),
        **({"per_question": per_question} if per_question else {}),
    }


def _position_recompute(
    systems: dict[str, dict[str, Any]], parts: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Recompute what is not a mean over questions; returns the merged ``per_question`` (or None)."""
    from eval.position import BINS, NULL_KEYS, N, summarize

    kept = [p.get("per_question") for p in parts]
    if all(kept):
        merged = {
            "qids": [q for pq in kept for q in pq["qids"]],
            "gold_rank": {name: [row for pq in kept for row in pq["gold_rank"][name]] for name in systems},
        }
        for name, rows in merged["gold_rank"].items():
            mat = np.array([[int(x) for x in row.split()] for row in rows])
            systems[name].update(summarize({pos: list(mat[:, pos]) for pos in range(N)}))
    else:
        merged = None
        for out in systems.values():
            bins = [out[f"recall@1@bin{b + 1}"] for b in range(BINS)]
            out["bin_spread"] = round(max(bins) - min(bins), 4)
            for key in NULL_KEYS:
                out.pop(key, None)
    raw, curve = systems.get("probe-raw", {}), systems.get("probe-curve", {})
    if raw.get("seconds_per_query") and curve.get("seconds_per_query"):
        curve["time_ratio_vs_raw"] = round(curve["seconds_per_query"] / raw["seconds_per_query"], 4)
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    """Merge the parts named on the command line; returns the exit code (0 ok, 2 refused)."""
    parser = argparse.ArgumentParser(prog="python -m eval.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="+", type=Path, help="result JSONs of the parts, in any order")
    parser.add_argument("--output", type=Path, required=True, help="where to write the merged JSON")
    args = parser.parse_args(argv)
    try:
        parts = []
        for path in args.parts:
            if not path.is_file():
                raise SuiteError(f"part not found: {path}")
            parts.append((str(path), json.loads(path.read_text(encoding="utf-8"))))
        merged = merge_parts(parts)
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {write_json(args.output, merged)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
