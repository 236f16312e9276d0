"""Suite ``batch``: throughput of ``attn-rerank run`` on the local engine and on Ray Data.

Data: the first ``queries`` TREC DL19 queries (43, all of them; 6 under ``--quick``) with their BM25
top-``depth`` (20) from ``trec-dl19/bm25_top100.json``, written as rank_llm request lines.

Config: ``--opt config=NAME`` (default ``default``) with ``generator: none`` and ``probe.passage_max_tokens``
from :func:`eval.common.passage_tokens` (32 under ``--quick``); ``model.threads`` = 2 for the local engine
(one process on this 2-core machine) and 1 per Ray actor.

Systems, each the real command in a fresh subprocess on the same input, interleaved round by round in
rotating order (``--opt repeats=R``, default 1; figures are medians over rounds):

* ``local``: ``attn-rerank run --engine local``.
* ``ray-1``, ``ray-2``: ``attn-rerank run --engine ray --workers N --address <the suite's cluster>``.

The suite starts a local Ray cluster (``num_cpus=2``) once, before the rounds; that start-up is reported
apart as ``config.ray_startup_seconds``, so the systems' figures hold the engine's per-job costs only.

Figures per system:

* ``wall_seconds``: the whole command (interpreter start, input check, model load(s) in the process or
  the actors, every query, output written); ``queries_per_second`` = queries / ``wall_seconds``.
* ``first_result_seconds``: from the command's start to its first result line in the output file
  (polled every 20 ms): the fixed costs (model loading in the process or the actors, actor start-up).
  Ray hands results back per batch and buffers them, so the arrival times of later lines do not give a
  clean steady-state rate; none is reported.
* ``ratio_vs_local`` (of ``queries_per_second``); the issue's goal is ``ray-2`` >= 0.95.
* ``same_docid_order_fraction``: the share of queries whose ranking has the same docids in the same order
  as the local engine's, and ``max_abs_score_diff``. Thread counts differ between the engines, so in bf16
  the sums are not bit-equal; ``tests/test_ray.py`` checks exact agreement in fp32.

``config.scaling`` holds ``ray-2`` over ``ray-1``. ``--opt dtype=float32`` runs both engines in fp32
(default: the config's dtype).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from eval.common import REPO_ROOT, SuiteError, check_opts, get_opt, passage_tokens, require_data

logger = logging.getLogger(__name__)

OPTS = ("queries", "depth", "repeats", "config", "passage_max_tokens", "dtype")
SYSTEMS = {"local": ("local", None), "ray-1": ("ray", 1), "ray-2": ("ray", 2)}


def _requests(data_dir: Path, n: int, depth: int) -> list[dict[str, Any]]:
    path = require_data(data_dir, "trec-dl19") / "bm25_top100.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not 1 <= n <= len(entries):
        raise SuiteError(f"queries={n} must be between 1 and {len(entries)}")
    return [
        {
            "query": {"qid": str(e["hits"][0]["qid"]), "text": e["query"]},
            "candidates": [
                {"docid": str(h["docid"]), "score": h["score"], "doc": h["content"]}
                for h in e["hits"][:depth]
            ],
        }
        for e in entries[:n]
    ]


def _config_yaml(name: str, threads: int, passage_max_tokens: int, dtype: str) -> str:
    model = f"threads: {threads}" + (f", dtype: {dtype}" if dtype else "")
    return (
        f"extends: {name}\n"
        "generator: {name: none}\n"
        f"model: {{{model}}}\n"
        f"probe: {{passage_max_tokens: {passage_max_tokens}}}\n"
    )


def _run_system(cmd: list[str], out: Path, env: dict[str, str]) -> dict[str, float]:
    """Run one command, polling its output file for the times at which result lines appear."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stamps: list[tuple[float, int]] = []
    last = 0
    while True:
        done = proc.poll() is not None
        n = out.read_bytes().count(b"\n") if out.exists() else 0
        if n > last:
            stamps.append((time.perf_counter() - t0, n))
            last = n
        if done:
            break
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... exited {proc.returncode}: {stderr[-2000:]}")
    return {
        "wall_seconds": wall,
        "queries_per_second": stamps[-1][1] / wall,
        "first_result_seconds": stamps[0][0],
    }


