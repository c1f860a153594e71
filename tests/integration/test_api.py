"""The OpenAI-compatible API on a real local Ray cluster, through the real `openai` client and httpx."""

from __future__ import annotations

import concurrent.futures
import json
import math
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

Deploy = Callable[[dict[str, Any]], str]


@pytest.fixture(scope="module")
def base(main_app: str) -> str:
    return main_app


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=60)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# --- the happy path -------------------------------------------------------------------------------------


def test_list_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"echo", "echo-embed", "tiny", "tiny-vllm", "tiny-embed"}


def test_health_and_readiness(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "models": {"echo": True, "echo-embed": True, "tiny": True, "tiny-vllm": True, "tiny-embed": True},
        "cold": [],
    }


def test_openapi_lists_the_endpoints(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"} <= set(paths)


def test_chat_echo_exact(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hello big world"}])
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "hello big world"
    assert out.choices[0].finish_reason == "stop"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (3, 3, 6)


def test_chat_echo_streaming_exact(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "one two three four"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert content == ["one", " two", " three"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1


def test_sse_framing_ends_with_done(http: httpx.Client) -> None:
    body = {"model": "echo", "prompt": "a b", "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(p["choices"][0]["text"] for p in payloads) == "a b"


def test_completion_echo(client: openai.OpenAI) -> None:
    out = client.completions.create(model="echo", prompt="a b c d", max_tokens=2)
    assert out.object == "text_completion"
    assert out.choices[0].text == "a b"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 2


def test_embeddings_echo_float_and_base64(client: openai.OpenAI, http: httpx.Client) -> None:
    # The openai client asks for base64 by default and decodes it.
    out = client.embeddings.create(model="echo-embed", input=["a b", "c"])
    assert [d.index for d in out.data] == [0, 1]
    assert all(len(d.embedding) == 16 for d in out.data)
    assert math.isclose(sum(v * v for v in out.data[0].embedding), 1.0, rel_tol=1e-5)
    assert out.usage.prompt_tokens == 3
    raw = http.post("/v1/embeddings", json={"model": "echo-embed", "input": "a b", "encoding_format": "float"})
    assert raw.json()["data"][0]["embedding"] == pytest.approx(out.data[0].embedding, rel=1e-6)


LLMS = ["tiny", "tiny-vllm"]


@pytest.mark.parametrize("model", LLMS)
def test_generation_chat(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0
    )
    choice = out.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in {"stop", "length"}
    assert out.usage.prompt_tokens > 0 and 0 < out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


@pytest.mark.parametrize("model", LLMS)
def test_generation_stream_matches_non_stream(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Count with me"}],
        "max_tokens": 12,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices
    )
    assert streamed == whole


@pytest.mark.parametrize("model", LLMS)
def test_generation_completion(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert out.usage.completion_tokens <= 5
    assert out.choices[0].finish_reason in {"stop", "length"}


def test_vllm_logprobs_penalties_and_n(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny-vllm",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        temperature=0.8,
        seed=7,
        n=2,
        logprobs=True,
        top_logprobs=3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        for token in choice.logprobs.content:
            assert token.logprob <= 0 and len(token.top_logprobs) == 3
    text = client.completions.create(model="tiny-vllm", prompt="Once", max_tokens=4, logprobs=2, temperature=0)
    lp = text.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0


def test_transformers_embeddings(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model="tiny-embed", input=["first text", "second text", "third"])
    assert len(out.data) == 3
    sizes = {len(d.embedding) for d in out.data}
    assert len(sizes) == 1 and sizes.pop() > 8
    for d in out.data:
        assert math.isclose(sum(v * v for v in d.embedding), 1.0, rel_tol=1e-4)


# --- bad input: the right status and an OpenAI error body -----------------------------------------------


def test_malformed_json(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", content=b'{"model": "echo", ', headers={"content-type": "application/json"})
    err = assert_error(r, 400)
    assert "JSON" in err["message"]
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "echo", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {"model": "echo", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": "x"}], "n": 17}, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
        ("/v1/completions", {"model": "echo", "prompt": "x", "temperature": 9}, "temperature"),
        ("/v1/completions", {"model": "echo", "prompt": []}, "prompt"),
        ("/v1/embeddings", {"model": "echo-embed", "input": []}, "input"),
    ],
)
def test_schema_errors_are_400(http: httpx.Client, path: str, body: dict[str, Any], param: str) -> None:
    assert_error(http.post(path, json=body), 400, param)


@pytest.mark.parametrize("model", ["echo", *LLMS])
def test_huge_max_tokens(http: httpx.Client, model: str) -> None:
    body = {"model": model, "prompt": "hi", "max_tokens": 10**9}
    assert_error(http.post("/v1/completions", json=body), 400, "max_tokens")


def test_n_choices(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b"}], n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert {c.message.content for c in out.choices} == {"a b"}
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens == 2
    stream = client.completions.create(model="echo", prompt="x y", n=2, stream=True)
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == ["x y", "x y"]


@pytest.mark.parametrize(
    ("model", "extra", "param"),
    [
        ("echo", {"logprobs": 2}, "logprobs"),
        ("tiny", {"presence_penalty": 0.5}, "presence_penalty"),
        ("tiny", {"frequency_penalty": -0.5}, "frequency_penalty"),
    ],
)
def test_unsupported_sampling_is_refused_not_ignored(
    http: httpx.Client, model: str, extra: dict[str, Any], param: str
) -> None:
    r = http.post("/v1/completions", json={"model": model, "prompt": "x", **extra})
    assert "not supported" in assert_error(r, 400, param)["message"]


def test_unknown_model_is_404(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    err = assert_error(http.post("/v1/embeddings", json={"model": "gpt-nope", "input": "x"}), 404, "model")
    assert err["code"] == "model_not_found"
    assert_error(http.get("/v1/models/gpt-nope"), 404)


def test_wrong_task_is_400(http: httpx.Client) -> None:
    r = http.post("/v1/embeddings", json={"model": "echo", "input": "x"})
    assert "serves text generation" in assert_error(r, 400, "model")["message"]
    r = http.post("/v1/chat/completions", json={"model": "tiny-embed", "messages": [{"role": "user", "content": "x"}]})
    assert_error(r, 400, "model")


@pytest.mark.parametrize("model", LLMS)
def test_prompt_longer_than_context(client: openai.OpenAI, http: httpx.Client, model: str) -> None:
    long_prompt = "word " * 400  # the tiny models' context is 256 tokens
    r = http.post("/v1/completions", json={"model": model, "prompt": long_prompt, "max_tokens": 4})
    assert "maximum context length" in assert_error(r, 400, "prompt")["message"]
    # Streaming requests get the same status, not a 200 followed by an error event.
    with pytest.raises(openai.BadRequestError):
        for _ in client.completions.create(model=model, prompt=long_prompt, max_tokens=4, stream=True):
            pass
    assert http_ready(str(http.base_url).rstrip("/")), "a prompt over the context never kills the engine"


def test_prompt_longer_than_embedding_context(http: httpx.Client) -> None:
    long_prompt = "word " * 400
    r = http.post("/v1/embeddings", json={"model": "tiny-embed", "input": ["ok", long_prompt]})
    assert_error(r, 400, "input")


def test_oversized_body_is_413(http: httpx.Client) -> None:
    body = {"model": "echo", "prompt": "x" * 100_000}
    err = assert_error(http.post("/v1/completions", json=body), 413)
    assert "larger than the limit" in err["message"]


def test_oversized_chunked_body_is_413(http: httpx.Client) -> None:
    def chunks() -> Any:
        yield b'{"model": "echo", "prompt": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413)


def test_unknown_route_is_openai_shaped_404(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nothing-here"), 404)


@pytest.mark.parametrize("model", LLMS)
def test_bad_request_in_burst_fails_nobody_else(base: str, model: str) -> None:
    good = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    bad = {"model": model, "messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 6}
    bodies = [good] * 7 + [bad] + [good] * 8

    def post(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(post, bodies))
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 7 + [400] + [200] * 8, statuses
    texts = {r.json()["choices"][0]["message"]["content"] for r in responses if r.status_code == 200}
    assert len(texts) == 1, "greedy requests batched together must all get the same answer"
    assert http_ready(base)


def http_ready(base: str) -> bool:
    return httpx.get(f"{base}/readyz", timeout=30).status_code == 200


def test_request_id_echoed(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": "echo", "prompt": "x"}, headers={"x-request-id": "abc123"})
    assert r.headers["x-request-id"] == "abc123"


def test_engine_failure_is_500_with_request_id_and_replica_survives(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": "echo", "prompt": "x __fail__ y"})
    err = assert_error(r, 500)
    assert r.headers["x-request-id"] in err["message"]
    assert "simulated" not in err["message"], "internal details stay in the logs"
    ok = http.post("/v1/completions", json={"model": "echo", "prompt": "still here"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "still here"


def test_failure_mid_stream_ends_with_error_event(http: httpx.Client) -> None:
    body = {"model": "echo", "prompt": "x __fail__ y", "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "x"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "internal_error" and "request id" in error["message"]
