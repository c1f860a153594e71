"""The rendered cpu-dev RayService run as containers of the project's image, as KubeRay would run its pods: a head
and two workers on a podman network of the test's own, each started with the `ray start` line KubeRay generates from
the overlay's rayStartParams and limits (scaled to this machine), the auth token from a podman secret standing in for
the Kubernetes Secret, the Serve config PUT to the head's dashboard as KubeRay does, and chat and embeddings answered
through the head's proxy and through a worker's, with the openai client.

What this cannot show: the operator's own reconciling (status, upgrades, pod restarts), Kubernetes scheduling and
autoscaling of pods, probes, volumes and claims.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.cluster.kuberay import (
    DEFAULT_HEAD_PORT,
    DEFAULT_SERVE_PORT,
    container_command,
    quantity,
    ray_start_command,
    wait_gcs_command,
)

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "k8s" / "overlays" / "cpu-dev" / "rayservice.yaml"
DASHBOARD_PORT = 8265
WORKERS = 2
# The pods' CPU limits are scaled alike so that the largest pod gets this machine's cores (all three together
# would leave the head a fifth of a core, too little to start Ray within its 60 s deadlines on a busy machine);
# memory is halved (3 GiB at least), which still holds a SmolLM2 engine and MiniLM on one worker.
CORES = 2.0
MEMORY_SCALE = 0.5
MEMORY_FLOOR = 3 * 2**30
SHM = "1g"
# Podman's default open-files limit fails here (no CAP_SYS_RESOURCE); KubeRay's `ulimit -n` takes this instead.
OPEN_FILES = 16384
READY_TIMEOUT_S = 900.0
INIT_TIMEOUT_S = 300.0
QUESTION = "What is the capital of France?"


def _podman() -> list[str]:
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed (Debian: apt-get install podman runc)")
    # crun cannot run containers on a hybrid cgroup tree; runc can (the Makefile decides alike).
    hybrid = Path("/sys/fs/cgroup/unified").is_dir() and shutil.which("runc") is not None
    return [podman, *(["--runtime", "runc"] if hybrid else [])]


@dataclass
class Pods:
    """The running containers: published loopback ports and the Serve config to deploy."""

    podman: list[str]
    names: list[str]
    dashboard: str
    head_proxy: str
    worker_proxies: list[str]
    token: str
    serve_config: dict[str, Any]

    def logs(self) -> str:
        out = []
        for name in self.names:
            proc = subprocess.run([*self.podman, "logs", "--tail", "40", name], capture_output=True, text=True)
            out.append(f"--- {name}\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
        return "\n".join(out)


def _run(podman: list[str], *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([*podman, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def _volumes(run_id: str, pod: dict[str, Any], container: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Stand-ins for the container's volumes: a claim is a podman volume shared by every container that mounts it
    (as a ReadWriteMany claim), an emptyDir one of the container's own; with an fsGroup, owned by the container's
    user as the kubelet's fsGroup makes it writable. Returns the flags and the names of the claims' volumes."""
    by_name = {volume["name"]: volume for volume in pod.get("volumes", [])}
    chown = ":U" if "fsGroup" in pod.get("securityContext", {}) else ""
    flags, claims = [], []
    for mount in container.get("volumeMounts", []):
        volume = by_name[mount["name"]]
        if "persistentVolumeClaim" in volume:
            name = f"mf-ct-{run_id}-{volume['persistentVolumeClaim']['claimName']}"
            flags.append(f"--volume={name}:{mount['mountPath']}{chown}")
            claims.append(name)
        elif "emptyDir" in volume:
            flags.append(f"--volume={mount['mountPath']}{chown}")
        else:
            pytest.fail(f"no stand-in for the volume {volume}: add one to {Path(__file__).name}")
    return flags, claims


