"""One real local Ray cluster per test session (127.0.0.1, free ports, its own temp dir), and Serve apps on it."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.local import free_port
from deployments.api.proxy_middleware import PROXY_ENV
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


def metric_samples(metric: str, application: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of the Prometheus series `metric` (its full exported name) of one Serve app, with its labels, read
    from each live node's Ray metrics port (a counter appears once per process that exported it: sum them)."""
    import ray

    pattern = re.compile(rf"^{re.escape(metric)}\{{([^}}]*)\}}\s+([0-9.eE+-]+)$")
    samples = []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        try:
            text = httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10).text
        except httpx.HTTPError:
            continue
        for line in text.splitlines():
            match = pattern.match(line)
            if match:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
                if labels.get("application") == application:
                    samples.append((labels, float(match.group(2))))
    return samples


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
def classifier_dir(model_cache: Path) -> Path:
    from models.registry import resolve_source

    return resolve_source("tiny-bert-classifier", cache_dir=model_cache)


@pytest.fixture(scope="session")
def cross_encoder_dir(model_cache: Path) -> Path:
    from models.registry import resolve_source

    return resolve_source("tiny-cross-encoder", cache_dir=model_cache)


GPU_NODE_GPUS = 2
GPU_NODE_ACCELERATOR = "H100"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[int]:
    """A real local two-node Ray cluster on 127.0.0.1, with Serve's HTTP proxy on a free port; yields the port.

    The head has CPUs only. The second node advertises GPUs and an accelerator type as resources (no GPU
    is present), so placement of GPU specs is tested for real without one.
    """
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    # In the session's own folder (tests/conftest.py), short: Ray's unix sockets live under it (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="r", dir=os.environ["RAY_TMPDIR"])
    # Ray's processes inherit this environment: Serve's proxy gets our middleware, as `modelfleet up` gives it.
    os.environ.update(PROXY_ENV)
    common = {"node_ip_address": "127.0.0.1", "temp_dir": temp_dir}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**common, "num_cpus": 8, "include_dashboard": False},
    )
    cluster.add_node(
        **common,
        # Enough logical CPUs that the shared app's replicas landing here never crowd out the GPU tests.
        num_cpus=8,
        num_gpus=GPU_NODE_GPUS,
        resources={f"accelerator_type:{GPU_NODE_ACCELERATOR}": 1},
    )
    ray.init(address=cluster.address, namespace="tests", log_to_driver=False)
    port = free_port()
    # One proxy, on the head: a proxy per node would bind the same loopback port twice.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        # Not cluster.shutdown(): both nodes share 127.0.0.1, the driver may have attached to the GPU
        # node's raylet, and Cluster refuses to remove "the driver's node" even after ray.shutdown().
        for node in [*cluster.worker_nodes, cluster.head_node]:
            node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


# Apps a test module deployed, deleted when the module ends: the session's cluster has 16 logical CPUs, and the
# apps of every module kept to the end would no longer fit (a later deploy would wait for CPUs until its deadline).
_module_apps: list[str] = []


@pytest.fixture(scope="session")
def deploy(ray_cluster: int) -> Iterator[Callable[..., str]]:
    """Deploy a config (as a dict) as its own Serve app; returns its base URL once /readyz is 200.

    The app is deleted when the test module that deployed it ends; `keep=True` keeps it to the end of the session
    (the shared apps).
    """
    from ray import serve

    from cluster import deploy as deploying
    from cluster.local import ClusterState

    names: list[str] = []
    # The test process is already a driver of this cluster: `deploy` sees that and reuses the connection.
    state = ClusterState(pid=0, gcs_address="in-process", temp_dir="", log_file="", num_cpus=8)

    def _deploy(raw: dict[str, Any], *, keep: bool = False) -> str:
        router = {**raw.get("router", {}), "port": ray_cluster}  # the session's proxy port, always
        config = ServingConfig.model_validate({**raw, "router": router})
        (names if keep else _module_apps).append(config.name)
        # The real deploy path: a deadline, unplaceable specs reported, and /readyz (a real answer) awaited.
        return deploying.deploy(config, state, timeout_s=READY_TIMEOUT_S)

    yield _deploy
    for name in [*names, *_module_apps]:
        serve.delete(name)


@pytest.fixture(scope="module", autouse=True)
def _delete_module_apps() -> Iterator[None]:
    """Delete the apps this module deployed (see `_module_apps`), so the next module's fit on the cluster."""
    yield
    if _module_apps:
        from ray import serve

        for name in dict.fromkeys(_module_apps):
            serve.delete(name)
        _module_apps.clear()


def main_app_config(tiny_llama: Path, tiny_bert: Path) -> dict[str, Any]:
    """The shared app: echo models, tiny Llama on transformers and on vLLM, a tiny BERT encoder."""
    return {
        "name": "main",
        "route_prefix": "/",
        "models": [
            {
                "id": "echo",
                "task": "generate",
                "engine": "echo",
                "resources": {"num_cpus": 0.25},
                "engine_kwargs": {"fail_marker": "__fail__"},
            },
            {
                "id": "echo-embed",
                "task": "embed",
                "engine": "echo",
                "resources": {"num_cpus": 0.25},
                "engine_kwargs": {"dimensions": 16},
            },
            {
                "id": "tiny",
                "task": "generate",
                "engine": "transformers",
                "source": str(tiny_llama),
                "context_length": 256,
                "max_output_tokens": 64,
                "resources": {"num_cpus": 1},
                "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02},
            },
            {
                "id": "tiny-vllm",
                "task": "generate",
                "engine": "vllm",
                "source": str(tiny_llama),
                "context_length": 256,
                "max_output_tokens": 64,
                "resources": {"num_cpus": 1},
            },
            {
                "id": "tiny-embed",
                "task": "embed",
                "engine": "transformers",
                "source": str(tiny_bert),
                "context_length": 128,
                "resources": {"num_cpus": 0.5},
            },
        ],
        "router": {"max_body_bytes": 65536},
    }


def surface_model(tiny_llama: Path) -> dict[str, Any]:
    """The tiny Llama on vLLM, set up for the whole API surface on random weights: constrained output without
    whitespace between JSON tokens (else it fills max_tokens with it), and vLLM's hermes parser for tool_choice
    'auto'. The surface, parity and fuzz tests serve it; vLLM's own server is started from the same spec."""
    return {
        "id": "so-vllm",
        "task": "generate",
        "engine": "vllm",
        "source": str(tiny_llama),
        "context_length": 256,
        "max_output_tokens": 64,
        "resources": {"num_cpus": 1},
        "tool_call_parser": "hermes",
        "engine_kwargs": {
            "cpu_kvcache_space_gb": 0.25,
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        },
    }


@pytest.fixture(scope="session")
def surface_app(deploy: Callable[[dict[str, Any]], str], tiny_llama: Path) -> str:
    """An app serving `surface_model` alone, deployed once per session."""
    return deploy({"name": "surface", "route_prefix": "/surface", "models": [surface_model(tiny_llama)]}, keep=True)


@pytest.fixture(scope="session")
def main_app(deploy: Callable[[dict[str, Any]], str], tiny_llama: Path, tiny_bert: Path) -> str:
    """The shared app (see `main_app_config`), deployed once per session."""
    return deploy(main_app_config(tiny_llama, tiny_bert), keep=True)
