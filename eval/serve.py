"""Suite ``serve``: the rerank HTTP service against in-process reranking of the same lists, same run.

Data: TREC DL19, each query's BM25 top-``depth`` (default 20) passages from
``trec-dl19/bm25_top100.json``, sent as plain strings in BM25 order (no first-stage scores: what a
Cohere-style client sends).

Systems, all on the same lists and the same config (``configs/default.yaml`` with the probe's
``passage_max_tokens`` set by :func:`eval.common.with_passage_tokens`, written to a temporary config
that ``extends: default``):

* ``in-process``: ``Pipeline.rerank(query, texts)`` in this process, one list after another, timed per
  call. It runs twice, before and after the service runs (the machine is shared and noisy); its
  figures pool both passes.
* ``service@c`` for ``c`` in ``clients`` (default 1, 2, 4, 8): ``python -m rerank.serve`` in a
  subprocess (its own model), ``c`` client threads each with its own HTTP connection posting
  ``/v2/rerank``; ``max(queries, 2 c)`` requests per level, cycling over the queries, so every client
  stays busy. ``requests_per_s`` = answered requests / wall seconds of the level, latencies per
  request (client side: HTTP, JSON, queueing and inference). ``max_in_flight`` is the most requests
  the server reported running or queued (``/metrics``, sampled every 0.1 s): the queue stays bounded
  by the client count. ``failed_requests`` counts every non-200.
* ``cli``: ``attn-rerank run`` on the same lists (a rank_llm JSONL without scores), in this process.

Figures: ``requests_per_s``, ``latency_p50_s``/``p95``/``p99``, ``ndcg@10`` (from each system's
ranking, rank-derived scores so that ties keep the system's order), ``identical_rankings`` (fraction of
queries whose order equals ``in-process``), ``latency_p50_ratio_vs_in_process`` (goal at 1 client:
<= 1.05) and ``throughput_ratio_vs_in_process`` (goal at 8 clients: >= 0.95).

GPU: where CUDA is present the suite says so but does not time a large model (not implemented); where
it is absent ``config.gpu`` says that no GPU was available.

Options (``--opt``): ``queries=N`` (default all 43; quick 3), ``depth=20``, ``clients=1,2,4,8``,
``passage_max_tokens=N`` (default the config's 300; quick 32), ``cli=true``. Timings are reported,
never asserted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from eval.common import REPO_ROOT, SuiteError, check_opts, get_opt, ir_metrics, with_passage_tokens

KNOWN_OPTS = ("queries", "depth", "clients", "passage_max_tokens", "cli")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _latency(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds)
    return {f"latency_p{p}_s": round(float(np.percentile(a, p)), 4) for p in (50, 95, 99)}


def _run_of(lists: list[dict[str, Any]], orders: dict[int, list[int]]) -> dict[str, dict[str, float]]:
    """TREC-style run from per-query orders (indices best first), rank-derived scores."""
    run = {}
    for qi, order in orders.items():
        ids = [lists[qi]["ids"][i] for i in order]
        run[lists[qi]["qid"]] = {d: float(len(ids) - r) for r, d in enumerate(ids)}
    return run


def _in_process(pipe: Any, lists: list[dict[str, Any]]) -> tuple[dict[int, list[int]], list[float]]:
    orders, secs = {}, []
    for qi, item in enumerate(lists):
        t0 = time.perf_counter()
        ranked = pipe.rerank(item["query"], item["texts"])
        secs.append(time.perf_counter() - t0)
        orders[qi] = [int(it.passage.id) for it in ranked.items]
    return orders, secs


class _Service:
    """``python -m rerank.serve`` in a subprocess."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_path.open("w")
        cmd = [
            sys.executable,
            "-m",
            "rerank.serve",
            "--config",
            str(config_path),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--max-queue-ms",
            "600000",
            "--max-concurrent-requests",
            "64",
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, client: Any, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SuiteError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if client.get(f"{self.url}/health").status_code == 200:
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
        raise SuiteError(f"the server was not ready within {timeout:.0f} s")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(30)
        self.log.close()
        return code


def _level(url: str, lists: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    import httpx

    n_req = max(len(lists), 2 * clients)
    lock = threading.Lock()
    next_i = [0]
    lat: list[float] = []
    failed: list[str] = []
    orders: dict[int, list[int]] = {}
    in_flight: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                for line in c.get(f"{url}/metrics").text.splitlines():
                    if line.startswith("attn_rerank_rerank_in_flight "):
                        in_flight.append(int(float(line.split()[1])))
                stop.wait(0.1)

    def client() -> None:
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    k = next_i[0]
                    next_i[0] += 1
                if k >= n_req:
                    return
                qi = k % len(lists)
                body = {"model": "attn-rerank", "query": lists[qi]["query"], "documents": lists[qi]["texts"]}
                t0 = time.perf_counter()
                r = c.post(f"{url}/v2/rerank", json=body)
                took = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        failed.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    lat.append(took)
                    orders.setdefault(qi, [res["index"] for res in r.json()["results"]])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join(30)
    return {
        "requests": n_req,
        "requests_per_s": round(len(lat) / wall, 4),
        **(_latency(lat) if lat else {}),
        "failed_requests": len(failed),
        "failures": failed[:5],
        "max_in_flight": max(in_flight, default=0),
        "_orders": orders,
    }


def _cli(config_path: Path, lists: list[dict[str, Any]], tmp: Path) -> tuple[dict[int, list[int]], float]:
    from rerank.cli import main as cli_main

    inp, out = tmp / "cli-in.jsonl", tmp / "cli-out.jsonl"
    with inp.open("w", encoding="utf-8") as f:
        for item in lists:
            cands = [{"docid": d, "doc": t} for d, t in zip(item["ids"], item["texts"], strict=True)]
            f.write(
                json.dumps({"query": {"qid": item["qid"], "text": item["query"]}, "candidates": cands}) + "\n"
            )
    t0 = time.perf_counter()
    code = cli_main(
        ["run", "--config", str(config_path), "--input", str(inp), "--output", str(out), "--no-progress"]
    )
    secs = time.perf_counter() - t0
    if code != 0:
        raise SuiteError(f"attn-rerank run exited with {code}")
    by_qid = {item["qid"]: qi for qi, item in enumerate(lists)}
    orders = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        qi = by_qid[rec["qid"]]
        pos = {d: i for i, d in enumerate(lists[qi]["ids"])}
        orders[qi] = [pos[r["docid"]] for r in rec["ranking"]]
    return orders, secs


def run(args: Namespace) -> dict[str, Any]:
    """Time the service against in-process reranking (see the module docstring)."""
    import httpx
    import torch

    from eval.rerank import load_dl19
    from rerank.config import load_config
    from rerank.pipeline import Pipeline

    opts = dict(getattr(args, "opts", None) or {})
    check_opts(opts, KNOWN_OPTS)
    quick = bool(args.quick)
    queries, qrels = load_dl19(args.data_dir)
    n = int(get_opt(opts, "queries", 3 if quick else len(queries)))
    depth = int(get_opt(opts, "depth", 20))
    clients = tuple(int(x) for x in get_opt(opts, "clients", (1.0, 2.0, 4.0, 8.0)))
    if n < 1 or depth < 1 or not clients or min(clients) < 1:
        raise SuiteError("queries, depth and every clients value must be at least 1")
    cfg = with_passage_tokens(load_config("default"), opts, quick)
    cap = cfg.probe.passage_max_tokens
    lists = [
        {
            "qid": q["qid"],
            "query": q["query"],
            "ids": [p.id for p in q["passages"][:depth]],
            "texts": [p.text for p in q["passages"][:depth]],
        }
        for q in queries[:n]
    ]
    systems: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config_path = tmp / "serve-bench.yaml"
        config_path.write_text(f"extends: default\nprobe:\n  passage_max_tokens: {cap}\n", encoding="utf-8")
        svc = _Service(config_path, tmp / "server.log")
        try:
            pipe = Pipeline(cfg)
            pipe.rerank("warm-up", ["one passage", "another passage"])
            ref_orders, secs_a = _in_process(pipe, lists)
            with httpx.Client(timeout=600) as c:
                svc.wait_ready(c)
                c.post(f"{svc.url}/v2/rerank", json={"query": "warm-up", "documents": ["a", "b"]})
            levels = {k: _level(svc.url, lists, k) for k in clients}
        finally:
            exit_code = svc.stop()
        _, secs_b = _in_process(pipe, lists)
        secs = secs_a + secs_b
        ip_rps = len(secs) / sum(secs)
        systems["in-process"] = {
            "requests_per_s": round(ip_rps, 4),
            **_latency(secs),
            "ndcg@10": ir_metrics(qrels, _run_of(lists, ref_orders), ["ndcg@10"])["ndcg@10"],
            "passes": 2,
        }
        ip_p50 = systems["in-process"]["latency_p50_s"]
        for k, lv in levels.items():
            orders = lv.pop("_orders")
            row = dict(lv)
            if orders:
                row["ndcg@10"] = ir_metrics(qrels, _run_of(lists, orders), ["ndcg@10"])["ndcg@10"]
                row["identical_rankings"] = sum(orders[q] == ref_orders[q] for q in orders) / len(orders)
            row["throughput_ratio_vs_in_process"] = round(row["requests_per_s"] / ip_rps, 4)
            if "latency_p50_s" in row:
                row["latency_p50_ratio_vs_in_process"] = round(row["latency_p50_s"] / ip_p50, 4)
            systems[f"service@{k}"] = row
        if bool(get_opt(opts, "cli", True)):
            del pipe
            cli_orders, cli_secs = _cli(config_path, lists, tmp)
            systems["cli"] = {
                "ndcg@10": ir_metrics(qrels, _run_of(lists, cli_orders), ["ndcg@10"])["ndcg@10"],
                "identical_rankings": sum(cli_orders[q] == ref_orders[q] for q in cli_orders)
                / len(cli_orders),
                "seconds_total": round(cli_secs, 3),
            }
    gpu = "no GPU was available in this run; the large-model /v2/rerank timing was not made"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        gpu = f"CUDA device present ({name}); the large-model timing is not implemented"
    return {
        "dataset": f"trec-dl19 bm25 top-{depth}, {n} queries",
        "config": {
            "config": "default",
            "passage_max_tokens": cap,
            "depth": depth,
            "queries": n,
            "clients": list(clients),
            "server": "python -m rerank.serve (subprocess), /v2/rerank, documents as strings in BM25 order",
            "server_exit_code_after_sigterm": exit_code,
            "torch_threads": torch.get_num_threads(),
            "gpu": gpu,
        },
        "systems": systems,
    }
