"""The streaming client: reads one OpenAI server-sent-event stream (chat or completions) into a `Sample`."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from cluster.bench.load import Mode
from cluster.bench.stats import Sample

__all__ = ["StreamReader", "failure", "sse_data", "stream_one"]


def sse_data(line: str) -> str | None:
    """The payload of an SSE `data:` line; None for any other line (blank, comment, event name)."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


class StreamReader:
    """Reads one streamed OpenAI response: time of the first non-empty content, content chunks, usage, errors."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.ttft: float | None = None
        self.chunks = 0
        self.usage_tokens: int | None = None
        self.error: str | None = None
        self.done = False

    @property
    def output_tokens(self) -> int:
        """Completion tokens from the usage chunk; without one, the number of content chunks."""
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    def feed(self, data: str, elapsed: float) -> None:
        """Take one `data:` payload that arrived `elapsed` seconds after the request was sent.

        Raises:
            ValueError: the payload is neither `[DONE]` nor JSON.
        """
        if data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        if "error" in event:
            error = event["error"] if isinstance(event["error"], dict) else {}
            self.error = f"stream:{error.get('type') or 'error'}"
            return
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])
        for choice in event.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") if self.mode == "chat" else choice.get("text")
            if text:
                self.chunks += 1
                if self.ttft is None:
                    self.ttft = elapsed


def failure(exc: httpx.HTTPError) -> str:
    """The error name a sample records for a transport failure."""
    return "timeout" if isinstance(exc, httpx.TimeoutException) else type(exc).__name__


async def stream_one(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], mode: Mode, sample: Sample, begin: float
) -> None:
    """POST one streaming request and fill `sample` (TTFT since `begin`, output tokens, or the error)."""
    reader = StreamReader(mode)
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                sample.error = str(response.status_code)
                return
            async for line in response.aiter_lines():
                data = sse_data(line)
                if data is not None:
                    reader.feed(data, time.perf_counter() - begin)
                if reader.done or reader.error:
                    break
    except httpx.HTTPError as exc:
        sample.error = failure(exc)
        return
    except ValueError:
        sample.error = "bad_stream"
        return
    sample.ttft, sample.output_tokens = reader.ttft, reader.output_tokens
    sample.error = reader.error or (None if reader.done else "incomplete_stream")
