"""Retrievers on real components: BM25 (both backends), dense (embedded MiniLM + FAISS), hybrid fusion,
index save/load, and the eval CLI's quick retrieval suite."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from retrievers.bm25 import BM25Retriever, tokenize, tokenizer_info
from retrievers.config import RetrieverConfig
from retrievers.dense import DenseRetriever
from retrievers.hybrid import HybridRetriever, rrf_fuse, weighted_fuse
from retrievers.index import RETRIEVERS, IndexFormatError, build_retriever, load_retriever, save_retriever
from retrievers.records import Passage

REPO = Path(__file__).resolve().parent.parent

QUERIES = [
    "how do plants turn sunlight into sugar",
    "when was the Eiffel Tower built and how tall is it",
    "Python global interpreter lock threads",
    "who made the first vaccine against smallpox",
    "mRNA vaccine protein",
    "coral reef bleaching warm water",
]


def _ids(hits):
    return [h.passage.id for h in hits]


def _tiny() -> list[Passage]:
    return [
        Passage(id="d1", text="the cat sat on the mat"),
        Passage(id="d2", text="a dog chased the cat around the garden"),
        Passage(id="d3", text="dogs and dogs and more dogs"),
        Passage(id="d4", title="Cats", text="cat cat cat"),
    ]


# --------------------------------------------------------------------------------------------------
# Tokenizer and BM25
# --------------------------------------------------------------------------------------------------


def test_tokenize():
    assert tokenize("The Eiffel-Tower, built in 1889!") == ["eiffel", "tower", "built", "1889"]
    assert tokenize("it is THE a an") == []
    assert tokenize("Café_crème") == ["café", "crème"]
    assert tokenizer_info()["stemmer"] in {"none", "snowball-english"}


def test_bm25_score_matches_hand_computed_lucene_formula():
    k1, b = 1.2, 0.75
    ret = BM25Retriever("rank_bm25", k1=k1, b=b)
    ret.index(_tiny(), show_progress=False)
    # Tokens: d1 [cat, sat, mat], d2 [dog, chased, cat, around, garden], d3 [dogs]*3 + [more],
    # d4 [cats, cat, cat, cat] (title first). N=4, avgdl=(3+5+4+4)/4, df(cat)=3.
    avgdl = 16 / 4
    idf = math.log(1 + (4 - 3 + 0.5) / (3 + 0.5))

    def w(tf, dl):
        return idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))

    hits = ret.search("cat", k=10)
    expected = sorted([("d1", w(1, 3)), ("d2", w(1, 5)), ("d4", w(3, 4))], key=lambda x: -x[1])
    assert _ids(hits) == [d for d, _ in expected]
    assert [h.score for h in hits] == pytest.approx([s for _, s in expected], rel=1e-12)
    assert [h.rank for h in hits] == [1, 2, 3]


@pytest.mark.parametrize("backend", ["bm25s", "rank_bm25"])
def test_bm25_returns_only_matching_passages(backend):
    ret = BM25Retriever(backend)
    ret.index(_tiny(), show_progress=False)
    assert _ids(ret.search("dogs", k=10)) == ["d3"]
    assert ret.search("unicorn the", k=10) == []
    assert ret.search_batch([], k=3) == []
    with pytest.raises(TypeError, match="single string"):
        ret.search_batch("cat", k=3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        ret.search("cat", k=0)


def test_bm25_backends_agree(demo_passages):
    a = BM25Retriever("bm25s", k1=0.9, b=0.4)
    b = BM25Retriever("rank_bm25", k1=0.9, b=0.4)
    a.index(demo_passages, show_progress=False)
    b.index(demo_passages, show_progress=False)
    for q in QUERIES + ["vaccine vaccine vaccines"]:
        ha, hb = a.search(q, k=20), b.search(q, k=20)
        assert ha, q
        assert _ids(ha) == _ids(hb), q
        assert [h.score for h in ha] == pytest.approx([h.score for h in hb], rel=1e-9), q
    assert a.search(QUERIES[0], k=1)[0].passage.id.startswith("photo")


def test_bm25_ties_are_broken_by_id():
    ps = [Passage(id=i, text="same words here") for i in ("z", "b", "m")]
    for backend in ("bm25s", "rank_bm25"):
        ret = BM25Retriever(backend)
        ret.index(ps, show_progress=False)
        assert _ids(ret.search("words", k=2)) == ["b", "m"]


def test_bm25_bad_arguments():
    with pytest.raises(ValueError, match="unknown BM25 backend 'lucene'; choose one of: bm25s, rank_bm25"):
        BM25Retriever("lucene")
    with pytest.raises(RuntimeError, match=r"no index; call \.index\(passages\)"):
        BM25Retriever().search("x")
    with pytest.raises(ValueError, match="duplicate passage id 'a'"):
        BM25Retriever().index([Passage(id="a", text="x y"), Passage(id="a", text="z")])
    with pytest.raises(ValueError, match="no passage has an indexable token"):
        BM25Retriever().index([Passage(id="a", text="the, a!")])


@pytest.mark.parametrize("backend", ["bm25s", "rank_bm25"])
def test_bm25_save_load_round_trip(tmp_path, demo_passages, backend):
    ret = BM25Retriever(backend, k1=1.1, b=0.6)
    ret.index(demo_passages, show_progress=False)
    ret.save(tmp_path / "idx")
    assert not list((tmp_path / "idx").rglob("*.pkl")) and not list((tmp_path / "idx").rglob("*.pickle"))
    loaded = load_retriever(tmp_path / "idx")
    assert isinstance(loaded, BM25Retriever)
    assert (loaded.backend, loaded.k1, loaded.b) == (backend, 1.1, 0.6)
    assert loaded.passages == demo_passages
    for q in QUERIES:
        before, after = ret.search(q, k=10), loaded.search(q, k=10)
        assert _ids(before) == _ids(after)
        assert [h.score for h in before] == pytest.approx([h.score for h in after], rel=1e-12)


def test_bm25_refuses_other_version_kind_and_tokenizer(tmp_path, demo_passages):
    ret = BM25Retriever("bm25s")
    ret.index(demo_passages, show_progress=False)
    d = ret.save(tmp_path / "idx")
    meta = json.loads((d / "meta.json").read_text())

    (d / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(IndexFormatError, match="format_version 0, but this code reads version 1"):
        BM25Retriever.load(d)
    (d / "meta.json").write_text(json.dumps({**meta, "tokenizer": {"name": "x", "stemmer": "porter"}}))
    with pytest.raises(IndexFormatError, match="index tokenized with .*rebuild the index"):
        BM25Retriever.load(d)
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="holds a 'bm25' index, not a 'dense' index"):
        DenseRetriever.load(d)
    with pytest.raises(IndexFormatError, match="is not an index directory"):
        load_retriever(tmp_path / "empty")


@pytest.mark.slow
def test_bm25s_on_scifact(scifact_dir):
    from eval.common import ir_metrics
    from retrievers.corpus import load_corpus, load_qrels, load_queries

    ret = BM25Retriever("bm25s")
    ret.index(load_corpus(scifact_dir), show_progress=False)
    queries, qrels = load_queries(scifact_dir), load_qrels(scifact_dir)
    hits = ret.search_batch(list(queries.values()), k=100)
    run = {q: {h.passage.id: 1.0 / h.rank for h in hs} for q, hs in zip(queries, hits, strict=True)}
    assert ir_metrics(qrels, run, ["ndcg@10"])["ndcg@10"] >= 0.66


# --------------------------------------------------------------------------------------------------
# Dense
# --------------------------------------------------------------------------------------------------


def test_dense_finds_the_topic(dense_demo):
    tops = [h.passage.id.split("-")[0] for h in (hs[0] for hs in dense_demo.search_batch(QUERIES, k=3))]
    assert tops == ["photo", "eiffel", "python", "vaccine", "vaccine", "reef"]
    hits = dense_demo.search(QUERIES[0], k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
    assert all(-1.0001 <= h.score <= 1.0001 for h in hits)  # cosine of normalised vectors
    assert len(dense_demo.search("anything", k=500)) == len(dense_demo)


def test_dense_save_load_round_trip(tmp_path, dense_demo, demo_passages):
    d = dense_demo.save(tmp_path / "dense")
    assert (d / "faiss.index").is_file()
    loaded = load_retriever(d)
    assert isinstance(loaded, DenseRetriever) and loaded.passages == demo_passages
    for before, after in zip(
        dense_demo.search_batch(QUERIES, k=10), loaded.search_batch(QUERIES, k=10), strict=True
    ):
        assert _ids(before) == _ids(after)
        assert [h.score for h in before] == pytest.approx([h.score for h in after], abs=1e-6)


def test_dense_refuses_another_encoder_or_version(tmp_path, dense_demo):
    d = dense_demo.save(tmp_path / "dense")
    meta = json.loads((d / "meta.json").read_text())
    assert meta["encoder"]["name"] == "embedded" and meta["encoder"]["dim"] == 384
    other = {**meta, "encoder": {**meta["encoder"], "fingerprint": "0" * 32, "name": "other-model"}}
    (d / "meta.json").write_text(json.dumps(other))
    with pytest.raises(IndexFormatError, match="built with encoder 'other-model'.*same encoder or rebuild"):
        DenseRetriever.load(d, encoder=dense_demo.encoder)
    (d / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="format_version 99"):
        load_retriever(d)


def test_bf16_encoding_agrees_with_float32(tmp_path, dense_encoder, demo_passages):
    import numpy as np

    from retrievers.index import indexed_text

    texts = [indexed_text(p) for p in demo_passages]
    f32 = DenseRetriever(dense_encoder, encoder_name="embedded", dtype="float32")
    b16 = DenseRetriever(dense_encoder, encoder_name="embedded", dtype="bfloat16")
    a, b = f32.encode(texts), b16.encode(texts)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    assert not np.array_equal(a, b)  # the bf16 pass really ran in bf16
    assert np.abs(np.linalg.norm(b, axis=1) - 1).max() < 1e-5
    assert (a * b).sum(axis=1).min() > 0.999
    f32.index(demo_passages, show_progress=False)
    b16.index(demo_passages, show_progress=False)
    for q in QUERIES:
        assert _ids(b16.search(q, k=3)) == _ids(f32.search(q, k=3)), q
    # The index records the dtype it was encoded in; a load encodes queries the same way.
    d = b16.save(tmp_path / "bf16")
    meta = json.loads((d / "meta.json").read_text())
    assert meta["encoder_dtype"] == "bfloat16"
    assert DenseRetriever.load(d, encoder=dense_encoder).dtype == "bfloat16"
    # An index from before the dtype was recorded was encoded in float32.
    d32 = f32.save(tmp_path / "f32")
    meta = json.loads((d32 / "meta.json").read_text())
    assert meta["encoder_dtype"] == "float32"
    assert RetrieverConfig().encoder_dtype == "auto"
    with pytest.raises(ValueError, match="unknown encoder dtype 'float16'; choose auto, float32, bfloat16"):
        DenseRetriever(dense_encoder, dtype="float16")


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_indexes_round_trip(tmp_path, dense_encoder, demo_passages, dense_demo, index_type):
    ret = DenseRetriever(dense_encoder, index_type=index_type, encoder_name="embedded")
    ret.index(demo_passages[:20], show_progress=False)  # photosynthesis, Eiffel, Python, vaccines
    for q in QUERIES[:4]:  # a tiny corpus: approximate search should find the exact top hit
        assert ret.search(q, k=1)[0].passage.id == dense_demo.search(q, k=1)[0].passage.id
    loaded = DenseRetriever.load(ret.save(tmp_path / index_type))
    assert loaded.index_type == index_type
    assert _ids(loaded.search(QUERIES[1], k=5)) == _ids(ret.search(QUERIES[1], k=5))


# --------------------------------------------------------------------------------------------------
# Fusion and hybrid
# --------------------------------------------------------------------------------------------------

A = [("a", 10.0), ("b", 6.0), ("c", 2.0)]
B = [("c", 0.9), ("d", 0.5), ("a", 0.1)]


def test_rrf_fuse_exact_order():
    fused = rrf_fuse([A, B], k=60)
    # a: 1/61 + 1/63 == c: 1/63 + 1/61 (tie -> id order), then b: 1/62 == d: 1/62.
    assert [pid for pid, _ in fused] == ["a", "c", "b", "d"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 63)
    assert [pid for pid, _ in rrf_fuse([A, B], k=60, weights=(1, 3))] == ["c", "a", "d", "b"]
    assert [pid for pid, _ in rrf_fuse([A, []], k=1)] == ["a", "b", "c"]


def test_weighted_fuse_exact_order():
    fused = weighted_fuse([A, B])
    assert fused == [("a", 1.0), ("c", 1.0), ("b", 0.5), ("d", 0.5)]
    fused = weighted_fuse([A, B], weights=(0.25, 0.75))
    assert [pid for pid, _ in fused] == ["c", "d", "a", "b"]
    assert [s for _, s in fused] == pytest.approx([0.75, 0.375, 0.25, 0.125])
    assert weighted_fuse([[("x", 3.0), ("y", 3.0)]]) == [("x", 1.0), ("y", 1.0)]


def test_fusion_refuses_bad_input():
    with pytest.raises(ValueError, match="list 1 holds id 'c' twice"):
        rrf_fuse([A, [("c", 1.0), ("c", 0.5)]])
    with pytest.raises(ValueError, match="got 1 weights for 2 lists"):
        weighted_fuse([A, B], weights=(1.0,))
    with pytest.raises(ValueError, match="unknown fusion 'max'; choose one of: rrf, weighted"):
        HybridRetriever(fusion="max")


def test_hybrid_fuses_its_components(dense_encoder):
    bm25 = BM25Retriever("bm25s")
    dense = DenseRetriever(dense_encoder, encoder_name="embedded")
    HybridRetriever(bm25, dense).index(_tiny(), show_progress=False)
    for fusion in ("rrf", "weighted"):
        hybrid = HybridRetriever(bm25, dense, fusion=fusion, rrf_k=10, weights=(0.3, 0.7), depth=3)
        for q in ["cat", "dog in the garden", "felines"]:
            sparse, dens = bm25.search(q, k=3), dense.search(q, k=3)
            if fusion == "rrf":
                expected = rrf_fuse([sparse, dens], k=10, weights=(0.3, 0.7))
            else:
                expected = weighted_fuse([sparse, dens], weights=(0.3, 0.7))
            got = hybrid.search(q, k=2)
            assert [(h.passage.id, h.score) for h in got] == expected[:2], (fusion, q)
            assert [h.rank for h in got] == [1, 2]


def test_hybrid_save_load_round_trip(tmp_path, dense_demo, demo_passages):
    bm25 = BM25Retriever("rank_bm25")
    bm25.index(demo_passages, show_progress=False)
    hybrid = HybridRetriever(bm25, dense_demo, fusion="weighted", weights=(0.4, 0.6), depth=20)
    d = save_retriever(hybrid, tmp_path / "hybrid")
    assert (d / "bm25" / "meta.json").is_file() and (d / "dense" / "faiss.index").is_file()
    loaded = load_retriever(d)
    assert isinstance(loaded, HybridRetriever)
    assert (loaded.fusion, loaded.weights, loaded.depth, loaded.bm25.backend) == (
        "weighted",
        (0.4, 0.6),
        20,
        "rank_bm25",
    )
    for before, after in zip(
        hybrid.search_batch(QUERIES, k=10), loaded.search_batch(QUERIES, k=10), strict=True
    ):
        assert _ids(before) == _ids(after)
        assert [h.score for h in before] == pytest.approx([h.score for h in after], abs=1e-6)


def test_hybrid_refuses_mismatched_components(dense_demo):
    bm25 = BM25Retriever()
    bm25.index(_tiny(), show_progress=False)
    with pytest.raises(ValueError, match="index different passages"):
        HybridRetriever(bm25, dense_demo)


# --------------------------------------------------------------------------------------------------
# Registry, import weight, layering
# --------------------------------------------------------------------------------------------------


def test_registry_and_build():
    assert RETRIEVERS.names() == ["bm25", "dense", "hybrid"]
    ret = build_retriever(RetrieverConfig(name="bm25", bm25_backend="rank_bm25", bm25_k1=1.3))
    assert isinstance(ret, BM25Retriever) and (ret.backend, ret.k1) == ("rank_bm25", 1.3)
    hybrid = build_retriever(RetrieverConfig(fusion="weighted", depth=7))
    assert isinstance(hybrid, HybridRetriever) and (hybrid.fusion, hybrid.depth) == ("weighted", 7)
    dense = build_retriever(RetrieverConfig(name="dense", faiss_index="hnsw"))
    assert isinstance(dense, DenseRetriever) and dense.index_type == "hnsw" and dense._encoder is None
    with pytest.raises(KeyError, match="unknown retriever 'splade'; choose one of: bm25, dense, hybrid"):
        RETRIEVERS.get("splade")


def test_importing_retrievers_is_light():
    code = (
        "import sys, retrievers\n"
        "from retrievers import build_retriever, load_corpus, rrf_fuse, BM25Retriever, DenseRetriever\n"
        "heavy = ('torch', 'faiss', 'sentence_transformers', 'bm25s', 'rank_bm25')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_retrievers_import_nothing_from_upper_layers():
    for path in (REPO / "retrievers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"rerank", "calibration", "eval"}, (
                    f"{path.name} imports {name}"
                )


# --------------------------------------------------------------------------------------------------
# Eval CLI
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_retrieval_quick(tmp_path, data_dir, dense_encoder):
    from eval.__main__ import main

    out = tmp_path / "r.json"
    argv = ["retrieval", "--quick", "--data-dir", str(data_dir), "--output", str(out)]
    assert main([*argv, "--opt", "queries=10", "--opt", "distractors=100"]) == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"suite", "dataset", "config", "systems", "machine"}
    assert res["suite"] == "retrieval" and res["dataset"] == "beir-scifact"
    assert res["config"]["quick"] is True and res["config"]["n_queries"] == 10
    assert "QUICK SUBSET" in res["config"]["corpus"]
    # The dense encoder runs in its configured dtype and, in the same run, in the other one.
    ran = res["config"]["dense"]["encoder_dtype"]
    other = "float32" if ran == "bfloat16" else "bfloat16"
    names = {"bm25-rank_bm25", "bm25-bm25s", "dense", f"dense-{other}", "hybrid-rrf", "hybrid-weighted"}
    assert set(res["systems"]) == names
    dense = res["systems"]["dense"]
    assert dense[f"build_speedup_vs_{other}"] == pytest.approx(
        res["systems"][f"dense-{other}"]["index_build_seconds"] / dense["index_build_seconds"], rel=0.01
    )
    assert abs(dense[f"ndcg@10_minus_{other}"]) < 0.05
    for name, metrics in res["systems"].items():
        for m in ("ndcg@10", "recall@100", "mrr@10"):
            assert 0.0 <= metrics[m] <= 1.0, (name, m)
        assert metrics["seconds_per_query"] > 0 and metrics["peak_rss_mb"] > 0
    assert res["systems"]["bm25-bm25s"]["ndcg@10"] == res["systems"]["bm25-rank_bm25"]["ndcg@10"]
    assert res["systems"]["bm25-bm25s"]["qps_ratio_bm25s_vs_rank_bm25"] > 0
    assert res["machine"]["cpu"] and res["machine"]["python"] and "hostname" not in json.dumps(res["machine"])


def test_eval_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    from eval.__main__ import main

    code = main(["retrieval", "--data-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.json")])
    assert code == 2
    assert "data folder not found" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_eval_unknown_option_is_refused(tmp_path, data_dir, capsys):
    from eval.__main__ import main

    code = main(
        [
            "retrieval",
            "--quick",
            "--data-dir",
            str(data_dir),
            "--output",
            str(tmp_path / "x.json"),
            "--opt",
            "colour=red",
        ]
    )
    assert code == 2
    assert "unknown --opt colour; this suite knows:" in capsys.readouterr().err
