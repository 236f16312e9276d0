"""Positional-bias curves: fitting, persistence, refusal on mismatch, and correction of a known bias."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.curve import CURVE_FORMAT_VERSION, BiasCurve, CurveMismatchError, fit_curve, pick_compatible

REPO = Path(__file__).resolve().parent.parent

META = {
    "model_id": "m",
    "weights_hash": "abc",
    "dtype": "bfloat16",
    "layers": [0, 5],
    "heads": None,
    "head_set": None,
    "aggregation": "mean",
    "score_kind": "raw",
    "template": "t1",
}


def _biased_lists(n_lists: int, n: int, seed: int, mode: str):
    """Lists whose scores are relevance (gold = 1.0 vs noise) shaped by a U-shaped slot bias."""
    rng = np.random.default_rng(seed)
    bias = 1.0 + 3.0 * (np.linspace(-1, 1, n) ** 2)  # start and end draw 4x the middle
    out = []
    for _ in range(n_lists):
        gold = int(rng.integers(n))
        rel = np.full(n, 1.0) + rng.normal(0, 0.05, n)
        rel[gold] = 1.6
        scores = rel * bias if mode == "multiplicative" else rel + bias
        out.append((scores, list(range(n)), [j != gold for j in range(n)], gold))
    return out


@pytest.mark.parametrize("mode", ["multiplicative", "subtractive", "zscore"])
def test_correction_recovers_the_gold_passage(mode):
    gen = "multiplicative" if mode == "multiplicative" else "additive"
    fit = _biased_lists(300, 20, 0, gen)
    test = _biased_lists(200, 20, 1, gen)
    curve = fit_curve([(s, p, u) for s, p, u, _ in fit], mode=mode, meta=META)
    raw_hits = np.mean([np.argmax(s) == g for s, _, _, g in test])
    cor_hits = np.mean([np.argmax(curve.apply(s)) == g for s, _, _, g in test])
    assert raw_hits < 0.5, "the synthetic bias must actually hide the gold passage"
    assert cor_hits > 0.95
    # The fitted curve has the U shape that was put in.
    b = curve.bias(20)
    assert b[0] > b[10] and b[-1] > b[10]


def test_round_trip_and_interpolated_lengths(tmp_path):
    curve = fit_curve([(s, p, u) for s, p, u, _ in _biased_lists(100, 10, 0, "multiplicative")], meta=META)
    curve20 = fit_curve([(s, p, u) for s, p, u, _ in _biased_lists(100, 20, 0, "multiplicative")], meta=META)
    curve.mean.update(curve20.mean)
    curve.sd.update(curve20.sd)
    curve.lengths = [10, 20]
    path = tmp_path / "c.json"
    curve.save(path)
    back = BiasCurve.load(path)
    assert back.mode == curve.mode and back.lengths == [10, 20] and back.meta["model_id"] == "m"
    np.testing.assert_allclose(back.bias(10), curve.bias(10), atol=1e-7)
    s = np.linspace(1, 2, 10)
    np.testing.assert_allclose(back.apply(s), curve.apply(s), atol=1e-6)
    mid = back.bias(15)  # between the fitted lengths: interpolated over relative position
    assert len(mid) == 15 and np.all(np.isfinite(mid))
    assert back.bias(15)[0] > back.bias(15)[7]
    assert len(back.bias(40)) == 40  # beyond: the nearest length's profile, stretched


def test_mismatch_is_refused_with_the_differences_named():
    curve = fit_curve([(s, p, u) for s, p, u, _ in _biased_lists(50, 5, 0, "multiplicative")], meta=META)
    curve.check_compatible(META)  # same configuration: accepted
    with pytest.raises(CurveMismatchError, match=r"weights_hash.*'abc'.*'other'"):
        curve.check_compatible({**META, "weights_hash": "other"})
    with pytest.raises(CurveMismatchError, match="layers"):
        curve.check_compatible({**META, "layers": [0, 29]})


def test_bad_files_are_refused(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps({"format_version": CURVE_FORMAT_VERSION + 1, "mode": "multiplicative"}))
    with pytest.raises(ValueError, match="format version"):
        BiasCurve.load(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BiasCurve.load(p)
    with pytest.raises(FileNotFoundError):
        BiasCurve.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown mode"):
        fit_curve([(np.ones(3), [0, 1, 2], [True] * 3)], mode="cubic")
    curve = fit_curve([(np.ones(3) + np.arange(3), [0, 1, 2], [True] * 3)])
    with pytest.raises(ValueError, match="permutation"):
        curve.apply([1.0, 2.0, 3.0], positions=[0, 0, 1])


def test_the_curve_fitted_for_the_probe_is_picked_among_candidates():
    lists = [(s, p, u) for s, p, u, _ in _biased_lists(50, 5, 0, "multiplicative")]
    bf16 = fit_curve(lists, meta={**META, "dtype": "bfloat16"})
    fp32 = fit_curve(lists, meta={**META, "dtype": "float32"})
    found = [("a.json", bf16), ("b.json", fp32)]
    assert pick_compatible(found, {**META, "dtype": "float32"}) is fp32
    assert pick_compatible(found, {**META, "dtype": "bfloat16"}) is bf16
    with pytest.raises(CurveMismatchError, match=r"a\.json: dtype.*'bfloat16'.*'float16'.*b\.json: dtype"):
        pick_compatible(found, {**META, "dtype": "float16"})
    other_probe = {**META, "dtype": "float32", "layers": [0, 1]}
    with pytest.raises(CurveMismatchError, match="layers"):
        pick_compatible(found, other_probe)
    assert pick_compatible(found, other_probe, keys=("model_id", "weights_hash", "dtype")) is fp32
    with pytest.raises(ValueError, match="no bias curve"):
        pick_compatible([], META)


def test_config_takes_one_curve_or_a_list():
    from pydantic import ValidationError

    from rerank.config import CalibrationConfig

    assert CalibrationConfig(name="curve", curve="a.json").curves == ("a.json",)
    assert CalibrationConfig(name="curve", curve=["a.json", "b.json"]).curves == ("a.json", "b.json")
    assert CalibrationConfig(name="curve").curves == ()
    with pytest.raises(ValidationError, match="empty list"):
        CalibrationConfig(name="curve", curve=[])


SHIPPED = {"curve": "smollm2-135m-raw", "curve+content-free": "smollm2-135m-nacal"}


@pytest.mark.parametrize(
    "path",
    [
        "configs/default.yaml",
        "configs/fit-curve-raw.yaml",
        "configs/fit-curve-nacal.yaml",
        "configs/short-lists.yaml",
    ],
)
def test_shipped_curves_fit_the_configs_that_use_them(smol_model, path):
    """Changing the default probe settings without refitting its curves must fail here, not for users.

    The embedded model runs in bf16 on a CPU with native bf16 and in fp32 elsewhere: each dtype needs
    its own curve, and both must be shipped and listed.
    """
    from rerank.config import CalibrationConfig, load_config
    from rerank.engines import AttentionReranker
    from rerank.engines.attention import resolve_curve_path

    cfg = load_config(REPO / path)
    names = cfg.calibration.curves
    if not names:  # a fitting config: its outputs are the shipped curves of that name
        stem = SHIPPED[cfg.calibration.name]
        names = (f"{stem}.json", f"{stem}-fp32.json")
        cfg = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={"curve": names})})
    rr = AttentionReranker(smol_model, cfg.probe, cfg.calibration)  # raises CurveMismatchError otherwise
    assert rr.curve is not None and rr.curve.meta["dtype"] == smol_model.dtype
    assert all(resolve_curve_path(n).parent.name == "curves" for n in names)
    base = "content-free" if cfg.calibration.name == "curve+content-free" else "none"
    meta = AttentionReranker(smol_model, cfg.probe, CalibrationConfig(name=base)).probe_meta()
    found = [(n, BiasCurve.load(resolve_curve_path(n))) for n in names]
    for dtype in ("bfloat16", "float32"):
        assert pick_compatible(found, {**meta, "dtype": dtype}).meta["dtype"] == dtype


@pytest.mark.slow
def test_calibrate_command_fits_a_curve_for_the_asked_dtype(tmp_path):
    """End to end on NQ dev lists with the embedded model: JSON (bound to fp32) and PNG, then applied."""
    from rerank.cli import main
    from rerank.config import load_config
    from rerank.engines import AttentionReranker
    from rerank.probe.model import load_model

    cfg = tmp_path / "fit.yaml"
    cfg.write_text(
        "probe: {engine: attention, layers: [0, 1], passage_max_tokens: 60}\ncalibration: {name: curve}\n",
        encoding="utf-8",
    )
    out = tmp_path / "curves" / "tiny.json"
    args = ["calibrate", "--config", str(cfg), "--out", str(out), "--lists", "16", "--dtype", "float32"]
    # A few hard lists for the fusion weights (the retrieved ones need the whole pool encoded).
    assert main([*args, "--no-progress", "--fusion-hard", "12", "--fusion-retrieved", "0"]) == 0
    curve = BiasCurve.load(out)
    assert curve.fusion is not None and curve.fusion.meta["lists_by_kind"] == {"hard": 12, "retrieved": 0}
    assert out.with_suffix(".png").stat().st_size > 0
    assert curve.meta["dtype"] == "float32" and curve.meta["layers"] == [0, 1]
    assert curve.meta["score_kind"] == "raw" and curve.lengths == [5, 10, 15, 20]
    loaded = load_config(cfg)
    cal = loaded.calibration.model_copy(update={"curve": str(out)})
    rr = AttentionReranker(
        load_model(loaded.model.model_copy(update={"dtype": "float32"})), loaded.probe, cal
    )
    assert rr.curve is not None and rr.curve.meta == curve.meta
    with pytest.raises(CurveMismatchError, match="dtype: curve has 'float32', probe has 'bfloat16'"):
        curve.check_compatible({**rr.probe_meta(), "dtype": "bfloat16"})
    assert main(["calibrate", "--config", str(cfg), "--out", str(out), "--dtype", "int8"]) == 2


def _weak_first_slot_sweep(questions: int, seed: int, n: int = 20) -> np.ndarray:
    """Sweep scores (question, gold slot, prompt slot) whose gold passage stands out less at slot 0.

    Distractors are noise around a slot bias; slot 0's distractors are noisier and the gold passage's
    margin there and at slot 1 is smaller, as with the embedded model's first slots.
    """
    rng = np.random.default_rng(seed)
    bias = np.linspace(0.3, -0.3, n)
    sd = np.full(n, 0.15)
    sd[0] = 0.3
    margin = np.full(n, 0.5)
    margin[0] = 0.25
    margin[1] = 0.35
    out = np.empty((questions, n, n))
    for q in range(questions):
        for g in range(n):
            row = bias + rng.normal(0, 1, n) * sd
            row[g] += margin[g]
            out[q, g] = row
    return out


def _sweep_curve(sweep: np.ndarray, mode: str) -> BiasCurve:
    n = sweep.shape[1]
    samples = [(row[g], range(n), [j != g for j in range(n)]) for row in sweep for g in range(n)]
    return fit_curve(samples, mode=mode, meta=META, n_bootstrap=0)


@pytest.mark.parametrize("knots", [None, (0, 1, 3, 10, 19)])
def test_offsets_even_out_recall_over_slots_on_held_out_questions(knots):
    from calibration.curve import equalise, sweep_recall

    fit, held_out = _weak_first_slot_sweep(200, 0), _weak_first_slot_sweep(200, 1)
    curve = _sweep_curve(fit, "subtractive")

    def recall(c: BiasCurve) -> np.ndarray:
        return sweep_recall(np.array([[c.apply(row[g]) for g in range(20)] for row in held_out]))

    even = equalise(curve, fit, knots=knots)
    before, after = recall(curve), recall(even)

    def bins(per_slot: np.ndarray) -> np.ndarray:
        return per_slot.reshape(5, 4).mean(axis=1)

    assert bins(before)[0] < bins(before)[1:].min() - 0.03, "slot 0 must pull the first bin down"
    # Evened out (over the bins of four slots the objective measures) on questions the offsets were
    # not fitted on, at a small cost in mean recall.
    assert np.ptp(bins(after)) < np.ptp(bins(before)) / 2
    assert bins(after)[0] > bins(before)[0] + 0.05
    assert after.mean() > before.mean() - 0.05
    # The first bin's slots are lifted; within a bin the objective does not ask for evenness, and the
    # noisy slot 0 (a lift there lets its distractors win too) gains least.
    off = even.offsets(20)
    assert off[:4].mean() > off[4:].max() and abs(off.mean()) < 1e-9
    assert after[0] >= before[0]
    fit_meta = even.meta["fit"]["offset"]
    assert fit_meta["questions"] == 200 and fit_meta["after"]["bin_spread"] < fit_meta["before"]["bin_spread"]
    assert not curve.offset, "equalise returns a copy; the fitted curve keeps no offsets"


def test_sweep_choice_measures_each_candidate_on_held_out_halves():
    """The form and offset shape are chosen on halves of the sweep the candidate was not fitted on."""
    from calibration.select import OFFSET_SHAPES, choose_by_sweep

    sweep = _weak_first_slot_sweep(40, 2)
    scored = [(row[g], g) for row in _weak_first_slot_sweep(6, 3) for g in range(20)]
    (mode, shape), table = choose_by_sweep(scored, sweep, ["subtractive", "zscore"], splits=6)
    assert set(table) == {f"{m}/{k}" for m in ("subtractive", "zscore") for k in OFFSET_SHAPES}
    for row in table.values():
        assert 0 <= row["bin_spread"] <= row["bin_spread_p90"] + 1e-9 <= 1 + 1e-9
        assert row["objective"] == pytest.approx(row["recall@1"] - row["bin_spread"], abs=2e-4)
    best = table[f"{mode}/{shape}"]
    assert best["objective"] == max(r["objective"] for r in table.values())
    # The weak first slot needs offsets: every curve without them leaves a wider held-out spread.
    assert shape != "none"
    assert best["bin_spread"] < min(table[f"{m}/none"]["bin_spread"] for m in ("subtractive", "zscore"))
    with pytest.raises(ValueError, match="at least 2"):
        choose_by_sweep(scored, sweep[:1], ["subtractive"])


def test_offsets_survive_a_round_trip_and_older_files_still_load(tmp_path):
    from calibration.curve import equalise

    sweep = _weak_first_slot_sweep(40, 0)
    even = equalise(_sweep_curve(sweep, "zscore"), sweep, knots=(0, 1, 19))
    path = tmp_path / "even.json"
    even.save(path)
    back = BiasCurve.load(path)
    np.testing.assert_allclose(back.offsets(20), even.offsets(20), atol=1e-7)
    np.testing.assert_allclose(back.apply(sweep[0, 3]), even.apply(sweep[0, 3]), atol=1e-6)
    assert len(back.offsets(10)) == 10 and back.offsets(10)[0] == pytest.approx(back.offsets(20)[0])
    # A format-1 file (no offsets) reads as a curve without offsets.
    d = json.loads(path.read_text())
    d["format_version"] = 1
    del d["offset"]
    path.write_text(json.dumps(d))
    old = BiasCurve.load(path)
    assert not old.offset and np.all(old.offsets(20) == 0)
    np.testing.assert_allclose(old.apply(sweep[0, 3]), even.apply(sweep[0, 3]) - even.offsets(20), atol=1e-6)


def test_bad_sweeps_and_knots_are_refused():
    from calibration.curve import equalise

    sweep = _weak_first_slot_sweep(3, 0)
    curve = _sweep_curve(sweep, "subtractive")
    with pytest.raises(ValueError, match="shape"):
        equalise(curve, sweep[:, :, :5])
    with pytest.raises(ValueError, match="first and last slot"):
        equalise(curve, sweep, knots=(1, 19))


@pytest.mark.slow
def test_calibrate_command_chooses_offsets_on_a_dev_sweep(tmp_path, capsys):
    """``--equalise-questions``: a sweep over dev questions, cached, and a cross-validated choice."""
    from calibration.select import OFFSET_SHAPES
    from calibration.stores import save_sweep_store
    from rerank.cli import main

    cfg = tmp_path / "fit.yaml"
    cfg.write_text(
        "probe: {engine: attention, layers: [0, 1], passage_max_tokens: 24}\n"
        "calibration: {name: curve+content-free}\n",
        encoding="utf-8",
    )
    out, cache = tmp_path / "even.json", tmp_path / "passes"
    args = ["calibrate", "--config", str(cfg), "--out", str(out), "--lists", "16", "--dtype", "float32"]
    store = tmp_path / "sweep.npz"
    args += ["--equalise-questions", "2", "--cache-dir", str(cache), "--no-progress"]
    args += ["--fusion-hard", "0", "--fusion-retrieved", "0"]
    assert main([*args, "--sweep-store", str(store)]) == 0
    curve = BiasCurve.load(out)
    fit = curve.meta["fit"]
    assert "sweep over 2 more questions" in fit["data"]
    table = fit["sweep_choice"]["candidates"]
    assert {k.split("/")[1] for k in table} == set(OFFSET_SHAPES)
    best = max(table, key=lambda k: table[k]["objective"])
    assert curve.mode == best.split("/")[0]
    assert bool(curve.offset) == (best.split("/")[1] != "none")
    assert len(list(cache.glob("*.npz"))) == 2 * 20
    # The store holds the two questions' scores; with the pass cache gone, a refit reads them from it
    # instead of probing again, and fits the same offsets.
    with np.load(store) as z:
        assert z["scores"].shape == (2, 20, 20) and len(set(z["qids"].tolist())) == 2
    for f in cache.glob("*.npz"):
        f.unlink()
    again = tmp_path / "again.json"
    assert main([*args[:4], str(again), *args[5:], "--sweep-store", str(store)]) == 0
    assert not list(cache.glob("*.npz")), "questions in the store must not be probed again"
    assert BiasCurve.load(again).offset == curve.offset
    # --lists-store keeps the fitting lists' scores: a refit reads them (altered here, so that reading
    # shows in the curve) instead of probing, and a store of other lists is refused.
    from calibration.stores import load_lists_store, save_lists_store

    lists_store = tmp_path / "lists.npz"
    stored = [*args[:4], str(tmp_path / "stored.json"), *args[5:], "--sweep-store", str(store)]
    assert main([*stored, "--lists-store", str(lists_store)]) == 0
    first = BiasCurve.load(tmp_path / "stored.json")
    assert first.mean.keys() == curve.mean.keys()
    with np.load(lists_store) as z:
        meta = json.loads(str(z["meta"]))
        lists = list(
            zip(z["questions"].tolist(), [[0] * n for n in z["lengths"]], z["gold"].tolist(), strict=True)
        )
        assert len(lists) == 16 and z["scores"].shape == (16, 20)
    scored = load_lists_store(lists_store, meta, lists)
    save_lists_store(lists_store, meta, lists, [(s[::-1].copy(), g) for s, g in scored])
    assert main([*stored, "--lists-store", str(lists_store)]) == 0
    flipped = BiasCurve.load(tmp_path / "stored.json")
    assert not np.allclose(flipped.mean[5], first.mean[5]), "the altered store was read"
    assert main([*stored, "--lists-store", str(lists_store), "--lists", "12"]) == 2
    with pytest.raises(ValueError, match="other settings"):
        load_lists_store(lists_store, {**meta, "layers": [0, 5]}, lists)
    # A store made in another dtype (here the same rows, relabelled bfloat16) is refused without
    # --sweep-dtype, read as it is with it, and refused when it lacks a question (which would otherwise
    # be probed in the model's dtype).
    with np.load(store) as z:
        meta, rows = json.loads(str(z["meta"])), dict(zip(z["qids"].tolist(), z["scores"], strict=True))
    bf16 = tmp_path / "sweep-bf16.npz"
    save_sweep_store(bf16, {**meta, "dtype": "bfloat16"}, rows)
    other = tmp_path / "other.json"
    refit = [*args[:4], str(other), *args[5:], "--sweep-store", str(bf16)]
    assert main(refit) == 2
    assert main([*refit, "--sweep-dtype", "bfloat16"]) == 0
    assert not list(cache.glob("*.npz")), "a store in another dtype is read, never probed into"
    moved = BiasCurve.load(other)
    assert moved.meta["dtype"] == "float32" and moved.meta["fit"]["sweep_dtype"] == "bfloat16"
    assert "from bfloat16 passes" in moved.meta["fit"]["data"]
    assert moved.offset == curve.offset
    save_sweep_store(bf16, {**meta, "dtype": "bfloat16"}, dict(list(rows.items())[:1]))
    capsys.readouterr()
    assert main([*refit, "--sweep-dtype", "bfloat16"]) == 2
    assert "holds 1 of the 2 questions" in (err := capsys.readouterr().err) and "--native-sweep-store" in err
    assert not list(cache.glob("*.npz"))
    # Beside a store in the model's own dtype, the question the bf16 store lacks is probed into it, and
    # the curve records how many rows came from each dtype.
    native = tmp_path / "sweep-fp32.npz"
    mixed = [*refit, "--sweep-dtype", "bfloat16", "--native-sweep-store", str(native)]
    assert main(mixed) == 0
    assert len(list(cache.glob("*.npz"))) == 20, "only the missing question is probed"
    with np.load(native) as z:
        assert z["qids"].tolist() == list(rows)[1:] and json.loads(str(z["meta"]))["dtype"] == "float32"
    fit = BiasCurve.load(other).meta["fit"]
    assert fit["sweep_dtypes"] == {"bfloat16": 1, "float32": 1}
    assert "bfloat16 passes for 1 questions and from float32 passes for 1" in fit["data"]
    # Rows in the model's dtype take precedence: altered native rows for both questions change the fit,
    # and nothing is probed.
    for f in cache.glob("*.npz"):
        f.unlink()
    save_sweep_store(native, meta, {q: r[::-1, ::-1].copy() for q, r in rows.items()})
    assert main(mixed) == 0
    assert not list(cache.glob("*.npz"))
    refitted = BiasCurve.load(other)
    assert refitted.meta["fit"]["sweep_dtypes"] == {"float32": 2}
    assert "sweep_dtype" not in refitted.meta["fit"] and "bfloat16" not in refitted.meta["fit"]["data"]
    assert not np.allclose(refitted.mean[20], moved.mean[20])
    assert main([*refit, "--native-sweep-store", str(native)]) == 2, "it goes with --sweep-dtype"
    no_sweep = [*args[:9], "--sweep-dtype", "bfloat16"]
    assert main(no_sweep) == 2, "--sweep-dtype names the dtype of a sweep"
    assert main([*args[:-5], "--equalise-questions", "x"]) == 2


def test_sweep_store_round_trip_and_refusal(tmp_path):
    """The sweep store keeps rows by question id and refuses settings it was not made with."""
    from calibration.stores import load_sweep_store, save_sweep_store

    meta = {"model_id": "m", "dtype": "bfloat16", "layers": [12, 19], "sweep_length": 20}
    rows = {"nq2": np.full((20, 20), 2.0), "nq10": np.arange(400.0).reshape(20, 20)}
    path = tmp_path / "s.npz"
    assert load_sweep_store(path, meta) == {}, "a missing store is an empty one"
    save_sweep_store(path, meta, rows)
    back = load_sweep_store(path, meta)
    assert sorted(back) == ["nq10", "nq2"]
    np.testing.assert_array_equal(back["nq10"], rows["nq10"])
    with pytest.raises(ValueError, match="layers differ"):
        load_sweep_store(path, {**meta, "layers": [0, 23]})
    assert not list(tmp_path.glob("*.tmp")), "the write is atomic: no temporary file left"


def test_shipped_sweep_store_reproduces_the_default_curves_offset_fit():
    """The store beside the default's curve holds the dev sweep its offsets were fitted on: that curve
    applied to those questions' lists gives the recall@1 and bin spread recorded when it was fitted."""
    from calibration.curve import bin_spread, sweep_recall
    from calibration.lists import load_calibration_items

    store = REPO / "calibration" / "curves" / "smollm2-135m-nacal.sweep.npz"
    curve = BiasCurve.load(store.with_name("smollm2-135m-nacal.json"))
    fitted = curve.meta["fit"]["offset"]
    with np.load(store) as z:
        meta = json.loads(str(z["meta"]))
        rows = dict(zip(z["qids"].tolist(), z["scores"].astype(np.float64), strict=True))
    for key in ("model_id", "weights_hash", "dtype", "layers", "score_kind", "template"):
        assert meta[key] == curve.meta[key], key
    dev = load_calibration_items()[: fitted["questions"]]
    sweep = np.stack([rows[it.qid] for it in dev])
    corrected = np.array([[curve.apply(s) for s in lists] for lists in sweep])
    per_slot = sweep_recall(corrected)
    assert round(float(per_slot.mean()), 4) == fitted["after"]["recall@1"]
    assert round(bin_spread(per_slot), 4) == fitted["after"]["bin_spread"]


