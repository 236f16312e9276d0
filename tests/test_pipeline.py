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


def test_config_extends_a_named_config_and_overrides_key_by_key(tmp_path):
    default = load_config("configs/default.yaml")
    p = tmp_path / "mine.yaml"
    p.write_text("extends: default\ngenerator: {name: none}\nprobe: {first_stage_weight: 0.5}\n")
    cfg = load_config(p)
    assert cfg.generator.name == "none"
    assert cfg.probe.first_stage_weight == 0.5
    # Everything else in the probe section is the default's, not the bare PipelineConfig's.
    assert cfg.probe.layers == default.probe.layers == (12, 19)
    assert cfg.probe.nacal_form == default.probe.nacal_form
    assert cfg.calibration == default.calibration
    assert cfg.retriever == default.retriever


def test_config_extends_a_relative_path_in_a_chain(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("probe: {layers: [2, 5], aggregation: sum}\npolicy: {top_k: 4}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../base.yaml\nprobe: {layers: [1, 3]}\n")
    (tmp_path / "top.yaml").write_text("extends: sub/mid.yaml\npolicy: {top_k: 2}\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert cfg.probe.layers == (1, 3)  # mid overrides base
    assert cfg.probe.aggregation == "sum"  # base's, kept through mid
    assert cfg.policy.top_k == 2  # top overrides base


def test_config_extends_in_a_loop_is_a_clear_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match=r"loop: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("extends: defualt\n", FileNotFoundError, "no config named 'defualt'.*holds: default"),
        ("extends: [default]\n", ValueError, "'extends' must be a config name or path"),
        ("extends: missing.yaml\n", FileNotFoundError, "missing.yaml"),
        ("extends: default\nprobe: {layerz: 1}\n", ValueError, "layerz"),
    ],
)
def test_config_extends_errors_are_clear(tmp_path, text, error, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(error, match=match):
        load_config(p)


def test_a_config_can_be_named(tmp_path, monkeypatch):
    assert load_config("default") == load_config("configs/default.yaml")
    assert Pipeline.from_config("heads").config == load_config("configs/heads.yaml")
    with pytest.raises(FileNotFoundError, match="no config named 'nope'.*default"):
        load_config("nope")
    # A file of that name in the working directory wins over the project's config.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").write_text("policy: {top_k: 7}\n")
    assert load_config("default").policy.top_k == 7


def test_default_config_loads_and_names_registered_parts():
    from rerank.engines import PROBE_ENGINES
    from rerank.probe.calibrators import CALIBRATORS

    cfg = load_config("configs/default.yaml")
    assert cfg.probe.engine in PROBE_ENGINES
    assert cfg.calibration.name in CALIBRATORS


def test_retrieve_without_index_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no index"):
        Pipeline().retrieve("anything")
