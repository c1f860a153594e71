"""The metric catalogue, the router's per-request timing (time to first token and its parts, status, endpoint) and
the replica's live counts, recorded into a fake of our own `instrument` (outside Ray, Ray's metric objects record
nothing, so what is recorded is read from the fake)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments import metrics, timing
from deployments.api import ingress
from deployments.api import limits as limits_mod
from deployments.auth import KeyRing
from deployments.engines.protocol import EmbedResult, GenerateChunk, ReplicaTimes

ROOT = Path(__file__).resolve().parents[3]


class Recorded:
    """Stands in for one Ray metric object: remembers every call."""

    def __init__(self, name: str, calls: list[tuple[str, float, dict[str, str]]]) -> None:
        self.name, self.calls = name, calls

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append((self.name, value, dict(tags)))

    observe = set = inc


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, float, dict[str, str]]]]:
    calls: list[tuple[str, float, dict[str, str]]] = []
    fakes = {m.name: Recorded(m.name, calls) for m in metrics.METRICS}
    monkeypatch.setattr(metrics, "instrument", lambda m: fakes[m.name])
    monkeypatch.setattr(timing, "instrument", lambda m: fakes[m.name])
    yield calls


class Clock:
    """`time.time()` as the test sets it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(timing.time, "time", lambda: self.now)


def _of(
    calls: list[tuple[str, float, dict[str, str]]], metric: metrics.MetricDef
) -> list[tuple[float, dict[str, str]]]:
    return [(value, tags) for name, value, tags in calls if name == metric.name]


# -- the catalogue ------------------------------------------------------------------------------------------------


def test_metric_names_follow_prometheus_conventions() -> None:
    names = [m.name for m in metrics.METRICS]
    assert len(set(names)) == len(names)
    for m in metrics.METRICS:
        assert re.fullmatch(r"modelfleet_[a-z0-9_]+", m.name), m.name
        assert not m.name.endswith("_total"), "Ray adds _total to counters"
        assert m.kind != "histogram" or m.name.endswith("_seconds") and m.buckets == tuple(sorted(m.buckets))
        assert "model" in m.labels and m.description
    assert metrics.REQUESTS.exported == "ray_modelfleet_requests_total"
    assert metrics.TTFT.exported == "ray_modelfleet_time_to_first_token_seconds"


