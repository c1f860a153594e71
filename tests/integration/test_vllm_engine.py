"""VLLMEngine driven directly with asyncio (no Ray) on the real vLLM CPU build: one engine on tiny-llama.

vLLM's AsyncLLM binds to the event loop it first serves on, so one loop runs in a background thread for the
whole module and every test submits coroutines to it with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deployments import cpus
from deployments.engines.protocol import (
    ChatMessage,
    GenerateChunk,
    GenerateRequest,
    SamplingConfig,
    StructuredOutput,
    TokenizeRequest,
    ToolCall,
    ToolFunction,
    merge_tool_calls,
)
from deployments.engines.vllm import VLLMEngine
from deployments.errors import EngineDeadError, EngineStartError, InvalidRequestError
from deployments.plan import PlanError
from models.spec import ModelSpec

T = TypeVar("T")

CONTEXT = 256
MAX_OUTPUT = 64
START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 60.0
QUESTION = (ChatMessage(role="user", content="What is the capital of France?"),)


class LoopThread:
    """One asyncio loop in a daemon thread; `run` waits for a coroutine on it, with a deadline."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = REQUEST_TIMEOUT_S) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            pytest.fail(f"timed out after {timeout:.0f} s waiting for the engine")

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


def _spec(source: str | Path, **overrides: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "id": "tiny-vllm",
        "task": "generate",
        "engine": "vllm",
        "source": str(source),
        "context_length": CONTEXT,
        "max_output_tokens": MAX_OUTPUT,
        # Without it, random weights fill max_tokens with the whitespace JSON allows between tokens.
        "engine_kwargs": {
            "cpu_kvcache_space_gb": 0.25,
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        },
        **overrides,
    }
    return ModelSpec(**fields)


_RUNNING: list[VLLMEngine] = []  # the module's engine, so the slow test can stop it first (one engine at a time)


@pytest.fixture(scope="module")
def engine(loop: LoopThread, tiny_llama: Path) -> Iterator[VLLMEngine]:
    """The module's one engine; teardown checks that its processes and shared memory are gone."""
    started = time.monotonic()
    eng = VLLMEngine(_spec(tiny_llama))
    loop.run(eng.start(), timeout=START_TIMEOUT_S)
    print(f"\nvLLM engine on tiny-llama started in {time.monotonic() - started:.1f} s")
    processes, shm = list(eng._processes), set(eng._shm)
    assert any(p.name().startswith("VLLM::EngineCore") for p in processes)
    _RUNNING.append(eng)
    try:
        yield eng
    finally:
        loop.run(eng.shutdown(), timeout=60)
    alive = [p.pid for p in processes if p.is_running() and p.status() != "zombie"]
    assert not alive, f"vLLM processes {alive} still run after shutdown"
    left = sorted(path for path in shm if Path(path).exists())
    assert not left, f"shared memory left behind: {left}"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _request(
    *, prompt: str | None = None, messages: tuple[ChatMessage, ...] | None = None, rid: str = "req", **sampling: Any
) -> GenerateRequest:
    if prompt is None and messages is None:
        messages = QUESTION
    return GenerateRequest(request_id=rid, prompt=prompt, messages=messages, sampling=SamplingConfig(**sampling))


async def _collect(engine: VLLMEngine, request: GenerateRequest) -> list[GenerateChunk]:
    return [chunk async for chunk in engine.generate(request)]