def _user(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """The pod's runAsUser/runAsGroup (the container's own win), as a kubelet applies them; none: the image's."""
    context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    if "runAsUser" not in context:
        return []
    group = f":{context['runAsGroup']}" if "runAsGroup" in context else ""
    return [f"--user={context['runAsUser']}{group}"]


def _scaled_limits(container: dict[str, Any], cpu_scale: float) -> tuple[str, int]:
    limits = container["resources"]["limits"]
    cpus = quantity(limits["cpu"]) * cpu_scale
    memory = max(int(quantity(limits["memory"]) * MEMORY_SCALE), MEMORY_FLOOR)
    return f"{cpus:.2f}", memory


def _published(podman: list[str], name: str, port: int) -> str:
    host = _run(podman, "port", name, f"{port}/tcp")
    if not host:  # podman lists no ports of a container that has exited
        logs = subprocess.run([*podman, "logs", "--tail", "40", name], capture_output=True, text=True)
        pytest.fail(f"container {name} is not running:\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}")
    return f"http://{host.splitlines()[0]}"


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pods]:
    podman = _podman()
    service = yaml.safe_load(OVERLAY.read_text())
    cluster = service["spec"]["rayClusterConfig"]
    head_spec = cluster["headGroupSpec"]
    (group,) = cluster["workerGroupSpecs"]
    head_container = head_spec["template"]["spec"]["containers"][0]
    worker_container = group["template"]["spec"]["containers"][0]
    image = head_container["image"]
    if subprocess.run([*podman, "image", "exists", image]).returncode != 0:
        pytest.fail(f"the image {image} is not built: make base-image && make image BASE=local (docs/production.md)")
    largest = max(quantity(c["resources"]["limits"]["cpu"]) for c in (head_container, worker_container))
    cpu_scale = CORES / largest

    run_id = uuid.uuid4().hex[:8]
    network, secret, head = f"mf-ct-{run_id}", f"mf-ct-{run_id}-auth", f"mf-ct-{run_id}-head"
    workers = [f"mf-ct-{run_id}-worker-{i}" for i in range(WORKERS)]
    token = secrets.token_hex(32)
    token_file = tmp_path_factory.mktemp("secret") / "auth_token"
    token_file.write_text(token)
    created: list[tuple[str, ...]] = []
    try:
        _run(podman, "network", "create", network)
        created.append(("network", "rm", "--force", network))
        _run(podman, "secret", "create", secret, str(token_file))
        created.append(("secret", "rm", secret))
        head_port = int(head_spec["rayStartParams"].get("port", DEFAULT_HEAD_PORT))
        for name, container, spec, node_type, group_name in [
            (head, head_container, head_spec, "head", "headgroup"),
            *[(w, worker_container, group, "worker", group["groupName"]) for w in workers],
        ]:
            params = spec["rayStartParams"]
            cpus, memory = _scaled_limits(container, cpu_scale)
            start = ray_start_command(
                node_type, params, {"cpu": cpus, "memory": memory}, head_host=head, head_port=head_port
            )
            env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
            # What KubeRay adds to every Ray container (token auth, node identity, the generated command).
            env |= {
                "RAY_AUTH_MODE": "token",
                "RAY_CLOUD_INSTANCE_ID": name,
                "RAY_NODE_TYPE_NAME": group_name,
                "KUBERAY_GEN_RAY_START_CMD": start,
                "RAY_START_ULIMIT_OPEN_FILES": str(OPEN_FILES),
            }
            if node_type == "worker":
                env |= {"FQ_RAY_IP": head, "RAY_IP": head}
            volumes, claims = _volumes(run_id, spec["template"]["spec"], container)
            for claim in claims:
                if ("volume", "rm", "--force", claim) not in created:
                    _run(podman, "volume", "create", claim)
                    created.append(("volume", "rm", "--force", claim))
            pod = [
                *volumes,
                "--network",
                network,
                *_user(spec["template"]["spec"], container),
                f"--ulimit=nofile={OPEN_FILES}:{OPEN_FILES}",
                f"--ulimit=nproc={OPEN_FILES}:{OPEN_FILES}",
                f"--secret={secret},type=env,target=RAY_AUTH_TOKEN",
                *[f"--env={key}={value}" for key, value in env.items()],
            ]
            if node_type == "worker":
                created.append(("rm", "--force", "--volumes", "--time", "0", f"{name}-init"))
                _run(
                    podman,
                    "run",
                    "--rm",
                    f"--name={name}-init",
                    *pod,
                    image,
                    *wait_gcs_command(head, head_port),
                    timeout=INIT_TIMEOUT_S,
                )
            ports = [DASHBOARD_PORT, DEFAULT_SERVE_PORT] if node_type == "head" else [DEFAULT_SERVE_PORT]
            created.append(("rm", "--force", "--volumes", "--time", "10", name))
            _run(
                podman,
                "run",
                "--detach",
                f"--name={name}",
                f"--hostname={name}",
                f"--cpus={cpus}",
                f"--memory={memory}",
                f"--shm-size={SHM}",
                *[f"--publish=127.0.0.1::{port}" for port in ports],
                *pod,
                image,
                *container_command(start),
            )
        yield Pods(
            podman=podman,
            names=[head, *workers],
            dashboard=_published(podman, head, DASHBOARD_PORT),
            head_proxy=_published(podman, head, DEFAULT_SERVE_PORT),
            worker_proxies=[_published(podman, w, DEFAULT_SERVE_PORT) for w in workers],
            token=token,
            serve_config=yaml.safe_load(service["spec"]["serveConfigV2"]),
        )
    finally:
        for args in reversed(created):
            subprocess.run([*podman, *args], capture_output=True, timeout=120)


