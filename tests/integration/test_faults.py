"""Faults on a real cluster, through the real HTTP API: a vLLM replica SIGKILLed under load loses no request (the
router sends the lost ones again, to the survivor); a stream that loses its replica before its first token is sent
again, and one that loses it later migrates (it goes on elsewhere with the same greedy text), never a hang; a
model's only replica killed is waited for; a wedged engine (accepts, never answers) fails its health check, is
replaced, and its requests are retried; `/readyz` stays 200 while a replica is saturated (busy is not unready); a
model whose weights fail to load shows in `modelfleet status` while the others serve.

Counts (sent, failed, retried) are printed (run with -s to see them). Retries are read from the router's
`modelfleet_retries` counter on each node's Ray metrics port. vLLM runs two replicas: one killed takes a minute or
more to come back on this CPU, so the retries land on the survivor ('solo' covers a model left with none).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster import deploy as deploying
from cluster.local import ClusterError, ClusterState
from deployments.api.ingress import REPLICA_HEADER
from tests.integration.conftest import metric_samples, wait_for

pytestmark = pytest.mark.slow

APP = "faults"
STATE = ClusterState(pid=0, gcs_address="in-process", temp_dir="", log_file="", num_cpus=8)
ECHO = {"task": "generate", "engine": "echo", "resources": {"num_cpus": 0.25}}
REQUEST_TIMEOUT_S = 120.0
RESTART_TIMEOUT_S = 240.0
STREAM_DEADLINE_S = 150.0  # every stream ends within this, whatever happens to its replica
METRICS_TIMEOUT_S = 90.0  # Ray's metrics agent exports every few seconds
WEDGE_AFTER = 5  # the wedging replica's warm-up, then 4 answers, then it hangs
PROMPT = "Tell me a short story about a fox and a crow in the forest"
STREAM_TOKENS = 48


@pytest.fixture(scope="module")
def app(deploy: Callable[[dict[str, Any]], str], tiny_llama: Path) -> str:
    return deploy(
        {
            "name": APP,
            "route_prefix": f"/{APP}",
            "models": [
                {
                    # Two replicas: a killed one takes a minute to come back on this CPU, so retries land on the
                    # survivor within the test's budget.
                    "id": "llama",
                    "task": "generate",
                    "engine": "vllm",
                    "source": str(tiny_llama),
                    "context_length": 256,
                    "max_output_tokens": 64,
                    "resources": {"num_cpus": 1},
                    "scaling": {"min_replicas": 2, "max_replicas": 2},
                    "engine_kwargs": {"cpu_kvcache_space_gb": 0.25},
                },
                # One replica, slow tokens: a kill leaves no survivor, so retries wait for the restarted one.
                {**ECHO, "id": "solo", "engine_kwargs": {"token_delay_s": 0.2}},
                # Wedges after WEDGE_AFTER requests; checked every second, wedged after 2 s without output.
                {
                    **ECHO,
                    "id": "wedge",
                    "engine_kwargs": {"wedge_after": WEDGE_AFTER},
                    "health": {"period_s": 1, "timeout_s": 5, "stall_timeout_s": 2},
                },
                # One request at a time, each a few seconds long: easy to saturate.
                {
                    **ECHO,
                    "id": "busy",
                    "engine_kwargs": {"token_delay_s": 0.25},
                    "scaling": {"max_ongoing_requests": 1},
                },
            ],
            "router": {"request_timeout_s": REQUEST_TIMEOUT_S, "max_retries": 3},
        }
    )


def _client(app: str) -> openai.OpenAI:
    # No client-side retries: every failure the server lets through must show.
    return openai.OpenAI(base_url=f"{app}/v1", api_key="x", max_retries=0, timeout=REQUEST_TIMEOUT_S + 30)


def _replica_actors(deployment: str) -> list[dict[str, Any]]:
    """The live replica actors of a model's deployment in this app (id and PID), from Ray's actor table."""
    import ray

    # Ray's state API (`ray.util.state.list_actors`) answers through the dashboard, which the test cluster does not
    # run; the GCS actor table it reads holds the same facts.
    table = ray._private.state.actors()  # noqa: SLF001
    name = f"ServeReplica:{APP}:replica:{deployment}"
    return [
        {"id": actor_id, "pid": info["Pid"], "name": info["Name"]}
        for actor_id, info in table.items()
        if info["ActorClassName"] == name and info["State"] == "ALIVE" and info["Pid"]
    ]


def _running(deployment: str) -> int:
    from ray import serve

    dep = serve.status().applications[APP].deployments[f"replica:{deployment}"]
    return dep.replica_states.get("RUNNING", 0)


def _kill_one_replica(deployment: str, serving: str | None = None) -> dict[str, Any]:
    """SIGKILL one replica actor of the deployment (only that process, by its PID): the one whose Serve replica id
    is `serving` (a recent answer's x-modelfleet-replica, so the victim surely holds requests), else any."""
    actors = _replica_actors(deployment)
    assert actors, f"no live replica actor of '{deployment}' found in Ray's actor table"
    if serving is not None:  # Serve names a replica's actor SERVE_REPLICA::<app>#<deployment>#<replica id>
        actors = [a for a in actors if a["name"].endswith(f"#{serving}")]
        assert actors, f"replica {serving} of '{deployment}' is not among the live actors"
    victim = actors[0]
    os.kill(victim["pid"], signal.SIGKILL)
    return victim


def _counters(model: str) -> dict[str, float]:
    """This app's router counters of `model`, summed over every node's Ray metrics port: 'requests' (answered
    requests, `modelfleet_requests`) and 'retries:<reason>' (`modelfleet_retries`)."""
    totals: dict[str, float] = {}
    for metric, name in (("ray_modelfleet_requests_total", None), ("ray_modelfleet_retries_total", "retries")):
        for labels, value in metric_samples(metric, APP):
            if labels.get("model") == model:
                key = f"retries:{labels['reason']}" if name else "requests"
                totals[key] = totals.get(key, 0.0) + value
    return totals


def _retries_since(model: str, before: dict[str, float], answered: int) -> dict[str, int]:
    """Retries of `model` by reason since `before` (a `_counters` reading), read once the router's export counts the
    `answered` requests sent since then: the two counters leave the router replica together."""
    now: dict[str, float] = {}

    def caught_up() -> bool:
        now.clear()
        now.update(_counters(model))
        return now.get("requests", 0.0) - before.get("requests", 0.0) >= answered

    wait_for(caught_up, timeout=METRICS_TIMEOUT_S, message=f"the router's counters of '{model}' were not exported")
    grown = {k.removeprefix("retries:"): int(v - before.get(k, 0.0)) for k, v in now.items() if k != "requests"}
    return {reason: n for reason, n in grown.items() if n > 0}


# --- readiness under load ------------------------------------------------------------------------------------


def test_readyz_stays_200_while_a_replica_is_saturated(app: str) -> None:
    """'busy' takes one request at a time, each 3 s long; 6 of them keep it saturated for about 18 s. A readiness
    call queued behind them (as before) timed out and answered 503."""
    client = _client(app)
    prompt = " ".join(f"w{i}" for i in range(12))  # 12 tokens x 0.25 s

    def one(_: int) -> str:
        reply = client.completions.create(model="busy", prompt=prompt, max_tokens=12)
        return reply.choices[0].text

    probes: list[tuple[int, dict[str, Any], bool]] = []
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        time.sleep(1.0)  # let the requests reach the replica and its queue
        while not all(f.done() for f in futures):
            response = httpx.get(f"{app}/readyz", timeout=60)
            probes.append((response.status_code, response.json(), not all(f.done() for f in futures)))
            time.sleep(1.0)
        texts = [f.result() for f in futures]
    assert texts == [prompt] * 6
    during = [p for p in probes if p[2]]
    print(f"\n/readyz while 'busy' was saturated: {[p[0] for p in during]}")
    assert during, "no readiness probe ran while the replica was saturated"
    for status, body, _ in during:
        assert status == 200, body
        assert body["models"]["busy"] is True and body["ready"] is True and body["cold"] == [], body


# --- replicas that die ---------------------------------------------------------------------------------------


def test_sigkill_of_a_vllm_replica_loses_no_non_streaming_request(app: str) -> None:
    client = _client(app)
    wait_for(lambda: len(_replica_actors("llama")) == 2, timeout=60, message="two live 'llama' replica actors")
    before = _counters("llama")
    sent, failures, done = 200, [], []
    serving: list[str] = []  # the replica of each answer, in order
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="llama", messages=[{"role": "user", "content": f"{PROMPT} {i}"}], max_tokens=16
            )
            assert raw.parse().choices[0].finish_reason in ("stop", "length")
            with lock:
                serving.append(raw.headers[REPLICA_HEADER])
        except Exception as exc:  # noqa: BLE001 - counted and shown below
            with lock:
                failures.append(f"{i}: {type(exc).__name__}: {exc}")
        finally:
            with lock:
                done.append(i)

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(sent)]
        wait_for(lambda: len(done) >= 40, timeout=REQUEST_TIMEOUT_S, message="40 requests answered before the kill")
        with lock:
            busy = serving[-1]
        victim = _kill_one_replica("llama", serving=busy)
        in_flight_at_kill = min(16, sent - len(done))
        for f in futures:
            f.result()
    retried = _retries_since("llama", before, answered=sent)
    print(
        f"\nSIGKILL of vLLM replica pid {victim['pid']} during {sent} chat completions at concurrency 16 "
        f"({in_flight_at_kill} in flight): failed {len(failures)}, retried {retried}"
    )
    assert not failures, failures[:5]
    assert retried, "a replica died under load, yet no request was retried"


