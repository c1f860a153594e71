"""One real local Ray cluster per test session (127.0.0.1, free ports, its own temp dir), and Serve apps on it."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.local import free_port
from deployments.config import ServingConfig

READY_TIMEOUT_S = 300.0


def wait_for(cond: Callable[[], bool], *, timeout: float, message: str, interval: float = 0.25) -> None:
    """Poll `cond` until it is true; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s: {message}")


@pytest.fixture(scope="session")
def model_cache() -> Iterator[Path]:
    """Tiny models built once per session, outside the user's cache."""
    path = Path(tempfile.mkdtemp(prefix="mf-models-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_llama(model_cache: Path) -> Path:
    from models.registry import resolve_source

    return resolve_source("tiny-llama", cache_dir=model_cache)


@pytest.fixture(scope="session")
def tiny_bert(model_cache: Path) -> Path:
    from models.registry import resolve_source

    return resolve_source("tiny-bert", cache_dir=model_cache)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[int]:
    """A real local Ray cluster with Serve's HTTP proxy on 127.0.0.1:<free port>; yields that port."""
    import ray
    from ray import serve

    # Short path: Ray's unix sockets live under the temp dir (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="mf-ray-", dir="/tmp")
    port = free_port()
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        namespace="tests",
        _temp_dir=temp_dir,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def deploy(ray_cluster: int) -> Iterator[Callable[[dict[str, Any]], str]]:
    """Deploy a config (as a dict) as its own Serve app; returns its base URL once /readyz is 200."""
    from ray import serve

    from deployments.app import build_app

    names: list[str] = []

    def _deploy(raw: dict[str, Any]) -> str:
        config = ServingConfig.model_validate(raw)
        serve.run(build_app(config), name=config.name, route_prefix=config.route_prefix)
        names.append(config.name)
        base = f"http://127.0.0.1:{ray_cluster}{config.route_prefix.rstrip('/')}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=10).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=READY_TIMEOUT_S, message=f"app {config.name} never became ready at {base}")
        return base

    yield _deploy
    for name in names:
        serve.delete(name)
