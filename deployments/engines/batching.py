"""Batching mechanics: a request queue drained by one worker thread, results handed back to asyncio.

Two workers share the queue, the thread and the failure rules: `BatchWorker` runs whole batches (embeddings),
`StepWorker` drives a `Stepper` one step at a time, letting queued items join at every step (continuous
batching of generation). Neither knows anything about models.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from deployments.errors import EngineDeadError, EngineError

__all__ = ["BatchStats", "BatchWorker", "StepWorker", "Stepper", "WorkItem"]

logger = logging.getLogger(__name__)

P = TypeVar("P")

_STOP = object()  # queue sentinel that wakes the worker up to exit


class WorkItem(Generic[P]):
    """One unit of batched work and the way its results go back to the event loop that submitted it.

    `sink` runs on that loop for every value sent; an exception instance means failure.
    """

    def __init__(self, payload: P, loop: asyncio.AbstractEventLoop, sink: Callable[[object], None]) -> None:
        self.payload = payload
        self.cancelled = False  # set from the loop when the client goes away; read by the worker
        self.done = False  # set by the worker once a final value or an error was sent
        self._loop = loop
        self._sink = sink

    def send(self, value: object, *, final: bool = False) -> None:
        """Hand `value` to the submitting loop (thread-safe); a no-op once the item is done."""
        if self.done:
            return
        self.done = final
        try:
            self._loop.call_soon_threadsafe(self._sink, value)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def fail(self, error: BaseException) -> None:
        """Send `error` as the item's final result."""
        self.send(error, final=True)


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """Counters of a worker since it started (a snapshot).

    `batches`: groups of items taken from the queue together (for a `StepWorker`: groups that joined a step);
    `steps`: steps a `StepWorker` ran; `max_batch_size_seen`: most items in one batch or step;
    `failed_batches`: batches (steps) that raised.
    """

    batches: int = 0
    items: int = 0
    max_batch_size_seen: int = 0
    failed_batches: int = 0
    steps: int = 0


class Stepper(Protocol[P]):
    """What a `StepWorker` drives: a running set of items advanced one step at a time (on the worker thread)."""

    def room(self, limit: int) -> int:
        """How many queued items may join at the next step, given at most `limit` running together."""
        ...

    def step(self, joining: list[WorkItem[P]]) -> None:
        """Take `joining` in and advance every running item by one step; finished items send their final value."""
        ...

    def items(self) -> list[WorkItem[P]]:
        """The items still running."""
        ...

    def clear(self) -> None:
        """Forget every running item (after a failed step)."""
        ...


class _QueueWorker(Generic[P]):
    """The queue, the thread, stop and the failure of queued items; subclasses write `_loop`."""

    def __init__(
        self, name: str, *, max_batch_size: int, wait_timeout_s: float, on_start: Callable[[], None] | None
    ) -> None:
        self._name = name
        self._on_start = on_start
        self._max_batch_size = max_batch_size
        self._wait_timeout_s = wait_timeout_s
        self._queue: queue.Queue[object] = queue.Queue()
        self._stopping = threading.Event()
        self._stats = BatchStats()
        self._current: list[WorkItem[P]] = []  # if a BaseException kills the thread, `_main` fails these as dead
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    @property
    def stats(self) -> BatchStats:
        """Counters so far."""
        return self._stats

    @property
    def stopping(self) -> bool:
        """True once `stop` was called: running work should return early."""
        return self._stopping.is_set()

    def is_alive(self) -> bool:
        """True while the worker thread runs and is not being stopped."""
        return self._thread.is_alive() and not self._stopping.is_set()

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def submit(self, item: WorkItem[P]) -> None:
        """Queue `item` for the next batch.

        Raises:
            EngineDeadError: the worker is stopped or died.
        """
        if not self.is_alive():
            raise EngineDeadError("the engine is not running")
        self._queue.put(item)

    def stop(self, timeout_s: float) -> None:
        """Stop the thread (waiting at most `timeout_s`) and fail every queued item with `EngineDeadError`."""
        self._stopping.set()
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("%s: worker still busy %.1f s after stop; abandoning it", self._name, timeout_s)
        self._fail_queued()

    def _loop(self) -> None:
        raise NotImplementedError

    def _held(self) -> list[WorkItem[P]]:
        """Items the thread holds besides `_current` (failed as dead when it ends)."""
        return []

    def _main(self) -> None:
        try:
            if self._on_start is not None:
                self._on_start()
            self._loop()
        except BaseException:  # noqa: BLE001 - the thread must record its death, not vanish silently
            logger.exception("%s: worker thread died", self._name)
        finally:
            self._stopping.set()
            for item in [*self._current, *self._held()]:
                item.fail(EngineDeadError("the engine stopped while running this request"))
            self._fail_queued()

    def _take(self, room: int, *, wait: bool) -> list[WorkItem[P]]:
        """Up to `room` queued items. `wait`: block for the first, then up to `wait_timeout_s` for more; else only
        what is queued now."""
        if room <= 0:
            return []
        taken: list[WorkItem[P]] = []
        if wait:
            first = self._queue.get()
            if first is _STOP:
                return []
            taken.append(first)  # type: ignore[arg-type]
        deadline = time.monotonic() + (self._wait_timeout_s if wait else 0.0)
        while len(taken) < room:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)  # run what we have; the loop sees `stopping` afterwards
                break
            taken.append(item)  # type: ignore[arg-type]
        return [item for item in taken if not item.cancelled]

    def _count(self, **increments: int) -> None:
        s = self._stats
        changes = {name: getattr(s, name) + value for name, value in increments.items()}
        self._stats = dataclasses.replace(s, **changes)

    def _seen(self, size: int) -> None:
        if size > self._stats.max_batch_size_seen:
            self._stats = dataclasses.replace(self._stats, max_batch_size_seen=size)

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, WorkItem):
                item.fail(EngineDeadError("the engine stopped before running this request"))


