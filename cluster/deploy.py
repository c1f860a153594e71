"""Deploying a ServingConfig onto a running cluster, waiting until it really answers, and reading status."""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cluster.auth_token import use_token
from cluster.local import ClusterError, ClusterState
from cluster.model_changes import record_config
from cluster.placement import unschedulable_reason
from cluster.preflight import check_local_engines, check_local_files
from cluster.unstarted import release_every_unstarted, release_leaving
from deployments.config import ServingConfig, TLSConfig
from deployments.plan import DeploymentPlan, PlanError, compile_plan
from models.settings import get_settings

__all__ = [
    "DeploymentRow",
    "connect",
    "deploy",
    "start_serve",
    "status",
    "stop_serving",
    "wait_controller",
    "wait_ready",
]

logger = logging.getLogger(__name__)

# Ray rewrites a 127.0.0.1 bootstrap address to the host's outward IP before connecting, and our head
# listens on loopback only. This flag (read when ray is first imported) makes a driver on a Linux host
# resolve "this node" to loopback, as Ray does on laptops. It only affects this driver process.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_DEPLOYED_FILE = "deployed.json"
_UNSCHEDULABLE_GRACE_S = 20.0
# How often `deploy` reads the app's status and `wait_ready` asks /readyz while an app starts: each costs one small
# call, and every period is added to the time the CLI reports ready (issue 14).
_POLL_S = 0.25
_RUNNING = "RUNNING:"  # how `_progress_line` starts once Serve runs the app
# The repo root is Ray's working_dir; only the code travels, never the venv or caches.
_WORKING_DIR_EXCLUDES = [".venv", ".git", "**/__pycache__", ".pytest_cache", ".mypy_cache", "docs", "tests"]


@dataclass(frozen=True)
class DeploymentRow:
    """One line of `modelfleet status`."""

    app: str
    deployment: str
    status: str
    replicas: str
    engine: str
    resources: str
    message: str
    pending: str = ""


