"""Autoscaling on a real cluster: a model scales 1 -> 2 under load and back to 1 after it; a model with min_replicas 0
scales to zero when idle, shows as cold (/readyz, /v1/models, `modelfleet status`), and serves its first request after
a cold start; requests past the hold limit, or past the cold-start timeout, get a 503 with Retry-After; a model whose
time to first token is over its `target_ttft_s` scales up under a load that queue depth alone holds at one replica
(a control model alike but for `target_ttft_s`, under the same load, stays at one).

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


# -- scale-up on time to first token ----------------------------------------------------------------------------

TTFT_APP = "ttft"
TTFT_TARGET_S = 0.25
# A one-word prompt with max_tokens 1: the echo engine waits its token delay before its only (first) token, so every
# request's TTFT is about 1 s, four times the target, at any load.
FIRST_TOKEN_DELAY_S = 1.0
# Three clients per model keep about 3 requests in it; a queue target of 8 asks for ceil(3 / 8) = 1 replica, and its
# scale-down floor ceil(3 / 4) = 1 too: queue depth alone holds the model at 1 replica.
TTFT_CLIENTS = 3
QUEUE_TARGET = 8


def _ttft_model(model_id: str, **scaling: Any) -> dict[str, Any]:
    return {
        **ECHO,
        "id": model_id,
        "engine_kwargs": {"token_delay_s": FIRST_TOKEN_DELAY_S},
        "scaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": QUEUE_TARGET, **FAST, **scaling},
    }


@pytest.fixture(scope="module")
def ttft_app(deploy: Callable[[dict[str, Any]], str]) -> str:
    """Two models alike but for `target_ttft_s`: 'ttft-bound' has one below its TTFT, 'ttft-control' has none."""
    return deploy(
        {
            "name": TTFT_APP,
            "route_prefix": f"/{TTFT_APP}",
            "models": [_ttft_model("ttft-bound", target_ttft_s=TTFT_TARGET_S), _ttft_model("ttft-control")],
        }
    )


def _stats(deployment: str) -> dict[str, float]:
    """What the model's replica reports to the policy now (one replica: the handle's only choice)."""
    from ray import serve

    handle = serve.get_deployment_handle(f"replica:{deployment}", app_name=TTFT_APP)
    return dict(handle.record_autoscaling_stats.remote().result(timeout_s=30))


@pytest.mark.slow
def test_slow_first_tokens_scale_up_where_queue_depth_alone_would_not(ttft_app: str) -> None:
    models = ("ttft-bound", "ttft-control")
    assert [_replicas(m, TTFT_APP) for m in models] == [(1, 1), (1, 1)]
    stop = threading.Event()
    failures: list[str] = []
    latencies: dict[str, list[float]] = {m: [] for m in models}
    answered_by: dict[str, set[str]] = {m: set() for m in models}  # replicas that answered (x-modelfleet-replica)

    def client(model: str) -> None:
        body = {"model": model, "prompt": "hello", "max_tokens": 1}
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                r = http.post(f"{ttft_app}/v1/completions", json=body)
                if r.status_code != 200:
                    failures.append(f"{model}: {r.status_code} {r.text}")
                else:
                    latencies[model].append(time.monotonic() - sent)
                    answered_by[model].add(r.headers["x-modelfleet-replica"])

    threads = [threading.Thread(target=client, args=(m,), daemon=True) for m in models for _ in range(TTFT_CLIENTS)]
    began = time.monotonic()
    control_most = 1  # the control's most replicas (running or starting) seen while the load ran
    try:
        for t in threads:
            t.start()
        # Both replicas see the same slow first tokens with requests waiting: the signal `target_ttft_s` acts on.
        seen: dict[str, dict[str, float]] = {}

        def slow_and_waiting() -> bool:
            for m in models:
                if m not in seen:
                    report = _stats(m)
                    if report["ttft_s"] > TTFT_TARGET_S and report["waiting"] > 0:
                        seen[m] = report
            return len(seen) == len(models)

        wait_for(slow_and_waiting, timeout=60, message=f"the replicas never reported a slow TTFT: {seen}", interval=1)

        def bound_scaled() -> bool:
            nonlocal control_most
            control_most = max(control_most, _replicas("ttft-control", TTFT_APP)[1])
            return _replicas("ttft-bound", TTFT_APP) == (2, 2)

        wait_for(
            bound_scaled,
            timeout=SCALE_TIMEOUT_S,
            message=f"'ttft-bound' did not scale to 2 replicas with a TTFT of ~{FIRST_TOKEN_DELAY_S} s over its "
            f"target of {TTFT_TARGET_S} s",
            interval=0.5,
        )
        up_s = time.monotonic() - began
        # The API shows it too, and the new replica takes its share of the load.
        cards: dict[str, dict[str, Any]] = {}

        def listed() -> bool:
            cards.update({c["id"]: c for c in httpx.get(f"{ttft_app}/v1/models", timeout=30).json()["data"]})
            return (cards["ttft-bound"]["replicas"], cards["ttft-control"]["replicas"]) == (2, 1)

        wait_for(listed, timeout=30, message=f"/v1/models did not list 2 and 1 replicas: {cards}", interval=0.5)
        wait_for(
            lambda: len(answered_by["ttft-bound"]) == 2,
            timeout=30,
            message=f"the new replica of 'ttft-bound' answered no request: {answered_by}",
            interval=0.5,
        )
        control_most = max(control_most, _replicas("ttft-control", TTFT_APP)[1])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not failures, failures[:3]
    # The same load and the same slow first tokens, for as long, without `target_ttft_s`: queue depth alone kept it
    # at one replica.
    assert control_most == 1, f"'ttft-control' (no target_ttft_s) scaled to {control_most} replicas"
    served = {m: sorted(v) for m, v in latencies.items()}
    assert all(served.values()), {m: len(v) for m, v in served.items()}
    assert len(answered_by["ttft-control"]) == 1, answered_by
    medians = ", ".join(f"{m} {v[len(v) // 2]:.2f} s ({len(v)} requests)" for m, v in served.items())
    reported = ", ".join(f"{m} {r['ttft_s']:.2f} s ({r['waiting']:.0f} waiting)" for m, r in seen.items())
    print(
        f"\nTTFT scale-up: 'ttft-bound' 1 -> 2 replicas {up_s:.1f} s after the load began; 'ttft-control' stayed at 1."
        f"\n  replica-reported TTFT: {reported}; client latency p50 (max_tokens 1): {medians}"
    )


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
            # A replica Serve stops gets its drain time (request_timeout_s + 5 s) even when it never started: kept
            # short, or deleting the app outlasts serve.delete's 60 s wait for it.
            "router": {"port": ray_cluster, "request_timeout_s": 20},
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
