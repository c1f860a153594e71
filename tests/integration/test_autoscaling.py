"""Autoscaling on a real cluster: a model scales 1 -> 2 under load and back to 1 after it; a model with min_replicas 0
scales to zero when idle, shows as cold (/readyz, /v1/models, `modelfleet status`), and serves its first request after
a cold start; requests past the hold limit, or past the cold-start timeout, get a 503 with Retry-After.

The times are measured and printed (run with -s to see them), never asserted."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import wait_for
from tests.integration.test_api import assert_error

APP = "autoscale"
SCALE_TIMEOUT_S = 120.0
ECHO = {"task": "generate", "engine": "echo", "resources": {"num_cpus": 0.25}}
# Short delays keep the test bounded; Serve's routers and replicas push their counts every 10 s regardless.
FAST = {"upscale_delay_s": 1, "downscale_delay_s": 5}


@pytest.fixture(scope="module")
def app(deploy: Callable[[dict[str, Any]], str]) -> str:
    return deploy(
        {
            "name": APP,
            "route_prefix": f"/{APP}",
            "models": [
                {
                    **ECHO,
                    "id": "burst",
                    "engine_kwargs": {"token_delay_s": 0.1},
                    "scaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, **FAST},
                },
                # Starts with one replica (the deploy proves it answers), then scales to zero when idle.
                {**ECHO, "id": "sleepy", "scaling": {"min_replicas": 0, "max_replicas": 1, **FAST}},
                # Starts at zero; holds at most 2 requests while it starts.
                {
                    **ECHO,
                    "id": "sleepy-narrow",
                    "scaling": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "cold_start_queue": 2},
                },
            ],
        }
    )


def _replicas(deployment: str, app_name: str = APP) -> tuple[int, int]:
    """(running, total) replicas of a deployment, as Serve's controller counts them."""
    from ray import serve

    dep = serve.status().applications[app_name].deployments[f"replica:{deployment}"]
    return dep.replica_states.get("RUNNING", 0), sum(dep.replica_states.values())


def _wait_replicas(deployment: str, running: int, what: str) -> float:
    """Wait until exactly `running` replicas run and none start or stop; returns the seconds it took."""
    started = time.monotonic()
    wait_for(lambda: _replicas(deployment) == (running, running), timeout=SCALE_TIMEOUT_S, message=what, interval=0.5)
    return time.monotonic() - started


@pytest.fixture
def load(app: str) -> Iterator[Callable[[], None]]:
    """Six clients sending 2-second completions to 'burst' back to back (three times its target of 2 per replica),
    until the returned function is called."""
    stop = threading.Event()
    failures: list[str] = []

    def client() -> None:
        body = {"model": "burst", "prompt": "w " * 20, "max_tokens": 20}
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                r = http.post(f"{app}/v1/completions", json=body)
                if r.status_code != 200:
                    failures.append(r.text)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    yield stop.set
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures[:3]


def test_scales_up_under_load_and_back_down_after_it(app: str, load: Callable[[], None]) -> None:
    from ray import serve

    began = time.monotonic()
    assert _replicas("burst") == (1, 1)
    # What the replica reports to the policy (Serve's record_autoscaling_stats hook): its requests wait 0.1 s for
    # their first token (the echo engine's token delay).
    replica = serve.get_deployment_handle("replica:burst", app_name=APP)
    reports: list[dict[str, float]] = []

    def reported_ttft() -> bool:
        reports.append(replica.record_autoscaling_stats.remote().result(timeout_s=30))
        return reports[-1]["ttft_s"] >= 0.1

    wait_for(reported_ttft, timeout=60, message="the replica never reported its time to first token", interval=1)
    assert set(reports[-1]) == {"ttft_s", "waiting", "running"}
    _wait_replicas("burst", 2, "'burst' did not scale to 2 replicas under 6 concurrent requests")
    up_s = time.monotonic() - began
    load()
    down_s = _wait_replicas("burst", 1, "'burst' did not scale back to 1 replica after the load stopped")
    print(f"\nautoscaling: 1 -> 2 replicas {up_s:.1f} s after the load began; 2 -> 1 {down_s:.1f} s after it stopped")


