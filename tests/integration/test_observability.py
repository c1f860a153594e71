"""The metrics and dashboards against real parts: a local cluster started by the CLI (`modelfleet up
--metrics-port`, a fresh HOME) serving echo models and the tiny Llama on vLLM under a short bounded load, scraped by
a real Prometheus (its own binary on loopback, with a generated config); every query of every dashboard panel must
return data there."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cluster.local import free_port
from cluster.observability import DASHBOARDS, PanelQuery, build, panel_queries
from deployments import metrics
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "cluster.cli"]
ROOT = Path(__file__).resolve().parents[2]
MODELS = ("echo", "echo-embed", "tiny-vllm")
# Ray's metrics agent exports application metrics every few seconds; Prometheus scrapes every 2 s here.
METRICS_DEADLINE_S = 150.0
_SESSION_VARS = ("MODELFLEET_", "RAY_AUTH_", "RAY_TMPDIR", "XDG_")


def _env(home: Path) -> dict[str, str]:
    """A new user's environment (as tests/integration/test_cli.py): nothing of the test session's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SESSION_VARS)}
    return {**env, "HOME": str(home), "TMPDIR": str(home.parent / "t"), "PYTHONUNBUFFERED": "1"}


def _run(home: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=_env(home), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="o", dir="/tmp"))  # short: Ray's unix sockets live under it
    (root / "h").mkdir()
    (root / "t").mkdir()
    yield root / "h"
    _run(root / "h", "down", timeout=180)
    shutil.rmtree(root, ignore_errors=True)


