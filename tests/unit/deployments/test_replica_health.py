"""A wedged engine, without Ray: the echo engine's `wedge_after` hook, the replica's progress tracking that tells a
wedged engine from a busy or idle one, and the health options the plan hands to Serve."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployments.engines.echo import EchoEngine
from deployments.engines.protocol import EmbedRequest, GenerateRequest, SamplingConfig
from deployments.errors import EngineStartError
from deployments.plan import plan_model
from deployments.replica import Progress
from models.spec import ModelSpec


def _echo(**kwargs: Any) -> EchoEngine:
    return EchoEngine(ModelSpec(id="e", task="generate", engine="echo", engine_kwargs=kwargs))


async def _answer(engine: EchoEngine, prompt: str) -> str:
    request = GenerateRequest(request_id=prompt, prompt=prompt, sampling=SamplingConfig(max_tokens=8))
    return "".join([chunk.text async for chunk in engine.generate(request)])


def test_echo_wedges_after_n_requests_and_its_health_check_still_passes() -> None:
    async def scenario() -> None:
        engine = _echo(wedge_after=2)
        await engine.start()
        assert await _answer(engine, "one") == "one"
        assert await _answer(engine, "two") == "two"
        with pytest.raises(TimeoutError):  # accepted, never answered
            await asyncio.wait_for(_answer(engine, "three"), 0.5)
        await engine.check_health()  # the engine's own check cannot tell

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_echo_wedge_also_holds_embeddings() -> None:
    async def scenario() -> None:
        engine = EchoEngine(ModelSpec(id="e", task="embed", engine="echo", engine_kwargs={"wedge_after": 1}))
        await engine.start()
        await engine.embed(EmbedRequest(request_id="a", inputs=("x",)))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(engine.embed(EmbedRequest(request_id="b", inputs=("x",))), 0.5)

    asyncio.run(asyncio.wait_for(scenario(), 10))


@pytest.mark.parametrize("value", [0, -1, "3", True, 1.5])
def test_echo_refuses_a_bad_wedge_after(value: Any) -> None:
    with pytest.raises(EngineStartError, match="wedge_after"):
        asyncio.run(_echo(wedge_after=value).start())


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_counts_a_stall_only_while_requests_wait() -> None:
    clock = Clock()
    progress = Progress(clock)
    clock.now += 50
    assert progress.stalled_s() == 0.0  # idle is not stalled
    with progress.request():
        assert progress.stalled_s() == 0.0  # the wait starts with the request, not with the last output before it
        clock.now += 6
        assert progress.stalled_s() == 6
        progress.made()
        assert progress.stalled_s() == 0.0
        clock.now += 1
        assert progress.stalled_s() == 1 and progress.in_flight == 1
    assert progress.in_flight == 0 and progress.stalled_s() == 0.0


def test_progress_counts_an_error_as_an_answer_and_a_cancellation_not() -> None:
    clock = Clock()
    progress = Progress(clock)
    with progress.request():
        clock.now += 5
        with pytest.raises(ValueError), progress.request():
            raise ValueError("the engine answered with an error")
        assert progress.stalled_s() == 0.0
        clock.now += 5
        with pytest.raises(asyncio.CancelledError), progress.request():
            raise asyncio.CancelledError
        assert progress.stalled_s() == 5
    assert progress.in_flight == 0


def test_plan_hands_the_health_settings_to_serve() -> None:
    spec = ModelSpec(id="e", task="generate", engine="echo", health={"period_s": 2, "timeout_s": 7})
    options = plan_model(spec).serve_options
    assert (options["health_check_period_s"], options["health_check_timeout_s"]) == (2, 7)
    assert spec.health.stall_timeout_s == 120.0  # the default