def test_docs_list_every_metric_and_label() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    for m in metrics.METRICS:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{m.exported}` |")), None)
        assert row is not None, f"docs/metrics.md has no row for {m.exported}"
        assert all(f"`{label}`" in row for label in m.labels), (m.exported, row)
    for part in metrics.TTFT_PARTS:
        assert f"`{part}`" in text


# -- the router's record of a request ---------------------------------------------------------------------------


def _times(received: float, first: float) -> ReplicaTimes:
    return ReplicaTimes(received_at=received, first_output_at=first)


def test_streamed_request_splits_time_to_first_token(recorded: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    record = timing.RequestRecord.begin()  # 1000.0
    clock.now = 1000.5
    watch = timing.dispatch("m")  # sent 1000.5 (ingress 0.5)
    clock.now = 1002.0  # router queue 0.25, engine 1.0, transport 0.25
    watch.chunk(GenerateChunk(text="a", prompt_tokens=3, completion_tokens=1, times=_times(1000.75, 1001.75)))
    clock.now = 1002.5
    watch.chunk(GenerateChunk(text="b", prompt_tokens=3, completion_tokens=3))
    clock.now = 1003.0
    watch.chunk(GenerateChunk(text="c", prompt_tokens=3, completion_tokens=5, finish_reason="stop"))
    clock.now = 1004.0
    record.status = 200
    record.finish({"path": "/v1/chat/completions", "route": _Route("/v1/chat/completions")}, set())
    assert _of(recorded, metrics.TTFT) == [(2.0, {"model": "m"})]
    parts = {tags["part"]: value for value, tags in _of(recorded, metrics.TTFT_PART)}
    assert parts == {"ingress": 0.5, "router_queue": 0.25, "engine": 1.0, "transport": 0.25}
    assert sum(parts.values()) == 2.0
    assert _of(recorded, metrics.TPOT) == [(0.25, {"model": "m"})]  # 1 s for the 4 tokens after the first output
    assert _of(recorded, metrics.QUEUE_TIME) == [(0.25, {"model": "m"})]
    labels = {"model": "m", "endpoint": "/v1/chat/completions"}
    assert _of(recorded, metrics.REQUESTS) == [(1, {**labels, "status": "200"})]
    assert _of(recorded, metrics.E2E_LATENCY) == [(4.0, labels)]
    assert _of(recorded, metrics.STREAM_ERRORS) == []


def test_clock_skew_never_records_negative_parts(recorded: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    record = timing.RequestRecord.begin()
    watch = timing.dispatch("m")
    clock.now = 1001.0
    # The replica's clock runs 5 s behind the router's.
    watch.chunk(GenerateChunk(text="a", prompt_tokens=1, completion_tokens=1, times=_times(995.5, 995.75)))
    record.finish({"path": "/v1/completions"}, {"/v1/completions"})
    parts = {tags["part"]: value for value, tags in _of(recorded, metrics.TTFT_PART)}
    assert parts["router_queue"] == 0.0 and parts["transport"] > 0 and min(parts.values()) >= 0


def test_unary_calls_record_queue_time_and_no_time_to_first_token(
    recorded: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    record = timing.RequestRecord.begin()
    watch = timing.dispatch("e")
    clock.now = 1003.0
    watch.result(EmbedResult(embeddings=((1.0,),), prompt_tokens=2, times=_times(1001.0, 1002.0)))
    record.finish({"path": "/v1/embeddings"}, {"/v1/embeddings"})
    assert _of(recorded, metrics.QUEUE_TIME) == [(1.0, {"model": "e"})]
    assert _of(recorded, metrics.TTFT) == [] and _of(recorded, metrics.TPOT) == []
    assert _of(recorded, metrics.REQUESTS)[0][1]["endpoint"] == "/v1/embeddings"


def test_stream_failure_counts_only_after_the_first_output(recorded: list[Any]) -> None:
    record = timing.RequestRecord.begin()
    before = timing.dispatch("m")
    before.failed()  # nothing was sent yet: the client gets an error status instead
    after = timing.dispatch("m")
    after.chunk(GenerateChunk(text="a", prompt_tokens=1, completion_tokens=1))
    after.failed()
    record.finish({"path": "/v1/chat/completions"}, set())
    assert len(_of(recorded, metrics.STREAM_ERRORS)) == 1


def test_calls_outside_an_http_request_record_nothing(recorded: list[Any]) -> None:
    watch = timing.dispatch("m")
    watch.chunk(GenerateChunk(text="a", prompt_tokens=1, completion_tokens=1))
    watch.chunk(GenerateChunk(text="b", prompt_tokens=1, completion_tokens=2, finish_reason="stop"))
    watch.failed()
    assert recorded == []


class _Route:
    def __init__(self, path: str) -> None:
        self.path = path


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A stand-in for the FastAPI app behind the middleware: routes one path, names the model, answers 200."""
    if scope["path"] == "/v1/chat/completions":
        scope["route"] = _Route("/v1/chat/completions")
        timing.label_model("m")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_middleware_counts_every_request_with_its_status(recorded: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_mod.limits, "keys", KeyRing.from_plain([b"secret"]))
    middleware = limits_mod.LimitsMiddleware(_app)

    async def served(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["app"] = ingress.app  # as Starlette does before its middleware: the known paths are its routes
        await middleware(scope, receive, send)

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=served)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            key = {"Authorization": "Bearer secret"}
            answers = [
                await client.post("/v1/chat/completions", json={}, headers=key),
                await client.post("/v1/chat/completions", json={}),  # no key: 401 before any routing
                await client.get("/no/such/path", headers=key),
            ]
        return [r.status_code for r in answers]

    assert asyncio.run(run()) == [200, 401, 200]
    counted = [tags for _, tags in _of(recorded, metrics.REQUESTS)]
    assert counted == [
        {"model": "m", "endpoint": "/v1/chat/completions", "status": "200"},
        {"model": "", "endpoint": "/v1/chat/completions", "status": "401"},  # a known path, though not routed
        {"model": "", "endpoint": "other", "status": "200"},
    ]


# -- the replica ------------------------------------------------------------------------------------------------


def test_replica_counts_waiting_running_and_tokens(recorded: list[Any]) -> None:
    async def run() -> None:
        replica = metrics.ReplicaMetrics("m")
        replica.ready()
        first, second = replica.start(), replica.start()
        assert (replica.waiting, replica.running) == (2, 0)
        times = first.first_output()
        assert times.received_at <= times.first_output_at
        assert (replica.waiting, replica.running) == (1, 1)
        first.finish(prompt_tokens=3, generation_tokens=5)
        second.finish()  # failed before any output
        assert (replica.waiting, replica.running) == (0, 0)
        replica.stopped()

    asyncio.run(run())
    tags = {"model": "m"}
    assert _of(recorded, metrics.PROMPT_TOKENS) == [(3, tags)]
    assert _of(recorded, metrics.GENERATION_TOKENS) == [(5, tags)]
    assert [v for v, _ in _of(recorded, metrics.REPLICAS)] == [1, 0]
    assert _of(recorded, metrics.WAITING)[-1] == (0, tags) and _of(recorded, metrics.RUNNING)[-1] == (0, tags)


def test_replica_keeps_its_gauges_set(recorded: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's agent drops a gauge not set for two export intervals: a replica sets its gauges again, idle or not."""
    monkeypatch.setattr(metrics, "_KEEP_INTERVAL_S", 0.01)
    monkeypatch.setattr(metrics, "_kept", {})

    async def run() -> None:
        replica = metrics.ReplicaMetrics("m")
        replica.ready()
        before = len(_of(recorded, metrics.REPLICAS))
        await asyncio.sleep(0.1)
        assert len(_of(recorded, metrics.REPLICAS)) > before + 2
        replica.stopped()

    asyncio.run(run())


# -- pipeline steps -----------------------------------------------------------------------------------------------


def test_each_pipeline_step_is_timed_with_its_outcome(recorded: list[Any]) -> None:
    from deployments.errors import OverloadedError, RequestTimeoutError
    from deployments.pipelines.executor import Pipelines

    async def answer() -> str:
        return "ok"

    async def overloaded() -> str:
        raise OverloadedError("full")

    async def never() -> str:
        await asyncio.sleep(60)
        return "late"

    async def run() -> None:
        limit = Pipelines._limit  # one step's call: the executor's only path to a model
        assert await limit(None, answer(), "pipe", "small", 5.0) == "ok"  # type: ignore[arg-type]
        with pytest.raises(OverloadedError):
            await limit(None, overloaded(), "pipe", "small", 5.0)  # type: ignore[arg-type]
        with pytest.raises(RequestTimeoutError):
            await limit(None, never(), "pipe", "big", 0.01)  # type: ignore[arg-type]

    asyncio.run(run())
    steps = [
        (tags["step"], tags["outcome"]) for name, _, tags in recorded if name == metrics.PIPELINE_STEP_LATENCY.name
    ]
    assert steps == [("small", "ok"), ("small", "429"), ("big", "timeout")]
    assert all(tags["model"] == "pipe" for name, _, tags in recorded if name == metrics.PIPELINE_STEP_LATENCY.name)