def test_idle_model_scales_to_zero_and_shows_as_cold(app: str) -> None:
    from cluster import deploy as deploying
    from cluster.local import ClusterState

    _wait_replicas("sleepy", 0, "'sleepy' (min_replicas 0) did not scale to zero while idle")
    ready = httpx.get(f"{app}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text  # cold is available: the probe neither fails nor wakes it
    assert set(ready.json()["cold"]) == {"sleepy", "sleepy-narrow"}
    cards = {m["id"]: m for m in httpx.get(f"{app}/v1/models", timeout=30).json()["data"]}
    assert (cards["sleepy"]["status"], cards["sleepy"]["replicas"]) == ("cold", 0)
    assert (cards["burst"]["status"], cards["burst"]["replicas"]) == ("ready", 1)
    assert _replicas("sleepy") == (0, 0), "asking for readiness and the model list started a replica"
    state = ClusterState(pid=0, gcs_address="in-process", temp_dir="", log_file="", num_cpus=8)
    rows = {r.deployment: r for r in deploying.status(state) if r.app == APP}
    assert rows["replica:sleepy"].status == "COLD" and rows["replica:sleepy"].replicas == "0/0"
    assert rows["replica:burst"].status == "HEALTHY"


def test_first_request_after_a_cold_start_succeeds(app: str) -> None:
    _wait_replicas("sleepy", 0, "'sleepy' (min_replicas 0) did not scale to zero while idle")
    client = openai.OpenAI(base_url=f"{app}/v1", api_key="x", max_retries=0, timeout=120)
    seen: dict[str, float] = {}  # when Serve first counted a replica (starting), and a running one
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and len(seen) < 2:
            running, total = _replicas("sleepy")
            now = time.monotonic() - started
            if total:
                seen.setdefault("starting", now)
            if running:
                seen.setdefault("running", now)
            time.sleep(0.25)

    started = time.monotonic()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = client.completions.create(model="sleepy", prompt="good morning", max_tokens=2)
    waited = time.monotonic() - started
    done.set()
    watcher.join(timeout=30)
    assert out.choices[0].text == "good morning"
    assert _replicas("sleepy")[0] == 1
    steps = ", ".join(f"{k} at {v:.1f} s" for k, v in seen.items())
    print(f"\ncold start: the first request to 'sleepy' at zero replicas answered after {waited:.1f} s ({steps})")
    idle_s = _wait_replicas("sleepy", 0, "'sleepy' did not go back to zero replicas once idle")
    print(f"scale to zero: 'sleepy' back at zero replicas {idle_s:.1f} s after its last request")


def test_requests_past_the_hold_limit_get_503_with_retry_after(app: str) -> None:
    assert _replicas("sleepy-narrow") == (0, 0)
    body = {"model": "sleepy-narrow", "prompt": "hello there", "max_tokens": 2}

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{app}/v1/completions", json=body, timeout=120)

    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(post, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 503, 503, 503, 503], [r.text for r in responses]  # cold_start_queue: 2
    for r in responses:
        if r.status_code == 503:
            error = assert_error(r, 503)
            assert (error["type"], error["code"]) == ("service_unavailable", "model_cold")
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["choices"][0]["text"] == "hello there"


@pytest.fixture(scope="module")
def stuck(ray_cluster: int) -> Iterator[str]:
    """An app whose model scales to zero and can never start again: its replica asks for more memory than any node
    has. Deployed with `serve.run`, not `deploy` (which refuses what cannot be placed)."""
    from ray import serve

    from deployments.app import build_app
    from deployments.config import ServingConfig

    config = ServingConfig.model_validate(
        {
            "name": "stuck",
            "route_prefix": "/stuck",
            "models": [
                {
                    **ECHO,
                    "id": "never",
                    "resources": {"num_cpus": 0.25, "memory_gb": 1000},
                    "scaling": {
                        "min_replicas": 0,
                        "max_replicas": 1,
                        "initial_replicas": 0,
                        "cold_start_timeout_s": 3,
                    },
                }
            ],
            "router": {"port": ray_cluster},
        }
    )
    serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix)
    base = f"http://127.0.0.1:{ray_cluster}/stuck"
    try:
        yield base
    finally:
        serve.delete(config.name)


def test_a_cold_start_past_its_timeout_is_a_503_with_retry_after(stuck: str) -> None:
    ready = httpx.get(f"{stuck}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["cold"] == ["never"], ready.text
    r = httpx.post(f"{stuck}/v1/completions", json={"model": "never", "prompt": "hi", "max_tokens": 1}, timeout=60)
    error = assert_error(r, 503)
    assert "cold_start_timeout_s of 3 s" in error["message"] and error["code"] == "model_cold"
    assert int(r.headers["retry-after"]) >= 1