def _config(home: Path, tiny_llama: Path, port: int) -> Path:
    config = {
        "name": "observed",
        "models": [
            {
                "id": "echo",
                "task": "generate",
                "engine": "echo",
                "resources": {"num_cpus": 0.25},
                "engine_kwargs": {"fail_marker": "__fail__", "token_delay_s": 0.005},
                # Autoscaling, so that Serve's autoscaler reports what it wants.
                "scaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2},
            },
            {"id": "echo-embed", "task": "embed", "engine": "echo", "resources": {"num_cpus": 0.25}},
            {
                "id": "tiny-vllm",
                "task": "generate",
                "engine": "vllm",
                "source": str(tiny_llama),
                "context_length": 256,
                "max_output_tokens": 64,
                "resources": {"num_cpus": 1},
                "engine_kwargs": {"cpu_kvcache_space_gb": 0.25},
            },
        ],
        # A pipeline, so that its steps' latency is recorded (the first target answers).
        "pipelines": [{"id": "echo-safe", "kind": "fallback", "targets": [{"model": "echo"}, {"model": "tiny-vllm"}]}],
        "router": {"port": port},
    }
    path = home / "observed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def cluster(home: Path, tiny_llama: Path) -> tuple[str, int]:
    """The CLI's cluster with the test app deployed: (base URL, Ray's metrics port)."""
    metrics_port = free_port()
    up = _run(home, "up", f"--metrics-port={metrics_port}", timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"http://127.0.0.1:{metrics_port}/metrics" in up.stdout
    state = json.loads((home / ".modelfleet" / "cluster.json").read_text())
    assert state["metrics_port"] == metrics_port
    port = free_port()
    deployed = _run(home, "deploy", str(_config(home, tiny_llama, port)), timeout=900)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    return f"http://127.0.0.1:{port}", metrics_port


@pytest.fixture(scope="module")
def prometheus(cluster: tuple[str, int], home: Path) -> Iterator[str]:
    """A Prometheus of the test's own on loopback, scraping the cluster's metrics port every 2 s."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "the `prometheus` binary is not installed, so the dashboards cannot be checked: `make test` installs "
            "Debian's package as root (or: apt-get install prometheus; any Prometheus 2.x binary on PATH works)"
        )
    root = home.parent / "prometheus"
    root.mkdir()
    config = {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{cluster[1]}"]}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (root / "log").open("w") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (root / "log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout=60, message=f"Prometheus did not become ready; see {root / 'log'}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _load(base: str) -> dict[str, int]:
    """A short, bounded load: streamed and whole completions, embeddings, and failures of each kind.

    Returns:
        How many streamed echo chats answered 200 (to check the request counter against).
    """
    chat = f"{base}/v1/chat/completions"

    def stream(model: str, text: str, max_tokens: int = 16) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": True}
        with httpx.stream("POST", chat, json={**body, "max_tokens": max_tokens}, timeout=120) as r:
            for _ in r.iter_bytes():
                pass
            return r.status_code

    words = " ".join(f"w{i}" for i in range(12))
    with ThreadPoolExecutor(max_workers=6) as pool:
        echo = list(pool.map(lambda _: stream("echo", words), range(40)))
        vllm = list(pool.map(lambda _: stream("tiny-vllm", "Tell me a story", 24), range(6)))
    assert set(echo) == {200} and set(vllm) == {200}, (echo, vllm)
    completion = {"model": "tiny-vllm", "prompt": "Once upon a time", "max_tokens": 8}
    assert httpx.post(f"{base}/v1/completions", json=completion, timeout=120).status_code == 200
    assert httpx.post(f"{base}/v1/completions", json={"model": "echo", "prompt": "a b c"}, timeout=30).is_success
    piped = {"model": "echo-safe", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 4}
    piped_ok = sum(httpx.post(chat, json=piped, timeout=30).status_code == 200 for _ in range(4))
    assert piped_ok == 4
    embed = {"model": "echo-embed", "input": ["one text", "another text"]}
    assert httpx.post(f"{base}/v1/embeddings", json=embed, timeout=30).status_code == 200
    assert httpx.post(chat, json={"model": "nope", "messages": []}, timeout=30).status_code in (400, 404)
    refused = {"model": "echo", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 1}
    assert httpx.post(chat, json=refused, timeout=30).status_code == 400  # the echo engine has no logprobs
    assert stream("echo", "a b c __fail__ d") == 200  # fails after its first token: an error event
    return {"echo_streams": len(echo), "piped": piped_ok}


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"Prometheus refused {expr!r}: {body}"
    return list(body["data"]["result"])


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def _resolve(query: PanelQuery, window: str) -> list[str]:
    """The query with the dashboard variables set as Grafana would: every cluster ('All'), all models for
    multi-select (`=~`), each served model in turn for the drill-down's single model (`=`)."""
    expr = query.expr.replace("$__rate_interval", window).replace("$cluster", ".*")
    if '=~"$model"' in expr:
        return [expr.replace("$model", ".*")]
    return [expr.replace("$model", model) for model in MODELS] if "$model" in expr else [expr]


def test_every_dashboard_query_returns_data(cluster: tuple[str, int], prometheus: str) -> None:
    base, _ = cluster
    started = time.monotonic()
    rounds = [_load(base)]
    # rate() sees a series' increments only from its first scrape on: load again once the first round's series
    # exist (in production traffic never stops; here the first round may be over before Ray's first export).
    suffix = {"histogram": "_bucket", "counter": "", "gauge": ""}
    ours = {m.exported + suffix[m.kind] for m in metrics.METRICS}
    expected = ours | {"ray_vllm_time_to_first_token_seconds_bucket", "ray_vllm_num_requests_running"}
    _until(lambda: expected - _names(prometheus), "metrics not exported after the first round of load")
    rounds.append(_load(base))

    boards = [build(board) for board in DASHBOARDS]
    queries = [(q, q.panel in gpu_only) for model, gpu_only in boards for q in panel_queries(model)]
    assert len(queries) > 50

    def missing() -> list[str]:
        window = f"{int(time.monotonic() - started) + 60}s"  # the whole load, whenever the check runs
        return [
            f"{q.dashboard} / {q.panel}: {q.expr}"
            for q, gpu in queries
            if not gpu and not any(_has_data(_query(prometheus, e)) for e in _resolve(q, window))
        ]

    _until(missing, f"dashboard queries without data (scrape targets: {_targets(prometheus)})")
    # GPU panels: valid queries (Prometheus accepts them), without data only because no node has a GPU.
    assert not _query(prometheus, 'ray_resources{Name="GPU"}'), "a GPU node exists: its panels must have data"
    for q, gpu in queries:
        if gpu:
            _query(prometheus, _resolve(q, "5m")[0])

    # The counters count what was sent (+1 per round: the stream that failed after its 200; a pipeline's requests
    # count under the model that answered them).
    ok = 'sum(ray_modelfleet_requests_total{model="echo",endpoint="/v1/chat/completions",status="200"})'
    counts = {
        ok: sum(r["echo_streams"] + r["piped"] + 1 for r in rounds),
        'sum(ray_modelfleet_stream_errors_total{model="echo"})': len(rounds),
        'sum(ray_modelfleet_requests_total{model="echo",status="400"})': len(rounds),
    }
    _until(
        lambda: [f"{e} = {_value(prometheus, e)}, not {n}" for e, n in counts.items() if _value(prometheus, e) != n],
        "request counters",
    )
    # Every streamed request's time to first token is split into all four parts. (Their sums are not compared:
    # Ray's metrics agent rebuilds histograms from bucket midpoints, so `_sum` is an estimate; the unit tests check
    # that the parts add up exactly.)
    ttft = _value(prometheus, 'sum(ray_modelfleet_time_to_first_token_seconds_count{model="echo"})')
    parts = _query(prometheus, 'sum by (part) (ray_modelfleet_time_to_first_token_part_seconds_count{model="echo"})')
    assert {r["metric"]["part"]: float(r["value"][1]) for r in parts} == dict.fromkeys(metrics.TTFT_PARTS, ttft)


def _until(problems: Callable[[], Collection[str]], what: str) -> None:
    """Poll until `problems()` is empty; fail with the last ones after METRICS_DEADLINE_S."""
    deadline = time.monotonic() + METRICS_DEADLINE_S
    while (left := problems()) and time.monotonic() < deadline:
        time.sleep(5)
    assert not left, f"after {METRICS_DEADLINE_S:.0f} s (Ray exports metrics every few seconds), {what}: {left}"


def _names(prometheus: str) -> set[str]:
    result = _query(prometheus, 'count by (__name__) ({__name__=~"ray_(modelfleet|vllm)_.+"})')
    return {r["metric"]["__name__"] for r in result}


def _targets(prometheus: str) -> list[dict[str, Any]]:
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=30).json()["data"]["activeTargets"]
    return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")} for t in targets]


def _value(prometheus: str, expr: str) -> float:
    result = _query(prometheus, expr)
    return float(result[0]["value"][1]) if result else math.nan
