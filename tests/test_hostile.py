"""Hostile but fair input (issue 30): one regression test per case found. Bad input never kills a run,
never loses a file, never ranks silently wrong. Ranking cases run the real embedded model."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rerank.cli import main
from rerank.config import PipelineConfig, load_config
from rerank.records import Hit, Passage, Query

FAST_CFG = "probe: {engine: attention, layers: [0, 3]}\ngenerator: {name: none}\n"
SURROGATE = "\ud800"
HAMLET = [
    Passage(id="p1", text="Hamlet is a tragedy written by William Shakespeare around 1600."),
    Passage(id="p2", text="The Eiffel Tower in Paris was completed in 1889."),
    Passage(id="p3", text="Christopher Marlowe wrote Doctor Faustus, a play about a scholar."),
]


def jline(obj: Any) -> bytes:
    # ensure_ascii: a lone surrogate is written as the JSON escape "\ud800", as a hostile file would hold it.
    return (json.dumps(obj) + "\n").encode()


def request(qid: str, text: str, n: int = 3, scores: bool = True) -> dict[str, Any]:
    cands = []
    for j in range(n):
        cand: dict[str, Any] = {"docid": f"{qid}-d{j}", "doc": f"{text} fact number {j}."}
        if scores:
            cand["score"] = float(n - j)
        cands.append(cand)
    return {"query": {"qid": qid, "text": text}, "candidates": cands}


def default_no_generator() -> PipelineConfig:
    cfg = load_config("default")
    return cfg.model_copy(update={"generator": cfg.generator.model_copy(update={"name": "none"})})


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "fast.yaml"
    path.write_text(FAST_CFG, encoding="utf-8")
    return path


def write_cfg(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_lines(err: str) -> list[str]:
    """stderr without the model loader's progress bar."""
    return [x for x in err.strip().splitlines() if "Loading weights" not in x]