def connect(state: ClusterState, *, ship_code: bool = True) -> None:
    """Connect this process to the local cluster as a driver (idempotent).

    Args:
        state: the running cluster.
        ship_code: make the repo root the job's working_dir (needed to deploy; a client that only reads status
            sends no code, and so gets none of Ray's upload messages).
    """
    import ray

    if ray.is_initialized():
        return
    use_token()  # the token `up` created for this cluster (cluster.auth_token)
    ray.init(
        address=state.gcs_address,
        # The head binds to loopback only; the driver must say so too or it looks for the host's address.
        _node_ip_address="127.0.0.1",
        namespace="modelfleet",
        runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": _WORKING_DIR_EXCLUDES} if ship_code else None,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )


def stop_serving(state: ClusterState, *, timeout_s: float = 90.0) -> None:
    """Shut Serve down gracefully (replicas run their engines' shutdown, which frees vLLM's shared memory),
    then disconnect this driver. Bounded: a stuck shutdown is left to `local.down`'s kill."""
    import ray
    from ray import serve

    try:
        connect(state, ship_code=False)
    except ConnectionError:
        return  # the cluster is already gone
    stopper = threading.Thread(target=serve.shutdown, name="serve-shutdown", daemon=True)
    stopper.start()
    deadline = time.monotonic() + timeout_s
    while stopper.is_alive() and time.monotonic() < deadline:
        release_every_unstarted()  # every replica goes: none that never started waits out a drain
        stopper.join(0.5)
    if stopper.is_alive():
        logger.warning("Serve did not shut down within %.0f s; stopping the cluster anyway", timeout_s)
    ray.shutdown()


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def deploy(
    config: ServingConfig,
    state: ClusterState,
    *,
    timeout_s: float = 1800.0,
    on_progress: Callable[[str], None] = lambda line: None,
) -> str:
    """Deploy `config` and wait until /readyz says every model answers.

    Returns:
        The base URL of the HTTP API.

    Raises:
        ClusterError: the config cannot be planned, the HTTP port is taken, the app failed to deploy, or it was
            not ready in time.
    """
    from ray import serve

    if not config.router.keys and not config.router.api_keys:
        on_progress(
            "warning: no API keys are configured (router.keys): the API is open to anyone who can reach "
            f"{config.router.host}:{config.router.port}; `modelfleet keys create NAME` makes one"
        )
    if config.batches.enabled and state.gcs_address != "in-process" and state.dashboard_port is None:
        on_progress(
            "warning: batches.enabled, but this cluster runs without Ray's dashboard (--no-dashboard), whose job API "
            "runs batches: creating one will answer 503; `modelfleet down` and `modelfleet up`, or set "
            "batches.enabled: false"
        )
    check_local_engines(config)
    check_local_files(config)
    if state.gcs_address != "in-process" and config.router.ingress != state.ingress:
        raise ClusterError(
            f"router.ingress is '{config.router.ingress}' but this cluster started with '{state.ingress}' (an "
            f"ingress is a setting of the whole cluster): `modelfleet down`, then `modelfleet up --ingress "
            f"{config.router.ingress}`, or set router.ingress: {state.ingress}"
        )
    plan = plan_for(config, state.engine_cpus)
    connect(state)
    host, port = config.router.host, config.router.port
    http_options = _http_options(config)
    if _serve_running():
        _check_tls_unchanged(config.router.tls)
    elif not _port_free(host, port):
        raise ClusterError(f"{host}:{port} is already in use: stop what listens there or set router.port")
    deadline = time.monotonic() + timeout_s
    from deployments.app import build_app_from_plan

    starter, start_failed = start_serve(http_options)
    application = build_app_from_plan(plan)  # while Serve's controller starts
    _record(plan)  # before it runs, so `modelfleet status` can explain an app that stays pending
    record_config(config)
    wait_controller(start_failed, deadline)
    last_line = ""
    stuck_since: float | None = None
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            serve.run(application, name=config.name, route_prefix=config.route_prefix)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread below
            outcome.append(exc)

    # serve.run blocks until the app runs, possibly forever (nothing can place it): run it in a daemon
    # thread so that giving up here never waits on it.
    runner = threading.Thread(target=run, name="serve-run", daemon=True)
    fresh = config.name not in serve.status().applications
    runner.start()
    while runner.is_alive():
        if start_failed:
            raise ClusterError(f"Serve did not start: {start_failed[0]}") from start_failed[0]
        line = _progress_line(config.name)
        if fresh and line.startswith(_RUNNING):
            # serve.run sees it only at its next poll, up to a second later (Serve's CLIENT_POLLING_INTERVAL_S):
            # go on to the real check now; the thread returns on its own. Not on a redeploy, where the old
            # version's RUNNING can show before Serve takes the new one.
            break
        reasons = pending_reasons(plan)
        release_leaving(config.name, plan, reasons)
        if reasons:
            line += " | waiting for resources: " + "; ".join(f"{d}: {r}" for d, r in reasons.items())
            stuck_since = stuck_since or time.monotonic()
            # A local cluster has no autoscaler: what cannot be placed now never will be.
            if time.monotonic() - stuck_since > _UNSCHEDULABLE_GRACE_S:
                raise ClusterError(
                    f"app '{config.name}' cannot be placed: {'; '.join(reasons.values())}. "
                    "It stays pending (see `modelfleet status`); change the model's resources and deploy again."
                )
        else:
            stuck_since = None
        if line and line != last_line:
            on_progress(line)
            last_line = line
        if time.monotonic() > deadline:
            raise ClusterError(f"app '{config.name}' was not running after {timeout_s:.0f} s: {last_line}")
        runner.join(timeout=_POLL_S)
    release_leaving(config.name, plan, pending_reasons(plan))
    if outcome and outcome[0] is not None:
        raise ClusterError(f"deploying '{config.name}' failed: {outcome[0]}") from outcome[0]
    starter.join(timeout=max(deadline - time.monotonic(), 0.0))  # the proxy: long up by now
    if start_failed or starter.is_alive():
        raise ClusterError(f"Serve did not start: {start_failed[0] if start_failed else 'its proxy is not up'}")
    base = f"{'https' if config.router.tls else 'http'}://{host}:{port}{config.route_prefix.rstrip('/')}"
    on_progress("deployments running; checking that every model answers ...")
    tls = config.router.tls
    wait_ready(base, timeout_s=max(deadline - time.monotonic(), 30.0), cafile=tls.certfile if tls else None)
    return base


def start_serve(http_options: dict[str, Any]) -> tuple[threading.Thread, list[BaseException]]:
    """Start Serve in the background (issue 14): serve.start returns only once Serve's proxy is up too, 1-2 s
    here, and the app's replicas need only the controller, so the app goes in while the proxy starts (serve.run
    finds the controller and uses it). `wait_controller` waits for the controller. `modelfleet deploy` and the
    bench's cluster start Serve this way.

    What the app needs is imported first, in this thread, and Ray's serialization context of this driver built:
    building it imports pydantic.v1 and starlette (Ray's serializer add-ons), and two threads importing
    pydantic.v1 at once (ours through deployments.app, Serve's through that context) once failed a deploy with
    KeyError: 'pydantic.v1'.

    Returns:
        The thread running serve.start, and a list that receives its error if it fails.
    """
    import ray
    from ray import serve

    import deployments.app  # noqa: F401 - imported before the second thread starts

    ray._private.worker.global_worker.get_serialization_context()
    failed: list[BaseException] = []

    def start() -> None:
        try:
            serve.start(http_options=http_options)
        except BaseException as exc:  # noqa: BLE001 - handed to the deploying thread
            failed.append(exc)

    starter = threading.Thread(target=start, name="serve-start", daemon=True)
    starter.start()
    return starter, failed


def wait_controller(failed: list[BaseException], deadline: float) -> None:
    """Return once Serve's controller exists and answers; this driver is then connected to it, so `serve.run`
    uses it.

    Waiting for the controller's named actor matters: `serve.status()` answers an empty status while there is no
    controller yet, and a `serve.run` started then creates a second controller, which fails with "Actor with name
    'SERVE_CONTROLLER_ACTOR' already exists" in one thread or the other (seen once in the bench).

    Raises:
        ClusterError: Serve failed to start (`failed`, from `start_serve`), or its controller did not answer by
            `deadline` (monotonic).
    """
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    from ray.serve.exceptions import RayServeException

    while time.monotonic() < deadline:
        if failed:
            raise ClusterError(f"Serve did not start: {failed[0]}") from failed[0]
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            serve.status()  # connects to it; blocks while the actor initialises
            return
        except (ValueError, RayServeException):  # not created yet
            time.sleep(0.05)
    raise ClusterError("Serve's controller did not start in time")


def _http_options(config: ServingConfig) -> dict[str, Any]:
    """Serve's HTTP options of the config: where the proxy listens, and its certificate when `router.tls` is set.

    Raises:
        ClusterError: a TLS file is missing, or the key password's environment variable is not set.
    """
    options: dict[str, Any] = {"host": config.router.host, "port": config.router.port}
    tls = config.router.tls
    if tls is None:
        return options
    for name in ("certfile", "keyfile"):
        path: Path = getattr(tls, name)
        if not path.is_file():
            raise ClusterError(f"router.tls.{name}: no such file {path}")
    options |= {"ssl_certfile": str(tls.certfile), "ssl_keyfile": str(tls.keyfile)}
    if tls.keyfile_password_env:
        # A secret named by the config, read where it is used: it never enters a config file or a record.
        password = os.environ.get(tls.keyfile_password_env)
        if not password:
            raise ClusterError(
                f"router.tls.keyfile_password_env: the environment variable {tls.keyfile_password_env} is not set"
            )
        options["ssl_keyfile_password"] = password
    return options


def _check_tls_unchanged(tls: TLSConfig | None) -> None:
    """Serve fixes its HTTP options when it starts: a config must ask for the TLS the running Serve has.

    Raises:
        ClusterError: the running Serve serves plain HTTP and the config asks for HTTPS, or the other way round,
            or with another certificate.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return
    running = client.http_config
    wanted = (str(tls.certfile), str(tls.keyfile)) if tls else (None, None)
    if (running.ssl_certfile, running.ssl_keyfile) != wanted:
        now = f"HTTPS with {running.ssl_certfile}" if running.ssl_certfile else "plain HTTP"
        asked = f"HTTPS with {tls.certfile}" if tls else "plain HTTP"
        raise ClusterError(
            f"Serve on this cluster serves {now}, and router.tls asks for {asked}: Serve's HTTP options are fixed "
            "when it starts. Stop the cluster (`modelfleet down`) and deploy again, or change router.tls back"
        )


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def plan_for(config: ServingConfig, engine_cpus: str | None) -> DeploymentPlan:
    """The deployment plan of `config` on a cluster whose nodes keep `engine_cpus` for engines (`ClusterState`).

    Raises:
        ClusterError: the config cannot be planned.
    """
    try:
        return compile_plan(config, engine_cpus=engine_cpus)
    except PlanError as exc:
        raise ClusterError(str(exc)) from None


def pending_reasons(plan: DeploymentPlan) -> dict[str, str]:
    """Deployment name -> why its replicas can never be placed on this cluster (only those that cannot)."""
    nodes = _alive_nodes()
    reasons = {}
    for model in plan.models:
        reason = unschedulable_reason(model.bundles, model.strategy, nodes)
        if reason:
            reasons[model.deployment_name] = reason
    return reasons


def _serve_running() -> bool:
    from ray import serve

    try:
        return bool(serve.status().proxies)
    except Exception:  # noqa: BLE001 - no controller yet
        return False


def _progress_line(app_name: str) -> str:
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - the controller may still be starting
        return "starting Serve ..."
    if app is None:
        return "submitting the app ..."
    parts = []
    for name, dep in app.deployments.items():
        running = dep.replica_states.get("RUNNING", 0)
        total = sum(dep.replica_states.values())
        parts.append(f"{name} {dep.status.value} {running}/{total}")
    return f"{app.status.value}: " + ", ".join(parts)


def wait_ready(base_url: str, *, timeout_s: float = 300.0, cafile: Path | None = None) -> None:
    """Poll GET /readyz until it answers 200.

    Args:
        base_url: the API's base URL (https for a TLS config).
        timeout_s: how long to wait.
        cafile: the server's own certificate (router.tls.certfile): an https server must present exactly it.

    Raises:
        ClusterError: it did not within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    verify: ssl.SSLContext | bool = True
    if cafile is not None:
        # Pinned to the certificate this process deployed (a leaf is accepted as its own anchor), so the name it
        # was issued for need not be the loopback address polled here.
        verify = ssl.create_default_context(cafile=str(cafile))
        verify.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        verify.check_hostname = False
    with httpx.Client(timeout=15.0, verify=verify) as client:
        while time.monotonic() < deadline:
            try:
                response = client.get(f"{base_url}/readyz")
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(_POLL_S)
    raise ClusterError(f"{base_url}/readyz did not turn ready in {timeout_s:.0f} s (last answer: {last})")


def _record(plan: DeploymentPlan) -> None:
    path = get_settings().home / _DEPLOYED_FILE
    deployed = _deployed()
    deployed[plan.config.name] = plan.model_dump(mode="json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(deployed))


def _deployed() -> dict[str, Any]:
    path = get_settings().home / _DEPLOYED_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def _summarize(message: str) -> str:
    """Serve's deployment messages can hold a whole traceback: keep its first line and the error itself."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if len(lines) > 2 and any(line.startswith(("Traceback", "File ")) for line in lines):
        return f"{lines[0][:200]} ... {lines[-1][:300]}"
    return " ".join(lines)[:500]


def status(state: ClusterState) -> list[DeploymentRow]:
    """Every app and deployment on the cluster, with replica counts and each model's engine and resources."""
    from ray import serve

    connect(state, ship_code=False)
    deployed = _deployed()
    rows = []
    for app_name, app in serve.status().applications.items():
        specs = {}
        pending: dict[str, str] = {}
        if app_name in deployed:
            try:
                plan = DeploymentPlan.model_validate(deployed[app_name])
            except ValueError:  # recorded by an older modelfleet
                plan = None
            if plan is not None:
                specs = {model.deployment_name: model.spec for model in plan.models}
                pending = pending_reasons(plan)
        for dep_name, dep in app.deployments.items():
            spec = specs.get(dep_name)
            running = dep.replica_states.get("RUNNING", 0)
            total = sum(dep.replica_states.values())
            engine = spec.engine if spec else "-"
            resources = "-"
            if spec:
                r = spec.resources
                resources = f"cpu={r.num_cpus:g} gpu={r.num_gpus:g}" + (
                    f" {r.accelerator_type}" if r.accelerator_type else ""
                )
                if spec.parallelism.world_size > 1:
                    p = spec.parallelism
                    resources += f" x{p.world_size} workers (tp={p.tensor_parallel_size} pp={p.pipeline_parallel_size})"
            states = ", ".join(f"{k.lower()}={v}" for k, v in sorted(dep.replica_states.items()))
            message = dep.message or (app.message if dep.status.value != "HEALTHY" else "")
            cold = spec is not None and spec.scaling.min_replicas == 0 and running == 0
            # At zero there is nothing to place; a replica starting from zero is checked like any other.
            reason = pending.get(dep_name, "") if running < max(total, 1) and not (cold and total == 0) else ""
            state_name = dep.status.value
            if reason:
                state_name = "PENDING"
                message = f"cannot be placed: {reason}"
            elif cold:
                # Available but cold: scaled to zero, or starting again; a request waits for a replica to start.
                state_name = "COLD"
                message = message or (
                    "scaled to zero: the next request starts a replica" if total == 0 else "starting from zero"
                )
            rows.append(
                DeploymentRow(
                    app=app_name,
                    deployment=dep_name,
                    status=state_name,
                    replicas=f"{running}/{total}" + (f" ({states})" if states and running != total else ""),
                    engine=engine,
                    resources=resources,
                    message=_summarize(message),
                    pending=reason,
                )
            )
    return rows