def _compare(local: Path, other: Path) -> dict[str, float]:
    a = [json.loads(x) for x in local.read_text(encoding="utf-8").splitlines()]
    b = {r["qid"]: r for r in (json.loads(x) for x in other.read_text(encoding="utf-8").splitlines())}
    same = 0
    diff = 0.0
    for ra in a:
        rb = b[ra["qid"]]
        same += [x["docid"] for x in ra["ranking"]] == [x["docid"] for x in rb["ranking"]]
        by_doc = {x["docid"]: x["score"] for x in rb["ranking"]}
        diff = max(diff, *(abs(x["score"] - by_doc[x["docid"]]) for x in ra["ranking"]))
    return {"same_docid_order_fraction": same / len(a), "max_abs_score_diff": diff}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time the local engine and Ray with 1 and 2 workers on the same DL19 requests."""
    check_opts(args.opts, OPTS)
    n = int(get_opt(args.opts, "queries", 6 if args.quick else 43))
    depth = int(get_opt(args.opts, "depth", 20))
    repeats = int(get_opt(args.opts, "repeats", 1))
    name = str(get_opt(args.opts, "config", "default"))
    cap = passage_tokens(args.opts, args.quick, 300)
    dtype = str(get_opt(args.opts, "dtype", ""))
    if repeats < 1 or depth < 1:
        raise SuiteError("repeats and depth must be at least 1")
    from rerank.batch.ray_engine import RayMissingError, require_ray

    try:
        ray = require_ray()
    except RayMissingError as exc:
        raise SuiteError(str(exc)) from None
    reqs = _requests(args.data_dir, n, depth)
    work = Path(tempfile.mkdtemp(prefix="eval-batch-"))
    inp = work / "queries.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in reqs), encoding="utf-8")
    cfgs = {
        "local": work / "local.yaml",
        "ray": work / "ray.yaml",
    }
    cfgs["local"].write_text(_config_yaml(name, 2, cap, dtype), encoding="utf-8")
    cfgs["ray"].write_text(_config_yaml(name, 1, cap, dtype), encoding="utf-8")

    t0 = time.perf_counter()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=500 * 1024 * 1024,
        log_to_driver=False,
        logging_level="WARNING",
    )
    startup = time.perf_counter() - t0
    address = ray.get_runtime_context().gcs_address
    # The cluster's auth token is in this process's environment once ray.init() returns.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in SYSTEMS}
    outputs: dict[str, Path] = {}
    try:
        names = list(SYSTEMS)
        for r in range(repeats):
            for system in names[r % len(names) :] + names[: r % len(names)]:
                engine, workers = SYSTEMS[system]
                out = work / f"{system}-{r}.jsonl"
                cmd = [sys.executable, "-m", "rerank.cli", "run", "--config", str(cfgs[engine])]
                cmd += ["--input", str(inp), "--output", str(out), "--no-progress", "--engine", engine]
                if workers is not None:
                    cmd += ["--workers", str(workers), "--address", address]
                logger.info("round %d: %s", r, system)
                runs[system].append(_run_system(cmd, out, env))
                outputs[system] = out
    finally:
        ray.shutdown()

    systems: dict[str, dict[str, Any]] = {}
    for system, rs in runs.items():
        systems[system] = {k: round(statistics.median(x[k] for x in rs), 4) for k in rs[0]}
    for system in ("ray-1", "ray-2"):
        s, loc = systems[system], systems["local"]
        s["ratio_vs_local"] = round(s["queries_per_second"] / loc["queries_per_second"], 3)
        s.update({k: round(v, 6) for k, v in _compare(outputs["local"], outputs[system]).items()})
    scaling = {
        "ray-2_over_ray-1": round(
            systems["ray-2"]["queries_per_second"] / systems["ray-1"]["queries_per_second"], 3
        ),
    }
    return {
        "dataset": f"trec-dl19 bm25 top-{depth}, {n} queries",
        "config": {
            "config": name,
            "passage_max_tokens": cap,
            "dtype": dtype or "the config's",
            "queries": n,
            "depth": depth,
            "repeats": repeats,
            "threads": {"local": 2, "ray_per_actor": 1},
            "ray_cluster_cpus": 2,
            "ray_startup_seconds": round(startup, 3),
            "ray_version": ray.__version__,
            "scaling": scaling,
            "goal": {"ray-2_ratio_vs_local": 0.95},
            "per_round": runs,
            "command": "python -m eval batch" + (" --quick" if args.quick else ""),
        },
        "systems": systems,
    }
