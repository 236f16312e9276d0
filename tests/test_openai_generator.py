"""The ``openai`` generator against real servers on 127.0.0.1.

* ``transformers serve`` with the embedded SmolLM2 (the dequantised cache folder the probe loads), started
  once per session: its greedy answers must equal the local transformers generator's, token for token.
* A small uvicorn endpoint that fails, stalls or counts concurrent requests on demand: what is under test
  there is this client's retry, timeout and concurrency handling, not a server.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("openai", reason="needs the openai extra: pip install 'attn-rerank[openai]'")
pytest.importorskip("fastapi", reason="the test server (`transformers serve`) needs transformers[serving]")
pytest.importorskip("uvicorn", reason="the test server (`transformers serve`) needs transformers[serving]")

from rerank.config import GeneratorConfig, RetrieverConfig, load_config  # noqa: E402
from rerank.generate import (  # noqa: E402
    GenerationError,
    OpenAIGenerator,
    TransformersGenerator,
    answer_messages,
    answer_prompt_text,
    build_generator,
)
from rerank.probe.prompt import PromptTemplate  # noqa: E402
from rerank.records import Passage  # noqa: E402

SERVER_START_LIMIT_S = 300
MAX_NEW = 24

PASSAGES = [
    Passage(id="p1", title="Hamlet", text="Hamlet is a tragedy written by William Shakespeare around 1600."),
    Passage(id="p2", title="Paris", text="Paris is the capital and largest city of France."),
    Passage(id="p3", title="Danube", text="The Danube flows through ten countries into the Black Sea."),
]
CASES = [
    ("Who wrote Hamlet?", PASSAGES),
    ("What is the capital of France?", list(reversed(PASSAGES))),
    ("Where does the Danube end?", PASSAGES[2:]),
    ("What is the capital of France?", []),  # closed book: no passage block at all
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_cfg(base_url: str, **kw: Any) -> GeneratorConfig:
    fields = {"name": "openai", "base_url": base_url, "model": "stub", "max_new_tokens": MAX_NEW}
    return GeneratorConfig(**(fields | kw))


# -- config ------------------------------------------------------------------------------------------


def test_config_requires_url_and_model() -> None:
    with pytest.raises(ValueError, match="needs base_url"):
        GeneratorConfig(name="openai", model="m")
    with pytest.raises(ValueError, match=r"needs model.*127\.0\.0\.1:8000/v1/models"):
        GeneratorConfig(name="openai", base_url="http://127.0.0.1:8000/v1")
    with pytest.raises(ValueError, match="http:// or https://"):
        GeneratorConfig(name="openai", base_url="127.0.0.1:8000/v1", model="m")
    with pytest.raises(ValueError, match="greedily"):
        GeneratorConfig(name="transformers", temperature=0.7)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        GeneratorConfig(name="openai", base_url="http://127.0.0.1:1/v1", model="m", api_key="secret")
    with pytest.raises(ValueError):
        served_cfg("http://127.0.0.1:1/v1", concurrency=0)


def test_shipped_served_config() -> None:
    cfg = load_config("vllm-served")
    assert cfg.generator.name == "openai"
    assert cfg.generator.base_url == "http://127.0.0.1:8000/v1"
    assert cfg.generator.temperature == 0.0
    # Everything but the generator is the tuned default.
    default = load_config("default")
    assert cfg.model_copy(update={"generator": default.generator}) == default


def test_missing_api_key_variable(smol_model, monkeypatch) -> None:
    monkeypatch.delenv("ATTN_RERANK_TEST_KEY", raising=False)
    cfg = served_cfg("http://127.0.0.1:1/v1", api_key_env="ATTN_RERANK_TEST_KEY")
    with pytest.raises(ValueError, match="ATTN_RERANK_TEST_KEY"):
        OpenAIGenerator(smol_model, cfg)


# -- the prompt --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(len(CASES)))
def test_messages_render_to_the_local_prompt(smol_model, case: int) -> None:
    """The messages sent, rendered with the model's chat template, are the local generator's prompt."""
    question, passages = CASES[case]
    tok, template = smol_model.tokenizer, PromptTemplate()
    instruction = GeneratorConfig().instruction
    msgs = answer_messages(tok, question, passages, template=template, instruction=instruction)
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    local = answer_prompt_text(tok, question, passages, template=template, instruction=instruction)
    assert rendered == local
    # No system line of our own: the chat template's default one, on both sides.
    assert [m["role"] for m in msgs] == (["system"] if template.system is not None else []) + ["user"]
    # The context order is the order given.
    where = [msgs[-1]["content"].find(p.text) for p in passages]
    assert where == sorted(where) and all(w >= 0 for w in where)


def test_passages_are_cut_as_the_probe_cuts_them(smol_model) -> None:
    long = Passage(id="long", text=" ".join(["word"] * 500))
    tok = smol_model.tokenizer
    msgs = answer_messages(
        tok, "q?", [long], template=PromptTemplate(), instruction="i", max_passage_tokens=10
    )
    local = answer_prompt_text(
        tok, "q?", [long], template=PromptTemplate(), instruction="i", max_passage_tokens=10
    )
    assert msgs[-1]["content"].count("word") < 20
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == local


# -- a real server: transformers serve ---------------------------------------------------------------


@pytest.fixture(scope="session")
def hf_server(smol_model, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """``transformers serve`` on the embedded model's local folder, in the probe's dtype; ``(base_url,
    model name)``. Offline: the folder is the dequantised copy ``load_model`` cached."""
    folder = str(smol_model.model.name_or_path)
    if not Path(folder, "config.json").is_file():
        pytest.fail(f"the embedded model was not loaded from a local folder: {folder!r}")
    port = free_port()
    log = tmp_path_factory.mktemp("hf-serve") / "server.log"
    cmd = [
        sys.executable, "-m", "transformers.cli.transformers", "serve", folder,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", smol_model.dtype, "--device", "cpu", "--log-level", "warning",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + SERVER_START_LIMIT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                tail = log.read_text()[-3000:]
                pytest.fail(f"transformers serve not ready in {SERVER_START_LIMIT_S} s:\n{tail}")
            time.sleep(0.5)
        yield f"{base}/v1", folder
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="session")
def local_answers(smol_model) -> list[str]:
    gen = TransformersGenerator(smol_model, GeneratorConfig(max_new_tokens=MAX_NEW))
    # One at a time: no padding, as each request on the server.
    return [gen.generate(q, ps) for q, ps in CASES]


@pytest.mark.slow
def test_served_answers_equal_local(smol_model, hf_server, local_answers) -> None:
    base_url, name = hf_server
    gen = build_generator(served_cfg(base_url, model=name), smol_model)
    assert isinstance(gen, OpenAIGenerator)
    tok = smol_model.tokenizer
    for (question, passages), local in zip(CASES, local_answers, strict=True):
        out = gen.generate_with_info(question, passages)
        assert out.text == local, question
        assert out.text  # the comparison is not between two empty strings
        # The server tokenised exactly the prompt the local generator reads.
        prompt = answer_prompt_text(
            tok, question, passages, template=PromptTemplate(), instruction=gen.cfg.instruction
        )
        assert out.info["prompt_tokens"] == len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert 0 < out.info["completion_tokens"] <= MAX_NEW
        assert out.info["total_tokens"] == out.info["prompt_tokens"] + out.info["completion_tokens"]
        assert out.info["attempts"] == 1 and out.info["latency_s"] > 0
    gen.close()


@pytest.mark.slow
def test_served_batch_and_async_equal_local(smol_model, hf_server, local_answers) -> None:
    base_url, name = hf_server
    gen = OpenAIGenerator(smol_model, served_cfg(base_url, model=name, concurrency=2))
    assert gen.generate_batch([q for q, _ in CASES], [ps for _, ps in CASES]) == local_answers

    async def both() -> list[str]:
        return list(await asyncio.gather(*(gen.agenerate(q, ps) for q, ps in CASES)))

    assert asyncio.run(both()) == local_answers
    assert asyncio.run(both()) == local_answers  # a second event loop gets its own async client
    gen.close()


@pytest.mark.slow
def test_pipeline_run_arun_run_batch(smol_model, hf_server) -> None:
    from rerank.pipeline import Pipeline

    base_url, name = hf_server
    base = load_config("default")
    base = base.model_copy(update={"retriever": RetrieverConfig(name="bm25", top_k=3)})
    served = base.model_copy(update={"generator": served_cfg(base_url, model=name, concurrency=2)})
    local = base.model_copy(update={"generator": GeneratorConfig(max_new_tokens=MAX_NEW)})
    questions = ["Who wrote Hamlet?", "What is the capital of France?", "Where does the Danube end?"]
    pipe = Pipeline(served, model=smol_model).index(PASSAGES, show_progress=False)
    ref = Pipeline(local, model=smol_model).index(PASSAGES, show_progress=False)

    expected = [ref.run(q) for q in questions]
    got = pipe.run(questions[0])
    assert got.text == expected[0].text
    assert got.passages_used == expected[0].passages_used
    assert set(got.timings) == {"retrieve", "rerank", "select", "generate"}

    batch = pipe.run_batch(questions, show_progress=False)
    assert [a.text for a in batch] == [a.text for a in expected]
    assert [a.query.text for a in batch] == questions

    async def arun_all() -> list[Any]:
        return list(await asyncio.gather(*(pipe.arun(q) for q in questions)))

    answers = asyncio.run(arun_all())
    assert [a.text for a in answers] == [a.text for a in expected]
    assert [a.passages_used for a in answers] == [a.passages_used for a in expected]
    # Token usage and latency reach the answer, from every path; the local generator reports none.
    for a in (got, *batch, *answers):
        gen = a.info["generation"]
        assert gen["prompt_tokens"] > 0 and gen["completion_tokens"] > 0 and gen["attempts"] == 1
        assert gen["latency_s"] > 0
    assert "generation" not in expected[0].info


# -- client behaviour against a stub endpoint (retries, timeouts, concurrency) ------------------------


class Stub:
    """A chat-completions endpoint whose failures are set per test; counts requests and overlap."""

    def __init__(self) -> None:
        self.epoch = 0
        self.reset()
        self.stopping = False

    def reset(self, *, fail_first: int = 0, status: int = 500, delay_s: float = 0.0, **headers: str) -> None:
        # A new epoch ends requests a previous test left stalled, so they cannot touch these counts.
        self.epoch += 1
        self.fail_first, self.status, self.delay_s, self.headers = fail_first, status, delay_s, headers
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth: list[str | None] = []

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        await request.body()
        epoch = self.epoch
        self.calls += 1
        self.auth.append(request.headers.get("authorization"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            # Sleep in steps so a stalled request ends when the fixture stops the server.
            end = time.monotonic() + self.delay_s
            while time.monotonic() < end and not self.stopping and self.epoch == epoch:
                await asyncio.sleep(0.05)
            if self.calls <= self.fail_first:
                body = {"error": {"message": f"stub failure {self.calls}", "code": self.status}}
                response = JSONResponse(body, status_code=self.status, headers=self.headers)
            else:
                response = JSONResponse(
                    {
                        "id": f"stub-{self.calls}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "stub",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": f" answer {self.calls} "},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
                    }
                )
        finally:
            if self.epoch == epoch:
                self.in_flight -= 1
        await response(scope, receive, send)


@pytest.fixture(scope="module")
def stub_server() -> Iterator[tuple[Stub, str]]:
    import uvicorn

    stub = Stub()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            stub.app,
            host="127.0.0.1",
            port=port,
            interface="asgi3",
            log_level="warning",
            timeout_graceful_shutdown=2,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the stub endpoint did not start")
        time.sleep(0.05)
    try:
        yield stub, f"http://127.0.0.1:{port}/v1"
    finally:
        stub.stopping = True
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def stub(stub_server) -> tuple[Stub, str]:
    stub_server[0].reset()
    return stub_server


def test_server_down_names_the_url(smol_model) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    gen = OpenAIGenerator(smol_model, served_cfg(url, max_retries=1, timeout_s=10))
    with pytest.raises(GenerationError) as err:
        gen.generate("q?", PASSAGES)
    msg = str(err.value)
    assert f"{url}/chat/completions" in msg
    assert "cannot connect" in msg and "2 attempts" in msg and "is the server running" in msg


def test_500s_are_retried_and_counted(smol_model, stub) -> None:
    server, url = stub
    server.reset(fail_first=2, status=500)
    out = OpenAIGenerator(smol_model, served_cfg(url, max_retries=2)).generate_with_info("q?", PASSAGES)
    assert server.calls == 3
    assert out.text == "answer 3"
    assert out.info["attempts"] == 3
    assert out.info["prompt_tokens"] == 7 and out.info["completion_tokens"] == 2


def test_500s_beyond_the_retries_raise(smol_model, stub) -> None:
    server, url = stub
    server.reset(fail_first=10, status=503)
    gen = OpenAIGenerator(smol_model, served_cfg(url, max_retries=1))
    with pytest.raises(GenerationError, match=r"after 2 attempts: HTTP 503.*stub failure 2"):
        gen.generate("q?", PASSAGES)
    assert server.calls == 2


def test_no_retries_means_one_try(smol_model, stub) -> None:
    server, url = stub
    server.reset(fail_first=1, status=500)
    with pytest.raises(GenerationError, match="after 1 attempt: HTTP 500"):
        OpenAIGenerator(smol_model, served_cfg(url, max_retries=0)).generate("q?", PASSAGES)
    assert server.calls == 1


def test_429_honours_retry_after(smol_model, stub) -> None:
    server, url = stub
    server.reset(fail_first=1, status=429, **{"retry-after": "0"})
    out = OpenAIGenerator(smol_model, served_cfg(url, max_retries=1)).generate_with_info("q?", [])
    assert (server.calls, out.info["attempts"], out.text) == (2, 2, "answer 2")


def test_client_errors_are_not_retried(smol_model, stub) -> None:
    server, url = stub
    server.reset(fail_first=1, status=404)
    gen = OpenAIGenerator(smol_model, served_cfg(url, max_retries=3, model="no-such-model"))
    with pytest.raises(GenerationError, match=r"HTTP 404.*'no-such-model'.*/models"):
        gen.generate("q?", PASSAGES)
    assert server.calls == 1


def test_timeout_is_retried_then_raised(smol_model, stub) -> None:
    server, url = stub
    server.reset(delay_s=30)  # ends early when the stub stops; the client gives up long before
    gen = OpenAIGenerator(smol_model, served_cfg(url, timeout_s=0.5, max_retries=1))
    with pytest.raises(GenerationError, match=r"after 2 attempts: no answer within timeout_s=0\.5 s"):
        gen.generate("q?", PASSAGES)
    assert server.calls == 2


def test_async_retries(smol_model, stub) -> None:
    server, url = stub
    server.reset(fail_first=1, status=502)
    gen = OpenAIGenerator(smol_model, served_cfg(url, max_retries=1))
    out = asyncio.run(gen.agenerate_with_info("q?", PASSAGES))
    assert (server.calls, out.info["attempts"]) == (2, 2)
    server.reset(fail_first=5, status=500)
    with pytest.raises(GenerationError, match="after 2 attempts"):
        asyncio.run(gen.agenerate("q?", PASSAGES))


def test_concurrency_is_bounded(smol_model, stub) -> None:
    server, url = stub
    server.reset(delay_s=1.0)
    gen = OpenAIGenerator(smol_model, served_cfg(url, concurrency=2))
    out = gen.generate_batch([f"q{i}?" for i in range(5)], [PASSAGES] * 5)
    assert len(out) == 5 and server.calls == 5
    assert server.max_in_flight == 2

    server.reset(delay_s=1.0)

    async def many() -> list[str]:
        return list(await asyncio.gather(*(gen.agenerate(f"q{i}?", []) for i in range(5))))

    assert len(asyncio.run(many())) == 5
    assert server.max_in_flight == 2


def test_api_key_is_sent_from_the_named_variable(smol_model, stub, monkeypatch) -> None:
    server, url = stub
    monkeypatch.setenv("ATTN_RERANK_TEST_KEY", "sk-local-test")
    OpenAIGenerator(smol_model, served_cfg(url, api_key_env="ATTN_RERANK_TEST_KEY")).generate("q?", [])
    assert server.auth == ["Bearer sk-local-test"]
