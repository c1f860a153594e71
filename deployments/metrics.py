"""The serving metrics, defined once (`METRICS`), and what records them at a model replica: one `ReplicaRequest` per
request (the router's side is `deployments.timing`), and vLLM's own engine metrics, passed through.

They go out through Ray's metrics agent, which serves each node's metrics in Prometheus format on its metrics port
and names them `ray_<name>` (counters `ray_<name>_total`). They are Serve metrics (`ray.serve.metrics`), so Serve
adds the `deployment`, `replica` and `application` labels. docs/metrics.md lists them; the Grafana dashboards
(`cluster.observability`) query them. Every observation is made once per request, never per token.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import Any, Literal

from deployments.engines.protocol import ReplicaTimes

__all__ = [
    "FAULT_METRICS",
    "KEY_METRICS",
    "KEY_REQUESTS",
    "KEY_TOKENS",
    "METRICS",
    "MIGRATIONS",
    "RETRIES",
    "TTFT_PARTS",
    "MetricDef",
    "ReplicaMetrics",
    "ReplicaRequest",
    "count_migration",
    "count_retry",
    "instrument",
    "observe",
    "vllm_stat_loggers",
]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# As vLLM's time-to-first-token buckets, from 1 ms.
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)

#: Where a streamed request's time to first token went, in order; the parts add up to the whole.
TTFT_PARTS: dict[str, str] = {
    "ingress": "the router replica received the HTTP request -> it handed the request to the model's Serve handle "
    "(body, validation, auth)",
    "router_queue": "handed to the handle -> the model replica started it (waiting for a replica with a free slot, "
    "Serve's routing, the hop)",
    "engine": "the model replica started it -> the engine's first output (the engine's own queue and the prefill; "
    "vLLM's ray_vllm_request_queue_time_seconds and ray_vllm_request_prefill_time_seconds split it further)",
    "transport": "the first output left the model replica -> it reached the router replica",
}


@dataclass(frozen=True)
class MetricDef:
    """One metric: its name as defined (Prometheus: `ray_<name>`, counters `ray_<name>_total`), kind and labels."""

    name: str
    kind: Literal["counter", "histogram", "gauge"]
    description: str
    labels: tuple[str, ...]
    recorded_by: Literal["router", "replica"]
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name Prometheus sees (histograms add `_bucket`, `_sum` and `_count` to it)."""
        return f"ray_{self.name}_total" if self.kind == "counter" else f"ray_{self.name}"


REQUESTS = MetricDef(
    "modelfleet_requests",
    "counter",
    "HTTP requests answered, by endpoint (route template, or 'other') and HTTP status. `model` is empty when the "
    "request named no served model.",
    ("model", "endpoint", "status"),
    "router",
)
STREAM_ERRORS = MetricDef(
    "modelfleet_stream_errors",
    "counter",
    "Streamed responses that failed after their 200 status went out (ended by an error event).",
    ("model", "endpoint"),
    "router",
)
E2E_LATENCY = MetricDef(
    "modelfleet_e2e_request_latency_seconds",
    "histogram",
    "The router replica received the request -> it sent the last byte of the response.",
    ("model", "endpoint"),
    "router",
    _LATENCY_BUCKETS,
)
TTFT = MetricDef(
    "modelfleet_time_to_first_token_seconds",
    "histogram",
    "Streamed generation: the router replica received the request -> the first output reached it.",
    ("model",),
    "router",
    _TTFT_BUCKETS,
)
TTFT_PART = MetricDef(
    "modelfleet_time_to_first_token_part_seconds",
    "histogram",
    f"Streamed generation: the time to first token split by `part` ({', '.join(TTFT_PARTS)}); see TTFT_PARTS.",
    ("model", "part"),
    "router",
    _TTFT_BUCKETS,
)
TPOT = MetricDef(
    "modelfleet_time_per_output_token_seconds",
    "histogram",
    "Streamed generation, per choice: (last output - first output) / tokens after the first output, at the router.",
    ("model",),
    "router",
    _TPOT_BUCKETS,
)
QUEUE_TIME = MetricDef(
    "modelfleet_request_queue_time_seconds",
    "histogram",
    "Handed to the model's Serve handle -> a model replica started it (the 'router_queue' part), every request.",
    ("model",),
    "router",
    _TTFT_BUCKETS,
)
PROMPT_TOKENS = MetricDef(
    "modelfleet_prompt_tokens", "counter", "Prompt (input) tokens the engines read.", ("model",), "replica"
)
GENERATION_TOKENS = MetricDef(
    "modelfleet_generation_tokens", "counter", "Output tokens the engines generated.", ("model",), "replica"
)
RUNNING = MetricDef(
    "modelfleet_requests_running",
    "gauge",
    "Requests in a model replica whose engine has given output (generating).",
    ("model",),
    "replica",
)
WAITING = MetricDef(
    "modelfleet_requests_waiting",
    "gauge",
    "Requests in a model replica with no output yet (in the engine's queue or prefill). Requests still waiting for a "
    "replica are Serve's ray_serve_deployment_queued_queries.",
    ("model",),
    "replica",
)
REPLICAS = MetricDef(
    "modelfleet_replicas",
    "gauge",
    "1 per model replica that finished warm-up (sum by model: ready replicas). A replica's series ends with it.",
    ("model",),
    "replica",
)
PIPELINE_STEP_LATENCY = MetricDef(
    "modelfleet_pipeline_step_seconds",
    "histogram",
    "One step of a pipeline (`model` is the pipeline, `step` the model it called), from the call to its answer (a "
    "stream: to its first chunk), by `outcome`: ok, timeout, or the step's HTTP status.",
    ("model", "step", "outcome"),
    "router",
    _LATENCY_BUCKETS,
)
PIPELINE_REQUESTS = MetricDef(
    "modelfleet_pipeline_requests",
    "counter",
    "HTTP requests that named a pipeline (`model` is the pipeline), by endpoint and HTTP status; each is also "
    "counted in modelfleet_requests under the model that answered it. A streamed response counts its 200.",
    ("model", "endpoint", "status"),
    "router",
)
METRICS: tuple[MetricDef, ...] = (
    REQUESTS,
    STREAM_ERRORS,
    E2E_LATENCY,
    TTFT,
    TTFT_PART,
    TPOT,
    QUEUE_TIME,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    RUNNING,
    WAITING,
    REPLICAS,
    PIPELINE_STEP_LATENCY,
    PIPELINE_REQUESTS,
)