@pytest.mark.slow
def test_shipped_fp32_curve_is_refitted_from_its_stores(tmp_path):
    """The fp32 curve the default applies is reproduced, without a pass, from the stores beside it: the
    fitting lists' fp32 scores and the dev sweep's bf16 and fp32 rows (copied, so that nothing in the
    repository is rewritten)."""
    import shutil

    from rerank.config import load_config
    from rerank.fitting import fit_for

    curves = REPO / "calibration" / "curves"
    shipped = BiasCurve.load(curves / "smollm2-135m-nacal-fp32.json")
    fit = shipped.meta["fit"]
    stores = {}
    for name in (
        "smollm2-135m-nacal.sweep.npz",
        "smollm2-135m-nacal-fp32.sweep.npz",
        "smollm2-135m-nacal-fp32.lists.npz",
    ):
        stores[name] = tmp_path / name
        shutil.copy(curves / name, stores[name])
    cfg = load_config(REPO / "configs" / "fit-curve-nacal.yaml")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "float32"})})
    curve, report = fit_for(
        cfg,
        equalise_questions=fit["offset"]["questions"],
        cache_dir=tmp_path / "passes",
        sweep_store=stores["smollm2-135m-nacal.sweep.npz"],
        sweep_dtype=fit["sweep_dtype"],
        lists_store=stores["smollm2-135m-nacal-fp32.lists.npz"],
        native_sweep_store=stores["smollm2-135m-nacal-fp32.sweep.npz"] if "sweep_dtypes" in fit else None,
    )
    assert not (tmp_path / "passes").exists(), "everything is read from the stores"
    assert (curve.mode, report["offset_shape"]) == (shipped.mode, fit["offset"]["shape"])
    assert curve.meta["fit"]["sweep_dtypes"] == fit["sweep_dtypes"]
    assert report["sweep_choice"] == fit["sweep_choice"]["candidates"]
    for n in shipped.lengths:
        np.testing.assert_allclose(curve.mean[n], shipped.mean[n], atol=1e-6)
        np.testing.assert_allclose(curve.sd[n], shipped.sd[n], atol=1e-6)
    np.testing.assert_allclose(curve.offsets(20), shipped.offsets(20), atol=1e-6)


