"""Dynamic batching mechanics: a request queue drained by one worker thread, results handed back to asyncio.

The worker knows nothing about models: it groups waiting `WorkItem`s into batches and calls `run_batch`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from deployments.errors import EngineDeadError, EngineError

__all__ = ["BatchStats", "BatchWorker", "WorkItem"]

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
    """Counters of a worker since it started (a snapshot)."""

    batches: int = 0
    items: int = 0
    max_batch_size_seen: int = 0
    failed_batches: int = 0


class BatchWorker(Generic[P]):
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
        self._name = name
        self._on_start = on_start
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._wait_timeout_s = wait_timeout_s
        self._queue: queue.Queue[object] = queue.Queue()
        self._stopping = threading.Event()
        self._stats = BatchStats()
        self._current: list[WorkItem[P]] = []
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    @property
    def stats(self) -> BatchStats:
        """Counters so far."""
        return self._stats

    @property
    def stopping(self) -> bool:
        """True once `stop` was called: `run_batch` should return early."""
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

    def _main(self) -> None:
        try:
            if self._on_start is not None:
                self._on_start()
            while not self._stopping.is_set():
                batch = self._next_batch()
                if batch:
                    self._run(batch)
        except BaseException:  # noqa: BLE001 - the thread must record its death, not vanish silently
            logger.exception("%s: worker thread died", self._name)
        finally:
            self._stopping.set()
            for item in self._current:
                item.fail(EngineDeadError("the engine stopped while running this request"))
            self._fail_queued()

    def _next_batch(self) -> list[WorkItem[P]]:
        first = self._queue.get()
        if first is _STOP:
            return []
        batch: list[WorkItem[P]] = [first]  # type: ignore[list-item]
        deadline = time.monotonic() + self._wait_timeout_s
        while len(batch) < self._max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)  # run what we have; the loop sees `stopping` afterwards
                break
            batch.append(item)  # type: ignore[arg-type]
        return [item for item in batch if not item.cancelled]

    def _run(self, batch: list[WorkItem[P]]) -> None:
        s = self._stats
        self._stats = dataclasses.replace(
            s,
            batches=s.batches + 1,
            items=s.items + len(batch),
            max_batch_size_seen=max(s.max_batch_size_seen, len(batch)),
        )
        self._current = batch  # if a BaseException kills the thread, `_main` fails these as dead
        try:
            self._run_batch(batch)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not take the worker down
            logger.exception("%s: batch of %d failed", self._name, len(batch))
            self._stats = dataclasses.replace(self._stats, failed_batches=self._stats.failed_batches + 1)
            for item in batch:
                item.fail(EngineError(f"the engine failed while running this request ({type(exc).__name__})"))
        self._current = []
        for item in batch:
            if not item.done and not item.cancelled:
                item.fail(EngineDeadError("the engine is shutting down") if self.stopping else EngineError("no result"))

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, WorkItem):
                item.fail(EngineDeadError("the engine stopped before running this request"))