def _greedy_stream(app: str, i: int) -> dict[str, Any]:
    """One greedy stream of 48 tokens (ignore_eos): its text, how it ended, its usage, its replica and the longest
    pause between two of its events."""
    body = {
        "model": "llama",
        "messages": [{"role": "user", "content": f"{PROMPT} {i}"}],
        "max_tokens": STREAM_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    seen: dict[str, Any] = {"outcome": "hung", "text": "", "usage": None, "replica": None, "pause_s": 0.0, "ids": set()}
    try:
        with httpx.stream(
            "POST", f"{app}/v1/chat/completions", json=body, timeout=httpx.Timeout(STREAM_DEADLINE_S)
        ) as response:
            if response.status_code != 200:
                response.read()
                seen["outcome"] = f"http_{response.status_code}: {response.text[:200]}"
                return seen
            seen["replica"] = response.headers.get(REPLICA_HEADER)
            last = time.monotonic()
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.monotonic()
                seen["pause_s"] = max(seen["pause_s"], now - last)
                last = now
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    seen["outcome"] = "ok" if seen["outcome"] == "hung" else seen["outcome"]
                    break
                event = json.loads(data)
                if "error" in event:
                    seen["outcome"] = f"error_event: {event['error'].get('message')}"
                    continue
                seen["ids"].add(event["id"])
                if event.get("usage"):
                    seen["usage"] = event["usage"]
                if event["choices"]:
                    seen["text"] += event["choices"][0]["delta"].get("content") or ""
    except httpx.TimeoutException:
        seen["outcome"] = "hung"
    return seen


def _migrations(model: str) -> dict[str, int]:
    """This app's `modelfleet_migrations` of `model` by outcome, summed over every node's metrics port."""
    totals: dict[str, int] = {}
    for labels, value in metric_samples("ray_modelfleet_migrations_total", APP):
        if labels.get("model") == model:
            totals[labels["outcome"]] = totals.get(labels["outcome"], 0) + int(value)
    return totals


def _streams_with_a_kill(app: str, sent: int, replicas: int) -> list[dict[str, Any]]:
    """`sent` greedy streams at concurrency 8; once some are under way, the replica that served the latest one
    to start is SIGKILLed (while `replicas` of 'llama' run)."""
    results: dict[int, dict[str, Any]] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        seen = _greedy_stream(app, i)
        with lock:
            results[i] = seen

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(sent)]
        wait_for(lambda: len(results) >= 8, timeout=REQUEST_TIMEOUT_S, message="8 streams done before the kill")
        wait_for(lambda: _running("llama") == replicas, timeout=RESTART_TIMEOUT_S, message="'llama' replicas up")
        with lock:
            busy = next(r["replica"] for r in reversed(list(results.values())) if r["replica"])
        time.sleep(0.5)  # the next streams are under way, their first tokens sent
        victim = _kill_one_replica("llama", serving=busy)
        for f in futures:
            f.result()
    print(f"  killed replica pid {victim['pid']} of {replicas}")
    return [results[i] for i in range(sent)]


