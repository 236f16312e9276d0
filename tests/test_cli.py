"""The ``attn-rerank`` command line, run for real: the embedded model, real files, real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rerank.cli import main
from rerank.core import common as cli_common
from rerank.core import inputs as cli_inputs
from rerank.core import output as cli_output
from rerank.core.inputs import LineError, parse_request
from rerank.core.output import recover_output

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
FAST_CFG = "probe: {engine: attention, layers: [0, 3]}\ngenerator: {name: none}\n"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "fast.yaml"
    path.write_text(FAST_CFG, encoding="utf-8")
    return path


def request(qid: str, text: str, n: int = 4, **extra: Any) -> dict[str, Any]:
    """A rank_llm request with ``n`` short candidates, best first."""
    cands = [
        {
            "docid": f"{qid}-d{j}",
            "score": float(n - j),
            "doc": {"title": f"T{j}", "contents": f"{text} fact {j}."},
        }
        for j in range(n)
    ]
    return {"query": {"qid": qid, "text": text}, "candidates": cands, **extra}


def jline(obj: Any) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def read_output(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the output must end with a complete line"
    return [json.loads(line) for line in data.splitlines()]


def cli_command() -> list[str]:
    """The installed console script, else ``python -m rerank.cli``."""
    script = Path(sys.executable).parent / "attn-rerank"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rerank.cli"]


# --------------------------------------------------------------------------------------------------
# Fast: parsing, resume bookkeeping, help, usage errors (no model)
# --------------------------------------------------------------------------------------------------


def test_help_documents_commands_formats_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for word in ("index", "run", "calibrate", "exit codes", "130"):
        assert word in top
    assert main(["run", "--help"]) == 0
    run_help = capsys.readouterr().out
    for word in ("--max-line-bytes", "--strict", "--trec-run", "--errors", "candidates", "FILE:LINE", "  3 "):
        assert word in run_help
    assert main(["index", "build", "--help"]) == 0
    assert "--corpus" in capsys.readouterr().out


def test_usage_errors_exit_2(tmp_path: Path, cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jline(request("q1", "fleas")))
    out = tmp_path / "out.jsonl"
    assert (
        main(["run", "--config", str(tmp_path / "nope.yaml"), "--input", str(inp), "--output", str(out)]) == 2
    )
    assert "config file not found" in capsys.readouterr().err
    assert main(["run", "--config", "defualt", "--input", str(inp), "--output", str(out)]) == 2
    assert "no config named 'defualt'" in capsys.readouterr().err  # and the names that exist
    assert main(["run", "--config", str(cfg), "--input", str(tmp_path / "x"), "--output", str(out)]) == 2
    assert "input file not found" in capsys.readouterr().err
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("probe: {layerz: [0, 3]}\n", encoding="utf-8")
    assert main(["run", "--config", str(bad_cfg), "--input", str(inp), "--output", str(out)]) == 2
    assert "layerz" in capsys.readouterr().err
    assert main(["run", "--config", str(cfg), "--input", str(inp), "--output", str(inp)]) == 2
    assert main(["run", "--config", str(cfg)]) == 2  # argparse: missing --input/--output
    assert not out.exists() or out.read_bytes() == b""


def test_calibrate_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--help"]) == 0
    out = capsys.readouterr().out
    for word in ("--model", "--data", "--out", "negatives"):
        assert word in out


def test_parse_request_accepts_both_forms() -> None:
    r = parse_request({"qid": 7, "query": "who?"}, 1, has_index=True)
    assert (r.qid, r.text, r.candidates) == ("7", "who?", None)
    def obj(with_scores: bool) -> dict[str, Any]:
        a = {"docid": "a", "doc": "plain text"}
        b = {"docid": 5, "doc": {"title": "T", "text": "object text"}}
        if with_scores:
            a["score"], b["score"] = 2, 1.5
        return {"query": {"qid": "q", "text": "who?"}, "candidates": [a, b]}

    r = parse_request(obj(True), 3, has_index=False)
    assert r.candidates[0].passage.id == "a" and r.candidates[0].score == 2.0  # a Hit: score given
    assert r.candidates[1].passage.title == "T" and r.candidates[1].score == 1.5
    r = parse_request(obj(False), 3, has_index=False)
    assert r.candidates[1].id == "5" and r.candidates[1].title == "T"  # a Passage: no score
    # Scores on only some candidates are refused (fusion needs all or none).
    mixed = obj(True)
    del mixed["candidates"][1]["score"]
    with pytest.raises(LineError, match=r"candidates\[0\] has a 'score' but candidates\[1\] has none"):
        parse_request(mixed, 3, has_index=False)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([1, 2], "expected a JSON object"),
        ({"query": "q"}, "missing field 'qid'"),
        ({"qid": "q"}, "missing field 'query'"),
        ({"qid": True, "query": "x"}, "qid must be a string or an integer"),
        ({"qid": "a b", "query": "x"}, "whitespace"),
        ({"qid": "q", "query": "  "}, "query is empty"),
        ({"qid": "q", "query": "x"}, "--index"),
        ({"query": "x", "candidates": []}, "'query' must be an object"),
        ({"query": {"qid": "q"}, "candidates": []}, "query has no 'text'"),
        ({"query": {"qid": "q", "text": "x"}, "candidates": {}}, "'candidates' must be a list"),
        ({"query": {"qid": "q", "text": "x"}, "candidates": []}, "'candidates' is empty"),
        ({"query": {"qid": "q", "text": "x"}, "candidates": [{"doc": "t"}]}, "candidates[0] has no 'docid'"),
        ({"query": {"qid": "q", "text": "x"}, "candidates": [{"docid": "d"}]}, "has no 'doc'"),
        (
            {"query": {"qid": "q", "text": "x"}, "candidates": [{"docid": "d", "doc": 3}]},
            "string or an object",
        ),
        ({"query": {"qid": "q", "text": "x"}, "candidates": [{"docid": "d", "doc": {}}]}, "none of the text"),
        ({"query": {"qid": "q", "text": "x"}, "candidates": [{"docid": "d", "doc": " "}]}, "doc is empty"),
        (
            {"query": {"qid": "q", "text": "x"}, "candidates": [{"docid": "d", "doc": "t", "score": "1"}]},
            "score must be a finite number",
        ),
        (
            {
                "query": {"qid": "q", "text": "x"},
                "candidates": [{"docid": "d", "doc": "t"}, {"docid": "d", "doc": "u"}],
            },
            "duplicate docid 'd'",
        ),
    ],
)
def test_parse_request_rejects(obj: Any, message: str) -> None:
    with pytest.raises(LineError) as info:
        parse_request(obj, 1, has_index=False)
    assert message in str(info.value)


def test_recover_output_cuts_a_torn_line_and_refuses_foreign_ones(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    good = [jline({"qid": q, "query": "x", "ranking": []}) for q in ("a", "b")]
    out.write_bytes(good[0] + good[1] + b'{"qid": "c", "ranking": [{"doc')
    assert recover_output(out) == {"a", "b"}
    assert out.read_bytes() == good[0] + good[1]
    # A complete line that is still valid JSON but lacks its newline is redone too.
    out.write_bytes(good[0] + good[1].rstrip(b"\n"))
    assert recover_output(out) == {"a"}
    assert out.read_bytes() == good[0]
    # Duplicate complete lines (a hand-edited file) are dropped, the rest kept in order.
    out.write_bytes(good[0] + good[0] + good[1])
    assert recover_output(out) == {"a", "b"}
    assert out.read_bytes() == good[0] + good[1]
    # A line this tool does not write (garbage, or a torn tail that is not a result) is never cut away:
    # the file is refused and left as it is.
    for data in (good[0] + b"garbage\n" + good[1], good[0] + b"some other text"):
        out.write_bytes(data)
        with pytest.raises(cli_common.UsageError, match="not an attn-rerank result"):
            recover_output(out)
        assert out.read_bytes() == data
    assert recover_output(tmp_path / "missing.jsonl") == set()


def test_oversized_line_is_skipped_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"short\n" + b"x" * 5000 + b"\n" + b"tail")
    with path.open("rb") as f:
        rows = list(cli_inputs._raw_lines(f, 100))
    assert [(n, off, raw, size) for n, off, raw, size in rows] == [
        (1, 0, b"short\n", 6),
        (2, 6, None, 5001),
        (3, 5007, b"tail", 4),
    ]


# --------------------------------------------------------------------------------------------------
# The model, in process: bad lines, strict mode, retrieval from an index
# --------------------------------------------------------------------------------------------------


def bad_lines_input(path: Path) -> dict[int, str]:
    """Write an input with one bad line of each kind; returns {line number: expected message part}."""
    big = request("big", "oversized", n=1)
    big["candidates"][0]["doc"]["contents"] = "y" * 3000
    lines: list[tuple[bytes, str | None]] = [
        (jline(request("q1", "how long do fleas live")), None),
        (b'{"query": {"qid": "broken", "text": "x"}, "candidates": [\n', "invalid JSON"),
        (
            jline({"query": {"qid": "m1"}, "candidates": request("m1", "x")["candidates"]}),
            "query has no 'text'",
        ),
        (jline({"query": {"qid": "w1", "text": 42}, "candidates": []}), "query.text must be a string"),
        (jline(request("e1", "   ")), "query.text is empty"),
        (jline(request("q1", "a second q1")), "duplicate qid 'q1' (first on line 1)"),
        (jline(big), "over the --max-line-bytes limit of 2048"),
        (jline(request("u1", "caf\u00e9")).replace(b"caf\\u00e9", b"caf\xe9"), "invalid UTF-8"),
        (jline(request("q2", "what is the capital of france")), None),
        (b"   \n", None),  # blank: skipped silently
        (jline({"qid": "r1", "query": "needs an index"}), "no --index"),
        (b"[1, 2]\n", "expected a JSON object"),
        (jline(request("q3", "who wrote hamlet")), None),
    ]
    path.write_bytes(b"".join(raw for raw, _ in lines))
    return {i: msg for i, (_, msg) in enumerate(lines, 1) if msg is not None}


def test_bad_lines_reported_rest_processed(
    tmp_path: Path, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, out = tmp_path / "queries.jsonl", tmp_path / "results.jsonl"
    expected = bad_lines_input(inp)
    argv = ["run", "--config", str(cfg), "--input", str(inp), "--output", str(out)]
    argv += ["--max-line-bytes", "2048", "--top-k", "2", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    for line, msg in expected.items():
        assert f"{inp}:{line}: " in err, f"line {line} not reported"
        assert msg in err
    errors_file = tmp_path / "results.errors.jsonl"
    records = [json.loads(x) for x in errors_file.read_text(encoding="utf-8").splitlines()]
    assert {r["line"]: r["error"] for r in records}.keys() == expected.keys()
    for r in records:
        assert expected[r["line"]] in r["error"]
        assert len(r["raw"]) <= cli_output.RAW_PREVIEW_CHARS
    rows = read_output(out)
    assert [r["qid"] for r in rows] == ["q1", "q2", "q3"]
    assert all(len(r["ranking"]) == 2 for r in rows)  # --top-k 2
    assert rows[0]["query"] == "how long do fleas live"
    assert set(rows[0]["ranking"][0]) == {
        "docid",
        "score",
        "rank",
        "raw_score",
        "calibrated_score",
        "prompt_position",
    }

    # A rerun skips what is done (not an error); the bad lines are still bad, the duplicate still a duplicate.
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "0 queries reranked, 3 already done" in err
    assert f"{inp}:6: duplicate qid 'q1'" in err
    assert [r["qid"] for r in read_output(out)] == ["q1", "q2", "q3"]
    assert len(errors_file.read_text(encoding="utf-8").splitlines()) == len(
        expected
    )  # rewritten, not appended


def test_strict_stops_at_first_bad_line(
    tmp_path: Path, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, out = tmp_path / "queries.jsonl", tmp_path / "results.jsonl"
    bad_lines_input(inp)
    errors = tmp_path / "bad.jsonl"
    argv = ["run", "--config", str(cfg), "--input", str(inp), "--output", str(out), "--errors", str(errors)]
    assert main([*argv, "--strict"]) == cli_common.EXIT_STRICT == 3
    err = capsys.readouterr().err
    assert f"{inp}:2: invalid JSON" in err and f"{inp}:3:" not in err
    assert [json.loads(x)["line"] for x in errors.read_text(encoding="utf-8").splitlines()] == [2]
    assert out.read_bytes() == b""  # the whole input is checked before anything is reranked


def test_index_build_then_run_retrieves(
    tmp_path: Path, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    facts = ["Fleas live about three months.", "Paris is the capital of France.", "Shakespeare wrote Hamlet."]
    corpus.write_text(
        "".join(json.dumps({"id": f"p{i}", "text": t, "source": "test"}) + "\n" for i, t in enumerate(facts)),
        encoding="utf-8",
    )
    index = tmp_path / "index"
    build = ["index", "build", "--corpus", str(corpus), "--out", str(index), "--config", str(cfg)]
    assert main([*build, "--retriever", "bm25", "--no-progress"]) == 0
    assert (index / "meta.json").is_file()
    assert main([*build, "--retriever", "bm25"]) == 2  # refuses to overwrite without --force
    assert "--force" in capsys.readouterr().err
    inp, out, trec = tmp_path / "q.jsonl", tmp_path / "r.jsonl", tmp_path / "r.trec"
    inp.write_bytes(jline({"qid": "q1", "query": "capital of France"}) + jline(request("q2", "fleas", n=2)))
    argv = ["run", "--config", str(cfg), "--index", str(index), "--input", str(inp), "--output", str(out)]
    assert main([*argv, "--trec-run", str(trec), "--no-progress"]) == 0
    rows = {r["qid"]: r for r in read_output(out)}
    # BM25 returns only passages sharing a term with the query; the reranker orders those.
    assert {it["docid"] for it in rows["q1"]["ranking"]} == {"p1"}
    assert {it["docid"] for it in rows["q2"]["ranking"]} == {"q2-d0", "q2-d1"}
    assert len(trec.read_text(encoding="utf-8").splitlines()) == 3


def test_resume_keeps_done_lines_and_refuses_garbage(tmp_path: Path, cfg: Path) -> None:
    inp, out = tmp_path / "q.jsonl", tmp_path / "r.jsonl"
    inp.write_bytes(jline(request("q1", "fleas", n=2)) + jline(request("q2", "cats", n=2)))
    done = jline({"qid": "q2", "query": "cats", "ranking": [{"docid": "kept", "score": 1.0, "rank": 1}]})
    argv = ["run", "--config", str(cfg), "--input", str(inp), "--output", str(out), "--no-progress"]
    # A hand-edited line is not this tool's output: refused, nothing changed.
    edited = b"not json\n" + done + b'{"qid": "q1", "ranking": ['
    out.write_bytes(edited)
    assert main(argv) == 2
    assert out.read_bytes() == edited
    out.write_bytes(done + b'{"qid": "q1", "ranking": [')  # torn by a crash mid-write: resumed
    assert main(argv) == 0
    rows = read_output(out)
    assert [r["qid"] for r in rows] == ["q2", "q1"]
    assert rows[0]["ranking"][0]["docid"] == "kept"  # a done query is never redone


# --------------------------------------------------------------------------------------------------
# Real subprocesses: SIGKILL and resume, the console script on TREC DL19
# --------------------------------------------------------------------------------------------------


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_sigkill_then_rerun_gives_one_line_per_qid(tmp_path: Path, cfg: Path) -> None:
    qids = [f"q{i:02d}" for i in range(12)]
    inp, out = tmp_path / "queries.jsonl", tmp_path / "results.jsonl"
    inp.write_bytes(
        b"".join(jline(request(q, f"question number {i} about fleas")) for i, q in enumerate(qids))
    )
    cmd = [sys.executable, "-m", "rerank.cli", "run", "--config", str(cfg), "--input", str(inp)]
    cmd += ["--output", str(out), "--batch-size", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    try:
        while complete_lines(out) < 2:
            assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no output after 10 minutes"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    data = out.read_bytes()
    done_before = data.count(b"\n")
    assert 2 <= done_before < len(qids), "killed too late to test resuming"
    if data.endswith(b"\n"):  # no torn write happened: simulate one for the next query
        nxt = qids[done_before]
        with out.open("ab") as f:
            f.write(f'{{"qid": "{nxt}", "query": "torn", "ranking": [{{"docid": "'.encode())

    rerun = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert b"removing a partial last line" in rerun.stderr
    rows = read_output(out)
    assert sorted(r["qid"] for r in rows) == qids  # every qid exactly once
    assert all(len(r["ranking"]) == 4 for r in rows)
    assert f"{len(qids) - done_before} queries reranked, {done_before} already done".encode() in rerun.stderr


def dl19_requests(n_queries: int, n_cands: int) -> list[dict[str, Any]]:
    path = DATA / "trec-dl19" / "bm25_top100.json"
    if not path.is_file():
        pytest.skip(f"TREC DL19 data not found at {path} (expected ../shared/data next to the repository)")
    topics = json.loads(path.read_text(encoding="utf-8"))[:n_queries]
    return [
        {
            "query": {"qid": t["hits"][0]["qid"], "text": t["query"]},
            "candidates": [
                {"docid": h["docid"], "score": h["score"], "doc": {"contents": h["content"]}}
                for h in t["hits"][:n_cands]
            ],
        }
        for t in topics
    ]


@pytest.mark.slow
def test_console_script_on_dl19_writes_matching_trec_run(tmp_path: Path, cfg: Path) -> None:
    reqs = dl19_requests(2, 10)
    inp, out, trec = tmp_path / "dl19.jsonl", tmp_path / "dl19.out.jsonl", tmp_path / "dl19.trec"
    inp.write_bytes(b"".join(jline(r) for r in reqs))
    cmd = cli_command() + ["run", "--config", str(cfg), "--input", str(inp), "--output", str(out)]
    res = subprocess.run(
        [*cmd, "--trec-run", str(trec)], cwd=tmp_path, env=ENV, capture_output=True, timeout=900
    )
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert b"q/s" in res.stderr or b"s/q" in res.stderr  # the progress bar shows a rate
    rows = read_output(out)
    assert [r["qid"] for r in rows] == [str(r["query"]["qid"]) for r in reqs]
    expected = []
    for row, req in zip(rows, reqs, strict=True):
        assert sorted(it["docid"] for it in row["ranking"]) == sorted(c["docid"] for c in req["candidates"])
        assert [it["rank"] for it in row["ranking"]] == list(range(1, 11))
        scores = [it["score"] for it in row["ranking"]]
        assert scores == sorted(scores, reverse=True)
        assert sorted(it["prompt_position"] for it in row["ranking"]) == list(range(10))
        expected += [
            (row["qid"], "Q0", it["docid"], it["rank"], it["score"], "attn-rerank") for it in row["ranking"]
        ]
    got = []
    for line in trec.read_text(encoding="utf-8").splitlines():
        qid, q0, docid, rank, score, tag = line.split()
        got.append((qid, q0, docid, int(rank), float(score), tag))
    assert got == expected


@pytest.mark.slow
def test_readme_cli_example_runs_verbatim(tmp_path: Path) -> None:
    from readme_examples import CLI

    if shutil.which("bash") is None:
        pytest.skip("bash not found")
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{ENV.get('PATH', '')}"}
    if not (Path(sys.executable).parent / "attn-rerank").exists():
        pytest.skip("the attn-rerank console script is not installed next to this Python")
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", CLI], cwd=tmp_path, env=env, capture_output=True, timeout=900
    )
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    trec = (tmp_path / "results.trec").read_text(encoding="utf-8").splitlines()
    assert {line.split()[0] for line in trec} == {"q1", "q2"}
    firsts = {line.split()[0]: line.split()[2] for line in trec if line.split()[3] == "1"}
    assert firsts == {"q1": "p1", "q2": "p2"}  # Hamlet for "Who wrote Hamlet?", the tower for q2
    assert res.stdout.decode().splitlines() == trec