def test_shipped_calibration_lists_are_the_dev_part_of_the_data(data_dir):
    """The lists inside the package are exactly the NQ-open dev items the benchmark harness builds from the
    shared data (same order, gold passages and distractors), and hold none of the test questions."""
    from calibration.lists import load_calibration_items
    from eval.nq import load_nq

    test, dev = load_nq(data_dir)
    shipped = load_calibration_items()
    assert shipped == dev
    assert not {it.qid for it in test} & {it.qid for it in shipped}


def test_offsets_at_short_lengths_keep_the_curve_and_its_other_offsets():
    from calibration.curve import equalise, equalise_lengths, evenness_objective, sweep_recall

    base = equalise(_sweep_curve(_weak_first_slot_sweep(60, 0), "subtractive"), _weak_first_slot_sweep(60, 2))
    sweeps = {n: _weak_first_slot_sweep(150, 3 + n, n=n) for n in (3, 5)}
    curve = equalise_lengths(base, sweeps, note={"data": "synthetic"})
    assert sorted(curve.offset) == [3, 5, 20]
    np.testing.assert_array_equal(curve.offset[20], base.offset[20])
    assert curve.mean is base.mean and curve.sd is base.sd
    assert curve.meta["fit"]["offset"] == base.meta["fit"]["offset"], "the 20-slot fit's record is kept"
    for n in (3, 5):
        rec = curve.meta["fit"]["offsets_by_length"][str(n)]
        assert rec["length"] == n and rec["data"] == "synthetic" and rec["questions"] == 150
        corrected = np.array([[base._correct(row[g]) for g in range(n)] for row in sweeps[n]])
        before = evenness_objective(sweep_recall(corrected), min(5, n))
        after = evenness_objective(sweep_recall(corrected + curve.offsets(n)[None, None, :]), min(5, n))
        assert after > before, n  # the weak first slot is lifted at every length
        assert abs(curve.offsets(n).mean()) < 1e-9
    # Lengths between fitted ones interpolate their neighbours; the curve survives a save and load.
    assert len(curve.offsets(4)) == 4 and not np.allclose(curve.offsets(4), 0)


