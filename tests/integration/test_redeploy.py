"""Config redeploys under a bounded load on a real cluster drop no request: replicas 1 -> 2 and back, an added model
and a changed split weight, each redeployed (the real `deploy` path) while 8 clients send chat completions, plain
and streamed, to the models and the split. The replica of a model no redeploy touched keeps running throughout."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from cluster import deploy as deploying
from cluster import model_changes
from cluster.local import ClusterState
from deployments.config import ServingConfig
from models.spec import ModelSpec

pytestmark = pytest.mark.slow

APP = "redeploy"
REPLICA = "x-modelfleet-replica"
CONCURRENCY = 8
MAX_REQUESTS = 1200  # the load's bound; it stops earlier, once the last redeploy is ready
TIMEOUT_S = 60.0
WORDS = " ".join(f"w{i}" for i in range(8))  # 8 tokens at 0.05 s: each request holds its replica about 0.4 s


def _echo(model_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "task": "generate",
        "engine": "echo",
        "resources": {"num_cpus": 0.25},
        "engine_kwargs": {"token_delay_s": 0.05},
        **fields,
    }


@pytest.fixture(scope="module")
def base(deploy: Callable[[dict[str, Any]], str]) -> str:
    return deploy(
        {
            "name": APP,
            "route_prefix": "/redeploy",
            "models": [_echo("scaled"), _echo("spare"), _echo("steady")],
            "pipelines": [
                {
                    "id": "mix",
                    "kind": "split",
                    "targets": [{"model": "scaled", "weight": 50}, {"model": "spare", "weight": 50}],
                }
            ],
        }
    )


@dataclass
class _Load:
    """A bounded closed-loop load: each worker sends its next request when the last one returned."""

    base: str
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)  # when each successful request returned (monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _next(self) -> int | None:
        with self.lock:
            if self.stop.is_set() or self.sent >= MAX_REQUESTS:
                return None
            self.sent += 1
            return self.sent

    def worker(self) -> None:
        client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        while (n := self._next()) is not None:
            model = ("scaled", "mix", "steady", "spare")[n % 4]
            messages = [{"role": "user", "content": WORDS}]
            try:
                if n % 2:
                    stream = client.chat.completions.create(model=model, messages=messages, stream=True)  # type: ignore[arg-type]
                    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                else:
                    reply = client.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]
                    text = reply.choices[0].message.content or ""
                if text != WORDS:
                    raise AssertionError(f"unexpected text {text!r}")
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                with self.lock:
                    self.failures.append(f"request {n} ({model}, {'stream' if n % 2 else 'plain'}): {exc!r}")
            else:
                with self.lock:
                    self.finished.append(time.monotonic())


def _steady_replica(base: str) -> str:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="steady", messages=[{"role": "user", "content": "x"}])
    return raw.headers[REPLICA]


def _scaled(config: ServingConfig, replicas: int) -> ServingConfig:
    models = [
        m.model_copy(
            update={"scaling": m.scaling.model_copy(update={"min_replicas": replicas, "max_replicas": replicas})}
        )
        if m.id == "scaled"
        else m
        for m in config.models
    ]
    return ServingConfig.model_validate({**config.model_dump(), "models": [m.model_dump() for m in models]})


def _weights(config: ServingConfig, scaled: float, spare: float) -> ServingConfig:
    raw = config.model_dump()
    raw["pipelines"][0]["targets"] = [{"model": "scaled", "weight": scaled}, {"model": "spare", "weight": spare}]
    return ServingConfig.model_validate(raw)


def test_redeploys_under_load_drop_nothing(base: str) -> None:
    state = ClusterState(pid=0, gcs_address="in-process", temp_dir="", log_file="", num_cpus=8)
    steady = _steady_replica(base)
    changes: list[tuple[str, Callable[[ServingConfig], ServingConfig]]] = [
        ("replicas 1 -> 2", lambda c: _scaled(c, 2)),
        ("a model added", lambda c: model_changes.add_models(c, [ModelSpec.model_validate(_echo("added"))])),
        ("split weights 50/50 -> 90/10", lambda c: _weights(c, 90, 10)),
        ("replicas 2 -> 1", lambda c: _scaled(c, 1)),
    ]
    load = _Load(base)
    windows: list[tuple[str, float, float]] = []
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        workers = [pool.submit(load.worker) for _ in range(CONCURRENCY)]
        try:
            time.sleep(2.0)  # the load runs before the first redeploy
            for name, change in changes:
                config = change(model_changes.running_config(APP))
                started = time.monotonic()
                deploying.deploy(config, state, timeout_s=180)
                windows.append((name, started, time.monotonic()))
                time.sleep(2.0)  # and between and after them: the drained replicas stop meanwhile
        finally:
            load.stop.set()
            for worker in workers:
                worker.result(timeout=TIMEOUT_S * 2)
    print(f"redeploy under load: {load.sent} requests sent, {len(load.failures)} failed")
    for name, start, end in windows:
        print(f"  {name}: {end - start:.1f} s, {sum(start <= t <= end for t in load.finished)} requests answered")
    assert not load.failures, f"{len(load.failures)} of {load.sent} requests failed: {load.failures[:5]}"
    assert load.sent < MAX_REQUESTS, "the load ran out before the redeploys ended: raise MAX_REQUESTS"
    for name, start, end in windows:
        assert any(start <= t <= end for t in load.finished), f"no request was answered during the redeploy '{name}'"
    assert _steady_replica(base) == steady, "a replica of the untouched model 'steady' was restarted"
