"""Continuous batching in the transformers engine: requests join the running decode batch and leave it per step.

The batch (`continuous.DecodeBatch`) is driven step by step, so which request joins when does not depend on timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deployments.engines.batching import WorkItem
from deployments.engines.continuous import DecodeBatch
from deployments.engines.decoding import GenerateJob
from deployments.engines.protocol import ChatMessage, GenerateChunk, GenerateRequest, SamplingConfig
from deployments.engines.transformers import TransformersEngine
from models.registry import resolve_source
from models.spec import ModelSpec

T = TypeVar("T")

TIMEOUT_S = 120.0
PROMPTS = [f"Request {i} says: " + "the quick brown fox " * (i % 4) + "jumps" for i in range(8)]


def run(coro: Awaitable[T], timeout: float = TIMEOUT_S) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def spec(source: Path, **overrides: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "id": "test-continuous",
        "task": "generate",
        "engine": "transformers",
        "source": str(source),
        "context_length": 512,
        "max_output_tokens": 256,
        "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.0},
    }
    return ModelSpec(**(fields | overrides))


def completion(prompt: str, max_tokens: int, **sampling: Any) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerateRequest(request_id="c", prompt=prompt, sampling=SamplingConfig(max_tokens=max_tokens, **sampling))


async def collect(engine: TransformersEngine, request: GenerateRequest) -> list[GenerateChunk]:
    return [chunk async for chunk in engine.generate(request)]


def text_of(chunks: list[GenerateChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def engine(cache_dir: Path) -> Iterator[TransformersEngine]:
    llm = TransformersEngine(spec(resolve_source("tiny-llama", cache_dir=cache_dir)))
    run(llm.start())
    try:
        yield llm
    finally:
        run(llm.shutdown())


class Driver:
    """Runs a `DecodeBatch` of an engine by hand: who joins at which step is the test's choice."""

    def __init__(self, engine: TransformersEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self.loop = engine, loop
        self.batch: DecodeBatch = engine._decode_batch()
        self.received: dict[str, list[object]] = {}
        self.items: dict[str, WorkItem[GenerateJob]] = {}

    def item(self, name: str, request: GenerateRequest) -> WorkItem[GenerateJob]:
        values = self.received.setdefault(name, [])
        self.items[name] = WorkItem(self.engine._prepare_generate(request), self.loop, values.append)
        return self.items[name]

    def running(self) -> set[str]:
        held = {id(item) for item in self.batch.items()}
        return {name for name, item in self.items.items() if id(item) in held}

    async def step(self, *joining: WorkItem[GenerateJob]) -> None:
        self.batch.step(list(joining))
        await asyncio.sleep(0)  # deliver what the step sent (the sinks run on this loop)

    def chunks(self, name: str) -> list[GenerateChunk]:
        values = self.received[name]
        assert all(isinstance(value, GenerateChunk) for value in values), values
        return [value for value in values if isinstance(value, GenerateChunk)]


def alone(engine: TransformersEngine, requests: list[GenerateRequest]) -> list[str]:
    return [text_of(run(collect(engine, request))) for request in requests]


def test_requests_joining_at_different_steps_get_their_greedy_output(engine: TransformersEngine) -> None:
    """Eight requests of different prompt lengths join every other step; each gets the text it gets alone."""
    requests = [completion(prompt, max_tokens=6 + 3 * i) for i, prompt in enumerate(PROMPTS)]
    expected = alone(engine, requests)
    widths: list[tuple[int, int]] = []  # (cache width, longest a running row can be) after each step

    async def drive() -> Driver:
        driver = Driver(engine, asyncio.get_running_loop())
        pending = [driver.item(str(i), request) for i, request in enumerate(requests)]
        for step in range(200):
            joining = [pending.pop(0)] if pending and step % 2 == 0 else []
            await driver.step(*joining)
            items = driver.batch.items()
            longest = max((len(i.payload.prompt_ids) + i.payload.sampling.max_tokens for i in items), default=0)
            widths.append((driver.batch.width, longest))
            if not pending and not driver.batch.items():
                return driver
        raise AssertionError("the batch did not finish in 200 steps")

    driver = run(drive())
    assert [text_of(driver.chunks(str(i))) for i in range(8)] == expected
    assert [driver.chunks(str(i))[-1].completion_tokens for i in range(8)] == [6 + 3 * i for i in range(8)]
    assert all(driver.items[str(i)].done for i in range(8))
    assert widths[-1] == (0, 0)
    assert all(width <= longest for width, longest in widths), "left padding no running row needs is cut away"


def test_a_request_joins_mid_decode_and_leaves_first(engine: TransformersEngine) -> None:
    """A short request joins a long one in mid-decode (with a longer prompt, so the running row is padded), ends
    first and leaves at once; the long one carries on to the same text it gets alone."""
    long_request = completion(PROMPTS[0], max_tokens=24)
    short_request = completion(PROMPTS[7], max_tokens=3)
    long_alone, short_alone = alone(engine, [long_request, short_request])

    async def drive() -> Driver:
        driver = Driver(engine, asyncio.get_running_loop())
        long_item, short_item = driver.item("long", long_request), driver.item("short", short_request)
        long_prompt, short_prompt = len(long_item.payload.prompt_ids), len(short_item.payload.prompt_ids)
        assert short_prompt > long_prompt + 3
        await driver.step(long_item)  # its prefill (token 1), then one decode (token 2)
        await driver.step()
        await driver.step()
        assert driver.running() == {"long"}
        assert driver.batch.width == long_prompt + 3, "the cache holds the prompt and the 3 tokens fed back"
        await driver.step(short_item)  # joins: its prefill, then one decode for both rows
        assert driver.running() == {"long", "short"}
        assert driver.batch.width == short_prompt + 1, "the running row is padded to the joining prompt"
        await driver.step()
        assert driver.running() == {"long"}, "the short request has its 3 tokens: it must leave at once"
        assert short_item.done and driver.chunks("short")[-1].finish_reason == "length"
        assert driver.batch.width == long_prompt + 5, "the padding only the short row needed is cut away"
        while driver.batch.items():
            await driver.step()
        return driver

    driver = run(drive())
    assert text_of(driver.chunks("short")) == short_alone
    assert text_of(driver.chunks("long")) == long_alone
    assert driver.chunks("long")[-1].completion_tokens == 24


def test_an_abandoned_request_leaves_at_the_next_step(engine: TransformersEngine) -> None:
    requests = [completion(PROMPTS[i], max_tokens=16) for i in range(3)]
    expected = alone(engine, requests)

    async def drive() -> Driver:
        driver = Driver(engine, asyncio.get_running_loop())
        items = [driver.item(str(i), request) for i, request in enumerate(requests)]
        await driver.step(*items)
        items[1].cancelled = True  # the client went away
        sent = len(driver.received["1"])
        await driver.step()
        assert driver.running() == {"0", "2"}
        assert len(driver.received["1"]) == sent, "nothing more is sent for an abandoned request"
        while driver.batch.items():
            await driver.step()
        return driver

    driver = run(drive())
    assert text_of(driver.chunks("0")) == expected[0] and text_of(driver.chunks("2")) == expected[2]
    assert not driver.items["1"].done


def test_seeded_sampling_does_not_depend_on_batch_mates(engine: TransformersEngine) -> None:
    sampled = completion(PROMPTS[2], max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    expected = alone(engine, [sampled])[0]

    async def drive() -> Driver:
        driver = Driver(engine, asyncio.get_running_loop())
        other = driver.item("other", completion(PROMPTS[5], max_tokens=20, temperature=0.8, seed=1))
        await driver.step(other)
        await driver.step(driver.item("sampled", sampled))
        while driver.batch.items():
            await driver.step()
        return driver

    assert text_of(run(drive()).chunks("sampled")) == expected


def test_stop_strings_and_min_tokens_in_a_joined_row(engine: TransformersEngine) -> None:
    full = alone(engine, [completion(PROMPTS[3], max_tokens=20)])[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    stopped = completion(PROMPTS[3], max_tokens=20, stop=(stop,), min_tokens=2)
    expected = alone(engine, [stopped])[0]
    assert expected == full[: full.index(stop)]

    async def drive() -> Driver:
        driver = Driver(engine, asyncio.get_running_loop())
        await driver.step(driver.item("first", completion(PROMPTS[0], max_tokens=30)))
        await driver.step(driver.item("stopped", stopped))
        while driver.batch.items():
            await driver.step()
        return driver

    chunks = run(drive()).chunks("stopped")
    assert text_of(chunks) == expected and chunks[-1].finish_reason == "stop"


def test_through_the_worker_a_new_request_does_not_wait_for_the_running_one(engine: TransformersEngine) -> None:
    """Submitted while a long request decodes, a short one joins its batch and finishes first.

    The long request's first decode pass waits until the short one is queued, so the order does not depend on timing.
    """
    long_request, short_request = completion(PROMPTS[0], max_tokens=40), completion(PROMPTS[6], max_tokens=3)
    long_alone, short_alone = alone(engine, [long_request, short_request])
    forward = engine._model.forward
    passes: list[int] = []
    queued = threading.Event()

    def gated(*args: Any, **kwargs: Any) -> Any:
        passes.append(len(passes) + 1)
        if len(passes) == 2:
            queued.wait(TIMEOUT_S)
        return forward(*args, **kwargs)

    finished: list[str] = []

    async def follow(name: str, request: GenerateRequest) -> list[GenerateChunk]:
        chunks = await collect(engine, request)
        finished.append(name)
        return chunks

    async def scenario() -> tuple[list[GenerateChunk], list[GenerateChunk]]:
        worker = engine._worker
        assert worker is not None
        stream = engine.generate(long_request)
        first = await anext(stream)  # the prefill made the first token; the worker now waits in its decode pass

        async def rest() -> list[GenerateChunk]:
            chunks = [first, *[chunk async for chunk in stream]]
            finished.append("long")
            return chunks

        long_task = asyncio.create_task(rest())
        short_task = asyncio.create_task(follow("short", short_request))
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while worker._queue.empty():  # the short request reached the queue
            assert asyncio.get_running_loop().time() < deadline, "the short request never reached the queue"
            await asyncio.sleep(0.001)
        queued.set()
        return await long_task, await short_task

    before = engine.stats
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine._model, "forward", gated)
        long_chunks, short_chunks = run(scenario())
    assert finished == ["short", "long"]
    assert text_of(long_chunks) == long_alone and text_of(short_chunks) == short_alone
    after = engine.stats
    assert (after.items - before.items, after.batches - before.batches) == (2, 2)
    assert after.max_batch_size_seen >= 2


def test_concurrent_requests_through_the_queue_match_alone(engine: TransformersEngine) -> None:
    """More requests than `max_batch_size` (4), sent at once: however they are grouped, the texts are the same."""
    requests = [completion(prompt, max_tokens=5 + 2 * i) for i, prompt in enumerate(PROMPTS)]
    expected = alone(engine, requests)

    async def together() -> list[list[GenerateChunk]]:
        return list(await asyncio.gather(*(collect(engine, request) for request in requests)))

    before = engine.stats
    assert [text_of(chunks) for chunks in run(together())] == expected
    assert engine.stats.max_batch_size_seen <= 4 and engine.stats.items - before.items == 8


# -- the real small model (slow) ----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_joined_mid_batch_matches_alone(cache_dir: Path) -> None:
    source = resolve_source("smollm2-135m-instruct", cache_dir=cache_dir)  # `make install` installs its package
    smollm = TransformersEngine(spec(source, max_output_tokens=64, batching={"max_batch_size": 8}))
    run(smollm.start())
    try:
        questions = ["What is the capital of France?", "Name three colours.", "Say hello."]
        requests = [
            GenerateRequest(
                request_id=str(i),
                messages=(ChatMessage(role="user", content=question),),
                sampling=SamplingConfig(max_tokens=16, temperature=0.0),
            )
            for i, question in enumerate(questions)
        ]
        expected = alone(smollm, requests)

        async def drive() -> Driver:
            driver = Driver(smollm, asyncio.get_running_loop())
            pending = [driver.item(str(i), request) for i, request in enumerate(requests)]
            for step in range(200):
                joining = [pending.pop(0)] if pending and step % 3 == 0 else []
                await driver.step(*joining)
                if not pending and not driver.batch.items():
                    return driver
            raise AssertionError("the batch did not finish in 200 steps")

        driver = run(drive(), timeout=600)
        assert [text_of(driver.chunks(str(i))) for i in range(3)] == expected
        assert "Paris" in expected[0]
    finally:
        run(smollm.shutdown())