class BatchWorker(_QueueWorker[P]):
    """Runs queued items in batches on one dedicated thread.

    A batch starts when an item arrives; the worker then waits up to `wait_timeout_s` for more, up to
    `max_batch_size` items. Items that arrive while a batch runs go into the next one. An exception from
    `run_batch` fails only that batch's unfinished items with `EngineError`; the thread carries on.
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[WorkItem[P]]], None],
        *,
        max_batch_size: int,
        wait_timeout_s: float,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name, max_batch_size=max_batch_size, wait_timeout_s=wait_timeout_s, on_start=on_start)
        self._run_batch = run_batch

    def _loop(self) -> None:
        while not self._stopping.is_set():
            batch = self._take(self._max_batch_size, wait=True)
            if batch:
                self._run(batch)

    def _run(self, batch: list[WorkItem[P]]) -> None:
        self._count(batches=1, items=len(batch))
        self._seen(len(batch))
        self._current = batch
        try:
            self._run_batch(batch)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not take the worker down
            logger.exception("%s: batch of %d failed", self._name, len(batch))
            self._count(failed_batches=1)
            for item in batch:
                item.fail(EngineError(f"the engine failed while running this request ({type(exc).__name__})"))
        self._current = []
        for item in batch:
            if not item.done and not item.cancelled:
                item.fail(EngineDeadError("the engine is shutting down") if self.stopping else EngineError("no result"))


class StepWorker(_QueueWorker[P]):
    """Drives a `Stepper` on one dedicated thread: continuous batching.

    While items run, the items queued meanwhile join at the next step (as many as `stepper.room` allows) and
    finished ones leave at once. When nothing runs the worker blocks for the first item, then waits up to
    `wait_timeout_s` for more so that a burst starts together. An exception from a step fails the items of
    that step (the running and the joining ones) with `EngineError`; the thread carries on.
    """

    def __init__(
        self,
        name: str,
        stepper: Stepper[P],
        *,
        max_batch_size: int,
        wait_timeout_s: float,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name, max_batch_size=max_batch_size, wait_timeout_s=wait_timeout_s, on_start=on_start)
        self._stepper = stepper

    def _held(self) -> list[WorkItem[P]]:
        return self._stepper.items()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            running = self._stepper.items()
            joining = self._take(self._stepper.room(self._max_batch_size), wait=not running)
            if self._stopping.is_set():
                self._current = joining  # failed as dead by `_main`
                return
            if joining or running:
                self._step(joining)

    def _step(self, joining: list[WorkItem[P]]) -> None:
        if joining:
            self._count(batches=1, items=len(joining))
        self._count(steps=1)
        self._seen(len(self._stepper.items()) + len(joining))
        self._current = joining
        try:
            self._stepper.step(joining)
        except Exception as exc:  # noqa: BLE001 - one bad step must not take the worker down
            held = self._stepper.items()
            logger.exception("%s: step of %d requests failed", self._name, len(held) + len(joining))
            self._count(failed_batches=1)
            error = EngineError(f"the engine failed while running this request ({type(exc).__name__})")
            for item in [*joining, *held]:
                item.fail(error)
            self._stepper.clear()
        self._current = []
        kept = {id(item) for item in self._stepper.items()}
        for item in joining:
            if not item.done and not item.cancelled and id(item) not in kept:
                item.fail(EngineError("no result"))
