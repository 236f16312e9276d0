"""The explain view: its figures are the reranker's own, and the page works in a real headless Chromium.

Browser tests skip only when Chromium or chromedriver is absent (CI installs Debian's ``chromium`` and
``chromium-driver``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from rerank.config import load_config
from rerank.explain import NOTICE, Explanation, explain_payload
from rerank.explain.browser import chromium, chromium_paths, wait_ready
from rerank.pipeline import Pipeline
from rerank.records import Hit, Passage

HOSTILE = (
    "<script>window.__pwned=1</script> fleas & ticks",
    '<img src=x onerror="window.__pwned=1"> a flea image',
    "&amp; &lt;b&gt;not bold&lt;/b&gt; &#60;i&#62; entities stay text",
    "\u202eRTL override: \u05e4\u05e8\u05e2\u05d5\u05e9 \u0628\u0631\u063a\u0648\u062b fleas in Hebrew "
    "and Arabic",
    "zero\u200bwidth\u200d joiners\ufeff hidden in a flea passage",
    "A flea lives for two to three months; the life cycle takes weeks.",
    "</script><script>window.__pwned=1</script><!-- closing the data block -->",
)

needs_chromium = pytest.mark.skipif(
    chromium_paths() is None,
    reason="headless Chromium not installed (apt-get install -y chromium chromium-driver); CI installs it",
)


def _pipeline(smol_model, **probe) -> Pipeline:
    # The explain page reads every window (it turns the cascade off), so the rankings it is compared
    # with here are the reranker's without the cascade.
    probe = {"cascade": False, **probe}
    cfg = load_config("default")
    cfg = cfg.model_copy(
        update={
            "generator": cfg.generator.model_copy(update={"name": "none"}),
            "probe": cfg.probe.model_copy(update=probe),
        }
    )
    return Pipeline(cfg, model=smol_model)


@pytest.fixture(scope="module")
def pipe(smol_model) -> Pipeline:
    return _pipeline(smol_model)


@pytest.fixture(scope="module")
def dl19(data_dir: Path) -> tuple[str, list[Hit]]:
    """The first DL19 query and its BM25 top-10 (with BM25 scores)."""
    path = data_dir / "trec-dl19" / "bm25_top100.json"
    if not path.is_file():
        pytest.skip(f"DL19 BM25 run not found at {path}")
    run = json.loads(path.read_text(encoding="utf-8"))[0]
    hits = [
        Hit(passage=Passage(id=h["docid"], text=h["content"]), score=h["score"], rank=i + 1)
        for i, h in enumerate(run["hits"][:10])
    ]
    return run["query"], hits


@pytest.fixture(scope="module")
def dl19_explained(pipe, dl19) -> tuple[Explanation, object]:
    query, hits = dl19
    exp = pipe.explain(query, hits)
    ranked = pipe.rerank(query, hits)
    return exp, ranked


def test_json_figures_are_the_rerankers_own(dl19_explained):
    exp, ranked = dl19_explained
    data = json.loads(exp.to_json())
    assert data["notice"] == NOTICE
    # prompt_order: both with second_order: adaptive reads the second order only where the rule says.
    orders = ["reversed", "retriever"][: ranked.info["prompts"]]
    assert len(data["facts"]["prompts"]) == ranked.info["prompts"]
    assert [p["id"] for p in data["passages"]] == ranked.ids
    for p, it in zip(data["passages"], ranked.items, strict=True):
        assert p["rank"] == it.rank
        assert p["score"] == it.score
        assert p["raw_score"] == it.raw_score
        assert p["calibrated_score"] == it.calibrated_score
        assert p["prompt_position"] == it.prompt_position
        assert p["first_stage_score"] == it.first_stage_score
        # The reported slot is the first prompt's; every order read covers every passage.
        assert [r["order"] for r in p["readings"]] == orders
        assert p["readings"][0]["slot"] == it.prompt_position
        if len(orders) == 2:
            assert p["readings"][0]["slot"] + p["readings"][1]["slot"] == len(ranked) - 1
        # raw_score is the mean of the prompts' raw scores.
        assert np.isclose(np.mean([r["raw"] for r in p["readings"]]), it.raw_score, rtol=1e-9, atol=0)
        assert p["rank_change"] == p["first_stage_rank"] - p["rank"]
        assert np.isclose(sum(p["layer_share"]), 1.0, atol=1e-3)
        assert len(p["layer_scores"]) == len(data["layers"]) == 8
        tok = p["tokens"]
        assert len(tok["tokens"]) == len(tok["raw"]) == len(tok["corrected"])
        # The tokens join to the passage's block exactly: "[n] " + its text.
        block = "".join(tok["tokens"])
        assert block.endswith(it.passage.text) and block.startswith("[")
        assert all(v >= 0 for v in tok["raw"])
    kept = [p for p in data["passages"] if p["kept"]]
    assert len(kept) == 3 and {p["rank"] for p in kept} == {1, 2, 3}  # prune top_k: 3
    assert sorted(p["context_position"] for p in kept) == [0, 1, 2]
    assert [b["order"] for b in data["bias"]] == orders
    assert all(len(b["points"]) == 10 and len(b["mean"]) == 10 for b in data["bias"])
    facts = data["facts"]
    assert facts["windows"] == 1
    assert facts["token_rows_bytes"] > 0
    # The record reads its own JSON back.
    assert Explanation.model_validate(data) == exp


def test_multiple_windows_and_a_single_passage_window(smol_model):
    pipe = _pipeline(smol_model, window_size=3)
    passages = [Passage(id=f"p{i}", text=t) for i, t in enumerate(HOSTILE)]
    exp = pipe.explain("how long do fleas live?", passages, counterfactual=True)
    ranked = pipe.rerank("how long do fleas live?", passages)
    assert [p.id for p in exp.passages] == ranked.ids
    assert [p.score for p in exp.passages] == [it.score for it in ranked.items]
    windows = {p.id: p.window for p in exp.passages}
    assert windows == {"p0": 0, "p1": 0, "p2": 0, "p3": 1, "p4": 1, "p5": 1, "p6": 2}
    # A one-passage window is probed in one order only; the others in one or two (the adaptive rule).
    assert len(next(p for p in exp.passages if p.id == "p6").readings) == 1
    assert len(exp.facts["prompts"]) == ranked.info["prompts"] == 3 + ranked.info["second_order"]["read"]
    for p in exp.passages:
        assert len(p.readings) == sum(r["window"] == p.window for r in exp.facts["prompts"])
    cf = exp.counterfactual
    assert cf is not None and cf.id == exp.passages[0].id and cf.slot_after != cf.slot_before


def test_explain_payload_for_the_service(pipe):
    docs = ["Fleas live 2-3 months.", {"text": "Cats host fleas.", "id": "c"}]
    out = explain_payload(pipe, "flea life cycle", docs)
    assert [p["id"] for p in out["explanation"]["passages"]].count("c") == 1
    assert "html" not in out
    with pytest.raises(ValueError, match="documents"):
        explain_payload(pipe, "q", [])


def test_explain_refuses_a_non_attention_engine(smol_model):
    cfg = load_config("default")
    cfg = cfg.model_copy(update={"probe": cfg.probe.model_copy(update={"engine": "identity"})})
    with pytest.raises(ValueError, match="attention"):
        Pipeline(cfg, model=smol_model).explain("q", ["a passage"])


def _browser_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


@needs_chromium
def test_page_renders_sorts_and_toggles_in_chromium(dl19_explained, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    exp, ranked = dl19_explained
    page = tmp_path / "report.html"
    exp.to_html(page)
    assert "http://" not in page.read_text().replace("http://www.w3.org/2000/svg", "")
    png = tmp_path / "shot.png"
    with chromium(1400, 1800) as d:
        d.get(page.as_uri())
        wait_ready(d)
        assert _browser_errors(d) == []
        d.save_screenshot(str(png))
        img = np.asarray(Image.open(png).convert("RGB")).astype(int)
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        orange = (r > 200) & (g > 60) & (g < 190) & (b < 140) & (r - b > 90)  # heatmap and kept rows
        blue = (b > 150) & (r < 90) & (g > 100) & (g < 160)  # the bias curve
        # How much orange shows depends on which passages rank first (their heatmaps come first): with
        # the fitted fusion the top three are lighter-shaded ones, ~1,900 px (2,000+ before); a page
        # without heatmaps or kept-row marks has none.
        assert orange.sum() > 1500, "no heatmap colours in the screenshot"
        assert blue.sum() > 200, "no bias curve in the screenshot"
        assert (img.sum(axis=-1) < 200).sum() > 5000, "no dark text in the screenshot"
        assert len(d.find_elements(By.CSS_SELECTOR, "#ranking tbody tr")) == 10
        assert len(d.find_elements(By.CSS_SELECTOR, "svg.bias-strip")) == ranked.info["prompts"]

        # The toggle recolours the tokens and relabels the legend.
        span = d.find_element(By.CSS_SELECTOR, "#p-0 .tokens span.t:nth-of-type(6)")
        before = span.value_of_css_property("background-color")
        label = d.find_element(By.ID, "mode-label").text
        d.find_element(By.ID, "toggle-mode").click()
        assert d.find_element(By.ID, "mode-label").text != label
        assert d.execute_script("return document.body.dataset.mode") == "corrected"
        assert span.value_of_css_property("background-color") != before

        # Sorting by raw attention reorders the rows by that column.
        def raw_order() -> list[str]:
            return d.execute_script(
                "return Array.from(document.querySelectorAll('#ranking tbody tr')).map(r => r.dataset.id)"
            )

        assert raw_order() == [str(i) for i in range(10)]
        th = d.find_element(By.CSS_SELECTOR, '#ranking th[data-key="raw_score"]')
        th.click()
        assert th.get_attribute("aria-sort") == "descending"
        want = sorted(range(10), key=lambda i: (-exp.passages[i].raw_score, i))
        assert raw_order() == [str(i) for i in want]
        th.click()
        assert th.get_attribute("aria-sort") == "ascending"
        assert raw_order()[0] == str(want[-1])
        assert _browser_errors(d) == []


@needs_chromium
def test_hostile_text_renders_as_text_and_runs_nothing(smol_model, tmp_path):
    from selenium.webdriver.common.by import By

    pipe = _pipeline(smol_model, window_size=4)
    passages = [
        Passage(id=f"h{i}", text=t, title="<b>title</b>" if i == 0 else "") for i, t in enumerate(HOSTILE)
    ]
    exp = pipe.explain("<script>window.__pwned=1</script> how long do fleas live?", passages)
    html = exp.to_html(tmp_path / "hostile.html")
    assert "<script>window.__pwned" not in html and "<img src=x" not in html
    with chromium(1400, 1800) as d:
        d.get((tmp_path / "hostile.html").as_uri())
        wait_ready(d)
        d.execute_script("document.querySelectorAll('details.ph').forEach(x => { x.open = true; })")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(d.find_elements(By.CSS_SELECTOR, ".tokens")) < len(HOSTILE):
            time.sleep(0.1)
        assert d.execute_script("return typeof window.__pwned") == "undefined"
        assert d.find_elements(By.CSS_SELECTOR, "#app img, #app script") == []
        assert d.find_elements(By.XPATH, "//b[text()='title']") == []
        text = d.find_element(By.ID, "app").text
        assert "<script>window.__pwned=1</script> how long" in text  # the query, as text
        heat = d.find_element(By.ID, "heatmaps").text
        assert "<script>window.__pwned=1</script> fleas & ticks" in heat
        assert '<img src=x onerror="window.__pwned=1">' in heat
        assert "&amp; &lt;b&gt;not bold&lt;/b&gt; &#60;i&#62;" in heat
        assert "</script><script>window.__pwned=1</script><!--" in heat
        assert "\u05e4\u05e8\u05e2\u05d5\u05e9" in heat and "<b>title</b>" in heat
        # Invisible and direction-changing characters are shown as labelled marks.
        marks = {e.text for e in d.find_elements(By.CSS_SELECTOR, "#heatmaps .cf")}
        assert {"U+202E", "U+200B", "U+200D", "U+FEFF"} <= marks
        assert _browser_errors(d) == []
        assert d.execute_script("return typeof window.__pwned") == "undefined"


@pytest.mark.slow
def test_hundred_passages_thirty_thousand_tokens(pipe, data_dir, tmp_path, capsys):
    """100 passages of about 300 tokens (DL19 BM25 top-100, each padded with the next ones' text).

    Reports the explain call's time against the rerank inside it and the page's size; only the size is
    asserted. About a minute of model time on two CPU cores (one or two prefills per 20-passage window).
    """
    path = data_dir / "trec-dl19" / "bm25_top100.json"
    if not path.is_file():
        pytest.skip(f"DL19 BM25 run not found at {path}")
    run = json.loads(path.read_text(encoding="utf-8"))[0]
    texts = [h["content"] for h in run["hits"]]
    hits = []
    for i, h in enumerate(run["hits"]):
        long = " ".join(texts[(i + k) % len(texts)] for k in range(5))
        hits.append(Hit(passage=Passage(id=h["docid"], text=long), score=h["score"], rank=i + 1))
    # One call: the rerank inside explain() is timed on its own (facts.timings.rerank_seconds), so the
    # ratio compares the whole explanation with the very prefills it explains, on one busy machine.
    t0 = time.perf_counter()
    exp = pipe.explain(run["query"], hits)
    page = exp.to_html(tmp_path / "big.html")
    js = exp.to_json()
    t_explain = time.perf_counter() - t0
    t_rerank = exp.facts["timings"]["rerank_seconds"]
    assert [p.first_stage_rank for p in exp.passages] != list(range(1, 101))  # reranked, not passed through
    tokens = sum(len(p.tokens.tokens) for p in exp.passages)
    size = len(page.encode("utf-8"))
    with capsys.disabled():
        print(
            f"\nexplain 100 passages: {tokens} passage tokens, {exp.facts['prompt_tokens']} prompt tokens "
            f"over {len(exp.facts['prompts'])} prompts; rerank {t_rerank:.2f} s, explain (that rerank + "
            f"record + page + JSON) {t_explain:.2f} s = {t_explain / t_rerank:.2f}x; building the record "
            f"after the rerank {exp.facts['timings']['explain_seconds']:.3f} s; HTML {size / 1e6:.2f} MB, "
            f"JSON {len(js.encode('utf-8')) / 1e6:.2f} MB; token rows kept "
            f"{exp.facts['token_rows_bytes'] / 2**20:.2f} MiB"
        )
    assert tokens > 28_000
    assert size < 5_000_000