def test_streams_cut_by_a_sigkill_go_on_elsewhere_with_the_same_text(app: str) -> None:
    """Streams whose replica dies mid-way migrate: the same stream id, the same greedy text as without the kill,
    usage over the whole; with two replicas (to the survivor), then with one (to the restarted replica)."""
    wait_for(lambda: _running("llama") == 2, timeout=RESTART_TIMEOUT_S, message="two running 'llama' replicas")
    sent = 40
    reference = {i: _greedy_stream(app, i) for i in range(sent)}
    assert all(r["outcome"] == "ok" for r in reference.values()), reference
    before = _migrations("llama")
    for replicas in (2, 1):
        streams = _streams_with_a_kill(app, sent, replicas)
        failed = [(i, s["outcome"]) for i, s in enumerate(streams) if s["outcome"] != "ok"]
        wrong = [i for i, s in enumerate(streams) if s["text"] != reference[i]["text"]]
        pause = max(s["pause_s"] for s in streams)
        print(
            f"  {sent} streams at concurrency 8: failed {len(failed)}, text differs {len(wrong)}, "
            f"longest pause {pause:.1f} s"
        )
        assert not failed, failed
        assert not wrong, [(i, streams[i]["text"], reference[i]["text"]) for i in wrong[:3]]
        for s in streams:
            assert len(s["ids"]) == 1, "one stream id across the seam"
            assert s["usage"]["completion_tokens"] == STREAM_TOKENS, s["usage"]
            assert s["usage"]["prompt_tokens"] == s["usage"]["total_tokens"] - STREAM_TOKENS
        if replicas == 2:  # the killed one comes back before the next round
            wait_for(lambda: _running("llama") == 1, timeout=60, message="the kill seen by Serve")

    def migrated() -> bool:
        return _migrations("llama").get("migrated", 0) > before.get("migrated", 0)

    wait_for(migrated, timeout=METRICS_TIMEOUT_S, message="no stream was migrated (modelfleet_migrations)")
    print(f"  migrations: {_migrations('llama')} (before: {before})")


