from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from deployments.engines import resolve
from deployments.engines.echo import EchoEngine
from deployments.engines.protocol import (
    ChatMessage,
    EmbedRequest,
    GenerateChunk,
    GenerateRequest,
    SamplingConfig,
)
from deployments.errors import EngineStartError, InvalidRequestError
from models.spec import ModelSpec

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def engine(task: str = "generate", **kw: Any) -> EchoEngine:
    eng = EchoEngine(ModelSpec(id="e", task=task, engine="echo", **kw))  # type: ignore[arg-type]
    run(eng.start())
    return eng


async def collect(eng: EchoEngine, req: GenerateRequest) -> list[GenerateChunk]:
    return [chunk async for chunk in eng.generate(req)]


def test_resolve_by_name() -> None:
    assert resolve("echo") is EchoEngine


def test_completion_echoes_words_with_counts() -> None:
    req = GenerateRequest(request_id="r", prompt="a b c", sampling=SamplingConfig(max_tokens=5))
    chunks = run(collect(engine(), req))
    assert [c.text for c in chunks] == ["a", " b", " c"]
    assert [c.completion_tokens for c in chunks] == [1, 2, 3]
    assert [c.finish_reason for c in chunks] == [None, None, "stop"]
    assert all(c.prompt_tokens == 3 for c in chunks)


def test_max_tokens_cuts_with_length() -> None:
    req = GenerateRequest(request_id="r", prompt="a b c", sampling=SamplingConfig(max_tokens=2))
    chunks = run(collect(engine(), req))
    assert "".join(c.text for c in chunks) == "a b"
    assert chunks[-1].finish_reason == "length"


def test_chat_echoes_last_message_and_counts_all() -> None:
    msgs = (ChatMessage(role="system", content="be nice"), ChatMessage(role="user", content="hi there"))
    chunks = run(collect(engine(), GenerateRequest(request_id="r", messages=msgs)))
    assert "".join(c.text for c in chunks) == "hi there"
    assert chunks[-1].prompt_tokens == 4


def test_stop_string_ends_output_before_it() -> None:
    req = GenerateRequest(request_id="r", prompt="one two three", sampling=SamplingConfig(stop=("thr",)))
    chunks = run(collect(engine(), req))
    assert "".join(c.text for c in chunks) == "one two "
    assert chunks[-1].finish_reason == "stop"


def test_context_and_output_limits() -> None:
    eng = engine(context_length=16, max_output_tokens=8)
    with pytest.raises(InvalidRequestError, match="maximum context length is 16") as info:
        run(collect(eng, GenerateRequest(request_id="r", prompt="w " * 12, sampling=SamplingConfig(max_tokens=8))))
    assert info.value.param == "max_tokens", "the prompt alone fits: lowering max_tokens is the fix"
    with pytest.raises(InvalidRequestError, match="maximum context length is 16") as info:
        run(collect(eng, GenerateRequest(request_id="r", prompt="w " * 16, sampling=SamplingConfig(max_tokens=1))))
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as info2:
        run(collect(eng, GenerateRequest(request_id="r", prompt="w", sampling=SamplingConfig(max_tokens=9))))
    assert info2.value.param == "max_tokens"


def test_embeddings_deterministic_and_normalised() -> None:
    eng = engine("embed", engine_kwargs={"dimensions": 8})
    a = run(eng.embed(EmbedRequest(request_id="r", inputs=("x y", "z"))))
    b = run(eng.embed(EmbedRequest(request_id="r", inputs=("x y",))))
    assert len(a.embeddings) == 2 and len(a.embeddings[0]) == 8
    assert a.embeddings[0] == b.embeddings[0]
    assert math.isclose(math.fsum(v * v for v in a.embeddings[1]), 1.0, rel_tol=1e-9)
    assert a.prompt_tokens == 3


def test_task_mismatch_is_invalid_request() -> None:
    with pytest.raises(InvalidRequestError):
        run(engine("generate").embed(EmbedRequest(request_id="r", inputs=("x",))))
    with pytest.raises(InvalidRequestError):
        run(collect(engine("embed"), GenerateRequest(request_id="r", prompt="x")))


def test_unknown_engine_kwargs_fail_start() -> None:
    eng = EchoEngine(ModelSpec(id="e", task="generate", engine="echo", engine_kwargs={"bogus": 1}))
    with pytest.raises(EngineStartError, match="bogus"):
        run(eng.start())


def test_fail_marker_fails_after_first_token() -> None:
    eng = engine(engine_kwargs={"fail_marker": "BOOM"})
    seen: list[str] = []

    async def consume() -> None:
        async for chunk in eng.generate(GenerateRequest(request_id="r", prompt="a BOOM c")):
            seen.append(chunk.text)

    with pytest.raises(RuntimeError, match="simulated failure"):
        run(consume())
    assert seen == ["a"]
