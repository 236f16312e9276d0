"""The Ray engine, run for real: a local Ray cluster started once for the session, the embedded model,
DL19 requests, real worker processes killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rerank.cli import main

# Ray Data reads its own deprecated settings when it copies a DataContext; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning:ray.data")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
# The embedded model, read through its first four layers over short passages, in fp32 on both sides so
# that the local and Ray runs compute the same numbers.
FAST_CFG = (
    "model: {dtype: float32}\n"
    "probe: {engine: attention, layers: [0, 3], prompt_order: reversed, passage_max_tokens: 48}\n"
    "generator: {name: none}\n"
)


def subprocess_env() -> dict[str, str]:
    # Read at call time: ray.init() puts the cluster's auth token in this process's environment, and a
    # driver in a subprocess needs it to join the session's cluster.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "1"}


@pytest.fixture(scope="session")
def ray_cluster() -> Any:
    """A local Ray cluster with 2 CPUs for the whole session; yields its GCS address."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=500 * 1024 * 1024,
        log_to_driver=False,
        logging_level="WARNING",
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "fast.yaml"
    path.write_text(FAST_CFG, encoding="utf-8")
    return path


def dl19_requests(n: int, depth: int = 20) -> list[dict[str, Any]]:
    """The first ``n`` DL19 queries with their BM25 top-``depth``, as rank_llm request lines."""
    path = DATA / "trec-dl19" / "bm25_top100.json"
    if not path.is_file():
        pytest.skip(f"TREC DL19 not found at {path}")
    entries = json.loads(path.read_text(encoding="utf-8"))[:n]
    return [
        {
            "query": {"qid": str(e["hits"][0]["qid"]), "text": e["query"]},
            "candidates": [
                {"docid": str(h["docid"]), "score": h["score"], "doc": h["content"]}
                for h in e["hits"][:depth]
            ],
        }
        for e in entries
    ]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the output must end with a complete line"
    return [json.loads(line) for line in data.splitlines()]


