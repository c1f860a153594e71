"""The RayService of a plan: a KubeRay cluster (head, CPU and GPU worker groups, autoscaling, token auth) that
deploys the plan's config through Serve.

Read from the plan: the Serve app (its config, as `args`), the Ray environment of every process, each replica's
resources (bundles) and replica counts (worker group shapes and bounds, `cluster.k8s.groups`). Read from the
render options: the image, the code's location, the weights claim, GPU node selection and the profile's pod
shapes. Nothing about Serve's deployments is decided here.
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import PurePosixPath
from typing import Any

from cluster.k8s.accelerators import GPU_RESOURCE, gpu_node_placement
from cluster.k8s.auth import auth_options
from cluster.k8s.constants import APP_LABELS, METRICS_PORT, METRICS_PORT_NAME, SERVE_PORT_NAME
from cluster.k8s.errors import RenderError
from cluster.k8s.groups import ACCELERATOR_PREFIX, WorkerGroup, plan_worker_groups
from cluster.k8s.head import HEAD_COMPONENT, HEAD_POD_ANNOTATIONS, gcs_fault_tolerance
from cluster.k8s.manifest import dump
from cluster.k8s.pod import (
    container_security_context,
    ephemeral_gib,
    grace_period_s,
    pod_security_context,
    pre_stop,
    shm_volume,
)
from cluster.k8s.profile import IMAGE_WORKDIR, PROFILES, Profile, RenderOptions, default_image
from cluster.k8s.serve_config import serve_config
from cluster.k8s.storage import files_config, files_volume
from deployments.api.proxy_middleware import PROXY_ENV
from deployments.plan import DeploymentPlan, compile_plan

__all__ = ["READY_PATH", "rayservice"]

# The router answers 200 here only once every model has answered a real request (deployments/api/ingress.py):
# whole-app readiness, for people and monitors; pods use KubeRay's per-node probes.
READY_PATH = "/readyz"
# KubeRay appends 6 characters to a RayService's name for its RayCluster, whose name must stay within 53.
_MAX_NAME = 47
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_WEIGHTS_VOLUME = "model-weights"
# A pod never reaches a model hub: weights come from the claim or from packages in the image.
# Serve's proxy imports its middleware (deployments.api.proxy_middleware) from the repository in the image, outside
# any runtime_env: the repository is on every Ray process's path.
_POD_ENV = {"HF_HUB_OFFLINE": "1", **PROXY_ENV, "PYTHONPATH": IMAGE_WORKDIR}


def rayservice(plan: DeploymentPlan, options: RenderOptions) -> dict[str, Any]:
    """The RayService (ray.io/v1) that serves a plan on Kubernetes.

    Args:
        plan: the plan as the cluster compiles it (`compile_plan(config)`: no engine cores).
        options: image, code, weights and node selection.

    Raises:
        RenderError: the app name is not a valid RayService name, a model needs GPUs on the cpu profile, an
            accelerator type has no node label value, weights are expected on a claim that is not given, the
            config holds API keys, or several router replicas serve batches without a files claim.
    """
    config = plan.config
    if not _DNS_1035.match(config.name) or len(config.name) > _MAX_NAME:
        raise RenderError(
            f"the app name '{config.name}' names the RayService: use at most {_MAX_NAME} lowercase letters, digits "
            "and '-', starting with a letter"
        )
    _check_weights(plan, options)
    profile = PROFILES[options.profile]
    groups = plan_worker_groups(plan, profile)
    on_cluster = files_config(config, options)
    if on_cluster is not config:
        plan = compile_plan(on_cluster)  # as the cluster compiles it: no engine cores
    image = options.image or default_image(profile.name)
    serve = serve_config(plan, working_dir=options.working_dir)
    cluster: dict[str, Any] = {
        "rayVersion": metadata.version("ray"),
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            # v2: drains a node in Ray before KubeRay deletes its pod, and reconciles per Ray node.
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": profile.idle_timeout_s,
            "securityContext": container_security_context(),
        },
        "authOptions": auth_options(),
        "headGroupSpec": _head_group(plan, profile, options, image),
        "workerGroupSpecs": [_worker_group(plan, profile, options, image, group) for group in groups],
    }
    if options.redis_address:
        cluster["gcsFaultToleranceOptions"] = gcs_fault_tolerance(options.redis_address, options.redis_secret)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": config.name, "labels": dict(APP_LABELS)},
        "spec": {
            # A changed cluster spec starts a new RayCluster; traffic moves once its app is ready.
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": dump(serve),
            "rayClusterConfig": cluster,
        },
    }


def _on_claim(plan: DeploymentPlan, options: RenderOptions) -> set[str]:
    """The deployments whose weights lie under the claim's mount."""
    mount = PurePosixPath(options.weights_mount)
    return {m.deployment_name for m in plan.models if m.spec.source and mount in PurePosixPath(m.spec.source).parents}


def _check_weights(plan: DeploymentPlan, options: RenderOptions) -> None:
    if options.weights_pvc:
        return
    on_claim = _on_claim(plan, options)
    for model in plan.models:
        if model.deployment_name in on_claim:
            raise RenderError(
                f"model '{model.spec.id}' loads its weights from {model.spec.source}, under {options.weights_mount}, "
                "but no weights claim is mounted there: pass --weights-pvc NAME"
            )


def _env(*parts: dict[str, str]) -> list[dict[str, str]]:
    merged: dict[str, str] = {}
    for part in parts:
        merged.update(part)
    return [{"name": k, "value": v} for k, v in merged.items()]