def test_the_only_replica_killed_is_waited_for(app: str) -> None:
    """'solo' has one replica: requests in it when it dies wait for Serve to restart it, then succeed."""
    client = _client(app)
    before = _counters("solo")
    prompt = " ".join(f"t{i}" for i in range(10))  # 10 tokens x 0.2 s: in flight when the kill comes

    def one(_: int) -> str:
        return client.completions.create(model="solo", prompt=prompt, max_tokens=10).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(4)]
        time.sleep(1.0)
        victim = _kill_one_replica("solo")
        texts = [f.result() for f in futures]
    retried = _retries_since("solo", before, answered=4)
    print(
        f"\nSIGKILL of the only 'solo' replica (pid {victim['pid']}) with 4 requests in it: 0 failed, retried {retried}"
    )
    assert texts == [prompt] * 4
    assert retried, "the requests in the killed replica were not retried"


# --- a wedged engine -----------------------------------------------------------------------------------------


def test_a_wedged_replica_is_replaced_and_its_requests_retried(app: str) -> None:
    client = _client(app)
    (first,) = _replica_actors("wedge")
    before = _counters("wedge")
    answered = [client.completions.create(model="wedge", prompt=f"a b {i}", max_tokens=3) for i in range(4)]
    assert [a.choices[0].text for a in answered] == [f"a b {i}" for i in range(4)]
    # The next requests reach an engine that accepts and never answers: its health check fails after 2 s
    # without output, Serve replaces the replica, and the router sends the requests again to the new one.
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(client.completions.create, model="wedge", prompt=f"c d {i}", max_tokens=3) for i in range(3)
        ]
        texts = [f.result().choices[0].text for f in futures]
    assert texts == [f"c d {i}" for i in range(3)]
    assert first["id"] not in {a["id"] for a in _replica_actors("wedge")}, "the wedged replica still runs"
    retried = _retries_since("wedge", before, answered=7)
    print(f"\nwedged 'wedge' replica replaced; 3 requests held by it: 0 failed, retried {retried}")
    assert retried, "the requests held by the wedged replica were not retried"


# --- weights that fail to load -------------------------------------------------------------------------------


def test_a_model_whose_weights_fail_to_load_shows_in_status_and_the_others_serve(
    deploy: Callable[[dict[str, Any]], str], ray_cluster: int, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage-model"
    garbage.mkdir()
    (garbage / "config.json").write_text("{ this is not a model config")
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    name = "broken"
    with pytest.raises(ClusterError) as failed:
        deploy(
            {
                "name": name,
                "route_prefix": f"/{name}",
                "models": [
                    {**ECHO, "id": "fine"},
                    {"id": "bad", "task": "generate", "engine": "transformers", "source": str(garbage)},
                ],
            }
        )
    print(f"\ndeploy of an app with a model on garbage weights: {failed.value}")
    rows = {r.deployment: r for r in deploying.status(STATE) if r.app == name}
    print("\n".join(f"  {r.deployment}: {r.status} {r.replicas} {r.message}" for r in rows.values()))
    bad, fine = rows["replica:bad"], rows["replica:fine"]
    assert bad.status in ("DEPLOY_FAILED", "UNHEALTHY"), bad
    assert "garbage-model" in bad.message or "config" in bad.message.lower(), bad
    assert fine.status == "HEALTHY" and fine.replicas.startswith("1/1"), fine
    base = f"http://127.0.0.1:{ray_cluster}/{name}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    reply = client.completions.create(model="fine", prompt="still serving", max_tokens=5)
    assert reply.choices[0].text == "still serving"
    ready = httpx.get(f"{base}/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["models"] == {"fine": True, "bad": False}, ready.text