@functools.cache
def instrument(metric: MetricDef) -> Any:
    """The Ray metric object of `metric` in this process, made on first use: inside a Serve replica, so that Serve
    adds its deployment, replica and application labels. Outside Ray, recording does nothing."""
    from ray.serve import metrics as serve_metrics

    labels: Any = metric.labels  # Ray annotates `tuple[str]` where it takes any number of tag keys
    if metric.kind == "counter":
        return serve_metrics.Counter(metric.name, description=metric.description, tag_keys=labels)
    if metric.kind == "gauge":
        return serve_metrics.Gauge(metric.name, description=metric.description, tag_keys=labels)
    return serve_metrics.Histogram(
        metric.name, description=metric.description, boundaries=list(metric.buckets), tag_keys=labels
    )


def observe(metric: MetricDef, value: float, tags: dict[str, str]) -> None:
    """Record one observation of a histogram (negative durations, from clocks of different nodes, count as 0)."""
    instrument(metric).observe(max(value, 0.0), tags=tags)


# Ray's metrics agent (2.60) drops a gauge that has not been set for about two export intervals (10 s each), and
# these gauges change only when requests come and go: their last values are set again every few seconds.
_KEEP_INTERVAL_S = 5.0
_kept: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[Any, dict[str, str], float]] = {}


def _set_gauge(gauge: Any, value: float, tags: dict[str, str]) -> None:
    gauge.set(value, tags=tags)
    _kept[(id(gauge), tuple(sorted(tags.items())))] = (gauge, dict(tags), value)


async def _keep_gauges() -> None:
    while True:
        await asyncio.sleep(_KEEP_INTERVAL_S)
        for gauge, tags, value in list(_kept.values()):
            gauge.set(value, tags=tags)


# -- the model replica ----------------------------------------------------------------------------------------------


class ReplicaMetrics:
    """A model replica's live request counts (running, waiting), its token counters and its readiness."""

    def __init__(self, model_id: str) -> None:
        self._tags = {"model": model_id}
        self.running = 0
        self.waiting = 0
        self._keeper: asyncio.Task[None] | None = None

    def ready(self) -> None:
        """Warm-up done: this replica counts, with zero requests in flight. Call it on the replica's event loop:
        it starts the task that keeps this process's gauges (vLLM's too) alive in Ray's metrics agent."""
        _set_gauge(instrument(REPLICAS), 1, self._tags)
        self._publish()
        self._keeper = asyncio.get_running_loop().create_task(_keep_gauges())

    def stopped(self) -> None:
        """The replica is shutting down: its gauges stop being kept, and it no longer counts."""
        if self._keeper is not None:
            self._keeper.cancel()
        instrument(REPLICAS).set(0, tags=self._tags)

    def start(self) -> ReplicaRequest:
        """A request arrived at this replica."""
        self.waiting += 1
        _set_gauge(instrument(WAITING), self.waiting, self._tags)
        return ReplicaRequest(self)

    def _publish(self) -> None:
        _set_gauge(instrument(WAITING), self.waiting, self._tags)
        _set_gauge(instrument(RUNNING), self.running, self._tags)


