"""`router.ingress`: the config field, the plan's Ray environment, and the local cluster's HAProxy settings (its
files, ports and the launcher that keeps HAProxy's own listeners on loopback), checked with the real binary."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.haproxy_local import LAUNCHER, haproxy_binary, local_haproxy_env
from deployments.config import RouterConfig, ServingConfig
from deployments.plan import HAPROXY_ENV, RAY_ENV, compile_plan, ingress_env

_ECHO = {"id": "echo", "task": "generate", "engine": "echo"}


def _config(**router: object) -> ServingConfig:
    return ServingConfig.model_validate({"models": [_ECHO], "router": router})


def test_ingress_defaults_to_serves_python_proxy() -> None:
    assert RouterConfig.model_validate({}).ingress == "python"
    assert compile_plan(_config()).ray_env == RAY_ENV


def test_haproxy_ingress_reaches_the_plans_ray_env() -> None:
    plan = compile_plan(_config(ingress="haproxy"))
    assert plan.ray_env == {**RAY_ENV, "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    assert ingress_env("haproxy") == HAPROXY_ENV
    assert ingress_env("python") == {}


def test_unknown_ingress_is_refused_by_name() -> None:
    with pytest.raises(ValidationError) as info:
        _config(ingress="nginx")
    assert info.value.errors()[0]["loc"] == ("router", "ingress")


def test_haproxy_ingress_refuses_tls_by_name(tmp_path: Path) -> None:
    tls = {"certfile": str(tmp_path / "c.pem"), "keyfile": str(tmp_path / "k.pem")}
    with pytest.raises(ValidationError, match=r"router.ingress 'haproxy' does not serve HTTPS"):
        _config(ingress="haproxy", tls=tls)
    assert _config(ingress="python", tls=tls).router.tls is not None


def test_local_haproxy_env_keeps_files_and_ports_to_the_cluster(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 60) / "ray"  # a long Ray folder: HAProxy's sockets still fit its 97 characters
    env = local_haproxy_env(deep)
    files = [key for key in env if key.startswith("RAY_SERVE_HAPROXY_") and key.endswith(("_LOC", "_PATH", "_FILE"))]
    files.remove("RAY_SERVE_HAPROXY_BINARY_PATH")
    base = Path(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    assert len(files) == 4 and all(Path(env[key]).parent == base for key in files)
    assert base.is_dir() and base.name.startswith("mfh-")
    # Serve adds a 56-character subfolder; HAProxy refuses socket paths over 97 characters.
    assert len(str(base / ("0" * 56) / "metrics.sock")) <= 97
    # Another cluster (another Ray folder) gets another folder; the same cluster the same one.
    other = Path(local_haproxy_env(tmp_path / "other")["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    assert other != base
    assert local_haproxy_env(deep)["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] == str(base)
    for folder in (base, other):
        shutil.rmtree(folder)
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(LAUNCHER)
    assert env["MODELFLEET_HAPROXY_BINARY"] == haproxy_binary()
    # Free ports of their own, not Serve's fixed 8404/9101 that a second cluster on the machine would also take.
    ports = {int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])}
    assert len(ports) == 2 and not ports & {8404, 9101}
    assert os.access(LAUNCHER, os.X_OK)


def test_launcher_binds_haproxys_own_listeners_to_loopback(tmp_path: Path) -> None:
    """The launcher rewrites the stats and Prometheus binds (every interface, as Serve writes them) and leaves the
    HTTP frontend's bind alone; the real HAProxy binary then accepts the config (`-c`: check only, binds nothing)."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "global\n    maxconn 100\n"
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 5s\n    timeout server 5s\n"
        "frontend prometheus\n    bind :19101\n    http-request use-service prometheus-exporter\n"
        "frontend http_frontend\n    bind *:18000\n    default_backend b\n"
        "backend b\n    server s1 127.0.0.1:18001\n"
        "listen stats\n  bind *:18404\n  stats enable\n"
    )
    env = {
        **os.environ,
        "MODELFLEET_HAPROXY_BINARY": haproxy_binary(),
        "RAY_SERVE_HAPROXY_STATS_PORT": "18404",
        "RAY_SERVE_HAPROXY_METRICS_PORT": "19101",
    }
    done = subprocess.run([str(LAUNCHER), "-c", "-f", str(cfg)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    binds = [line.strip() for line in cfg.read_text().splitlines() if line.strip().startswith("bind")]
    assert binds == ["bind 127.0.0.1:19101", "bind *:18000", "bind 127.0.0.1:18404"]


def test_launcher_without_the_real_binary_fails_with_its_name(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "MODELFLEET_HAPROXY_BINARY"}
    done = subprocess.run([str(LAUNCHER), "-v"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "MODELFLEET_HAPROXY_BINARY" in done.stderr
