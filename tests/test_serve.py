"""The rerank HTTP service, end to end: real uvicorn servers on 127.0.0.1, the real embedded model, the
official Cohere SDK, LangChain's CohereRerank and plain httpx (TEI).

One inference worker (one model) is shared by the module's servers; each server has its own limits.
The SIGTERM drain runs ``python -m rerank.serve`` in a subprocess.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from rerank.serve.app import create_app, new_worker, relevance_score
from rerank.serve.runner import InferenceWorker
from rerank.serve.settings import ServeSettings

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUERY = "What is the capital of France?"
DOCS = [
    "Berlin is the capital of Germany.",
    "Paris is the capital and largest city of France.",
    "The Eiffel Tower is a landmark in Paris.",
    "Cats sleep for most of the day.",
]
EXAMPLE_ADDRESS = "http://127.0.0.1:8080"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until(cond: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class _Server:
    """A uvicorn server in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.state.serve
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _wait_until(lambda: self.server.started, "the server to start", 60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def worker() -> Iterator[InferenceWorker]:
    w = new_worker(ServeSettings()).start()
    assert w.loaded.wait(300), "the model did not load"
    assert w.state == "ready", w.error
    yield w
    w.stop()


def _serve(worker: InferenceWorker, **settings: Any) -> Iterator[_Server]:
    srv = _Server(create_app(ServeSettings(**settings), worker=worker))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def main(worker: InferenceWorker) -> Iterator[_Server]:
    """API key, 200 documents at most, room for the concurrency test."""
    yield from _serve(worker, api_key=KEY, max_documents=200, max_concurrent_requests=64)


@pytest.fixture(scope="module")
def open_server(worker: InferenceWorker) -> Iterator[_Server]:
    """No API key (the documented examples)."""
    yield from _serve(worker)


@pytest.fixture(scope="module")
def tight(worker: InferenceWorker) -> Iterator[_Server]:
    """One request at a time, 1 ms of queueing allowed."""
    yield from _serve(worker, max_concurrent_requests=1, max_queue_ms=1)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120) as c:
        yield c


def _in_process(worker: InferenceWorker, query: str, docs: list[str]) -> list[tuple[int, float]]:
    """(index, relevance_score) best first, from ``Pipeline.rerank`` run on the worker's thread."""
    ranked = worker.call(lambda pipe: pipe.rerank(query, docs), timeout=300)
    return [(int(it.passage.id), relevance_score(it.score)) for it in ranked.items]


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """Same indices in the same order, scores equal to 1e-9."""
    return [i for i, _ in got] == [i for i, _ in want] and all(
        abs(a - b) <= 1e-9 for (_, a), (_, b) in zip(got, want, strict=True)
    )


def _pairs(body: dict[str, Any]) -> list[tuple[int, float]]:
    return [(r["index"], r["relevance_score"]) for r in body["results"]]


def _assert_sorted(scores: list[float]) -> None:
    assert scores == sorted(scores, reverse=True)