def run_args(cfg: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--config", str(cfg), "--input", str(inp), "--output", str(out), "--no-progress", *extra]


def assert_same_rankings(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [r["qid"] for r in a] == [r["qid"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert [x["docid"] for x in ra["ranking"]] == [x["docid"] for x in rb["ranking"]], ra["qid"]
        for xa, xb in zip(ra["ranking"], rb["ranking"], strict=True):
            assert xa["score"] == pytest.approx(xb["score"], abs=1e-5), (ra["qid"], xa["docid"])


def cli_subprocess(args: list[str]) -> subprocess.Popen[bytes]:
    code = "import sys; from rerank.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen[bytes], timeout: float = 300) -> int:
    """Wait until ``path`` holds at least ``n`` complete lines (or the process ended); return the count."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = path.read_bytes().count(b"\n") if path.exists() else 0
        if count >= n or proc.poll() is not None:
            return count
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{path} did not reach {n} lines in {timeout} s")


def qid_counts(path: Path) -> Counter[str]:
    return Counter(r["qid"] for r in read_output(path))


# --------------------------------------------------------------------------------------------------
# No cluster needed
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "index"])
def test_engine_ray_without_ray_exits_2_naming_the_extra(tmp_path: Path, cfg: Path, command: str) -> None:
    # Ray made unimportable at the import boundary only, in a fresh interpreter.
    inp = write_jsonl(tmp_path / "q.jsonl", [{"query": {"qid": "q1", "text": "x"}, "candidates": []}])
    if command == "run":
        args = run_args(cfg, inp, tmp_path / "out.jsonl", "--engine", "ray")
    else:
        args = ["index", "build", "--corpus", str(inp), "--out", str(tmp_path / "ix"), "--engine", "ray"]
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['ray.data'] = None\n"
        "from rerank.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'attn-rerank[ray]'" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_bytes()
    assert not (tmp_path / "ix").exists()


def test_unreachable_address_exits_2_at_once(tmp_path: Path, cfg: Path) -> None:
    pytest.importorskip("ray")
    inp = write_jsonl(tmp_path / "q.jsonl", dl19_requests(1, depth=2))
    # A fresh interpreter: one already connected to Ray reuses that connection whatever --address says.
    proc = cli_subprocess(
        run_args(cfg, inp, tmp_path / "out.jsonl", "--engine", "ray", "--address", "127.0.0.1:1")
    )
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "cannot connect to Ray at 127.0.0.1:1" in stderr.decode()


def test_ray_options_need_engine_ray(tmp_path: Path, cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write_jsonl(tmp_path / "q.jsonl", dl19_requests(1, depth=2))
    assert main(run_args(cfg, inp, tmp_path / "out.jsonl", "--workers", "2")) == 2
    assert "--engine ray" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# On the session's local cluster
# --------------------------------------------------------------------------------------------------


def test_ray_run_matches_local_on_dl19(ray_cluster: str, tmp_path: Path, cfg: Path) -> None:
    inp = write_jsonl(tmp_path / "dl19.jsonl", dl19_requests(12))
    local, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert main(run_args(cfg, inp, local, "--trec-run", str(tmp_path / "local.trec"))) == 0
    ray_args = ["--engine", "ray", "--workers", "2", "--trec-run", str(tmp_path / "ray.trec")]
    assert main(run_args(cfg, inp, ray_out, *ray_args)) == 0
    a, b = read_output(local), read_output(ray_out)
    assert len(a) == 12
    assert_same_rankings(a, b)  # same docids in the same order, scores within 1e-5, input order
    trec_a = [line.split()[:4] for line in (tmp_path / "local.trec").read_text().splitlines()]
    trec_b = [line.split()[:4] for line in (tmp_path / "ray.trec").read_text().splitlines()]
    assert trec_a == trec_b
    # Rerunning resumes: everything is done, nothing is added.
    assert main(run_args(cfg, inp, ray_out, "--engine", "ray", "--workers", "2")) == 0
    assert read_output(ray_out) == b


def test_ray_reports_bad_lines_and_failing_rows_as_local(
    ray_cluster: str, tmp_path: Path, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = dl19_requests(3, depth=4)
    # A query longer than the model's context: the line is valid, the model refuses it.
    refused = {
        "query": {"qid": "too-long", "text": "flea " * 9000},
        "candidates": [{"docid": "d1", "doc": "a short passage"}],
    }
    lines = [
        json.dumps(good[0]) + "\n",
        "{not json\n",
        json.dumps({"query": {"qid": "q-empty", "text": "  "}, "candidates": good[1]["candidates"]}) + "\n",
        json.dumps(refused) + "\n",
        json.dumps(good[1]) + "\n",
        json.dumps(good[0]) + "\n",  # duplicate qid
        json.dumps(good[2]) + "\n",
    ]
    inp = write_jsonl(tmp_path / "mixed.jsonl", lines)
    results = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.jsonl"
        extra = ("--engine", "ray", "--workers", "2") if engine == "ray" else ()
        assert main(run_args(cfg, inp, out, *extra)) == 1
        err = capsys.readouterr().err
        errors_file = out.with_name(f"{engine}.errors.jsonl")
        records = [json.loads(x) for x in errors_file.read_text().splitlines()]
        reported = sorted(x for x in err.splitlines() if x.startswith(str(inp)))
        results[engine] = (read_output(out), records, reported)
    (out_l, rec_l, err_l), (out_r, rec_r, err_r) = results["local"], results["ray"]
    assert_same_rankings(out_l, out_r)
    assert [r["qid"] for r in out_r] == [
        good[0]["query"]["qid"],
        good[1]["query"]["qid"],
        good[2]["query"]["qid"],
    ]
    assert rec_l == rec_r
    assert [r["line"] for r in rec_r] == [2, 3, 6, 4]  # the scan first, then the model
    refused_rec = next(r for r in rec_r if r["line"] == 4)
    assert refused_rec["qid"] == "too-long" and refused_rec["error"].startswith("rerank failed:")
    assert err_l == err_r


def test_ray_retrieves_from_an_index_as_local(ray_cluster: str, tmp_path: Path, cfg: Path) -> None:
    index = tmp_path / "bm25"
    corpus = REPO / "rerank" / "data" / "demo_corpus.jsonl"
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(index), "--retriever", "bm25"]) == 0
    queries = ["who wrote hamlet", "what is the capital of france", "how do vaccines work"]
    inp = write_jsonl(tmp_path / "q.jsonl", [{"qid": f"q{i}", "query": q} for i, q in enumerate(queries)])
    outs = {}
    for engine in ("local", "ray"):
        outs[engine] = tmp_path / f"{engine}.jsonl"
        extra = ("--engine", "ray", "--workers", "2") if engine == "ray" else ()
        assert main(run_args(cfg, inp, outs[engine], "--index", str(index), *extra)) == 0
    assert_same_rankings(read_output(outs["local"]), read_output(outs["ray"]))


def test_a_pipeline_that_cannot_be_built_on_the_workers_exits_2(
    ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {{name: {tmp_path / 'no-such-model'}}}\ngenerator: {{name: none}}\n")
    inp = write_jsonl(tmp_path / "q.jsonl", dl19_requests(1, depth=2))
    out = tmp_path / "out.jsonl"
    assert main(run_args(bad, inp, out, "--engine", "ray", "--workers", "1")) == 2
    assert "cannot build the pipeline" in capsys.readouterr().err
    assert not out.exists() or out.read_bytes() == b""


def test_ray_strict_stops_at_a_bad_line_before_any_worker(
    ray_cluster: str, tmp_path: Path, cfg: Path
) -> None:
    inp = write_jsonl(tmp_path / "q.jsonl", [json.dumps(r) + "\n" for r in dl19_requests(2, 2)] + ["[1]\n"])
    out = tmp_path / "out.jsonl"
    assert main(run_args(cfg, inp, out, "--engine", "ray", "--strict")) == 3
    assert not out.exists() or out.read_bytes() == b""


def _busy_reranker_pids() -> list[int]:
    """PIDs of this session's QueryReranker actors that are running a batch (the cluster is our child;
    Ray titles an actor process ``ray::<class>.<method>`` while the method runs)."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
            if "QueryReranker" in title and ".submit" in title:
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def _ray_process_names() -> list[str]:
    import psutil

    names = []
    for p in psutil.Process().children(recursive=True):
        try:
            names.append(" ".join(p.cmdline())[:60])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return names


def test_killed_worker_is_retried_and_every_qid_appears_once(
    ray_cluster: str, tmp_path: Path, cfg: Path
) -> None:
    reqs = dl19_requests(24, depth=20)
    inp = write_jsonl(tmp_path / "q.jsonl", reqs)
    out = tmp_path / "out.jsonl"
    proc = cli_subprocess(
        run_args(cfg, inp, out, "--engine", "ray", "--workers", "2", "--address", ray_cluster)
    )
    try:
        got = wait_for_lines(out, 2, proc)
        assert proc.poll() is None and got < len(reqs), "the job ended before a worker could be killed"
        deadline = time.monotonic() + 60
        pids = _busy_reranker_pids()
        while not pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = _busy_reranker_pids()
        assert pids, f"no QueryReranker actor running a batch among {_ray_process_names()}"
        os.kill(pids[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
    counts = qid_counts(out)
    assert set(counts) == {r["query"]["qid"] for r in reqs}
    assert set(counts.values()) == {1}


def test_driver_sigkill_then_rerun_gives_every_qid_once(ray_cluster: str, tmp_path: Path, cfg: Path) -> None:
    reqs = dl19_requests(16, depth=20)
    inp = write_jsonl(tmp_path / "q.jsonl", reqs)
    out = tmp_path / "out.jsonl"
    args = run_args(cfg, inp, out, "--engine", "ray", "--workers", "2", "--address", ray_cluster)
    proc = cli_subprocess(args)
    try:
        got = wait_for_lines(out, 3, proc)
        assert proc.poll() is None and got < len(reqs), "the job ended before the driver could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 0 < len(qid_counts(out)) < len(reqs)
    again = cli_subprocess(args)
    _, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr.decode(errors="replace")[-3000:]
    assert "already done" in stderr.decode()
    counts = qid_counts(out)
    assert set(counts) == {r["query"]["qid"] for r in reqs}
    assert set(counts.values()) == {1}


def test_rerank_dataset_on_a_ray_dataset(ray_cluster: str, tmp_path: Path, cfg: Path) -> None:
    import ray

    from rerank.batch import rerank_dataset
    from rerank.config import load_config

    reqs = dl19_requests(2, depth=5)
    path = write_jsonl(tmp_path / "q.jsonl", reqs)
    config = load_config(cfg)
    # Lines as text rows, and requests decoded by Ray's JSON reader: the same rankings.
    from_text = rerank_dataset(ray.data.read_text(str(path)), config, workers=1).take_all()
    from_json = rerank_dataset(ray.data.read_json(str(path), lines=True), config, workers=1).take_all()
    for rows in (from_text, from_json):
        assert sorted(r["qid"] for r in rows) == sorted(r["query"]["qid"] for r in reqs)
        assert all(r["error"] == "" for r in rows)
    by_qid = {r["qid"]: json.loads(r["result"]) for r in from_text}
    assert_same_rankings(
        [by_qid[r["query"]["qid"]] for r in reqs],
        [json.loads(r["result"]) for r in sorted(from_json, key=lambda r: list(by_qid).index(r["qid"]))],
    )


def test_index_build_on_ray_matches_local(ray_cluster: str, tmp_path: Path, scifact_dir: Path) -> None:
    import faiss
    import numpy as np

    # The first 200 SciFact passages: the whole corpus would take minutes to encode on this CPU.
    with (scifact_dir / "corpus.jsonl").open(encoding="utf-8") as f:
        corpus = write_jsonl(tmp_path / "corpus.jsonl", [next(f) for _ in range(200)])
    local, remote = tmp_path / "local", tmp_path / "ray"
    base = ["index", "build", "--corpus", str(corpus), "--no-progress", "--retriever", "hybrid"]
    assert main([*base, "--out", str(local)]) == 0
    assert main([*base, "--out", str(remote), "--engine", "ray", "--workers", "2"]) == 0
    files_l = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    files_r = sorted(p.relative_to(remote) for p in remote.rglob("*") if p.is_file())
    assert files_l == files_r
    for rel in files_l:
        if rel.name == "meta.json":
            # The same but for checksums, which cover the vectors' file (equal within float tolerance
            # only); every other file is compared byte for byte below.
            ma, mb = (json.loads((d / rel).read_text()) for d in (local, remote))
            for m in (ma, mb):
                for entry in m.get("files", {}).values():
                    entry.pop("sha256", None)
            assert ma == mb, rel
        elif rel.name != "faiss.index":  # BM25, passages and metadata: byte for byte
            assert (local / rel).read_bytes() == (remote / rel).read_bytes(), rel
    va = faiss.read_index(str(local / "dense" / "faiss.index"))
    vb = faiss.read_index(str(remote / "dense" / "faiss.index"))
    a, b = va.reconstruct_n(0, va.ntotal), vb.reconstruct_n(0, vb.ntotal)
    assert a.shape == b.shape == (200, a.shape[1])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.9999
