"""The whole pipeline on the real embedded models and the bundled demo corpus."""

from __future__ import annotations

import pytest

from rerank.config import PipelineConfig, load_config
from rerank.pipeline import Pipeline

FAST = {
    "retriever": {"name": "hybrid", "top_k": 6},
    "probe": {"layers": [0, 9], "window_size": 20},
    "policy": {"order": "best_last", "prune": "top_k", "top_k": 3},
    "generator": {"name": "transformers", "max_new_tokens": 12},
}


@pytest.fixture(scope="module")
def pipe(demo_passages):
    return Pipeline(PipelineConfig.model_validate(FAST)).index(demo_passages, show_progress=False)


def test_run_end_to_end(pipe):
    ans = pipe.run("What gas do plants release during photosynthesis?")
    assert len(ans.ranking) == 6
    assert len(ans.passages_used) == 3
    # best_last: the best kept passage is the last one the generator reads.
    assert ans.passages_used[-1].id == ans.ranking.items[0].passage.id
    assert ans.text is not None and ans.text.strip()
    assert set(ans.timings) == {"retrieve", "rerank", "select", "generate"}
    assert any(p.id.startswith("photo") for p in ans.passages_used)


def test_stages_are_separately_callable(pipe, demo_passages):
    hits = pipe.retrieve("Who designed the Eiffel Tower?")
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    ranked = pipe.rerank("Who designed the Eiffel Tower?", hits)
    assert sorted(ranked.ids) == sorted(h.passage.id for h in hits)
    assert [it.rank for it in ranked.items] == list(range(1, len(hits) + 1))
    assert all(it.first_stage_score is not None for it in ranked.items)
    # The caller's hits are untouched (frozen records; a new list is returned).
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    batch = pipe.rerank_batch(["Who designed the Eiffel Tower?"], [hits], show_progress=False)
    assert batch[0].ids == ranked.ids


def test_unknown_names_fail_at_construction():
    with pytest.raises(KeyError, match="unknown order policy 'middle'; choose one of: .*best_last"):
        Pipeline(PipelineConfig.model_validate({"policy": {"order": "middle"}}))
    with pytest.raises(KeyError, match="unknown prune policy"):
        Pipeline(PipelineConfig.model_validate({"policy": {"prune": "half"}}))


def test_config_rejects_unknown_keys(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("probe:\n  layerz: [0, 3]\n")
    with pytest.raises(ValueError, match="layerz"):
        load_config(p)


def test_default_config_loads_and_names_registered_parts():
    from rerank.calibrators import CALIBRATORS
    from rerank.reranker import PROBE_ENGINES

    cfg = load_config("configs/default.yaml")
    assert cfg.probe.engine in PROBE_ENGINES
    assert cfg.calibration.name in CALIBRATORS


def test_retrieve_without_index_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no index"):
        Pipeline().retrieve("anything")