@pytest.mark.slow
def test_calibrate_extend_adds_short_list_offsets_to_the_shipped_curve(tmp_path, smol_model, capsys):
    """``--extend CURVE --short-lengths``: the shipped curve as it is, plus offsets fitted at 3 passages."""
    from rerank.cli import main
    from rerank.config import load_config
    from rerank.engines import AttentionReranker
    from rerank.engines.attention import resolve_curve_path

    stem = SHIPPED["curve+content-free"]
    shipped = resolve_curve_path(f"{stem}.json" if smol_model.dtype == "bfloat16" else f"{stem}-fp32.json")
    out, cache = tmp_path / "short.json", tmp_path / "passes"
    args = ["calibrate", "--extend", str(shipped), "--out", str(out), "--short-lengths", "3"]
    args += ["--short-questions", "3", "--short-start", "60", "--cache-dir", str(cache), "--no-progress"]
    assert main(args) == 0
    assert "3 passages: recall@1" in capsys.readouterr().err
    curve, before = BiasCurve.load(out), BiasCurve.load(shipped)
    assert sorted(curve.offset) == sorted([3, *before.offset])
    for n in before.offset:
        np.testing.assert_array_equal(curve.offset[n], before.offset[n])
    assert curve.meta["fit"]["offsets_by_length"]["3"]["questions"] == 3
    assert "questions 60..62" in curve.meta["fit"]["offsets_by_length"]["3"]["data"]
    assert len(list(cache.glob("*.npz"))) == 3 * 3
    cfg = load_config(out.with_suffix(".yaml"))
    rr = AttentionReranker(smol_model, cfg.probe, cfg.calibration)
    assert rr.curve is not None and 3 in rr.curve.offset
    # Usage errors: --extend needs the lengths; a length below 2 is refused.
    assert main(["calibrate", "--extend", str(shipped), "--out", str(out)]) == 2
    assert main(["calibrate", "--extend", str(shipped), "--out", str(out), "--short-lengths", "1"]) == 2
    assert "list lengths must be >= 2, got '1'" in capsys.readouterr().err


def test_short_list_curve_is_the_shipped_curve_plus_short_offsets():
    """configs/short-lists.yaml's curve must follow the shipped one: refitting the default's curve without
    re-running its --extend command fails here."""
    from rerank.engines.attention import resolve_curve_path

    short = BiasCurve.load(resolve_curve_path("smollm2-135m-nacal-short.json"))
    shipped = BiasCurve.load(resolve_curve_path("smollm2-135m-nacal.json"))
    assert short.mode == shipped.mode and short.lengths == shipped.lengths
    for n in shipped.lengths:
        np.testing.assert_array_equal(short.mean[n], shipped.mean[n])
        np.testing.assert_array_equal(short.sd[n], shipped.sd[n])
    assert sorted(short.offset) == sorted({3, 5, 10, *shipped.offset})
    for n in shipped.offset:
        np.testing.assert_array_equal(short.offset[n], shipped.offset[n])
    assert short.mismatches(shipped.meta) == []
    assert sorted(short.meta["fit"]["offsets_by_length"], key=int) == ["3", "5", "10"]
