"""Per-request timing at the router replica: a `RequestRecord` per HTTP request (opened by the outermost middleware)
and a `StreamWatch` per call handed to a model's Serve handle, observed into `deployments.metrics` once per request.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any

from deployments.engines.protocol import EmbedResult, GenerateChunk, ReplicaTimes
from deployments.metrics import (
    E2E_LATENCY,
    QUEUE_TIME,
    REQUESTS,
    STREAM_ERRORS,
    TPOT,
    TTFT,
    TTFT_PART,
    instrument,
    observe,
)

__all__ = ["RequestRecord", "StreamWatch", "dispatch", "label_model"]

_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("modelfleet_request", default=None)
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class RequestRecord:
    """What one HTTP request did at the router replica, observed once when it ends (`finish`).

    The outermost middleware opens it (`begin`); the router's calls (`dispatch`) find it through a context
    variable, which the tasks that stream the response inherit.
    """

    __slots__ = ("_token", "dispatched", "endpoint", "first", "model", "received_at", "status", "stream_failed")

    def __init__(self) -> None:
        self.received_at = time.time()
        self.model = ""
        self.endpoint = "other"
        self.status = 500  # until a response starts: an exception that escapes the app is a 500
        self.dispatched: list[tuple[float, ReplicaTimes]] = []  # (handed to the handle, replica's stamps)
        self.first: tuple[float, float, ReplicaTimes | None] | None = None  # streams: (dispatched, arrived, stamps)
        self.stream_failed = False
        self._token: contextvars.Token[RequestRecord | None] | None = None

    @classmethod
    def begin(cls) -> RequestRecord:
        """Open the record of the HTTP request being handled in this context."""
        record = cls()
        record._token = _current.set(record)
        return record

    def wrap(self, send: Send) -> Send:
        """`send` that notes the response's status as it starts (one check per message)."""

        async def noting_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = int(message["status"])
            await send(message)

        return noting_send

    def finish(self, scope: MutableMapping[str, Any], paths: Collection[str]) -> None:
        """Observe the request: count it, its latency, and for streams the time to first token and its parts.

        Args:
            scope: the request's ASGI scope (the route that served it, if any).
            paths: the app's route templates: an unrouted request (refused before routing) keeps its path if it
                is one of them, else it counts as 'other'.
        """
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        now = time.time()
        route = scope.get("route")
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        endpoint = getattr(route, "path", None) or (path if path in paths else "other")
        model = {"model": self.model}
        instrument(REQUESTS).inc(1, tags={**model, "endpoint": endpoint, "status": str(self.status)})
        observe(E2E_LATENCY, now - self.received_at, {**model, "endpoint": endpoint})
        if self.stream_failed:
            instrument(STREAM_ERRORS).inc(1, tags={**model, "endpoint": endpoint})
        for handed, stamps in self.dispatched:
            observe(QUEUE_TIME, stamps.received_at - handed, model)
        if self.first is not None:
            sent, arrived, times = self.first
            observe(TTFT, arrived - self.received_at, model)
            if times is not None:
                parts = {
                    "ingress": sent - self.received_at,
                    "router_queue": times.received_at - sent,
                    "engine": times.first_output_at - times.received_at,
                    "transport": arrived - times.first_output_at,
                }
                for part, seconds in parts.items():
                    observe(TTFT_PART, seconds, {**model, "part": part})

    # Called by StreamWatch (router side) as outputs arrive.
    def _first_output(self, sent: float, arrived: float, times: ReplicaTimes | None) -> None:
        if self.first is None:  # `n` choices: the first of them
            self.first = (sent, arrived, times)


class StreamWatch:
    """One call the router hands to a model's Serve handle, within an HTTP request's record: when it was handed
    over, and what came back when. Without a record (no HTTP request around it) it records nothing."""

    __slots__ = ("_first_at", "_first_tokens", "_record", "model", "sent")

    def __init__(self, record: RequestRecord | None, model_id: str) -> None:
        self._record = record
        self.model = model_id
        self.sent = time.time()
        self._first_at = 0.0
        self._first_tokens = 0
        if record is not None:
            record.model = model_id

    def result(self, result: GenerateChunk | EmbedResult) -> None:
        """A unary call returned: its queue time."""
        if self._record is not None and result.times is not None:
            self._record.dispatched.append((self.sent, result.times))

    def chunk(self, chunk: GenerateChunk) -> None:
        """A streamed output arrived (called for every chunk: two checks unless it is the first or the last)."""
        record = self._record
        if record is None:
            return
        if not self._first_at:
            self._first_at = now = time.time()
            self._first_tokens = chunk.completion_tokens
            record._first_output(self.sent, now, chunk.times)
            if chunk.times is not None:
                record.dispatched.append((self.sent, chunk.times))
        if chunk.finish_reason is not None and chunk.completion_tokens > self._first_tokens:
            per_token = (time.time() - self._first_at) / (chunk.completion_tokens - self._first_tokens)
            observe(TPOT, per_token, {"model": self.model})

    def failed(self) -> None:
        """The call failed after its first output: the response's status was already sent."""
        if self._record is not None and self._first_at:
            self._record.stream_failed = True


def label_model(model_id: str) -> None:
    """The current HTTP request is for this served model (its metrics' `model` label)."""
    record = _current.get()
    if record is not None:
        record.model = model_id


def dispatch(model_id: str) -> StreamWatch:
    """A watch on a call the router is about to hand to `model_id`'s Serve handle (within the current HTTP
    request's record, if any)."""
    return StreamWatch(_current.get(), model_id)