def _resources(profile: Profile, cpus: int, memory_gib: int, gpus: int = 0) -> dict[str, Any]:
    # Requests equal limits: Guaranteed QoS, and whole cores, so a kubelet with the static CPU manager gives the
    # pod cores of its own; Ray advertises exactly these CPUs and GPUs.
    amounts: dict[str, Any] = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        amounts[GPU_RESOURCE] = str(gpus)
    # Ephemeral storage is requested only: a pod past a limit would be evicted mid-request.
    requests = {**amounts, "ephemeral-storage": f"{ephemeral_gib(profile, memory_gib)}Gi"}
    return {"requests": requests, "limits": dict(amounts)}


def _pod(plan: DeploymentPlan, container: dict[str, Any]) -> dict[str, Any]:
    return {
        # Autoscaler v2 requires it: a failed Ray container is replaced by a new pod (a new Ray node), never
        # restarted in place under the same pod name.
        "restartPolicy": "Never",
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": grace_period_s(plan),
        "containers": [container],
    }


def _port(name: str, number: int) -> dict[str, Any]:
    return {"name": name, "containerPort": number}


def _with_files(pod: dict[str, Any], options: RenderOptions) -> dict[str, Any]:
    """Mount the files claim, where there is one, on the pod's Ray container."""
    if options.files_pvc:
        volume, mount = files_volume(options.files_pvc)
        pod.setdefault("volumes", []).append(volume)
        pod["containers"][0].setdefault("volumeMounts", []).append(mount)
    return pod


def _head_group(plan: DeploymentPlan, profile: Profile, options: RenderOptions, image: str) -> dict[str, Any]:
    container = {
        "name": "ray-head",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [
            _port("gcs-server", 6379),
            _port("dashboard", 8265),
            _port("client", 10001),
            _port(SERVE_PORT_NAME, plan.config.router.port),
            _port(METRICS_PORT_NAME, METRICS_PORT),
        ],
        "env": _env(plan.ray_env, _POD_ENV),
        "resources": _resources(profile, profile.head_cpus, profile.head_memory_gib),
        "securityContext": container_security_context(),
        # No readiness probe of ours: KubeRay sends the Serve config only once the head pod is ready, so a probe
        # that waits for the app would never pass. KubeRay's default probe checks Ray's own health, and the
        # operator puts the head's proxy behind the serve Service only while it answers.
    }
    return {
        "rayStartParams": {
            # Replicas run on workers: the head keeps the GCS, the dashboard and the Serve controller.
            "num-cpus": "0",
            "dashboard-host": "0.0.0.0",
            "metrics-export-port": str(METRICS_PORT),
        },
        "template": {
            "metadata": {
                "labels": {**APP_LABELS, "app.kubernetes.io/component": HEAD_COMPONENT},
                "annotations": dict(HEAD_POD_ANNOTATIONS),
            },
            "spec": _with_files(_pod(plan, container), options),
        },
    }


def _worker_group(
    plan: DeploymentPlan, profile: Profile, options: RenderOptions, image: str, group: WorkerGroup
) -> dict[str, Any]:
    config = plan.config
    container: dict[str, Any] = {
        "name": "ray-worker",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [_port(SERVE_PORT_NAME, config.router.port), _port(METRICS_PORT_NAME, METRICS_PORT)],
        "env": _env(plan.ray_env, dict(profile.worker_env), _POD_ENV),
        "resources": _resources(profile, group.cpus, group.memory_gib, group.gpus),
        "securityContext": container_security_context(),
        "lifecycle": pre_stop(plan),
        # No probes of ours: KubeRay's defaults make a worker ready while its raylet answers and, for a RayService,
        # its Serve proxy's /-/healthz on the serve port: a node is in the serve Service while it can route, not
        # only while every model of the app has a replica (the app-wide READY_PATH, for humans and monitors).
    }
    pod = _pod(plan, container)
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if group.gpus:
        volume, mount = shm_volume(profile, group)
        volumes.append(volume)
        mounts.append(mount)
    # Only where a replica reads from it.
    if options.weights_pvc and _on_claim(plan, options) & set(group.hosts):
        mounts.append({"name": _WEIGHTS_VOLUME, "mountPath": options.weights_mount, "readOnly": True})
        volumes.append(
            {"name": _WEIGHTS_VOLUME, "persistentVolumeClaim": {"claimName": options.weights_pvc, "readOnly": True}}
        )
    if mounts:
        container["volumeMounts"] = mounts
        pod["volumes"] = volumes
    _with_files(pod, options)
    params = {"num-cpus": str(group.cpus), "metrics-export-port": str(METRICS_PORT)}
    if group.gpus:
        params["num-gpus"] = str(group.gpus)
        label, values = options.gpu_node_label, options.gpu_node_values
        pod.update(gpu_node_placement(group.accelerator_type, label=label, overrides=values))
        if group.accelerator_type:
            # Ray advertises `accelerator_type:<T>: 1` on a node with such GPUs; stated here so the autoscaler knows
            # before the pod exists which group serves a replica that asks for the type. Single-quoted JSON, as
            # KubeRay writes it itself: KubeRay pastes the value into the `ray start` shell command, and both it
            # and Ray's autoscaler strip one pair of quotes before parsing.
            params["resources"] = "'" + json.dumps({f"{ACCELERATOR_PREFIX}{group.accelerator_type}": 1}) + "'"
    return {
        "groupName": group.name,
        "replicas": group.min_replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": params,
        "template": {
            "metadata": {"labels": {**APP_LABELS, "app.kubernetes.io/component": f"ray-worker-{group.name}"}},
            "spec": pod,
        },
    }
