"""The whole OpenAI surface through the official `openai` SDK on a real cluster (issue 9): structured outputs, tool
calls, every field honoured or refused by name, /tokenize, /detokenize, /health, model cards and 405s."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.integration.test_api import assert_error

Deploy = Callable[[dict[str, Any]], str]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def sdk(surface_app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{surface_app}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(main_app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{main_app}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(main_app: str) -> httpx.Client:
    return httpx.Client(base_url=main_app, timeout=60)


class Verdict(BaseModel):
    ok: bool
    label: Literal["cat", "dog"]


class GetWeather(BaseModel):
    """Weather in a city."""

    city: Literal["Paris", "Rome"]
    celsius: bool


# --- structured outputs ------------------------------------------------------------------------------------


def test_parse_returns_a_parsed_object(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.parse(model="so-vllm", messages=QUESTION, response_format=Verdict, temperature=0)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Verdict), out
    streamed = sdk.chat.completions.create(
        model="so-vllm",
        messages=QUESTION,
        temperature=0,
        stream=True,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "Verdict", "schema": Verdict.model_json_schema(), "strict": True},
        },
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert Verdict.model_validate_json(text) == parsed


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        ({"choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"regex": "[0-9]{2}"}, lambda t: len(t) == 2 and t.isdigit()),
        ({"json": {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}}, json.loads),
    ],
)
def test_structured_outputs_extension(sdk: openai.OpenAI, constraint: dict[str, Any], check: Callable) -> None:
    out = sdk.completions.create(
        model="so-vllm", prompt="Answer:", max_tokens=32, temperature=0, extra_body={"structured_outputs": constraint}
    )
    assert check(out.choices[0].text), out.choices[0].text


def test_json_object(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(
        model="so-vllm", messages=QUESTION, temperature=0, response_format={"type": "json_object"}
    )
    text = out.choices[0].message.content or ""
    # Object keys are free text, which random weights may run on with until max_tokens.
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("model", ["echo", "tiny"])
def test_structured_outputs_refused_by_name_off_vllm(http: httpx.Client, model: str) -> None:
    body = {"model": model, "messages": QUESTION, "response_format": {"type": "json_object"}}
    assert (
        "not supported" in assert_error(http.post("/v1/chat/completions", json=body), 400, "response_format")["message"]
    )
    body = {"model": model, "prompt": "x", "structured_outputs": {"choice": ["a"]}}
    assert_error(http.post("/v1/completions", json=body), 400, "structured_outputs")


# --- tool calls ---------------------------------------------------------------------------------------------


def test_named_tool_choice_returns_a_valid_call_and_the_stream_assembles_to_it(sdk: openai.OpenAI) -> None:
    tool = openai.pydantic_function_tool(GetWeather)
    choice = {"type": "function", "function": {"name": "GetWeather"}}
    out = sdk.chat.completions.create(
        model="so-vllm", messages=QUESTION, tools=[tool], tool_choice=choice, temperature=0
    )
    (call,) = out.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "GetWeather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert out.choices[0].finish_reason == "stop"  # OpenAI's finish reason for a named call

    stream = sdk.chat.completions.create(
        model="so-vllm", messages=QUESTION, tools=[tool], tool_choice=choice, temperature=0, stream=True
    )
    pieces = [tc for chunk in stream if chunk.choices for tc in chunk.choices[0].delta.tool_calls or []]
    assert pieces[0].id and pieces[0].function.name == "GetWeather"
    assert {p.index for p in pieces} == {0}
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments

    parsed = sdk.chat.completions.parse(
        model="so-vllm", messages=QUESTION, tools=[tool], tool_choice=choice, temperature=0
    )
    assert isinstance(parsed.choices[0].message.tool_calls[0].function.parsed_arguments, GetWeather)


def test_required_tool_choice_and_a_tool_history(sdk: openai.OpenAI) -> None:
    tools = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(Verdict)]
    out = sdk.chat.completions.create(
        model="so-vllm",
        messages=QUESTION,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
    )
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and len(message.tool_calls or []) == 1
    # The assistant turn goes back into the history as the SDK gives it, with the tool's answer.
    history = [*QUESTION, message, {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny"}]
    again = sdk.chat.completions.create(model="so-vllm", messages=history, max_tokens=4)
    assert again.choices[0].finish_reason in ("stop", "length")


def test_auto_uses_the_configured_parser(sdk: openai.OpenAI, client: openai.OpenAI) -> None:
    tools = [openai.pydantic_function_tool(GetWeather)]
    out = sdk.chat.completions.create(model="so-vllm", messages=QUESTION, tools=tools, max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError) as info:  # tiny-vllm has no tool_call_parser
        client.chat.completions.create(model="tiny-vllm", messages=QUESTION, tools=tools, max_tokens=8)
    assert info.value.body["param"] == "tool_choice" and "tool_call_parser" in info.value.body["message"]
    none = client.chat.completions.create(
        model="tiny", messages=QUESTION, tools=tools, tool_choice="none", max_tokens=2
    )
    assert none.choices[0].message.tool_calls in (None, [])


# --- every field honoured or refused by name ----------------------------------------------------------------


def _chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 4, **fields}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_chat("echo", frobnicate=1), "frobnicate"),
        (_chat("echo", audio={"voice": "x"}), "audio"),
        (_chat("echo", store=True), "store"),
        (_chat("echo", seed=2**64), "seed"),
        (_chat("echo", stop=""), "stop"),
        (_chat("echo", stop=["a", ""]), "stop"),
        (_chat("echo", messages=[{"role": "user", "content": "\ud800"}]), "messages"),
        (_chat("echo", top_k=5), "top_k"),
        (_chat("tiny", presence_penalty=0.5), "presence_penalty"),
        (_chat("echo", tool_choice="auto"), "tool_choice"),
        ({"model": "echo", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "echo", "prompt": "x", "best_of": 2}, "best_of"),
        ({"model": "echo", "prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ({"model": "echo", "prompt": [1, 2]}, "prompt"),
        ({"model": "echo-embed", "input": "x", "extra": 1}, "extra"),
    ],
)
def test_refused_by_name(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/embeddings" if "input" in body else "/v1/completions"
    # json.dumps escapes the lone surrogate as \ud800, as a client would send it
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    err = assert_error(r, 400, param)
    if param in ("frobnicate", "audio"):
        assert param in err["message"]


def test_describe_only_fields_are_accepted(http: httpx.Client) -> None:
    body = _chat("echo", user="u1", metadata={"team": "x"}, store=False, service_tier="auto", safety_identifier="s")
    assert http.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("model", ["tiny", "tiny-vllm"])
def test_vllm_extensions_honoured(client: openai.OpenAI, model: str) -> None:
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 6, "ignore_eos": True}
    out = client.completions.create(
        model=model, prompt="One two", max_tokens=6, seed=3, extra_body={**extra, "skip_special_tokens": False}
    )
    assert (out.usage.completion_tokens, out.choices[0].finish_reason) == (6, "length")
    out = client.completions.create(model=model, prompt="One", max_tokens=2, temperature=0, logit_bias={"7": 100})
    assert out.usage.completion_tokens == 2


def test_prompt_lists_token_ids_and_echo(client: openai.OpenAI, http: httpx.Client) -> None:
    out = client.completions.create(model="echo", prompt=["a b", "c d"], n=2, max_tokens=5)
    assert [(c.index, c.text) for c in out.choices] == [(0, "a b"), (1, "a b"), (2, "c d"), (3, "c d")]
    assert out.usage.prompt_tokens == 4
    echoed = client.completions.create(model="echo", prompt="a b", echo=True, max_tokens=5)
    assert echoed.choices[0].text == "a ba b"
    ids = http.post("/tokenize", json={"model": "tiny", "prompt": "One two three"}).json()["tokens"]
    for model in ("tiny", "tiny-vllm"):
        by_ids = client.completions.create(model=model, prompt=[ids, ids], max_tokens=3, temperature=0, echo=True)
        by_text = client.completions.create(model=model, prompt="One two three", max_tokens=3, temperature=0)
        assert len(by_ids.choices) == 2 and by_ids.usage.prompt_tokens == 2 * len(ids)
        assert by_ids.choices[1].text.endswith(by_text.choices[0].text)
        assert by_ids.choices[1].text.startswith("One two three") or "One" in by_ids.choices[1].text


def test_top_logprobs_alone_turns_logprobs_on(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="tiny-vllm", messages=QUESTION, max_tokens=2, top_logprobs=2)
    assert out.choices[0].logprobs is not None and len(out.choices[0].logprobs.content[0].top_logprobs) == 2


# --- endpoints ----------------------------------------------------------------------------------------------


def test_tokenize_and_detokenize_in_vllm_shapes(http: httpx.Client) -> None:
    results = {}
    for model in ("tiny", "tiny-vllm"):
        r = http.post("/tokenize", json={"model": model, "prompt": "One two", "return_token_strs": True})
        body = r.json()
        assert set(body) == {"count", "max_model_len", "tokens", "token_strs"} and body["count"] == len(body["tokens"])
        assert body["max_model_len"] == 256
        chat = http.post("/tokenize", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}).json()
        text = http.post("/detokenize", json={"model": model, "tokens": body["tokens"]}).json()
        assert "One two" in text["prompt"]
        results[model] = (body["tokens"], chat["tokens"])
    assert results["tiny"] == results["tiny-vllm"]
    assert_error(http.post("/tokenize", json={"model": "echo", "prompt": "x"}), 400, "model")
    assert_error(http.post("/detokenize", json={"model": "tiny", "tokens": [10**9]}), 400, "tokens")


def test_health_cards_and_405(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    vllm = cards["tiny-vllm"]
    assert vllm["max_model_len"] == 256 and vllm["root"] and vllm["parent"] is None
    assert vllm["permission"][0]["object"] == "model_permission"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