def _assert_envelope(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def _long_docs(n: int) -> list[str]:
    """``n`` distinct short passages (about 15 tokens each): enough windows to keep the model busy."""
    return [f"Document {i} talks about rivers, mountains and the weather in spring." for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# The score mapping
# ---------------------------------------------------------------------------------------------------


def test_relevance_score_is_a_fixed_monotone_squashing() -> None:
    xs = [-1e6, -40.0, -2.0, -0.5, 0.0, 0.5, 2.0, 40.0, 1e6]
    ys = [relevance_score(x) for x in xs]
    assert all(0.0 <= y <= 1.0 for y in ys)
    assert ys == sorted(ys)
    assert relevance_score(0.0) == 0.5
    assert relevance_score(1.0) == pytest.approx(1 / (1 + math.exp(-1)))


def test_one_document_scores_one_half_not_zero(main: _Server, client: httpx.Client) -> None:
    body = {"model": "m", "query": QUERY, "documents": ["Paris is the capital of France."]}
    resp = client.post(f"{main.url}/v2/rerank", json=body, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert _pairs(resp.json()) == [(0, 0.5)]


def test_identical_documents_tie(main: _Server, client: httpx.Client) -> None:
    body = {
        "query": QUERY,
        "documents": ["Paris is in France.", "Paris is in France."],
        "attn": {"raw_scores": True},
    }
    res = client.post(f"{main.url}/v2/rerank", json=body, headers=AUTH).json()["results"]
    assert all(0.0 < r["relevance_score"] < 1.0 for r in res)


# ---------------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------------


def test_cohere_v2_sdk(main: _Server, worker: InferenceWorker) -> None:
    import cohere

    co = cohere.ClientV2(base_url=main.url, api_key=KEY)
    resp = co.rerank(model="attn-rerank", query=QUERY, documents=DOCS, top_n=3)
    got = [(r.index, r.relevance_score) for r in resp.results]
    assert len(got) == 3
    _assert_sorted([s for _, s in got])
    assert _same(got, _in_process(worker, QUERY, DOCS)[:3])
    assert resp.meta.api_version.version == "2"
    assert resp.meta.billed_units.search_units == 1
    assert resp.meta.tokens.input_tokens > 0


def test_cohere_v1_sdk_with_documents(main: _Server) -> None:
    import cohere

    co = cohere.Client(base_url=main.url, api_key=KEY)
    resp = co.rerank(
        model="attn-rerank", query=QUERY, documents=[{"text": d} for d in DOCS], return_documents=True
    )
    assert sorted(r.index for r in resp.results) == list(range(len(DOCS)))
    _assert_sorted([r.relevance_score for r in resp.results])
    for r in resp.results:
        assert r.document.text == DOCS[r.index]


def test_langchain_cohere_rerank(main: _Server) -> None:
    import cohere
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    rr = CohereRerank(client=cohere.ClientV2(base_url=main.url, api_key=KEY), model="attn-rerank", top_n=2)
    docs = [Document(page_content=d, metadata={"i": i}) for i, d in enumerate(DOCS)]
    out = rr.compress_documents(docs, QUERY)
    assert len(out) == 2
    _assert_sorted([d.metadata["relevance_score"] for d in out])
    assert all(d.page_content == DOCS[d.metadata["i"]] for d in out)


def test_tei_rerank_scores_every_text(main: _Server, client: httpx.Client, worker: InferenceWorker) -> None:
    body = {"query": QUERY, "texts": DOCS, "return_text": True}
    resp = client.post(f"{main.url}/rerank", json=body, headers=AUTH)
    assert resp.status_code == 200, resp.text
    items = resp.json()
    assert isinstance(items, list)
    assert sorted(it["index"] for it in items) == list(range(len(DOCS)))
    _assert_sorted([it["score"] for it in items])
    assert all(it["text"] == DOCS[it["index"]] for it in items)
    assert _same([(it["index"], it["score"]) for it in items], _in_process(worker, QUERY, DOCS))
    raw = client.post(f"{main.url}/rerank", json={**body, "raw_scores": True}, headers=AUTH).json()
    assert [relevance_score(it["score"]) for it in raw] == pytest.approx([it["score"] for it in items])
    assert (
        "text"
        not in client.post(f"{main.url}/rerank", json={"query": QUERY, "texts": DOCS}, headers=AUTH).json()[0]
    )


def test_v1_leaves_document_out_unless_asked(main: _Server, client: httpx.Client) -> None:
    for path in ("/v1/rerank", "/rerank"):
        body = {"model": "jina-reranker-v2", "query": QUERY, "documents": DOCS[:2]}
        res = client.post(f"{main.url}{path}", json=body, headers=AUTH).json()
        assert all(set(r) == {"index", "relevance_score"} for r in res["results"])
        assert res["model"] == "jina-reranker-v2"
        assert res["usage"]["total_tokens"] > 0


def test_attn_options_raw_scores_and_prune(
    main: _Server, client: httpx.Client, worker: InferenceWorker
) -> None:
    body = {"query": QUERY, "documents": DOCS, "attn": {"raw_scores": True}}
    res = client.post(f"{main.url}/v2/rerank", json=body, headers=AUTH).json()["results"]
    ranked = worker.call(lambda pipe: pipe.rerank(QUERY, DOCS), timeout=300)
    by_index = {int(it.passage.id): it for it in ranked.items}
    for r in res:
        it = by_index[r["index"]]
        assert r["attn"]["score"] == pytest.approx(it.score)
        assert r["attn"]["raw_score"] == pytest.approx(it.raw_score)
        assert r["attn"]["calibrated_score"] == pytest.approx(it.calibrated_score)
        assert r["attn"]["prompt_position"] == it.prompt_position
    pruned = {"query": QUERY, "documents": DOCS, "attn": {"prune": "top_k", "top_k": 2}}
    assert len(client.post(f"{main.url}/v2/rerank", json=pruned, headers=AUTH).json()["results"]) == 2
    bad = {"query": QUERY, "documents": DOCS, "attn": {"prune": "nope"}}
    err = _assert_envelope(client.post(f"{main.url}/v2/rerank", json=bad, headers=AUTH), 422)
    assert err["param"] == "attn.prune" and "top_k" in err["message"]


def test_many_documents_are_windowed_like_the_python_api(
    main: _Server, client: httpx.Client, worker: InferenceWorker
) -> None:
    docs = [
        f"Passage {i} about {'France' if i % 7 == 0 else 'weather'} and city number {i}." for i in range(45)
    ]
    # Three documents over the 300-token budget: the probe cuts them, and the answer still equals the API's.
    for i in (3, 21, 40):
        docs[i] = " ".join(f"Paris France capital river{j} bridge{i}" for j in range(120))
    resp = client.post(f"{main.url}/v2/rerank", json={"query": QUERY, "documents": docs}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    got = _pairs(resp.json())
    want = _in_process(worker, QUERY, docs)
    assert [i for i, _ in got] == [i for i, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want])


# ---------------------------------------------------------------------------------------------------
# Documented examples, run verbatim (docs/serve.md and README.md)
# ---------------------------------------------------------------------------------------------------


def _examples(kind: str) -> list[tuple[str, str]]:
    found = []
    for name in ("docs/serve.md", "README.md"):
        path = REPO / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(rf"<!-- serve-example: {kind} -->\s*```\w*\n(.*?)```", text, re.S):
            found.append((name, m.group(1)))
    return found


def test_documented_examples_exist() -> None:
    for kind in ("curl", "cohere"):
        assert {name for name, _ in _examples(kind)} == {"docs/serve.md", "README.md"}, kind


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_documented_curl_example(open_server: _Server) -> None:
    for name, script in _examples("curl"):
        out = subprocess.run(
            ["bash", "-c", script.replace(EXAMPLE_ADDRESS, open_server.url)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        body = json.loads(out)
        assert len(body["results"]) == 2, name
        _assert_sorted([r["relevance_score"] for r in body["results"]])


def test_documented_cohere_example(open_server: _Server) -> None:
    for name, code in _examples("cohere"):
        buf = io.StringIO()
        with redirect_stdout(buf):
            exec(compile(code.replace(EXAMPLE_ADDRESS, open_server.url), name, "exec"), {})
        lines = buf.getvalue().split("\n")
        assert len([ln for ln in lines if ln.strip()]) == 2, (name, buf.getvalue())


# ---------------------------------------------------------------------------------------------------
# Operational routes
# ---------------------------------------------------------------------------------------------------


def test_health_info_metrics_docs(main: _Server, client: httpx.Client) -> None:
    assert client.get(f"{main.url}/health").json() == {"status": "ok"}
    info = client.get(f"{main.url}/info", headers=AUTH).json()
    assert info["model"]["dtype"] in {"bfloat16", "float32"}
    assert info["calibration"]["curve"]["lengths"]
    assert info["limits"]["max_documents"] == 200
    assert "0.5" in info["relevance_score"]
    metrics = client.get(f"{main.url}/metrics").text
    for name in (
        "attn_rerank_requests_total",
        "attn_rerank_queue_seconds",
        "attn_rerank_inference_seconds",
        "attn_rerank_documents_per_request",
        "attn_rerank_tokens_per_request",
    ):
        assert name in metrics
    assert 'route="/health",status="200"' in metrics
    # With a key, the API description needs it too (no --public-docs here).
    _assert_envelope(client.get(f"{main.url}/docs"), 401)
    _assert_envelope(client.get(f"{main.url}/openapi.json"), 401)
    page = client.get(f"{main.url}/docs", headers=AUTH)
    assert page.status_code == 200
    # Swagger UI from this server, never a CDN: /docs works offline.
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("/docs/assets/") for a in assets), assets
    for a in assets:
        assert client.get(f"{main.url}{a}", headers=AUTH).status_code == 200, a
    schema = client.get(f"{main.url}/openapi.json", headers=AUTH).json()
    assert {"/v2/rerank", "/v1/rerank", "/rerank", "/health", "/info", "/metrics"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert schema["security"] == [{"bearer": []}]


def test_public_docs_opens_the_description_not_the_api(worker: InferenceWorker, client: httpx.Client) -> None:
    for server in _serve(worker, api_key=KEY, public_docs=True):
        assert client.get(f"{server.url}/docs").status_code == 200
        assert client.get(f"{server.url}/openapi.json").status_code == 200
        body = {"query": "q", "documents": ["d"]}
        _assert_envelope(client.post(f"{server.url}/v2/rerank", json=body), 401)


def test_health_503_while_loading_and_after_a_failed_load(
    worker: InferenceWorker, client: httpx.Client
) -> None:
    # A second worker over the same loaded pipeline: it is started only after the first checks.
    late = InferenceWorker(lambda: worker.target)
    srv = _Server(create_app(ServeSettings(), worker=late, start_worker=False))
    try:
        h = client.get(f"{srv.url}/health")
        assert h.status_code == 503 and h.json()["status"] == "idle"
        _assert_envelope(client.post(f"{srv.url}/v2/rerank", json={"query": "q", "documents": ["d"]}), 503)
        late.start()
        assert late.loaded.wait(60)
        assert client.get(f"{srv.url}/health").status_code == 200
    finally:
        srv.stop()
        late.stop()

    def broken() -> Any:
        raise FileNotFoundError("no such config: nowhere.yaml")

    failed = InferenceWorker(broken)
    srv = _Server(create_app(ServeSettings(), worker=failed))
    try:
        assert failed.loaded.wait(60)
        h = client.get(f"{srv.url}/health")
        assert h.status_code == 503 and h.json()["status"] == "failed"
        assert "nowhere.yaml" in h.json()["error"]["message"]
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------
# Error paths
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", "empty_body"),
        (b"   ", "empty_body"),
        (b'{"query": "q", "documents": ["\xff\xfe"]}', "invalid_encoding"),
        (b'{"query": "q", "documents": [', "invalid_json"),
        (b'["q", "d"]', "invalid_json"),
        (b'{"query": "q", "documents": ["d"], "top_n": NaN}', "invalid_json"),
        (b'{"query": "  ", "documents": ["d"]}', "empty_query"),
        (b'{"query": "q", "documents": []}', "empty_documents"),
        (b'{"query": "q", "documents": ["a", " "]}', "empty_document"),
    ],
)
def test_400(main: _Server, client: httpx.Client, content: bytes, code: str) -> None:
    for path in ("/v2/rerank", "/v1/rerank"):
        _assert_envelope(client.post(f"{main.url}{path}", content=content, headers=AUTH), 400, code)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": "q", "documents": "one string"}, "documents"),
        ({"query": "q", "documents": ["d", 3]}, "documents[1]"),
        ({"query": 7, "documents": ["d"]}, "query"),
        ({"documents": ["d"]}, "query"),
        ({"query": "q", "documents": ["d"], "top_n": 0}, "top_n"),
        ({"query": "q", "documents": ["d"], "top_n": "3"}, "top_n"),
        ({"query": "q", "documents": ["d"], "max_tokens_per_doc": 0}, "max_tokens_per_doc"),
        ({"query": "q", "documents": ["d"], "attn": {"raw_scores": "yes"}}, "attn.raw_scores"),
        ({"query": "q", "documents": ["d"], "attn": {"unknown": 1}}, "attn.unknown"),
    ],
)
def test_422(main: _Server, client: httpx.Client, body: dict[str, Any], param: str) -> None:
    err = _assert_envelope(client.post(f"{main.url}/v2/rerank", json=body, headers=AUTH), 422)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


def test_v2_takes_strings_only_v1_takes_objects(main: _Server, client: httpx.Client) -> None:
    body = {"query": QUERY, "documents": [{"text": DOCS[0]}, DOCS[1]]}
    _assert_envelope(client.post(f"{main.url}/v2/rerank", json=body, headers=AUTH), 422)
    assert client.post(f"{main.url}/v1/rerank", json=body, headers=AUTH).status_code == 200
    no_text = {"query": QUERY, "documents": [{"title": "x"}]}
    err = _assert_envelope(client.post(f"{main.url}/v1/rerank", json=no_text, headers=AUTH), 422)
    assert err["param"] == "documents[0].text"
    fields = {
        "query": QUERY,
        "documents": [{"title": "Paris", "body": "capital"}],
        "rank_fields": ["title", "body"],
    }
    assert client.post(f"{main.url}/v1/rerank", json=fields, headers=AUTH).status_code == 200


def test_lone_surrogates_are_400_on_every_rerank_route(main: _Server, client: httpx.Client) -> None:
    """JSON can carry a lone surrogate (a valid Python str, not valid Unicode): a 400 naming the field,
    never a 500 from the tokenizer."""
    doc = b'{"query": "q", "documents": ["a\\ud800b", "Paris"]}'
    query = b'{"query": "q\\udfff", "documents": ["Paris"]}'
    for path in ("/v2/rerank", "/v1/rerank"):
        err = _assert_envelope(
            client.post(f"{main.url}{path}", content=doc, headers=AUTH), 400, "invalid_text"
        )
        assert err["param"] == "documents[0]" and "U+D800" in err["message"]
        _assert_envelope(client.post(f"{main.url}{path}", content=query, headers=AUTH), 400, "invalid_text")
    tei = client.post(f"{main.url}/rerank", content=b'{"query": "q", "texts": ["\\ud800"]}', headers=AUTH)
    assert tei.status_code == 400 and set(tei.json()) == {"error", "error_type"}
    assert client.get(f"{main.url}/health").status_code == 200


def test_v1_returns_the_document_as_sent_with_rank_fields(main: _Server, client: httpx.Client) -> None:
    docs = [{"title": "Germany", "body": "Berlin is its capital.", "id": "de"}, "Paris is in France."]
    body = {"query": QUERY, "documents": docs, "rank_fields": ["title"], "return_documents": True}
    body["documents"] = [docs[0], {"title": "France", "body": "Paris is its capital."}]
    res = client.post(f"{main.url}/v1/rerank", json=body, headers=AUTH).json()
    by_index = {r["index"]: r["document"] for r in res["results"]}
    assert by_index[0] == docs[0], "the object as sent, not the 'title: Germany' text that was ranked"
    plain = {"query": QUERY, "documents": DOCS[:2], "return_documents": True}
    res = client.post(f"{main.url}/v1/rerank", json=plain, headers=AUTH).json()
    assert {r["index"]: r["document"]["text"] for r in res["results"]} == {0: DOCS[0], 1: DOCS[1]}


def test_404_and_405_answer_in_the_error_envelope(main: _Server, client: httpx.Client) -> None:
    err = _assert_envelope(client.get(f"{main.url}/no/such/route", headers=AUTH), 404, "not_found")
    assert "/v2/rerank" in err["message"]
    _assert_envelope(client.get(f"{main.url}/v2/rerank", headers=AUTH), 405, "method_not_allowed")
    tei = client.get(f"{main.url}/rerank", headers=AUTH)
    assert tei.status_code == 405 and set(tei.json()) == {"error", "error_type"}


def test_10000_documents_over_the_limit_is_422(main: _Server, client: httpx.Client) -> None:
    body = {"query": "q", "documents": ["d"] * 10_000}
    err = _assert_envelope(
        client.post(f"{main.url}/v2/rerank", json=body, headers=AUTH), 422, "too_many_documents"
    )
    assert "--max-documents 200" in err["message"]


def test_401(main: _Server, client: httpx.Client) -> None:
    body = {"query": "q", "documents": ["d"]}
    _assert_envelope(client.post(f"{main.url}/v2/rerank", json=body), 401, "unauthorized")
    _assert_envelope(
        client.post(f"{main.url}/v1/rerank", json=body, headers={"Authorization": "Bearer no"}), 401
    )
    _assert_envelope(client.get(f"{main.url}/info"), 401)
    # The scheme is case-insensitive; the key is not.
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert client.get(f"{main.url}/info", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    _assert_envelope(client.get(f"{main.url}/info", headers={"Authorization": f"Bearer {KEY.upper()}"}), 401)
    _assert_envelope(client.get(f"{main.url}/info", headers={"Authorization": f"Basic {KEY}"}), 401)
    tei = client.post(f"{main.url}/rerank", json={"query": "q", "texts": ["d"]})
    assert tei.status_code == 401 and set(tei.json()) == {"error", "error_type"}
    assert client.get(f"{main.url}/health").status_code == 200
    assert client.get(f"{main.url}/metrics").status_code == 200


def test_413_ten_megabyte_body(main: _Server, client: httpx.Client) -> None:
    big = json.dumps({"query": "q", "documents": ["x" * 1000] * 10_000}).encode()
    assert len(big) > 10_000_000
    _assert_envelope(
        client.post(f"{main.url}/v2/rerank", content=big, headers=AUTH), 413, "payload_too_large"
    )
    tei = client.post(f"{main.url}/rerank", content=big, headers=AUTH)
    assert tei.status_code == 413 and tei.json()["error_type"] == "Validation"
    # The server is unharmed.
    assert (
        client.post(
            f"{main.url}/v2/rerank", json={"query": "q", "documents": ["d"]}, headers=AUTH
        ).status_code
        == 200
    )


def test_one_megabyte_document_is_truncated_and_reported(main: _Server, client: httpx.Client) -> None:
    doc = "Paris is the capital of France. " * 32_768
    assert len(doc.encode()) >= 1_000_000
    body = {"query": QUERY, "documents": [doc, DOCS[0]], "attn": {"raw_scores": True}}
    resp = client.post(f"{main.url}/v2/rerank", json=body, headers=AUTH)
    assert resp.status_code == 200, resp.text
    res = resp.json()
    assert "truncated to 300 tokens (indices 0)" in res["meta"]["warnings"][0]
    assert {r["index"]: r["attn"]["truncated"] for r in res["results"]} == {0: True, 1: False}
    assert res["meta"]["tokens"]["input_tokens"] < 400
    short = client.post(f"{main.url}/v2/rerank", json={**body, "max_tokens_per_doc": 5}, headers=AUTH).json()[
        "meta"
    ]["warnings"][0]
    assert "2 document(s) were truncated to 5 tokens" in short


def test_tei_truncate(main: _Server, client: httpx.Client) -> None:
    long = "word " * 2000
    tei = client.post(f"{main.url}/rerank", json={"query": "q", "texts": [long, "short"]}, headers=AUTH)
    assert tei.status_code == 413 and set(tei.json()) == {"error", "error_type"}
    ok = client.post(
        f"{main.url}/rerank", json={"query": "q", "texts": [long, "short"], "truncate": True}, headers=AUTH
    )
    assert ok.status_code == 200 and len(ok.json()) == 2
    empty = client.post(f"{main.url}/rerank", json={"query": "q", "texts": []}, headers=AUTH)
    assert empty.status_code == 400 and empty.json()["error_type"] == "Validation"


def _occupy(srv: _Server, headers: dict[str, str] | None = None) -> tuple[threading.Thread, list[int]]:
    """Send one slow request to ``srv`` in a thread; returns once the server has admitted it."""
    status: list[int] = []
    before = srv.state.gate.active
    body = {"query": QUERY, "documents": _long_docs(40)}

    def go() -> None:
        with httpx.Client(timeout=300) as c:
            status.append(c.post(f"{srv.url}/v2/rerank", json=body, headers=headers or {}).status_code)

    t = threading.Thread(target=go)
    t.start()
    _wait_until(lambda: srv.state.gate.active > before or bool(status), "the slow request to be admitted")
    return t, status


def test_429_with_retry_after(tight: _Server, client: httpx.Client) -> None:
    t, status = _occupy(tight)
    resp = client.post(f"{tight.url}/v2/rerank", json={"query": "q", "documents": ["d"]})
    t.join(300)
    assert status == [200]
    _assert_envelope(resp, 429, "too_many_requests")
    assert int(resp.headers["Retry-After"]) >= 1


def test_504_after_waiting_too_long(main: _Server, tight: _Server, client: httpx.Client) -> None:
    # The slow request holds the one model through another server; tight's request may queue 1 ms.
    t, status = _occupy(main, AUTH)
    resp = client.post(f"{tight.url}/v2/rerank", json={"query": "q", "documents": ["d"]})
    t.join(300)
    assert status == [200]
    _assert_envelope(resp, 504, "queue_timeout")


def test_work_for_clients_that_left_is_dropped_or_stopped(
    main: _Server, client: httpx.Client, worker: InferenceWorker
) -> None:
    """Six clients that give up while another request holds the model: none of their jobs runs (a
    running job's stop at a window boundary is tested in test_fusion.py: with the cascade the default
    reads one window, so it has no later boundary to stop at)."""

    def abandoned() -> float:
        text = client.get(f"{main.url}/metrics").text
        return float(re.search(r"^attn_rerank_abandoned_requests_total (\S+)$", text, re.M).group(1))

    before = abandoned()
    started = worker.jobs_started
    t, status = _occupy(main, AUTH)
    body = {"query": QUERY, "documents": DOCS}
    for _ in range(6):
        with pytest.raises(httpx.TimeoutException), httpx.Client(timeout=0.3) as quick:
            quick.post(f"{main.url}/v2/rerank", json=body, headers=AUTH)
    t.join(300)
    assert status == [200]
    _wait_until(lambda: main.state.gate.active == 0, "the abandoned requests to leave the gate")
    assert worker.jobs_started == started + 1, "only the request whose client waited ran"
    assert abandoned() == before + 6
    assert client.post(f"{main.url}/v2/rerank", json=body, headers=AUTH).status_code == 200


# ---------------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------------


def test_concurrent_mixed_requests_match_single_answers(main: _Server, client: httpx.Client) -> None:
    valid = [
        ("/v2/rerank", {"model": "m", "query": QUERY, "documents": DOCS}),
        ("/v2/rerank", {"query": "Which animal sleeps a lot?", "documents": DOCS[::-1], "top_n": 2}),
        (
            "/v1/rerank",
            {
                "query": "Eiffel Tower location",
                "documents": [{"text": d} for d in DOCS[1:]],
                "return_documents": True,
            },
        ),
        ("/rerank", {"query": QUERY, "texts": DOCS[:3]}),
    ]
    invalid: list[tuple[str, bytes]] = [
        ("/v2/rerank", b'{"query": "q", "documents": ['),
        ("/v2/rerank", b'{"query": "q", "documents": [], "top_n": 1}'),
        ("/v2/rerank", json.dumps({"query": "q", "documents": ["d"], "top_n": -1}).encode()),
        ("/v1/rerank", b"\xff\xfe\xfd"),
        ("/rerank", json.dumps({"query": "q", "texts": "not a list"}).encode()),
    ]

    def strip(body: Any) -> Any:
        # Scores rounded far below any meaningful difference; index order and documents compared exactly.
        if isinstance(body, dict):
            return [(r["index"], round(r["relevance_score"], 9), r.get("document")) for r in body["results"]]
        return [(r["index"], round(r["score"], 9)) for r in body]

    single = [strip(client.post(f"{main.url}{p}", json=b, headers=AUTH).json()) for p, b in valid]
    failures: list[str] = []

    def worker_thread(k: int) -> None:
        with httpx.Client(timeout=300) as c:
            for j in range(10):
                pick = (k * 10 + j) % (len(valid) + len(invalid))
                if pick < len(valid):
                    p, b = valid[pick]
                    r = c.post(f"{main.url}{p}", json=b, headers=AUTH)
                    if r.status_code != 200:
                        failures.append(f"valid {pick}: {r.status_code} {r.text[:200]}")
                    elif strip(r.json()) != single[pick]:
                        failures.append(f"valid {pick}: answer differs from the single-request answer")
                else:
                    p, raw = invalid[pick - len(valid)]
                    r = c.post(f"{main.url}{p}", content=raw, headers=AUTH)
                    if r.status_code not in (400, 422):
                        failures.append(f"invalid {pick}: {r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=worker_thread, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures[:5]
    metrics = client.get(f"{main.url}/metrics").text
    assert not re.search(r'attn_rerank_requests_total\{route="[^"]+",status="5\d\d"\} [1-9]', metrics)


# ---------------------------------------------------------------------------------------------------
# SIGTERM drain (subprocess)
# ---------------------------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rerank.serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--max-queue-ms",
            "600000",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(timeout=300) as c:

            def healthy() -> bool:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    return c.get(f"{url}/health").status_code == 200
                except httpx.TransportError:
                    return False

            _wait_until(healthy, "the subprocess server", 300)
            results: list[int] = []
            body = {"query": QUERY, "documents": _long_docs(40)}

            def send() -> None:
                with httpx.Client(timeout=300) as cc:
                    results.append(cc.post(f"{url}/v2/rerank", json=body).status_code)

            threads = [threading.Thread(target=send) for _ in range(4)]
            for t in threads:
                t.start()

            def admitted() -> bool:
                m = re.search(r"attn_rerank_rerank_in_flight (\d+)", c.get(f"{url}/metrics").text)
                return bool(results) or (m is not None and int(m.group(1)) >= 4)

            _wait_until(admitted, "four requests in flight", 120)
            proc.send_signal(signal.SIGTERM)
            _wait_until(lambda: c.get(f"{url}/health").status_code == 503, "draining", 60)
            late = c.post(f"{url}/v2/rerank", json={"query": "q", "documents": ["d"]})
            for t in threads:
                t.join(300)
        assert proc.wait(120) == 0
        assert results == [200, 200, 200, 200]
        _assert_envelope(late, 503, "draining")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()


# ---------------------------------------------------------------------------------------------------
# POST /explain
# ---------------------------------------------------------------------------------------------------


def test_explain_route_equals_the_rerank_and_shares_the_errors(
    main: _Server, client: httpx.Client, worker: InferenceWorker
) -> None:
    """The explain page's figures over HTTP: the same ranking as a rerank of the same documents, the
    HTML when asked, the API key and the error envelope of the other routes."""
    docs = ["Berlin is the capital of Germany.", {"text": "Paris is the capital of France.", "id": "fr"}]
    body = {"query": QUERY, "documents": docs, "html": True}
    resp = client.post(f"{main.url}/explain", json=body, headers=AUTH)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["html"].lstrip().lower().startswith("<!doctype html")
    texts = ["Berlin is the capital of Germany.", "Paris is the capital of France."]
    ranked = worker.call(lambda pipe: pipe.rerank(QUERY, texts), timeout=300)
    rows = sorted(out["explanation"]["passages"], key=lambda r: r["rank"])
    assert [r["score"] for r in rows] == pytest.approx([it.score for it in ranked.items], abs=1e-9)
    assert client.post(f"{main.url}/explain", json=body).status_code == 401
    bad = client.post(f"{main.url}/explain", json={"query": QUERY, "documents": []}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "empty_documents"
    wrong = client.post(f"{main.url}/explain", json={"query": 3, "documents": ["x"]}, headers=AUTH)
    assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "query"
