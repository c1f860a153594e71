"""The embedded local Ray cluster: start a head bound to 127.0.0.1, find it again, and stop only it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cluster import LOCAL_ONLY_ENV
from cluster.auth_token import ray_auth_env
from cluster.haproxy_local import haproxy_folder, local_haproxy_env
from deployments import cpus
from deployments.api.proxy_middleware import PROXY_ENV
from deployments.plan import RAY_ENV, ingress_env
from models.settings import get_settings

__all__ = ["CLUSTER_ENV", "ClusterError", "ClusterState", "down", "free_port", "read_state", "settle_cpus", "up"]

logger = logging.getLogger(__name__)

_STATE_FILE = "cluster.json"
# Ray's raylet starts idle Python workers when the first driver connects, as many as it may start at once (here
# 2). No modelfleet actor can use them: Serve's controller, proxy and replicas all run in the job's runtime_env
# (the repo as working_dir), which an idle worker lacks. They only took both cores, and both worker-start slots,
# while the controller's own worker started (issue 14).
# Serve's controller kills a proxy that is not ready 5 s after its actor was created, and the deploy waiting for it
# fails: on a loaded 2-core machine, with the dashboard's processes starting too, the proxy's worker took longer.
_STARTUP_ENV = {"RAY_prestart_worker_first_driver": "0", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}
#: The environment every Ray process of a local cluster gets (besides its ingress' and its token): the plan's
#: `RAY_ENV`; Serve's proxy answering undecodable headers with a 400 (deployments.api.proxy_middleware); its
#: processes dialling each other on 127.0.0.1 (see cluster/__init__.py); no idle workers at start, and time for the
#: proxy to start. The bench's cluster gets it too.
CLUSTER_ENV = {**RAY_ENV, **PROXY_ENV, **LOCAL_ONLY_ENV, **_STARTUP_ENV}
# Ray puts unix sockets at <temp dir>/session_<date>_<time>_<usec>_<pid>/sockets/<name>; the longest name is the
# dashboard's (dash_MetricsHead): 69 more bytes with a 7-digit pid, within the 107 of a unix socket path, and a
# little margin for Ray's other socket names. Past it the dashboard fails to start and takes the head down.
_MAX_TEMP_DIR_CHARS = 36


class ClusterError(RuntimeError):
    """Raised when the local cluster cannot be started, found or stopped."""


@dataclass(frozen=True)
class ClusterState:
    """What `up` started: enough for later commands to connect to it and to stop exactly it."""

    pid: int
    gcs_address: str
    temp_dir: str
    log_file: str
    num_cpus: int
    dashboard_port: int | None = None
    engine_cpus: str | None = None  # cores kept for engine compute; Ray's processes run on the others
    metrics_port: int | None = None  # Ray's metrics export port (Prometheus format) on 127.0.0.1
    ingress: str = "python"  # what listens on the HTTP port (router.ingress): Serve's Python proxy or HAProxy

    @property
    def alive(self) -> bool:
        """Whether the `ray start` process still runs."""
        try:
            # Reap it if it is our own child (`modelfleet serve`), so a zombie does not count as alive.
            if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                return False
        except ChildProcessError:
            pass
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def ray_temp_dir(home: Path) -> Path:
    """Ray's temp folder for the cluster kept in `home`: `home/ray`, or a short folder in /tmp named after `home`
    when that path is too long for the unix sockets Ray puts under it (107 bytes with the session's name)."""
    temp_dir = home / "ray"
    if len(str(temp_dir)) <= _MAX_TEMP_DIR_CHARS:
        return temp_dir
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
    return Path("/tmp") / f"modelfleet-{digest}"


def _state_path() -> Path:
    return get_settings().home / _STATE_FILE


def read_state() -> ClusterState | None:
    """The running cluster's state, or None when none is running (a stale state file is removed)."""
    path = _state_path()
    if not path.exists():
        return None
    try:
        state = ClusterState(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        path.unlink(missing_ok=True)
        return None
    if not state.alive:
        path.unlink(missing_ok=True)
        return None
    return state


def _wait_port(port: int, deadline: float, proc: subprocess.Popen[bytes], log_file: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise ClusterError(f"`ray start` exited with code {proc.returncode}:\n{tail}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise ClusterError(f"Ray's GCS did not open port {port} in time; see {log_file}")


def up(
    *,
    num_cpus: int | None = None,
    dashboard: bool = True,
    engine_cpus: str = "auto",
    metrics_port: int | None = None,
    ingress: Literal["python", "haproxy"] = "python",
    timeout_s: float = 120.0,
) -> ClusterState:
    """Start a local Ray head bound to 127.0.0.1 (or return the one already running).

    Args:
        num_cpus: logical CPUs to advertise. Defaults to at least 8, more than the cores, so that a model
            replica asking for CPUs never starves the router (see FIELD-NOTES).
        dashboard: start Ray's dashboard, whose job API runs batch jobs (`ray job submit`, the Batches API).
        engine_cpus: cores kept for engine compute ('auto', 'off' or a CPU list; see `deployments.cpus`):
            recorded in the state, from which `deploy` compiles the plan that hands them to the engines;
            `settle_cpus` moves the rest of the cluster onto the other cores once an app answers. Ray's
            processes get the plan's `RAY_ENV`, the proxy's middleware (`PROXY_ENV`) and the cluster's auth token
            (`cluster.auth_token`).
        metrics_port: the port on 127.0.0.1 where Ray exports the node's metrics (Ray's, Serve's and the app's,
            in Prometheus format) for a Prometheus to scrape; default: a free port. Recorded in the state.
        ingress: `router.ingress` of the configs this cluster will serve: 'python' (Serve's proxy) or 'haproxy'
            (Serve's HAProxy ingress, kept to this cluster and to loopback: `cluster.haproxy_local`). A setting
            of Ray's processes, so of the whole cluster; recorded in the state.
        timeout_s: how long to wait for the head to come up.

    Returns:
        The state of the running cluster.

    Raises:
        ClusterError: the head did not start, or `engine_cpus` is not usable here.
    """
    existing = read_state()
    if existing is not None:
        return existing
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    temp_dir = ray_temp_dir(settings.home)
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_file = settings.home / "ray-start.log"
    logical_cpus = num_cpus or max(8, os.cpu_count() or 2)
    port = free_port()
    dashboard_port = free_port() if dashboard else None
    metrics_port = metrics_port or free_port()
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={logical_cpus}",
        f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}",
        f"--metrics-export-port={metrics_port}",
        # The dashboard agent's HTTP port (job submission) is fixed at 52365 by default: a second local cluster
        # on the machine would fail to bind it and refuse every job.
        f"--dashboard-agent-listen-port={free_port()}",
        "--disable-usage-stats",
    ]
    if dashboard_port:
        cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    else:
        cmd += ["--include-dashboard=false"]
    try:
        split = cpus.plan_cpus(engine_cpus)
    except ValueError as exc:
        raise ClusterError(f"--engine-cpus: {exc}") from None
    env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_TOKEN"}
    env.update(CLUSTER_ENV)
    env.update(ingress_env(ingress))
    if ingress == "haproxy":
        try:
            env.update(local_haproxy_env(temp_dir))
        except RuntimeError as exc:
            raise ClusterError(str(exc)) from None
    env.update(ray_auth_env(settings.home))  # token auth stays on, with the cluster's own token
    if split is not None:
        logger.info("local cluster: %s", split.describe())
    with log_file.open("wb") as log:
        # A session of its own: `down` signals this process group and nothing else on the machine.
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _wait_port(port, time.monotonic() + timeout_s, proc, log_file)
    state = ClusterState(
        pid=proc.pid,
        gcs_address=f"127.0.0.1:{port}",
        temp_dir=str(temp_dir),
        log_file=str(log_file),
        num_cpus=logical_cpus,
        dashboard_port=dashboard_port,
        metrics_port=metrics_port,
        engine_cpus=cpus.format_cpu_list(split.engine) if split is not None else None,
        ingress=ingress,
    )
    _state_path().write_text(json.dumps(asdict(state)))
    return state


def settle_cpus(state: ClusterState) -> int:
    """Move the cluster's serving threads onto the cores `up` kept free of engines (a no-op without a split).

    Returns:
        How many threads were moved.
    """
    if not state.engine_cpus:
        return 0
    engine = cpus.parse_cpu_list(state.engine_cpus)
    serving = cpus.usable_cpus() - engine
    if not serving:
        return 0
    return cpus.pin_process_tree(state.pid, cpus.CpuPlan(engine=engine, serving=frozenset(serving)))


def down(timeout_s: float = 60.0) -> bool:
    """Stop the cluster that `up` started, and only it.

    Returns:
        True if a cluster was stopped, False if none was running.
    """
    state = read_state()
    if state is None:
        return False
    try:
        pgid = os.getpgid(state.pid)
    except ProcessLookupError:
        pgid = state.pid
    # TERM to `ray start --block` makes it stop the head's processes; the group kill catches stragglers.
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while state.alive and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if state.ingress == "haproxy":
        shutil.rmtree(haproxy_folder(Path(state.temp_dir)), ignore_errors=True)
    _state_path().unlink(missing_ok=True)
    return True