def _text(chunks: list[GenerateChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


def _check_stream(chunks: list[GenerateChunk], prompt_tokens: int) -> None:
    assert chunks, "no chunks"
    assert all(chunk.text for chunk in chunks[:-1]), "only the last chunk may have empty text"
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason in ("stop", "length")
    counts = [chunk.completion_tokens for chunk in chunks]
    assert counts == sorted(counts) and counts[0] >= 1, counts
    assert {chunk.prompt_tokens for chunk in chunks} == {prompt_tokens}


async def _wait_idle(engine: VLLMEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.num_unfinished_requests:
        if time.monotonic() > deadline:
            raise AssertionError(f"{engine.num_unfinished_requests} requests still run in vLLM after {timeout} s")
        await asyncio.sleep(0.05)


def test_chat_stream_structure(loop: LoopThread, engine: VLLMEngine, tokenizer: Any) -> None:
    chunks = loop.run(_collect(engine, _request(max_tokens=8, temperature=0.0)))
    expected = tokenizer.apply_chat_template(
        [m.model_dump() for m in QUESTION], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    _check_stream(chunks, len(expected))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 8
    assert chunks[-1].logprobs is None
    assert engine.context_length == CONTEXT


def test_completion_stream_structure(loop: LoopThread, engine: VLLMEngine, tokenizer: Any) -> None:
    prompt = "The capital of France is"
    chunks = loop.run(_collect(engine, _request(prompt=prompt, max_tokens=5, temperature=0.0)))
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id, "the completions prompt gets BOS, as in vLLM's own endpoint"
    _check_stream(chunks, len(ids))
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("length", 5)


def test_greedy_is_deterministic_alone_and_in_a_batch(loop: LoopThread, engine: VLLMEngine) -> None:
    request = _request(prompt="One two three", max_tokens=12, temperature=0.0)
    first = _text(loop.run(_collect(engine, request)))
    second = _text(loop.run(_collect(engine, request)))
    assert first and first == second

    async def batch() -> list[list[GenerateChunk]]:
        others = [
            _request(prompt=f"The {word} river runs", rid=f"other-{i}", max_tokens=12, temperature=0.0)
            for i, word in enumerate(("big", "green", "old", "quiet", "dark", "slow", "cold"))
        ]
        return await asyncio.gather(*(_collect(engine, r) for r in [*others[:3], request, *others[3:]]))

    results = loop.run(batch())
    assert _text(results[3]) == first
    for chunks in results:
        _check_stream(chunks, chunks[0].prompt_tokens)


def test_seeded_sampling_is_reproducible(loop: LoopThread, engine: VLLMEngine) -> None:
    request = _request(prompt="Hello", max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    runs = [_text(loop.run(_collect(engine, request))) for _ in range(2)]
    assert runs[0] and runs[0] == runs[1]


def test_stop_string_ends_the_text_before_it(loop: LoopThread, engine: VLLMEngine) -> None:
    prompt = "The teacher sees the river"
    full = _text(loop.run(_collect(engine, _request(prompt=prompt, max_tokens=16, temperature=0.0))))
    stop = full[len(full) // 2 :][:3]
    assert stop.strip(), f"greedy output too short to pick a stop string from: {full!r}"
    chunks = loop.run(_collect(engine, _request(prompt=prompt, max_tokens=16, temperature=0.0, stop=(stop,))))
    assert _text(chunks) == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert all(chunk.text for chunk in chunks[:-1])


def test_logprobs_have_k_alternatives_per_token(loop: LoopThread, engine: VLLMEngine) -> None:
    chunks = loop.run(_collect(engine, _request(prompt="Paris is", max_tokens=6, temperature=0.0, logprobs=3)))
    entries = [entry for chunk in chunks for entry in chunk.logprobs or ()]
    assert all(chunk.logprobs is not None for chunk in chunks)
    assert len(entries) == chunks[-1].completion_tokens == 6
    for entry in entries:
        assert math.isfinite(entry.logprob) and entry.logprob <= 0
        assert len(entry.top) == 3
        values = [lp for _, lp in entry.top]
        assert all(math.isfinite(v) for v in values) and values == sorted(values, reverse=True)
        assert entry.top[0] == (entry.token, entry.logprob), "greedy picks the most likely token"
    assert _text(chunks) == "".join(entry.token for entry in entries)


def test_penalties_are_accepted(loop: LoopThread, engine: VLLMEngine) -> None:
    request = _request(prompt="one one one", max_tokens=8, presence_penalty=1.5, frequency_penalty=1.0)
    chunks = loop.run(_collect(engine, request))
    _check_stream(chunks, chunks[0].prompt_tokens)


def test_context_overflow_fails_alone(loop: LoopThread, engine: VLLMEngine) -> None:
    long_prompt = " ".join(["river"] * (CONTEXT + 10))
    long_chat = (ChatMessage(role="user", content=long_prompt),)

    async def mixed() -> list[Any]:
        requests = [
            _request(prompt="The cats", rid="ok-0", max_tokens=8, temperature=0.0),
            _request(prompt=long_prompt, rid="long", max_tokens=8),
            _request(messages=long_chat, rid="long-chat", max_tokens=8),
            *(_request(prompt=f"The {i} cats", rid=f"ok-{i}", max_tokens=MAX_OUTPUT, temperature=0.0) for i in (1, 2)),
        ]
        return await asyncio.gather(*(_collect(engine, r) for r in requests), return_exceptions=True)

    results = loop.run(mixed())
    for result, param in zip(results[1:3], ("prompt", "messages"), strict=True):
        assert isinstance(result, InvalidRequestError), result
        assert result.param == param
        assert result.message.startswith(f"This model's maximum context length is {CONTEXT} tokens")
    for chunks in (results[0], *results[3:]):
        assert isinstance(chunks, list), chunks
        assert chunks[-1].finish_reason == "length"
    loop.run(engine.check_health())


def test_prompt_plus_max_tokens_over_the_context(loop: LoopThread, engine: VLLMEngine, tokenizer: Any) -> None:
    prompt = " ".join(["river"] * (CONTEXT - MAX_OUTPUT // 2))
    used = len(tokenizer(prompt)["input_ids"])
    assert used < CONTEXT < used + MAX_OUTPUT
    with pytest.raises(InvalidRequestError, match="maximum context length") as caught:
        loop.run(_collect(engine, _request(prompt=prompt, max_tokens=MAX_OUTPUT)))
    assert caught.value.param == "max_tokens", "the prompt alone fits: lowering max_tokens is the fix"
    chunks = loop.run(_collect(engine, _request(prompt=prompt, max_tokens=CONTEXT - used, temperature=0.0)))
    assert chunks[-1].completion_tokens == CONTEXT - used


def test_max_tokens_above_the_model_limit(loop: LoopThread, engine: VLLMEngine) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        loop.run(_collect(engine, _request(max_tokens=MAX_OUTPUT + 1)))
    assert caught.value.param == "max_tokens"


def test_closing_a_stream_aborts_the_request(loop: LoopThread, engine: VLLMEngine) -> None:
    """Closing the stream, or cancelling the task that reads it, aborts the request in vLLM.

    The longest request this engine takes (MAX_OUTPUT tokens; greedy tiny-llama does not stop early on this
    prompt) ends by itself in well under a second here: too soon to tell an abort from its natural end by the
    clock. So once its first chunk is out, vLLM's own `pause_generation(mode="keep")` holds it where it is: from
    then on it stays in vLLM's count of unfinished requests however long it waits, and only an abort takes it out.
    """
    llm = engine._llm
    prompt = "The king"

    async def held(first_chunk: Any) -> bool:
        """Wait for the first chunk, then pause vLLM; True if the request is held unfinished there."""
        await asyncio.wait_for(first_chunk, REQUEST_TIMEOUT_S)
        await llm.pause_generation(mode="keep", clear_cache=False)
        return engine.num_unfinished_requests == 1

    async def aborted(how: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while engine.num_unfinished_requests:
            assert time.monotonic() < deadline, (
                f"{how} left the request unfinished in vLLM for {timeout:.0f} s (it is paused: only an abort ends it)"
            )
            await asyncio.sleep(0.05)

    async def close_after_first_chunk() -> None:
        for _ in range(3):  # the pause lands a step after the first chunk; a retry covers a badly delayed one
            stream = engine.generate(_request(prompt=prompt, rid="closed", max_tokens=MAX_OUTPUT, temperature=0.0))
            try:
                if await held(anext(stream)):
                    await stream.aclose()  # type: ignore[attr-defined]
                    await aborted("closing the stream")
                    return
                await stream.aclose()  # type: ignore[attr-defined]
            finally:
                await llm.resume_generation()
        pytest.fail(f"the request ran all {MAX_OUTPUT} tokens before the pause could hold it, 3 times")

    async def consume(first: asyncio.Event) -> None:
        async for _ in engine.generate(
            _request(prompt=prompt, rid="cancelled", max_tokens=MAX_OUTPUT, temperature=0.0)
        ):
            first.set()

    async def cancel_consumer() -> None:
        for _ in range(3):
            first = asyncio.Event()
            task = asyncio.create_task(consume(first))
            try:
                if await held(first.wait()):
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                    await aborted("cancelling the task that reads the stream")
                    return
                await asyncio.wait_for(task, REQUEST_TIMEOUT_S)
            finally:
                await llm.resume_generation()
        pytest.fail(f"the request ran all {MAX_OUTPUT} tokens before the pause could hold it, 3 times")

    loop.run(close_after_first_chunk())
    loop.run(cancel_consumer())
    # Unpaused and left alone, the same request runs to its length limit: the closes above cut it short.
    chunks = loop.run(_collect(engine, _request(prompt=prompt, max_tokens=MAX_OUTPUT, temperature=0.0)))
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("length", MAX_OUTPUT)
    assert engine.num_unfinished_requests == 0
    loop.run(engine.check_health())


def test_same_client_request_id_twice_concurrently(loop: LoopThread, engine: VLLMEngine) -> None:
    async def twice() -> tuple[list[GenerateChunk], list[GenerateChunk]]:
        request = _request(prompt="Same id", rid="dup", max_tokens=6, temperature=0.0)
        return await asyncio.gather(_collect(engine, request), _collect(engine, request))

    a, b = loop.run(twice())
    assert _text(a) == _text(b) and a[-1].completion_tokens == b[-1].completion_tokens == 6


def test_unknown_engine_kwargs_fail_before_loading(loop: LoopThread, tiny_llama: Path) -> None:
    eng = VLLMEngine(_spec(tiny_llama, engine_kwargs={"max_num_seqs": 4, "warp_speed": 9}))
    with pytest.raises(EngineStartError, match=r"unknown engine_kwargs \['warp_speed'\].*max_num_seqs"):
        loop.run(eng.start())
    assert eng._llm is None
    # What the spec decides cannot be set again through engine_kwargs: refused when the plan is compiled.
    with pytest.raises(PlanError, match="context_length"):
        VLLMEngine(_spec(tiny_llama, engine_kwargs={"max_model_len": 64}))


def test_gpus_on_the_cpu_build_fail_to_start(loop: LoopThread, tiny_llama: Path) -> None:
    eng = VLLMEngine(_spec(tiny_llama, resources={"num_gpus": 1}, engine_kwargs={}))
    with pytest.raises(EngineStartError, match="CPU build"):
        loop.run(eng.start())


def test_unloadable_model_fails_to_start(loop: LoopThread, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    eng = VLLMEngine(_spec(tmp_path))
    with pytest.raises(EngineStartError, match="cannot start vLLM for model 'tiny-vllm'"):
        loop.run(eng.start(), timeout=START_TIMEOUT_S)
    loop.run(eng.shutdown())


def test_not_started_engine_is_dead(loop: LoopThread, tiny_llama: Path) -> None:
    eng = VLLMEngine(_spec(tiny_llama))
    with pytest.raises(EngineDeadError):
        loop.run(eng.check_health())
    with pytest.raises(EngineDeadError):
        loop.run(_collect(eng, _request()))


# --- structured outputs, tool calls, token ids, tokenize (issue 9) ---------------------------------------------

# Bounded values: unconstrained numbers or strings from random weights run on until max_tokens.
_POINT = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "label": {"type": "string", "enum": ["a", "b"]}},
    "required": ["ok", "label"],
    "additionalProperties": False,
}
_WEATHER = ToolFunction(
    name="get_weather",
    description="Weather in a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
_TIME = ToolFunction(
    name="get_time", parameters={"type": "object", "properties": {"zone": {"type": "integer"}}, "required": ["zone"]}
)


def _structured(**constraint: Any) -> SamplingConfig:
    return SamplingConfig(max_tokens=MAX_OUTPUT, temperature=0.0, structured=StructuredOutput(**constraint))


def test_json_schema_output_is_valid_json(loop: LoopThread, engine: VLLMEngine) -> None:
    request = GenerateRequest(request_id="js", messages=QUESTION, sampling=_structured(json_schema=_POINT))
    chunks = loop.run(_collect(engine, request))
    value = json.loads(_text(chunks))  # random weights, but decoding is constrained
    assert set(value) == {"ok", "label"} and isinstance(value["ok"], bool) and value["label"] in ("a", "b")
    assert chunks[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        ({"choice": ("yes", "no")}, lambda text: text in ("yes", "no")),
        ({"regex": "[0-9]{3}-[a-c]"}, lambda text: re.fullmatch("[0-9]{3}-[a-c]", text) is not None),
        ({"json_object": True}, lambda text: isinstance(json.loads(text), dict)),
        ({"grammar": 'root ::= "ab" | "cd"'}, lambda text: text in ("ab", "cd")),
    ],
)
def test_structured_output_kinds(
    loop: LoopThread, engine: VLLMEngine, constraint: dict[str, Any], check: Callable[[str], bool]
) -> None:
    request = GenerateRequest(request_id="so", prompt="Answer:", sampling=_structured(**constraint, param="x"))
    text = _text(loop.run(_collect(engine, request)))
    assert check(text), text


def test_invalid_constraint_is_invalid_request(loop: LoopThread, engine: VLLMEngine) -> None:
    request = GenerateRequest(
        request_id="bad", prompt="x", sampling=_structured(regex="(unclosed", param="structured_outputs")
    )
    with pytest.raises(InvalidRequestError) as info:
        loop.run(_collect(engine, request))
    assert info.value.param == "structured_outputs"


def _tool_request(choice: str, name: str | None = None, **fields: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id="tools",
        messages=QUESTION,
        sampling=SamplingConfig(max_tokens=MAX_OUTPUT, temperature=0.0),
        tools=(_WEATHER, _TIME),
        tool_choice=choice,
        tool_name=name,
        **fields,
    )


def test_named_tool_choice_streams_one_call_with_valid_arguments(loop: LoopThread, engine: VLLMEngine) -> None:
    chunks = loop.run(_collect(engine, _tool_request("function", "get_weather")))
    deltas = [d for c in chunks for d in c.tool_calls or ()]
    assert deltas[0].id and deltas[0].name == "get_weather"
    assert all(d.name is None and d.id is None for d in deltas[1:]), "id and name come once"
    (call,) = merge_tool_calls(deltas)
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    assert _text(chunks) == "" and chunks[-1].finish_reason == "stop"


def test_required_tool_choice_returns_calls(loop: LoopThread, engine: VLLMEngine) -> None:
    chunks = loop.run(_collect(engine, _tool_request("required", parallel_tool_calls=False)))
    calls = merge_tool_calls(d for c in chunks for d in c.tool_calls or ())
    assert len(calls) == 1 and calls[0].name in ("get_weather", "get_time") and calls[0].id
    json.loads(calls[0].arguments)
    assert chunks[-1].finish_reason == "tool_calls"


def test_auto_without_a_parser_is_refused_by_name(loop: LoopThread, engine: VLLMEngine) -> None:
    with pytest.raises(InvalidRequestError) as info:
        loop.run(_collect(engine, _tool_request("auto")))
    assert info.value.param == "tool_choice" and "tool_call_parser" in info.value.message


def test_tool_history_renders(loop: LoopThread, engine: VLLMEngine) -> None:
    call = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    history = (
        *QUESTION,
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
    )
    request = GenerateRequest(request_id="h", messages=history, sampling=SamplingConfig(max_tokens=4))
    assert loop.run(_collect(engine, request))[-1].finish_reason in ("stop", "length")


def test_token_id_prompt_and_tokenize_round_trip(loop: LoopThread, engine: VLLMEngine, tokenizer: Any) -> None:
    tokenized = loop.run(
        engine.tokenize(TokenizeRequest(request_id="t", prompt="One two three", add_special_tokens=True))
    )
    assert list(tokenized.tokens) == tokenizer("One two three")["input_ids"]
    assert tokenized.max_model_len == CONTEXT
    assert loop.run(engine.detokenize(tokenized.tokens[1:])) == "One two three"
    by_text = _text(loop.run(_collect(engine, _request(prompt="One two three", max_tokens=6, temperature=0.0))))
    by_ids = GenerateRequest(
        request_id="ids", prompt_token_ids=tokenized.tokens, sampling=SamplingConfig(max_tokens=6, temperature=0.0)
    )
    assert _text(loop.run(_collect(engine, by_ids))) == by_text
    with pytest.raises(InvalidRequestError) as info:
        loop.run(_collect(engine, by_ids.model_copy(update={"prompt_token_ids": (10**6,)})))
    assert info.value.param == "prompt"


def test_vllm_extensions_are_honoured(loop: LoopThread, engine: VLLMEngine) -> None:
    sampling = SamplingConfig(max_tokens=12, temperature=0.0, min_tokens=12, ignore_eos=True, top_k=5, min_p=0.1)
    chunks = loop.run(_collect(engine, GenerateRequest(request_id="x", prompt="Hi", sampling=sampling)))
    assert (chunks[-1].completion_tokens, chunks[-1].finish_reason) == (12, "length")
    favourite = loop.run(engine.tokenize(TokenizeRequest(request_id="f", prompt="river", add_special_tokens=False)))
    biased = SamplingConfig(max_tokens=3, temperature=0.0, logit_bias=((favourite.tokens[0], 100.0),))
    out = loop.run(_collect(engine, GenerateRequest(request_id="b", prompt="Hi", sampling=biased)))
    assert _text(out) == loop.run(engine.detokenize(favourite.tokens[:1] * 3))


def test_auto_tool_calls_are_read_by_vllms_parser(tokenizer: Any, engine: VLLMEngine) -> None:
    """The hermes parser reads a call out of text the model could write (random weights never do)."""
    from deployments.engines.vllm_tools import ToolCallReader, load_parser

    parser = load_parser("hermes", "tiny-vllm", engine._tokenizer)
    reader = ToolCallReader(_tool_request("auto"), "tiny-vllm", parser, engine._tokenizer, engine._llm.model_config)
    text = 'Let me see. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, deltas = "", []
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    for i, piece in enumerate(pieces):
        ids = engine._tokenizer.encode(piece, add_special_tokens=False)
        got, calls = reader.feed(piece, ids, [1], finished=i == len(pieces) - 1)
        content += got
        deltas.extend(calls)
    (call,) = merge_tool_calls(deltas)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.id
    assert content.strip() == "Let me see."
    assert reader.finish_reason("stop") == "tool_calls"


def test_engine_core_moves_to_the_engine_cores(loop: LoopThread, engine: VLLMEngine) -> None:
    """With an engine/serving split, vLLM's busy-waiting engine core goes to the engine cores (beside its worker), and
    the engine still answers; vLLM's model worker keeps the placement vLLM gave it."""
    core = next(p for p in engine._processes if p.name().startswith("VLLM::EngineCor"))
    others = {p.pid: p.cpu_affinity() for p in engine._processes if p.pid != core.pid}
    before = frozenset(core.cpu_affinity())
    first = min(os.sched_getaffinity(0))
    plan = engine.plan
    engine.plan = plan.model_copy(update={"cpus": str(first)})
    try:
        engine._pin_engine_core()
        placed = {thread.id: frozenset(os.sched_getaffinity(thread.id)) for thread in core.threads()}
        assert placed and set(placed.values()) == {frozenset({first})}, placed
        assert {p.pid: p.cpu_affinity() for p in engine._processes if p.pid != core.pid} == others
        chunks = loop.run(_collect(engine, _request(max_tokens=4, temperature=0.0)))
        assert chunks[-1].completion_tokens == 4
    finally:
        engine.plan = plan
        cpus.pin_process(core.pid, before)
    engine._pin_engine_core()  # no split in the plan: nothing moves
    assert frozenset(core.cpu_affinity()) == before


def test_killed_engine_core_is_reported_dead(loop: LoopThread, engine: VLLMEngine) -> None:
    """Last test on the module's engine: kill its engine core as an OOM killer would."""
    core = next(p for p in engine._processes if p.name().startswith("VLLM::EngineCore"))
    core.kill()

    async def dead() -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                await engine.check_health()
            except EngineDeadError:
                return
            assert time.monotonic() < deadline, "check_health still passes 30 s after the engine core was killed"
            await asyncio.sleep(0.1)

    loop.run(dead())
    with pytest.raises(EngineDeadError):
        loop.run(_collect(engine, _request(max_tokens=4)))
    # The fixture's teardown then checks that shutdown reaps the worker and removes the shared memory the
    # killed engine core could not clean up itself.


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(loop: LoopThread) -> None:
    """Real weights: greedy SmolLM2 answers with Paris. Last in the module: it stops the tiny engine first."""
    from models.registry import resolve_source

    source = resolve_source("smollm2-135m-instruct")  # the user's cache; converted once (about 25 s)
    for running in _RUNNING:  # one engine at a time on a small machine; the fixture's later shutdown is a no-op
        loop.run(running.shutdown(), timeout=60)
    eng = VLLMEngine(_spec(source, id="smollm2", context_length=None, engine_kwargs={}))
    started = time.monotonic()
    loop.run(eng.start(), timeout=START_TIMEOUT_S)
    try:
        print(f"\nvLLM engine on SmolLM2 started in {time.monotonic() - started:.1f} s")
        chunks = loop.run(_collect(eng, _request(max_tokens=32, temperature=0.0)))
        assert "Paris" in _text(chunks), _text(chunks)
        _check_stream(chunks, chunks[0].prompt_tokens)
    finally:
        loop.run(eng.shutdown(), timeout=60)
