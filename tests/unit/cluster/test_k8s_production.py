"""What a production team needs from the rendered manifests, checked on the rendered YAML: hardened pods, drains,
the autoscaler, per-node readiness, a head that survives, storage, TLS ingress and a RayJob that apply -k leaves
alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import build_parser, main
from cluster.k8s import RenderError, RenderOptions, rayservice
from cluster.k8s.auth import AUTH_SECRET, create_secret_command
from cluster.k8s.head import REDIS_PASSWORD_KEY, REDIS_SECRET, create_redis_secret_command
from cluster.k8s.ingress import TLS_SECRET
from cluster.k8s.pod import IMAGE_GID, IMAGE_UID
from cluster.k8s.profile import PROFILES
from cluster.k8s.storage import FILES_MOUNT, FILES_VOLUME
from deployments.config import ServingConfig
from deployments.plan import compile_plan
from tests.unit.cluster.test_k8s import K8S, OVERLAYS, _crd_errors, _docs, _plan, _service, _workers


def _groups(service: dict[str, Any]) -> list[dict[str, Any]]:
    return _cluster_groups(service["spec"]["rayClusterConfig"])


def _cluster_groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _pods(service: dict[str, Any]) -> list[dict[str, Any]]:
    return [g["template"]["spec"] for g in _groups(service)]


# -- pods: security, storage, shared memory ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_every_pod_runs_restricted_as_the_image_user(name: str) -> None:
    for pod in _pods(_service(OVERLAYS[name])):
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True
        assert (context["runAsUser"], context["runAsGroup"]) == (IMAGE_UID, IMAGE_GID) and IMAGE_UID != 0
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_every_pod_requests_ephemeral_storage(name: str) -> None:
    for pod in _pods(_service(OVERLAYS[name])):
        (container,) = pod["containers"]
        requested = container["resources"]["requests"]["ephemeral-storage"]
        assert requested.endswith("Gi") and int(requested[:-2]) >= 10
        assert "ephemeral-storage" not in container["resources"]["limits"]  # no eviction mid-request


def test_gpu_workers_get_shared_memory_sized_for_tensor_parallel() -> None:
    service = _service(OVERLAYS["gpu-prod"])
    gpu = _workers(service)["gpu-a10g"]["template"]["spec"]
    (shm,) = [v for v in gpu["volumes"] if "emptyDir" in v]
    # Llama runs tensor parallel over 2 GPUs: 30% of 48 GiB for the object store, plus 2 GiB per TP worker.
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{15 + 2 * 2}Gi"}
    mounts = {m["mountPath"]: m["name"] for m in gpu["containers"][0]["volumeMounts"]}
    assert mounts["/dev/shm"] == shm["name"]
    # Other pods keep KubeRay's own /dev/shm (sized to the pod's memory).
    cpu = _workers(service)["cpu"]["template"]["spec"]
    assert all("emptyDir" not in v for v in cpu.get("volumes", []))


def test_shared_memory_grows_with_the_tensor_parallel_size() -> None:
    def shm(tp: int) -> str:
        model = {"id": "m", "task": "generate", "engine": "vllm", "source": "/w/m"}
        model |= {"resources": {"num_gpus": 1, "accelerator_type": "L4"}, "parallelism": {"tensor_parallel_size": tp}}
        config = ServingConfig.model_validate({"models": [model]})
        pod = _workers(rayservice(compile_plan(config), RenderOptions(profile="gpu")))["gpu-l4"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if "emptyDir" in v]
        return str(volume["emptyDir"]["sizeLimit"])

    per_worker = PROFILES["gpu"].shm_gib_per_tp_worker
    assert int(shm(4)[:-2]) - int(shm(1)[:-2]) >= 3 * per_worker


# -- drains -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_grace_period_covers_the_longest_drain_of_the_plan(name: str) -> None:
    plan = _plan(OVERLAYS[name])
    drains = [plan.router_options, *(m.serve_options for m in plan.models)]
    longest = max(o["graceful_shutdown_timeout_s"] + o["graceful_shutdown_wait_loop_s"] for o in drains)
    assert longest >= plan.config.router.request_timeout_s + 5
    service = _service(OVERLAYS[name])
    for pod in _pods(service):
        assert pod["terminationGracePeriodSeconds"] >= longest
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        script = container["lifecycle"]["preStop"]["exec"]["command"][-1]
        assert script.startswith("ray drain-node ") and "ray::[S]erveReplica" in script


def test_grace_period_follows_the_request_timeout() -> None:
    def grace(timeout_s: float) -> int:
        config = ServingConfig.model_validate(
            {"models": [{"id": "e", "task": "generate", "engine": "echo"}], "router": {"request_timeout_s": timeout_s}}
        )
        pod = _pods(rayservice(compile_plan(config), RenderOptions()))[1]
        return int(pod["terminationGracePeriodSeconds"])

    assert grace(900) - grace(60) == 840 and grace(60) >= 65


def test_hardened_pods_still_validate_against_the_crds() -> None:
    for name in OVERLAYS:
        assert _crd_errors(_service(OVERLAYS[name])) == []


# -- autoscaler -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_autoscaler_v2_with_pods_that_never_restart(name: str) -> None:
    service = _service(OVERLAYS[name])
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    # KubeRay adds the autoscaler as a sidecar of the head: it runs under the same restrictions.
    assert cluster["autoscalerOptions"]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert [pod["restartPolicy"] for pod in _pods(service)] == ["Never"] * len(_groups(service))


# -- the head survives ------------------------------------------------------------------------------------------


def test_gpu_prod_head_keeps_the_gcs_in_an_external_redis() -> None:
    cluster = _service(OVERLAYS["gpu-prod"])["spec"]["rayClusterConfig"]
    options = cluster["gcsFaultToleranceOptions"]
    assert options["redisAddress"] == OVERLAYS["gpu-prod"].options.redis_address
    assert options["redisPassword"] == {
        "valueFrom": {"secretKeyRef": {"name": REDIS_SECRET, "key": REDIS_PASSWORD_KEY}}
    }
    assert "gcsFaultToleranceOptions" not in _service(OVERLAYS["cpu-dev"])["spec"]["rayClusterConfig"]


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_head_is_kept_from_evictions(name: str) -> None:
    service = _service(OVERLAYS[name])
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]
    assert head["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    (budget,) = _docs(K8S / "overlays" / name / "head-pdb.yaml")
    assert budget["kind"] == "PodDisruptionBudget" and budget["spec"]["minAvailable"] == 1
    selector = budget["spec"]["selector"]["matchLabels"]
    assert selector.items() <= head["labels"].items()
    # Only the serving head: the batch job's cluster and the workers carry other component labels.
    (job,) = _docs(K8S / "overlays" / name / "rayjob.yaml")
    for group in [*_groups(service)[1:], *_cluster_groups(job["spec"]["rayClusterSpec"])]:
        assert not selector.items() <= group["template"]["metadata"]["labels"].items()
    assert "head-pdb.yaml" in _docs(K8S / "overlays" / name / "kustomization.yaml")[0]["resources"]


# -- storage: weights and batch files ---------------------------------------------------------------------------


def _storage(name: str, file: str) -> list[dict[str, Any]]:
    return _docs(K8S / "overlays" / name / "storage" / file)


def test_weights_claim_is_read_only_for_serving_and_filled_by_a_job() -> None:
    overlay = OVERLAYS["gpu-prod"]
    (claim,) = _storage("gpu-prod", "weights-pvc.yaml")
    assert claim["metadata"]["name"] == overlay.options.weights_pvc
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany", "ReadWriteOnce"]
    for pod in _pods(_service(overlay)):
        for volume in pod.get("volumes", []):
            if volume.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]:
                assert volume["persistentVolumeClaim"]["readOnly"] is True
                mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
                assert mount["readOnly"] is True
    config_map, job = _storage("gpu-prod", "weights-fill.yaml")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    config_file = container["command"][2]
    assert container["command"] == ["modelfleet", "prepare", config_file, "--download-under", "/models"]
    weights = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
    assert weights["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}  # read-write
    assert not any(m.get("readOnly") for m in container["volumeMounts"] if m["name"] == weights["name"])
    # The Job's config is the one the cluster serves, and `prepare` accepts its flags.
    served = yaml.safe_load(_service(overlay)["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == served
    args = build_parser().parse_args(container["command"][1:])
    assert args.download_under == "/models" and args.func.__name__ == "_cmd_prepare"


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_batch_files_live_on_a_read_write_many_claim_on_every_pod(name: str) -> None:
    overlay = OVERLAYS[name]
    (claim,) = _storage(name, "files-pvc.yaml")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    service = _service(overlay)
    files_dir = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["batches"]["files_dir"]
    assert files_dir.startswith(FILES_MOUNT + "/")
    for pod in _pods(service):
        assert {"name": FILES_VOLUME, "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in pod[
            "volumes"
        ]
        assert {"name": FILES_VOLUME, "mountPath": FILES_MOUNT} in pod["containers"][0]["volumeMounts"]
    # Data outlives the serving overlay: the claims are in a kustomization of their own.
    (serving,) = _docs(K8S / "overlays" / name / "kustomization.yaml")
    assert not any("pvc" in r or "storage" in r for r in serving["resources"])


def _router_config(replicas: int, **batches: Any) -> ServingConfig:
    return ServingConfig.model_validate(
        {
            "models": [{"id": "e", "task": "generate", "engine": "echo"}],
            "router": {"num_replicas": replicas},
            "batches": batches,
        }
    )


def test_several_routers_without_a_files_claim_are_refused() -> None:
    with pytest.raises(RenderError, match="--files-pvc NAME") as refused:
        rayservice(compile_plan(_router_config(2)), RenderOptions())
    assert "batches.enabled: false" in str(refused.value)
    rayservice(compile_plan(_router_config(1)), RenderOptions())  # one router sees its own files
    rayservice(compile_plan(_router_config(2, enabled=False)), RenderOptions())
    rayservice(compile_plan(_router_config(2)), RenderOptions(files_pvc="f"))
    with pytest.raises(RenderError, match="not on the files claim"):
        rayservice(compile_plan(_router_config(2, files_dir="/srv/files")), RenderOptions(files_pvc="f"))


def test_render_k8s_names_the_fix_for_several_routers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "routers.yaml"
    config.write_text(yaml.safe_dump(_router_config(3).model_dump(mode="json", exclude_unset=True)))
    assert main(["render-k8s", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "--files-pvc" in capsys.readouterr().err


# -- the RayJob -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_applying_the_overlay_never_suspends_or_starts_the_rayjob(name: str) -> None:
    (job,) = _docs(K8S / "overlays" / name / "rayjob.yaml")
    assert "suspend" not in job["spec"]  # created by hand, so no steady state to return to
    (kustomization,) = _docs(K8S / "overlays" / name / "kustomization.yaml")
    assert "rayjob.yaml" not in kustomization["resources"]


# -- TLS at the edge --------------------------------------------------------------------------------------------


def test_gpu_prod_ingress_ends_tls_in_front_of_the_serve_service() -> None:
    overlay = OVERLAYS["gpu-prod"]
    (ingress,) = _docs(K8S / "overlays" / "gpu-prod" / "ingress.yaml")
    host = overlay.options.ingress_host
    assert ingress["spec"]["tls"] == [{"hosts": [host], "secretName": TLS_SECRET}]
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    config = _plan(overlay).config
    assert rule["host"] == host and path["path"] == config.route_prefix
    assert path["backend"]["service"] == {"name": f"{config.name}-serve-svc", "port": {"number": config.router.port}}
    # A long generation outlives nginx's 60 s default: the proxy waits as long as the router does.
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= config.router.request_timeout_s
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # streamed tokens
    (kustomization,) = _docs(K8S / "overlays" / "gpu-prod" / "kustomization.yaml")
    assert "ingress.yaml" in kustomization["resources"]
    assert not (K8S / "overlays" / "cpu-dev" / "ingress.yaml").exists()


# -- the README -------------------------------------------------------------------------------------------------


def test_readme_lists_what_a_cluster_needs_before_apply() -> None:
    text = (K8S / "README.md").read_text()
    before = text[text.index("## Before `kubectl apply -k`") : text.index("## Deploy")]
    for need, provider in [
        ("KubeRay operator 1.7", "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0"),
        ("GPU device plugin", "nvidia/gpu-operator"),
        ("ReadWriteMany storage class", "--storage-class NAME"),
        ("ReadOnlyMany storage class", "VolumeSnapshot"),
        ("Redis", create_redis_secret_command()),
        (f"Ray auth token Secret `{AUTH_SECRET}`", create_secret_command()),
        (f"TLS Secret `{TLS_SECRET}`", f"kubectl create secret tls {TLS_SECRET}"),
    ]:
        row = next((line for line in before.splitlines() if line.startswith(f"| {need}")), None)
        assert row is not None and provider in row, need
    assert "kind: StorageClass" in before
    # NewCluster stays, and what it costs is written down next to the incremental upgrade it was weighed against.
    upgrades = text[text.index("- **Upgrades.**") :]
    assert "NewClusterWithIncrementalUpgrade" in upgrades and "twice" in upgrades