def errors_of(path: Path) -> dict[int, dict[str, Any]]:
    return {r["line"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


# --------------------------------------------------------------------------------------------------
# 5. Concurrency (first in the file: a cold pipeline, before any other test has loaded a model here)
# --------------------------------------------------------------------------------------------------


def test_four_threads_on_a_cold_pipeline_load_the_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import rerank.probe.model as model_mod
    from rerank.pipeline import Pipeline

    real = model_mod.load_model
    loads: list[int] = []

    def counting_load_model(*args: Any, **kw: Any) -> Any:
        loads.append(threading.get_ident())
        return real(*args, **kw)

    monkeypatch.setattr(model_mod, "load_model", counting_load_model)
    pipe = Pipeline(default_no_generator())
    queries = ["Who wrote Hamlet?", "When was the Eiffel Tower built?", "Who wrote Faustus?", "Hamlet"]
    results: dict[int, Any] = {}
    failures: list[BaseException] = []
    start = threading.Barrier(4)

    def work(i: int) -> None:
        try:
            start.wait(timeout=60)
            results[i] = pipe.rerank(queries[i], HAMLET)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not failures, failures
    assert len(loads) == 1
    sequential = [pipe.rerank(q, HAMLET) for q in queries]
    for i, seq in enumerate(sequential):
        assert results[i].ids == seq.ids
        assert [it.score for it in results[i].items] == [it.score for it in seq.items]


# --------------------------------------------------------------------------------------------------
# 1. Poison pill: invalid Unicode is a bad line; a line failing in the model is an error record
# --------------------------------------------------------------------------------------------------


def test_lone_surrogates_are_bad_lines_and_the_run_goes_on(
    tmp_path: Path, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, out, trec = tmp_path / "q.jsonl", tmp_path / "r.jsonl", tmp_path / "r.trec"
    bad_query = request("q2", "fleas" + SURROGATE)
    bad_passage = request("q3", "cats")
    bad_passage["candidates"][1]["doc"] = "a passage " + SURROGATE
    bad_docid = request("q4", "dogs")
    bad_docid["candidates"][0]["docid"] = "d" + SURROGATE
    bad_qid = request("q5" + SURROGATE, "birds")
    inp.write_bytes(
        jline(request("q1", "fleas"))
        + jline(bad_query)
        + jline(bad_passage)
        + jline(bad_docid)
        + jline(bad_qid)
        + jline(request("q6", "horses"))
    )
    argv = ["run", "--config", str(cfg), "--input", str(inp), "--output", str(out), "--no-progress"]
    assert main([*argv, "--trec-run", str(trec)]) == 1
    assert "lone surrogate" in capsys.readouterr().err
    errs = errors_of(tmp_path / "r.errors.jsonl")
    assert sorted(errs) == [2, 3, 4, 5]
    assert all("not valid Unicode" in e["error"] for e in errs.values())
    assert [json.loads(x)["qid"] for x in out.read_text(encoding="utf-8").splitlines()] == ["q1", "q6"]
    assert len(trec.read_text(encoding="utf-8").splitlines()) == 6
    # A rerun does the same, without dying; --strict stops at the first of them.
    assert main([*argv, "--trec-run", str(trec)]) == 1
    assert main([*argv, "--strict"]) == 3


def test_a_line_that_fails_in_the_model_is_an_error_record_with_its_qid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Three passages of ~3000 tokens cannot share SmolLM2's 8192-token context: the probe refuses the prompt.
    cfg = write_cfg(
        tmp_path,
        "probe: {layers: [0, 3], passage_max_tokens: 4000, window_size: 3}\ngenerator: {name: none}\n",
    )
    huge = request("q2", "fleas")
    for c in huge["candidates"]:
        c["doc"] = "lorem ipsum dolor sit amet " * 600
    inp, out, trec = tmp_path / "q.jsonl", tmp_path / "r.jsonl", tmp_path / "r.trec"
    inp.write_bytes(jline(request("q1", "cats")) + jline(huge) + jline(request("q3", "dogs")))
    argv = ["run", "--config", str(cfg), "--input", str(inp), "--output", str(out), "--no-progress"]
    assert main([*argv, "--trec-run", str(trec)]) == 1
    errs = errors_of(tmp_path / "r.errors.jsonl")
    assert list(errs) == [2] and errs[2]["qid"] == "q2" and "rerank failed" in errs[2]["error"]
    assert [json.loads(x)["qid"] for x in out.read_text(encoding="utf-8").splitlines()] == ["q1", "q3"]
    assert trec.is_file()


def test_python_api_refuses_invalid_unicode_with_a_clear_error(smol_pipe: Any) -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        Query(text="who" + SURROGATE)
    with pytest.raises(ValueError, match="candidate 1 text is not valid Unicode"):
        smol_pipe.rerank("who wrote Hamlet", [HAMLET[0], Passage(id="x", text="bad " + SURROGATE)])
    with pytest.raises(ValueError, match="candidate 0 is not valid Unicode"):
        smol_pipe.rerank("who wrote Hamlet", ["bad " + SURROGATE])


# --------------------------------------------------------------------------------------------------
# 2. Scores: finite and in range, all or none
# --------------------------------------------------------------------------------------------------


def test_a_huge_integer_score_is_a_bad_line(tmp_path: Path, cfg: Path) -> None:
    inp, out = tmp_path / "q.jsonl", tmp_path / "r.jsonl"
    huge = b'{"query": {"qid": "q2", "text": "x"}, "candidates": [{"docid": "a", "doc": "y", "score": 1' + (
        b"0" * 400 + b"}]}\n"
    )
    some = request("q3", "cats")
    del some["candidates"][1]["score"]
    inp.write_bytes(jline(request("q1", "fleas")) + huge + jline(some) + jline(request("q4", "dogs")))
    argv = ["run", "--config", str(cfg), "--input", str(inp), "--output", str(out), "--no-progress"]
    assert main(argv) == 1
    errs = errors_of(tmp_path / "r.errors.jsonl")
    assert "finite number" in errs[2]["error"] and "401 digits" in errs[2]["error"]
    assert "candidates[1] has none" in errs[3]["error"]
    assert [json.loads(x)["qid"] for x in out.read_text(encoding="utf-8").splitlines()] == ["q1", "q4"]


# --------------------------------------------------------------------------------------------------
# 3. Data loss: an --output this tool did not write is refused, never truncated
# --------------------------------------------------------------------------------------------------


def test_foreign_output_is_refused_and_left_untouched(
    tmp_path: Path, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, out = tmp_path / "q.jsonl", tmp_path / "precious.jsonl"
    inp.write_bytes(jline(request("q1", "fleas")))
    argv = ["run", "--config", str(cfg), "--input", str(inp), "--output", str(out), "--no-progress"]
    foreign = [
        b'{"id": "doc1", "text": "my corpus"}\n{"id": "doc2", "text": "more"}\n',  # another JSONL
        b'{"id": "doc1", "text": "no newline at the end"}',  # would have looked like a torn line
        jline({"qid": "other", "query": "x", "ranking": []}),  # our format, another input's qid
        jline({"qid": "q1", "query": "another text", "ranking": []}),  # same qid, another query
    ]
    for data in foreign:
        out.write_bytes(data)
        assert main(argv) == 2
        assert "--overwrite" in capsys.readouterr().err
        assert out.read_bytes() == data
    # An errors or TREC file that is not one is refused the same way.
    out.unlink()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n", encoding="utf-8")
    assert main([*argv, "--errors", str(notes)]) == 2
    assert main([*argv, "--trec-run", str(notes)]) == 2
    assert notes.read_text(encoding="utf-8") == "my notes\n"
    # --overwrite replaces it.
    out.write_bytes(foreign[0])
    assert main([*argv, "--overwrite"]) == 0
    assert [json.loads(x)["qid"] for x in out.read_text(encoding="utf-8").splitlines()] == ["q1"]
    assert main(argv) == 0  # now it is ours: resumed, nothing redone
    assert "0 queries reranked, 1 already done" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# 4. Silent wrong rankings
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_pipe() -> Any:
    from rerank.pipeline import Pipeline

    return Pipeline(default_no_generator())


def test_without_scores_the_readme_example_does_not_rank_by_the_given_order(smol_pipe: Any) -> None:
    ranked = smol_pipe.rerank("Who wrote Hamlet?", HAMLET)
    assert ranked.info["first_stage"] == "none" and "bm25" in ranked.info["signals"]
    # The Eiffel Tower passage (no word of the query, no relevance) is last; Hamlet is not (it was last
    # when the rank stood in for a score). The two plays' passages are close: the probe alone puts
    # Marlowe's "wrote" a hair above Hamlet's "written by".
    assert ranked.ids[-1] == "p2" and "p1" in ranked.ids[:2]
    # No rank signal: the same passages given in the reverse order rank the same.
    backwards = smol_pipe.rerank("Who wrote Hamlet?", HAMLET[::-1])
    assert backwards.ids == ranked.ids
    # Reading both prompt orders, the reversed input is read in the same two prompts: the same scores.
    # (The adaptive default may read one order only, whose prompt then depends on the input's order.)
    from rerank.pipeline import Pipeline

    cfg = smol_pipe.config
    both = Pipeline(
        cfg.model_copy(update={"probe": cfg.probe.model_copy(update={"second_order": "always"})}),
        model=smol_pipe.reranker.model,
    )
    forward = both.rerank("Who wrote Hamlet?", HAMLET)
    backward = both.rerank("Who wrote Hamlet?", HAMLET[::-1])
    assert forward.info["prompts"] == backward.info["prompts"] == 2
    assert backward.ids == forward.ids
    np.testing.assert_allclose(
        [it.score for it in backward.items], [it.score for it in forward.items], atol=1e-5
    )


def test_two_passage_lists_are_reordered(smol_pipe: Any) -> None:
    # The rank as a stand-in score cancelled the probe exactly for two passages (both fused scores 0.0).
    ranked = smol_pipe.rerank("Who wrote Hamlet?", [HAMLET[1], HAMLET[0]])
    assert ranked.ids == ["p1", "p2"]
    assert ranked.items[0].score != ranked.items[1].score
    # Nothing shares a word with the query: nothing is fused, and info says so.
    flat = smol_pipe.rerank("zzz qqq", [HAMLET[1], HAMLET[0]])
    assert flat.info["first_stage"] == "none"


def test_nan_or_mixed_first_stage_scores_are_refused(smol_pipe: Any) -> None:
    for bad in (float("nan"), float("inf")):
        hits = [
            Hit(passage=p, score=s, rank=i + 1)
            for i, (p, s) in enumerate(zip(HAMLET, [1.0, bad, 0.5], strict=True))
        ]
        with pytest.raises(ValueError, match="candidate 1 has a first-stage score"):
            smol_pipe.rerank("Who wrote Hamlet?", hits)
    mixed = [Hit(passage=HAMLET[0], score=1.0, rank=1), HAMLET[1]]
    with pytest.raises(ValueError, match="candidate 1 has none"):
        smol_pipe.rerank("Who wrote Hamlet?", mixed)
    # Scores near the float limit are fused without overflowing (with a weight on them: the fitted
    # weights may give the first stage none).
    extreme = [
        Hit(passage=p, score=s, rank=i + 1)
        for i, (p, s) in enumerate(zip(HAMLET, [1e308, -1e308, 0.0], strict=True))
    ]
    from rerank.pipeline import Pipeline

    weighted = Pipeline(smol_pipe.config, model=smol_pipe.model)
    weighted.config = weighted.config.model_copy(
        update={
            "probe": weighted.config.probe.model_copy(update={"weights": {"probe": 1.0, "first_stage": 1.0}})
        }
    )
    ranked = weighted.rerank("Who wrote Hamlet?", extreme)
    assert ranked.info["first_stage"] == "scores"
    assert all(np.isfinite(it.score) for it in ranked.items)


def curve_file(tmp_path: Path, edit: Any) -> Path:
    from rerank.engines.attention import CURVES_DIR

    d = json.loads((CURVES_DIR / "smollm2-135m-nacal-fp32.json").read_text(encoding="utf-8"))
    edit(d)
    path = tmp_path / "curve.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["mean"]["5"].__setitem__(2, float("nan")), "'mean.5'[2]: nan is not a finite number"),
        (lambda d: d["offset"]["20"].__setitem__(0, 1e300), "'offset.20'[0]: 1e+300 is not a finite number"),
        (lambda d: d.pop("sd"), "required field 'sd' is missing"),
        (lambda d: d["mean"]["20"].pop(), "field 'mean.20': expected a list of 20 numbers"),
        (lambda d: d["mean"].pop("15"), "field 'mean' has no values for length(s) [15]"),
        (lambda d: d.__setitem__("lengths", [5, "x"]), "field 'lengths' holds 'x'"),
    ],
)
def test_damaged_curves_are_refused_naming_file_and_field(tmp_path: Path, edit: Any, message: str) -> None:
    from calibration.curve import BiasCurve

    path = curve_file(tmp_path, edit)
    with pytest.raises(ValueError) as info:
        BiasCurve.load(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_damaged_curve_in_a_run_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = curve_file(tmp_path, lambda d: d.pop("mean"))
    cfg = write_cfg(
        tmp_path, f"extends: default\ngenerator: {{name: none}}\ncalibration: {{curve: {path}}}\n"
    )
    inp, out = tmp_path / "q.jsonl", tmp_path / "r.jsonl"
    inp.write_bytes(jline(request("q1", "fleas")))
    assert (
        main(["run", "--config", str(cfg), "--input", str(inp), "--output", str(out), "--no-progress"]) == 2
    )
    err = capsys.readouterr().err
    assert "required field 'mean' is missing" in err and str(path) in err
    assert "Traceback" not in err and len(error_lines(err)) == 1


@pytest.mark.parametrize(
    ("yaml", "key"),
    [
        ("probe: {first_stage_weight: .inf}", "probe.first_stage_weight"),
        ("probe: {first_stage_weight: .nan}", "probe.first_stage_weight"),
        ("probe: {window_size: true}", "probe.window_size"),
        ("model: {device: junk}", "model.device"),
        ("model: {threads: -1}", "model.threads"),
        ("model: {threads: 0}", "model.threads"),
        ("policy: {threshold: .inf}", "policy.threshold"),
    ],
)
def test_bad_config_values_exit_2_naming_the_key(
    tmp_path: Path, yaml: str, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_cfg(tmp_path, f"extends: default\n{yaml}\n")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(cfg)
    inp, out = tmp_path / "q.jsonl", tmp_path / "r.jsonl"
    inp.write_bytes(jline(request("q1", "fleas")))
    assert main(["run", "--config", str(cfg), "--input", str(inp), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert key in err and str(cfg) in err and len(error_lines(err)) == 1


# --------------------------------------------------------------------------------------------------
# 6. Setup errors: exit 2, one line, no traceback (unless -v)
# --------------------------------------------------------------------------------------------------


def test_unwritable_output_paths_exit_2(
    tmp_path: Path, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "q.jsonl"
    inp.write_bytes(jline(request("q1", "fleas")))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x", encoding="utf-8")
    targets = [tmp_path, a_file / "out.jsonl"]  # a directory; a path under a file
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        targets.append(ro / "out.jsonl")
    for out in targets:
        assert main(["run", "--config", str(cfg), "--input", str(inp), "--output", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(error_lines(err)) == 1
    assert main(["-v", "run", "--config", str(cfg), "--input", str(inp), "--output", str(a_file / "o")]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.fixture(scope="module")
def built_indexes(tmp_path_factory: pytest.TempPathFactory, cfg: Path) -> dict[str, Path]:
    """A dense and a BM25 index of a 4-passage corpus, and a same-sized second corpus's dense index."""
    root = tmp_path_factory.mktemp("indexes")
    out = {}
    for corpus_name, texts in (
        (
            "a",
            [
                "Fleas live about three months.",
                "Paris is in France.",
                "Shakespeare wrote Hamlet.",
                "Cats purr.",
            ],
        ),
        ("b", ["Dogs bark.", "Rome is in Italy.", "Marlowe wrote Faustus.", "Owls hoot at night."]),
    ):
        corpus = root / f"{corpus_name}.jsonl"
        corpus.write_text(
            "".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(texts)),
            encoding="utf-8",
        )
        for kind in ("dense", "bm25") if corpus_name == "a" else ("dense",):
            index = root / f"{corpus_name}-{kind}"
            build = ["index", "build", "--corpus", str(corpus), "--out", str(index), "--config", str(cfg)]
            assert main([*build, "--retriever", kind, "--no-progress"]) == 0
            out[f"{corpus_name}-{kind}"] = index
    return out


def copy_index(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def run_with_index(tmp_path: Path, cfg: Path, index: Path) -> int:
    inp, out = tmp_path / "q.jsonl", tmp_path / "r.jsonl"
    inp.write_bytes(jline({"qid": "q1", "query": "who wrote Hamlet"}))
    return main(
        ["run", "--config", str(cfg), "--index", str(index), "--input", str(inp), "--output", str(out)]
    )


@pytest.mark.parametrize(
    ("kind", "target", "damage", "message"),
    [
        ("dense", "faiss.index", lambda b: b[: len(b) // 2], "faiss.index is"),
        ("dense", "faiss.index", lambda b: b"\0garbage" * (len(b) // 8) + b"\0" * (len(b) % 8), "SHA-256"),
        ("bm25", "vocab.json", lambda b: b'["x"]', "vocab.json is"),
        ("bm25", "bm25s/params.index.json", lambda b: b"{" + b[1:-1] + b"!", "SHA-256"),
    ],
)
def test_truncated_or_garbage_index_files_exit_2(
    tmp_path: Path,
    cfg: Path,
    built_indexes: dict[str, Path],
    kind: str,
    target: str,
    damage: Any,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    index = copy_index(built_indexes[f"a-{kind}"], tmp_path / "index")
    path = index / target
    path.write_bytes(damage(path.read_bytes()))
    assert run_with_index(tmp_path, cfg, index) == 2
    err = capsys.readouterr().err
    assert message in err and "rebuild the index" in err
    assert "Traceback" not in err and len(error_lines(err)) == 1


# --------------------------------------------------------------------------------------------------
# 7. Integrity: swapped files and a tampered encoder name
# --------------------------------------------------------------------------------------------------


def test_files_swapped_for_another_corpus_of_the_same_size_are_refused(
    built_indexes: dict[str, Path], tmp_path: Path
) -> None:
    from retrievers.index import IndexFormatError, load_retriever

    for name in ("faiss.index", "passages.jsonl"):
        index = copy_index(built_indexes["a-dense"], tmp_path / f"swap-{name}")
        (index / name).write_bytes((built_indexes["b-dense"] / name).read_bytes())
        with pytest.raises(IndexFormatError, match=name):
            load_retriever(index)
    assert len(load_retriever(built_indexes["a-dense"])) == 4


def test_a_tampered_encoder_name_is_refused_before_anything_loads(
    built_indexes: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import retrievers.dense as dense_mod
    from retrievers.index import IndexFormatError, load_retriever

    loaded: list[str] = []
    monkeypatch.setattr(dense_mod, "load_encoder", lambda name: loaded.append(name))
    for name in ("../../../../tmp/elsewhere", "/nonexistent/model", "a b c"):
        index = copy_index(built_indexes["a-dense"], tmp_path / f"enc{len(loaded)}-{abs(hash(name))}")
        meta = json.loads((index / "meta.json").read_text(encoding="utf-8"))
        meta["encoder"]["name"] = name
        (index / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        with pytest.raises(IndexFormatError, match="encoder name"):
            load_retriever(index)
    assert loaded == []


def test_an_index_without_file_checksums_is_refused(built_indexes: dict[str, Path], tmp_path: Path) -> None:
    from retrievers.index import IndexFormatError, load_retriever

    index = copy_index(built_indexes["a-bm25"], tmp_path / "old")
    meta = json.loads((index / "meta.json").read_text(encoding="utf-8"))
    del meta["files"]
    (index / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(IndexFormatError, match="no 'files' record"):
        load_retriever(index)


# --------------------------------------------------------------------------------------------------
# 8. Small ones
# --------------------------------------------------------------------------------------------------


def test_a_huge_passage_is_cut_by_characters_before_tokenising(smol_pipe: Any) -> None:
    from rerank.probe.prompt import CHARS_PER_TOKEN_BOUND, truncate_text

    tok = smol_pipe.model.tokenizer
    seen: list[int] = []

    def recording(text: str, **kw: Any) -> Any:
        seen.append(len(text))
        return tok(text, **kw)

    huge = "word " * 1_000_000  # 5 MB
    cut, truncated = truncate_text(recording, huge, 300)
    assert truncated and seen == [300 * CHARS_PER_TOKEN_BOUND]
    assert cut == truncate_text(tok, huge[:20_000], 300)[0]
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) == 300
    # A short text is kept whole and not marked as cut.
    assert truncate_text(tok, "short text", 300) == ("short text", False)


def test_run_tag_with_whitespace_is_a_usage_error(tmp_path: Path, cfg: Path) -> None:
    inp, out = tmp_path / "q.jsonl", tmp_path / "r.jsonl"
    inp.write_bytes(jline(request("q1", "fleas")))
    argv = [
        "run",
        "--config",
        str(cfg),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--trec-run",
        str(tmp_path / "t"),
    ]
    assert main([*argv, "--run-tag", "my tag"]) == 2
    assert not out.exists()


def test_the_default_fuses_with_the_weights_fitted_for_its_model() -> None:
    probe = load_config("default").probe
    assert probe.fusion == "fitted" and probe.weights is None and probe.cascade
