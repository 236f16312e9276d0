"""Corpus, query and qrels loading: formats accepted, and every malformed input refused with its location."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrievers.corpus import CorpusError, load_corpus, load_qrels, load_queries

DEMO_CORPUS = Path(__file__).resolve().parent.parent / "rerank" / "data" / "demo_corpus.jsonl"


def _write(path: Path, lines: list[str] | bytes) -> Path:
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rec(**kw) -> str:
    return json.dumps(kw)


def test_demo_corpus_is_well_formed(demo_passages):
    assert 35 <= len(demo_passages) <= 45
    assert len({p.id for p in demo_passages}) == len(demo_passages)
    assert all(p.title and len(p.text.split()) >= 15 for p in demo_passages)
    themes = {p.id.split("-")[0] for p in demo_passages}
    for theme in ("photo", "eiffel", "python", "vaccine"):
        assert sum(p.id.startswith(theme) for p in demo_passages) >= 4, theme
    assert len(themes) >= 15


def test_jsonl_fields_aliases_and_metadata(tmp_path):
    path = _write(
        tmp_path / "c.jsonl",
        [
            _rec(_id="d1", title="T1", text="first text", source="wiki", year=2020),
            "",
            _rec(id=7, contents="second text"),
            _rec(id="d3", text="third", title=None),
        ],
    )
    ps = load_corpus(path)
    assert [p.id for p in ps] == ["d1", "7", "d3"]
    assert ps[0].title == "T1" and ps[0].metadata == {"source": "wiki", "year": 2020}
    assert ps[1].text == "second text" and ps[1].title == "" and ps[1].metadata == {}
    assert ps[2].title == ""


def test_beir_folder(tmp_path):
    _write(tmp_path / "corpus.jsonl", [_rec(_id="a", title="", text="alpha")])
    assert [p.id for p in load_corpus(tmp_path)] == ["a"]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([_rec(id="a", text="x"), '{"id": "b", "text": '], r"c\.jsonl:2: malformed JSON"),
        ([_rec(id="a", text="x"), "[1, 2]"], r"c\.jsonl:2: expected a JSON object, got list"),
        (
            [_rec(id="a", text="x"), _rec(id="a", text="y")],
            r"c\.jsonl:2: duplicate id 'a' \(first seen on line 1\)",
        ),
        ([_rec(id="a", title="t")], r"c\.jsonl:1: no text field; each record needs one of text or contents"),
        ([_rec(id="a", text="   ")], r"c\.jsonl:1: text of id 'a' is empty"),
        ([_rec(id="a", contents="")], r"c\.jsonl:1: contents of id 'a' is empty"),
        ([_rec(id="a", text=["x"])], r"c\.jsonl:1: text must be a string, got list"),
        ([_rec(text="x")], r"c\.jsonl:1: no id field"),
        ([_rec(id="", text="x")], r"c\.jsonl:1: id is empty"),
        ([_rec(id=True, text="x")], r"c\.jsonl:1: id must be a string or an integer, got bool"),
        ([_rec(id="a", _id="b", text="x")], r"c\.jsonl:1: both id and _id are given with different values"),
        ([_rec(id="a", text="x", title=3)], r"c\.jsonl:1: title must be a string, got int"),
        (["", "   "], r"c\.jsonl: the corpus is empty"),
        ([], r"c\.jsonl: the corpus is empty"),
    ],
)
def test_bad_corpus_is_refused_with_location(tmp_path, lines, message):
    path = _write(tmp_path / "c.jsonl", lines)
    with pytest.raises(CorpusError, match=message):
        load_corpus(path)


def test_invalid_utf8_names_file_and_line(tmp_path):
    data = (_rec(id="a", text="fine") + "\n").encode() + b'{"id": "b", "text": "caf\xe9"}\n'
    path = _write(tmp_path / "c.jsonl", data)
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: invalid UTF-8 \(byte 0xe9"):
        load_corpus(path)


def test_utf8_bom_and_unicode_text_are_fine(tmp_path):
    path = _write(
        tmp_path / "c.jsonl", b"\xef\xbb\xbf" + _rec(id="a", text="caf\u00e9 \u03b1").encode() + b"\n"
    )
    assert load_corpus(path)[0].text == "caf\u00e9 \u03b1"


def test_missing_paths(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "nope.jsonl")
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(CorpusError, match=r"folder without corpus\.jsonl \(it holds: other\.txt\)"):
        load_corpus(tmp_path)
    assert isinstance(CorpusError("x"), ValueError)


def test_queries_and_qrels(tmp_path):
    _write(tmp_path / "queries.test.jsonl", [_rec(_id="q1", text="what"), _rec(_id=2, text="why")])
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\n2\td1\t0\n"
    )
    assert load_queries(tmp_path) == {"q1": "what", "2": "why"}
    assert load_qrels(tmp_path) == {"q1": {"d1": 1, "d2": 2}, "2": {"d1": 0}}
    trec = _write(tmp_path / "qrels.txt", ["q1 0 d9 3"])
    assert load_qrels(trec) == {"q1": {"d9": 3}}


def test_bad_queries_and_qrels(tmp_path):
    q = _write(tmp_path / "q.jsonl", [_rec(_id="q1", text="a"), _rec(_id="q1", text="b")])
    with pytest.raises(CorpusError, match=r"q\.jsonl:2: duplicate query id 'q1'"):
        load_queries(q)
    q = _write(tmp_path / "q2.jsonl", [_rec(_id="q1", text="")])
    with pytest.raises(CorpusError, match=r"q2\.jsonl:1: query 'q1' has no non-empty 'text'"):
        load_queries(q)
    r = _write(tmp_path / "r.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\thigh"])
    with pytest.raises(CorpusError, match=r"r\.tsv:2: relevance grade 'high' is not an integer"):
        load_qrels(r)
    r = _write(tmp_path / "r2.tsv", ["q1\td1"])
    with pytest.raises(CorpusError, match=r"r2\.tsv:1: expected 3 columns"):
        load_qrels(r)


def test_demo_corpus_path_is_packaged():
    assert DEMO_CORPUS.is_file()


def test_scifact_loads_in_full(scifact_dir):
    corpus = load_corpus(scifact_dir)
    queries = load_queries(scifact_dir, split="test")
    qrels = load_qrels(scifact_dir, split="test")
    assert len(corpus) == 5183 and all(p.title for p in corpus[:50])
    assert len(queries) == 300
    assert sum(len(v) for v in qrels.values()) == 339
    assert set(qrels) <= set(queries)