class ReplicaRequest:
    """One request in a model replica: waiting until its first output, then running until `finish`."""

    __slots__ = ("_owner", "received_at", "times")

    def __init__(self, owner: ReplicaMetrics) -> None:
        self._owner = owner
        self.received_at = time.time()
        self.times: ReplicaTimes | None = None

    def first_output(self) -> ReplicaTimes:
        """The engine's first output: the request is running. Returns the stamps for the API layer."""
        self.times = ReplicaTimes(received_at=self.received_at, first_output_at=time.time())
        owner = self._owner
        owner.waiting -= 1
        owner.running += 1
        owner._publish()
        return self.times

    def finish(self, prompt_tokens: int = 0, generation_tokens: int = 0) -> None:
        """The request left the replica (done, failed or cancelled) having read and generated these tokens."""
        owner = self._owner
        if self.times is None:
            owner.waiting -= 1
        else:
            owner.running -= 1
        owner._publish()
        if prompt_tokens > 0:
            instrument(PROMPT_TOKENS).inc(prompt_tokens, tags=owner._tags)
        if generation_tokens > 0:
            instrument(GENERATION_TOKENS).inc(generation_tokens, tags=owner._tags)


def vllm_stat_loggers() -> list[Any] | None:
    """vLLM's stat loggers for an engine in this process: inside a Ray worker (a Serve replica), vLLM's own engine
    metrics go out through Ray's metrics agent as `ray_vllm_*` (vLLM's Ray stat logger, as Ray Serve LLM exports
    them), with its gauges kept alive like ours; elsewhere None (vLLM's defaults)."""
    import ray

    if not ray.is_initialized():
        return None
    from vllm.v1.metrics.ray_wrappers import RayGaugeWrapper, RayPrometheusStatLogger

    class KeptGauge(RayGaugeWrapper):
        """vLLM sets its gauges only while it works: kept, so that an idle engine's last values stay visible."""

        def set(self, value: float) -> None:
            _set_gauge(self.metric, value, self._tags)

    class RayStatLogger(RayPrometheusStatLogger):
        _gauge_cls = KeptGauge

    return [RayStatLogger]


# -- faults: retries of requests whose replica was lost -----------------------------------------------------------

RETRIES = MetricDef(
    "modelfleet_retries",
    "counter",
    "Requests the router sent again because the replica holding them was lost before they returned (`reason`: "
    "replica_died, replica_unavailable, engine_dead). Series appear with the first retry; kept out of `METRICS`, "
    "whose every series the dashboards show and the observability test expects under plain load.",
    ("model", "reason"),
    "router",
)
MIGRATIONS = MetricDef(
    "modelfleet_migrations",
    "counter",
    "Streams whose replica was lost after their first chunk (`outcome`: migrated, the stream went on on another "
    "replica; else why it ended with the error: engine_without_token_ids, structured_output, tool_calls, "
    "max_migrations, timeout). Series appear with the first one; kept out of `METRICS` as RETRIES is.",
    ("model", "outcome"),
    "router",
)
FAULT_METRICS: tuple[MetricDef, ...] = (RETRIES, MIGRATIONS)


def count_retry(model_id: str, reason: str) -> None:
    """One request of `model_id` sent again after its replica was lost (`RETRIES`)."""
    instrument(RETRIES).inc(1, tags={"model": model_id, "reason": reason})


def count_migration(model_id: str, outcome: str) -> None:
    """One stream of `model_id` whose replica was lost after its first chunk, and what became of it."""
    instrument(MIGRATIONS).inc(1, tags={"model": model_id, "outcome": outcome})


# -- API keys: usage per key (key names only, never keys) -----------------------------------------------------------

KEY_REQUESTS = MetricDef(
    "modelfleet_key_requests",
    "counter",
    "HTTP requests made with each API key (`key`: the key's name in router.keys; plain router.api_keys are "
    "`api_keys.<i>`), by HTTP status (429: over the key's limits). Series appear once keys are used; kept out of "
    "`METRICS` (no `model` label, and absent where no keys are configured).",
    ("key", "status"),
    "router",
)
KEY_TOKENS = MetricDef(
    "modelfleet_key_tokens",
    "counter",
    "Tokens charged to each API key (`kind`: prompt or completion), as its requests' `usage` reports them.",
    ("key", "kind"),
    "router",
)
KEY_METRICS: tuple[MetricDef, ...] = (KEY_REQUESTS, KEY_TOKENS)
