"""The real `modelfleet` CLI as a new user runs it: an empty HOME and TMPDIR (no ~/.ray token, no /tmp/ray, no
caches), its own local Ray head on free ports, deploy, status, serve, down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml

from cluster.local import free_port
from deployments import cpus
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "cluster.cli"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def home() -> Iterator[Path]:
    """A fresh, empty HOME; the CLI keeps its cluster in HOME/.modelfleet (its default)."""
    # Short path: Ray's unix sockets live under ~/.modelfleet/ray (107-byte limit).
    root = Path(tempfile.mkdtemp(prefix="c", dir="/tmp"))
    (root / "h").mkdir()
    (root / "t").mkdir()
    yield root / "h"
    subprocess.run([*CLI, "down"], env=_env(root / "h"), cwd=ROOT, timeout=120, check=False)
    shutil.rmtree(root, ignore_errors=True)


# What the test session set for itself (its cluster home, token, caches, Ray's temp folder): a new user has none.
_SESSION_VARS = ("MODELFLEET_", "RAY_AUTH_", "RAY_TMPDIR", "XDG_")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SESSION_VARS)}
    return {**env, "HOME": str(home), "TMPDIR": str(home.parent / "t"), "PYTHONUNBUFFERED": "1"}


def _state(home: Path) -> dict[str, Any]:
    return dict(json.loads((home / ".modelfleet" / "cluster.json").read_text()))


def _config(home: Path) -> tuple[Path, int]:
    port = free_port()
    config = yaml.safe_load((ROOT / "deployments" / "configs" / "echo.yaml").read_text())
    config["router"] = {"port": port}
    path = home / "echo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


def _run(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=_env(home), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_deploy_status_down(home: Path) -> None:
    config, port = _config(home)
    up = _run(home, "up")
    assert up.returncode == 0, up.stderr
    state = _state(home)
    assert state["gcs_address"].startswith("127.0.0.1:")
    # Token authentication is on, with the cluster's own token, made by `up`; ~/.ray is never created.
    token = home / ".modelfleet" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) >= 32
    head_env = psutil.Process(state["pid"]).environ()
    assert head_env["RAY_AUTH_MODE"] == "token" and head_env["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert not (home / ".ray").exists()

    deployed = _run(home, "deploy", str(config))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert f"ready: http://127.0.0.1:{port}/v1" in deployed.stdout

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "via the cli"}])
    assert reply.choices[0].message.content == "via the cli"

    status = _run(home, "status", "--json")
    assert status.returncode == 0, status.stderr
    rows = {r["deployment"]: r for r in json.loads(status.stdout)["deployments"]}
    assert rows["replica:echo"]["status"] == "HEALTHY"
    assert rows["replica:echo"]["replicas"] == "1/1"
    assert rows["replica:echo"]["engine"] == "echo"
    assert rows["replica:echo"]["resources"] == "cpu=0.5 gpu=0"
    table = _run(home, "status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert (
        lines[0].startswith("cluster 127.0.0.1:")
        and lines[1] == ""
        and lines[2].split()[:3] == ["APP", "DEPLOYMENT", "STATUS"]
    )
    assert {line.split()[1] for line in lines[3:]} == {"router", "replica:echo", "replica:echo-embed"}, table.stdout
    assert "working_dir" not in table.stdout + table.stderr
    _check_cpu_split(state)
    if state["engine_cpus"]:
        assert f"serving processes moved off the engine cores ({state['engine_cpus']})" in deployed.stdout

    down = _run(home, "down")
    assert down.returncode == 0 and "stopped" in down.stdout
    wait_for(lambda: not _pid_alive(state["pid"]), timeout=60, message="ray head still running after down")
    assert not (home / ".modelfleet" / "cluster.json").exists()
    assert not (home / ".ray").exists()


def _check_cpu_split(state: dict[str, Any]) -> None:
    """`up` (engine cores 'auto') recorded the engine cores and started Ray's workers at niceness 0; the
    router stepped back to SERVING_NICE; `deploy` moved the cluster's threads to the serving cores once
    the app answered (threads an engine pins to its cores stay; the echo engine pins none)."""
    plan = cpus.plan_cpus("auto")
    if plan is None:  # one core: nothing to split
        assert state["engine_cpus"] is None
        return
    assert state["engine_cpus"] == cpus.format_cpu_list(plan.engine)
    head = psutil.Process(state["pid"])
    # Process titles look like 'ray::ServeReplica:<app>:<deployment>[.<method being run>]', space-padded.
    titles = {" ".join(p.cmdline()).split(".")[0].strip(): p for p in head.children(recursive=True)}
    router = next(p for title, p in titles.items() if "ServeReplica" in title and title.endswith(":router"))
    echo = next(p for title, p in titles.items() if "ServeReplica" in title and title.endswith(":replica:echo"))
    assert router.nice() == cpus.SERVING_NICE
    assert echo.nice() == 0  # the echo engine computes in its replica: no step back
    for proc in (head, router, echo):
        assert set(proc.cpu_affinity()) == plan.serving


def test_serve_runs_until_sigterm(home: Path) -> None:
    # A user's own Ray token is neither needed nor overwritten.
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("the-users-own-token")
    config, port = _config(home)
    log = home / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", str(config)], env=_env(home), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(
            lambda: "Press Ctrl-C" in log.read_text() or proc.poll() is not None,
            timeout=300,
            message="`modelfleet serve` did not become ready",
        )
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in text
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "echo", "prompt": "hi"}, timeout=30)
        assert r.json()["choices"][0]["text"] == "hi"
        pid = _state(home)["pid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()
        assert "stopped the local cluster" in log.read_text()
        wait_for(lambda: not _pid_alive(pid), timeout=30, message="ray head outlived `modelfleet serve`")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert (home / ".ray" / "auth_token").read_text() == "the-users-own-token"