def _wait(what: str, pods: Pods, check: Any, deadline: float) -> Any:
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = result
        except (httpx.HTTPError, openai.APIError) as exc:
            last = exc
        time.sleep(2)
    pytest.fail(f"{what}: not within {READY_TIMEOUT_S:.0f} s (last: {last!r})\n{pods.logs()}")


def _app_status(pods: Pods, headers: dict[str, str]) -> str:
    body = httpx.get(f"{pods.dashboard}/api/serve/applications/", headers=headers, timeout=10).json()
    apps = body.get("applications") or {}
    statuses = {name: app.get("status") for name, app in apps.items()}
    if any(status == "DEPLOY_FAILED" for status in statuses.values()):
        messages = {
            f"{app_name}/{name}": deployment.get("message")
            for app_name, app in apps.items()
            for name, deployment in (app.get("deployments") or {}).items()
            if deployment.get("status") != "HEALTHY"
        }
        pytest.fail(f"Serve failed to deploy: {json.dumps(messages, indent=1)[-6000:]}\n{pods.logs()}")
    return "RUNNING" if statuses and all(s == "RUNNING" for s in statuses.values()) else ""


def _ready(url: str) -> bool:
    return httpx.get(f"{url}/readyz", timeout=15).status_code == 200


def test_the_rendered_service_answers_through_every_proxy(pods: Pods) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    # KubeRay's dashboard client: the token in x-ray-authorization.
    headers = {"x-ray-authorization": f"Bearer {pods.token}"}
    _wait(
        "the head's dashboard",
        pods,
        lambda: httpx.get(f"{pods.dashboard}/api/version", headers=headers, timeout=5).status_code == 200,
        deadline,
    )
    unauthorized = httpx.put(f"{pods.dashboard}/api/serve/applications/", json=pods.serve_config, timeout=30)
    assert unauthorized.status_code in (401, 403), "the dashboard takes a Serve config without the token"
    try:
        put = httpx.put(
            f"{pods.dashboard}/api/serve/applications/", json=pods.serve_config, headers=headers, timeout=120
        )
    except httpx.HTTPError as exc:
        pytest.fail(f"PUT of the Serve config failed: {exc!r}\n{pods.logs()}")
    assert put.status_code == 200, put.text
    _wait("the Serve app RUNNING", pods, lambda: _app_status(pods, headers), deadline)
    _wait("the head's proxy ready", pods, lambda: _ready(pods.head_proxy), deadline)
    models = {m["id"]: m for m in pods.serve_config["applications"][0]["args"]["models"]}
    chat_model = next(i for i, m in models.items() if m["task"] == "generate")
    embed_model = next(i for i, m in models.items() if m["task"] == "embed")
    _answers(pods.head_proxy, chat_model, embed_model)
    # Serve runs a proxy on the nodes that hold replicas: at least one worker does.
    worker = _wait(
        "a worker's proxy ready",
        pods,
        lambda: next((url for url in pods.worker_proxies if _ready(url)), None),
        deadline,
    )
    _answers(worker, chat_model, embed_model)


def _answers(base: str, chat_model: str, embed_model: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120, max_retries=0)
    chat = client.chat.completions.create(
        model=chat_model, messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0
    )
    # Greedy SmolLM2 answers this one the same every time.
    assert "Paris" in (chat.choices[0].message.content or ""), chat
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    embedding = client.embeddings.create(model=embed_model, input=["a container", "a pod"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 384
