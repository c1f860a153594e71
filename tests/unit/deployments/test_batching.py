"""StepWorker (continuous batching) driven with a model-free `Stepper` of our own: joins, failures, stop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from deployments.engines.batching import StepWorker, WorkItem
from deployments.errors import EngineDeadError, EngineError

T = TypeVar("T")

TIMEOUT_S = 30.0
FOREVER = -1  # a payload that runs until its client goes away (or the worker stops)
BOOM = -2  # a payload whose step raises


class CountingStepper:
    """Each item runs for `payload` steps and then sends the number of steps it saw; at most `limit` run together."""

    def __init__(self) -> None:
        self.running: list[tuple[WorkItem[int], int]] = []
        self.sizes: list[int] = []  # rows in each step
        self.step_done = threading.Event()

    def room(self, limit: int) -> int:
        return limit - len(self.running)

    def items(self) -> list[WorkItem[int]]:
        return [item for item, _ in self.running]

    def clear(self) -> None:
        self.running = []

    def step(self, joining: list[WorkItem[int]]) -> None:
        if any(item.payload == BOOM for item in joining):
            raise RuntimeError("simulated step failure")
        self.running = [(item, steps) for item, steps in self.running if not item.cancelled]
        self.running += [(item, 0) for item in joining]
        self.sizes.append(len(self.running))
        advanced = [(item, steps + 1) for item, steps in self.running]
        self.running = [(item, steps) for item, steps in advanced if steps != item.payload]
        for item, steps in advanced:
            if steps == item.payload:  # sent once it left: whoever gets it sees it gone
                item.send(steps, final=True)
        self.step_done.set()
        threading.Event().wait(0.001)  # a forever-running item must not spin the CPU


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, TIMEOUT_S)

    return asyncio.run(bounded())


async def submit(worker: StepWorker[int], payload: int) -> tuple[WorkItem[int], asyncio.Future[object]]:
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    def settle(value: object) -> None:
        if not future.done():
            future.set_result(value)

    item = WorkItem(payload, asyncio.get_running_loop(), settle)
    worker.submit(item)
    return item, future


def worker_for(stepper: CountingStepper, max_batch_size: int = 4) -> StepWorker[int]:
    worker = StepWorker("test", stepper, max_batch_size=max_batch_size, wait_timeout_s=0.0)
    worker.start()
    return worker


def test_items_join_the_running_ones_and_leave_when_done() -> None:
    stepper = CountingStepper()
    worker = worker_for(stepper)

    async def scenario() -> tuple[object, object]:
        forever, forever_result = await submit(worker, FOREVER)
        while not stepper.items():  # bounded by run()'s timeout
            await asyncio.sleep(0.001)
        _, three = await submit(worker, 3)  # joins while `forever` runs: not after it
        result = await three
        assert stepper.items() == [forever], "the finished item left; the running one carries on"
        worker.stop(TIMEOUT_S)
        return result, await forever_result

    try:
        three_result, forever_result = run(scenario())
    finally:
        worker.stop(TIMEOUT_S)
    assert three_result == 3
    assert isinstance(forever_result, EngineDeadError), "stop fails what still runs"
    assert worker.stats.items == 2 and worker.stats.batches == 2 and worker.stats.max_batch_size_seen == 2


def test_a_failed_step_fails_its_items_and_the_worker_carries_on() -> None:
    stepper = CountingStepper()
    worker = worker_for(stepper)

    async def scenario() -> list[object]:
        _, running = await submit(worker, FOREVER)
        while not stepper.items():
            await asyncio.sleep(0.001)
        _, boom = await submit(worker, BOOM)
        results = [await running, await boom]
        _, after = await submit(worker, 2)
        return [*results, await after]

    try:
        running, boom, after = run(scenario())
    finally:
        worker.stop(TIMEOUT_S)
    assert type(running) is EngineError and type(boom) is EngineError
    assert "RuntimeError" in str(boom) and "simulated" not in str(boom)
    assert after == 2
    assert worker.stats.failed_batches == 1


def test_at_most_max_batch_size_run_together() -> None:
    stepper = CountingStepper()
    worker = worker_for(stepper, max_batch_size=3)

    async def scenario() -> list[object]:
        futures = [(await submit(worker, 5 + i))[1] for i in range(7)]
        return list(await asyncio.gather(*futures))

    try:
        results = run(scenario())
    finally:
        worker.stop(TIMEOUT_S)
    assert results == [5 + i for i in range(7)]
    assert max(stepper.sizes) == 3 and worker.stats.max_batch_size_seen == 3


def test_abandoned_item_leaves_without_a_result() -> None:
    stepper = CountingStepper()
    worker = worker_for(stepper)

    async def scenario() -> None:
        item, future = await submit(worker, FOREVER)
        while not stepper.items():
            await asyncio.sleep(0.001)
        item.cancelled = True
        while stepper.items():
            await asyncio.sleep(0.001)
        assert not future.done()

    try:
        run(scenario())
    finally:
        worker.stop(TIMEOUT_S)

    async def too_late() -> None:
        with pytest.raises(EngineDeadError):
            await submit(worker, 1)

    run(too_late())
