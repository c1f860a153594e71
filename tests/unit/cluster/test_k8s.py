"""The rendered KubeRay manifests: fresh, valid against KubeRay's CRDs and Kubernetes' schemas, built by kustomize,
and true to the deployment plan (Serve config, GPU groups, autoscaling bounds as Ray's autoscaler reads them)."""

from __future__ import annotations

import copy
import functools
import json
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _node_type_from_group_spec
from ray.serve.schema import ServeDeploySchema

from cluster.cli import main
from cluster.k8s import COMMITTED_OVERLAYS, Overlay, RenderError, RenderOptions, rayservice, render_tree
from cluster.k8s.accelerators import GPU_RESOURCE
from cluster.k8s.auth import AUTH_SECRET, AUTH_TOKEN_KEY
from cluster.k8s.groups import plan_worker_groups
from cluster.k8s.profile import PROFILES
from cluster.k8s.rayjob import BATCH_CLAIM, BATCH_MOUNT
from cluster.k8s.serve_config import IMPORT_PATH
from cluster.k8s.storage import FILES_MOUNT, files_config
from deployments.batch.spec import ENTRYPOINT_MODULE, BatchJobSpec
from deployments.config import ServingConfig, load_config
from deployments.plan import RAY_ENV, DeploymentPlan, compile_plan

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "k8s"
CRDS = ROOT / "tests" / "data" / "kuberay-crds"
RENDER = "run `modelfleet render-k8s` (make k8s) and commit k8s/"
KUBERNETES_VERSION = "1.30.0"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
OVERLAYS = {o.name: o for o in COMMITTED_OVERLAYS}
# API groups of Kubernetes itself, whose schemas kubernetes-validate holds ("v1": the core group).
CORE_GROUPS = {"v1", "policy", "batch", "networking.k8s.io"}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("k8s")
    render_tree(out)
    return out


def _owned(tree: Path) -> dict[str, str]:
    """The files of a tree that the renderer writes, by relative path."""
    paths = [tree / "README.md", *tree.glob("*.template.yaml"), *tree.glob("base/*"), *tree.glob("overlays/**/*")]
    paths += tree.glob("dashboards/*")
    return {str(p.relative_to(tree)): p.read_text() for p in paths if p.is_file()}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def _objects(tree: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted([*tree.glob("*.yaml"), *tree.glob("base/*.yaml"), *tree.glob("overlays/**/*.yaml")]):
        for doc in _docs(path):
            yield str(path.relative_to(tree)), doc


def _plan(overlay: Overlay) -> DeploymentPlan:
    """The plan an overlay runs: its config with `batches.files_dir` on the files claim."""
    return compile_plan(files_config(load_config(ROOT / overlay.config), overlay.options))


def _service(overlay: Overlay) -> dict[str, Any]:
    (doc,) = _docs(K8S / "overlays" / overlay.name / "rayservice.yaml")
    return doc


def _workers(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def _ray_containers(service: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"]["containers"][0] for g in groups]


# -- drift ----------------------------------------------------------------------------------------------------


def test_committed_tree_is_a_fresh_render(fresh: Path) -> None:
    committed, expected = _owned(K8S), _owned(fresh)
    missing, extra = sorted(set(expected) - set(committed)), sorted(set(committed) - set(expected))
    changed = sorted(p for p in set(expected) & set(committed) if expected[p] != committed[p])
    assert not (missing or extra or changed), (
        f"k8s/ is not what the committed configs render to (missing {missing}, not rendered {extra}, "
        f"changed {changed}): {RENDER}"
    )


def test_tree_has_both_overlays_and_the_base() -> None:
    assert {p.name for p in (K8S / "overlays").iterdir()} == {"cpu-dev", "gpu-prod"}
    assert (K8S / "base" / "kustomization.yaml").is_file()


# -- KubeRay CRDs ---------------------------------------------------------------------------------------------


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as the API server applies it: objects with declared properties reject any other field (it
    prunes them), unless they preserve unknown fields."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    return out


def _as_stored(value: Any, schema: dict[str, Any]) -> Any:
    """What the API server validates: nulls dropped, then schema defaults applied, recursively."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {k: v for k, v in value.items() if v is not None}
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        return {k: _as_stored(v, props.get(k) or (extra if isinstance(extra, dict) else {})) for k, v in out.items()}
    if isinstance(value, list):
        return [_as_stored(v, schema.get("items", {})) for v in value if v is not None]
    return value


@functools.cache
def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the strict openAPIV3Schema of the vendored KubeRay CRDs."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        (crd,) = _docs(path)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _crd_errors(obj: dict[str, Any]) -> list[str]:
    schema = _crd_schemas()[(obj["apiVersion"], obj["kind"])]
    validator = jsonschema.Draft7Validator(schema)
    errors = validator.iter_errors(_as_stored(obj, schema))
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors)


def test_vendored_crds_cover_rayservice_and_rayjob() -> None:
    assert {("ray.io/v1", "RayService"), ("ray.io/v1", "RayJob")} <= set(_crd_schemas())


def test_ray_objects_validate_against_the_kuberay_crds(fresh: Path) -> None:
    ray_objects = [(path, doc) for path, doc in _objects(fresh) if doc["apiVersion"].startswith("ray.io/")]
    assert {doc["kind"] for _, doc in ray_objects} == {"RayService", "RayJob"}
    assert len(ray_objects) == 2 * len(COMMITTED_OVERLAYS)
    for path, doc in ray_objects:
        assert doc["apiVersion"] == "ray.io/v1"
        assert _crd_errors(doc) == [], path


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_rayjob_runs_the_batch_entrypoint_on_a_cluster_of_its_own(name: str) -> None:
    (job,) = _docs(K8S / "overlays" / name / "rayjob.yaml")
    assert "suspend" not in job["spec"] and job["spec"]["shutdownAfterJobFinishes"] is True
    python, dash_m, module, spec_json = shlex.split(job["spec"]["entrypoint"])
    assert (dash_m, module) == ("-m", ENTRYPOINT_MODULE)
    spec = BatchJobSpec.model_validate_json(spec_json)
    assert spec.model.spec.parallelism.world_size == 1 and spec.input.startswith(BATCH_MOUNT + "/")
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in (group["template"]["spec"] for group in pods):
        assert {"name": "batch-files", "persistentVolumeClaim": {"claimName": BATCH_CLAIM}} in pod["volumes"]
        assert {"name": "batch-files", "mountPath": BATCH_MOUNT} in pod["containers"][0]["volumeMounts"]


@pytest.mark.parametrize(
    ("where", "change", "expected"),
    [
        (("spec", "rayClusterConfig", "headGroupSpec"), {"replicaz": 1}, "'replicaz' was unexpected"),
        (("spec", "rayClusterConfig"), {"enableInTreeAutoscaling": "yes"}, "is not of type 'boolean'"),
        (("spec", "upgradeStrategy"), {"clusterUpgradeOptions": {"gatewayClassName": "x"}}, "is a required property"),
    ],
    ids=["unknown-field", "wrong-type", "missing-required"],
)
def test_crd_validation_catches_mistakes(where: tuple[str, ...], change: dict[str, Any], expected: str) -> None:
    service = copy.deepcopy(_service(OVERLAYS["gpu-prod"]))
    target = service
    for key in where:
        target = target[key]
    target.update(change)
    errors = _crd_errors(service)
    assert any(expected in e for e in errors), errors


def test_unknown_field_in_a_pod_template_is_caught() -> None:
    service = copy.deepcopy(_service(OVERLAYS["cpu-dev"]))
    _ray_containers(service)[1]["resource"] = {"limits": {"cpu": "1"}}
    assert any("'resource' was unexpected" in e for e in _crd_errors(service))


def test_nulls_are_dropped_and_defaults_applied_before_validating() -> None:
    # minReplicas and maxReplicas are required, with defaults: the API server fills them in before validating,
    # and it drops nulls. Without doing the same, a valid manifest would fail.
    service = copy.deepcopy(_service(OVERLAYS["cpu-dev"]))
    group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    del group["minReplicas"], group["maxReplicas"]
    group["template"]["spec"]["containers"][0]["imagePullPolicy"] = None
    assert _crd_errors(service) == []
    raw = jsonschema.Draft7Validator(_crd_schemas()[("ray.io/v1", "RayService")]).iter_errors(service)
    messages = {e.message for e in raw}
    assert {"'minReplicas' is a required property", "None is not of type 'string'"} <= messages


# -- Kubernetes core objects ----------------------------------------------------------------------------------


def test_core_objects_validate_with_kubernetes_schemas(fresh: Path) -> None:
    core = [(path, doc) for path, doc in _objects(fresh) if doc["apiVersion"].split("/")[0] in CORE_GROUPS]
    assert {"Secret", "ConfigMap", "PodDisruptionBudget"} <= {doc["kind"] for _, doc in core}
    # Each Ray pod template, as a core PodTemplate: the pod spec as Kubernetes itself defines it.
    for overlay in COMMITTED_OVERLAYS:
        cluster = _service(overlay)["spec"]["rayClusterConfig"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            name = group.get("groupName", "head")
            meta = {"name": f"{overlay.name}-{name}"}
            core.append(
                (name, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": group["template"]})
            )
    for _, doc in core:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**core[0][1], "stringdata": {}}, KUBERNETES_VERSION, strict=True)


def test_secret_template_holds_no_token(fresh: Path) -> None:
    (secret,) = _docs(fresh / "ray-auth-secret.template.yaml")
    assert secret["metadata"]["name"] == AUTH_SECRET and secret["stringData"] == {AUTH_TOKEN_KEY: ""}
    kustomizations = [fresh / "base" / "kustomization.yaml", *fresh.glob("overlays/*/kustomization.yaml")]
    assert all("template" not in p.read_text() for p in kustomizations), "the Secret must stay out of apply -k"


# The PodMonitor's CRD belongs to prometheus-operator, whose schema is not vendored: its shape is checked here,
# and what it must agree on with the Ray pods (labels, port name) below.
POD_MONITOR_SHAPE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}


def test_pod_monitor_scrapes_every_ray_pod(fresh: Path) -> None:
    (monitor,) = _docs(fresh / "base" / "podmonitor.yaml")
    jsonschema.validate(monitor, POD_MONITOR_SHAPE)
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    # KubeRay adds `ray.io/is-ray-node: "yes"` to every Ray pod; the rest must be on the templates.
    ours = {k: v for k, v in selector.items() if k != "ray.io/is-ray-node"}
    assert selector.get("ray.io/is-ray-node") == "yes"
    for overlay in COMMITTED_OVERLAYS:
        cluster = _service(overlay)["spec"]["rayClusterConfig"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            labels = group["template"]["metadata"]["labels"]
            assert ours.items() <= labels.items()
            container = group["template"]["spec"]["containers"][0]
            named = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports <= set(named)
            assert int(group["rayStartParams"]["metrics-export-port"]) == named["metrics"]


# -- the Serve config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_serve_config_deploys_the_same_plan(name: str) -> None:
    overlay = OVERLAYS[name]
    service = _service(overlay)
    schema = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH
    assert schema.http_options.host == "0.0.0.0"
    args = ServingConfig.model_validate(app.args)
    rendered_from = _plan(overlay)
    assert args == rendered_from.config
    # The config as written, but for the files folder: on the files claim that every pod mounts.
    written = load_config(ROOT / overlay.config)
    assert args.model_copy(update={"batches": written.batches}) == written
    assert str(args.batches.files_dir).startswith(FILES_MOUNT + "/")
    assert (app.name, app.route_prefix, schema.http_options.port) == (args.name, args.route_prefix, args.router.port)
    in_cluster = compile_plan(args)  # what build_app compiles from `args`
    assert in_cluster == rendered_from
    assert [m.serve_options for m in in_cluster.models] == [m.serve_options for m in rendered_from.models]
    assert in_cluster.router_options == rendered_from.router_options
    # The worker groups of the manifest are those of the plan the cluster runs.
    groups = plan_worker_groups(in_cluster, PROFILES[overlay.options.profile])
    workers = _workers(service)
    assert [g.name for g in groups] == list(workers)
    for group in groups:
        assert (workers[group.name]["minReplicas"], workers[group.name]["maxReplicas"]) == (
            group.min_replicas,
            group.max_replicas,
        )


def test_import_path_is_the_app_builder() -> None:
    import deployments.app

    module, _, attr = IMPORT_PATH.partition(":")
    assert module == deployments.app.__name__ and getattr(deployments.app, attr) is deployments.app.build_app


def test_every_ray_container_gets_the_ray_env_and_token_auth_comes_from_kuberay() -> None:
    for overlay in COMMITTED_OVERLAYS:
        service = _service(overlay)
        cluster = service["spec"]["rayClusterConfig"]
        assert cluster["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}
        for container in _ray_containers(service):
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert RAY_ENV.items() <= env.items()
            # KubeRay adds RAY_AUTH_MODE and RAY_AUTH_TOKEN only where a container does not set them itself.
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env)


def test_cpu_profile_workers_compute_unbound_on_their_ray_cpus() -> None:
    service = _service(OVERLAYS["cpu-dev"])
    assert list(_workers(service)) == ["cpu"]
    (worker,) = _workers(service).values()
    env = {e["name"]: e["value"] for e in worker["template"]["spec"]["containers"][0]["env"]}
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert _plan(OVERLAYS["cpu-dev"]).engine_cpus is None
    resources = worker["template"]["spec"]["containers"][0]["resources"]
    guaranteed = ("cpu", "memory")  # Guaranteed QoS: requests equal limits for both
    assert {k: resources["requests"][k] for k in guaranteed} == resources["limits"]
    assert worker["rayStartParams"]["num-cpus"] == resources["limits"]["cpu"]


def test_readiness_is_kuberays_per_node_probe() -> None:
    # No probe of ours on any Ray container: KubeRay's default makes a worker ready while its raylet and its Serve
    # proxy's /-/healthz (on the port named `serve`) answer; /readyz is the whole app's, 503 while a model lacks a
    # replica, and would take every node out of the Service at once.
    for overlay in COMMITTED_OVERLAYS:
        service = _service(overlay)
        for container in _ray_containers(service):
            assert "readinessProbe" not in container and "livenessProbe" not in container
            assert {"name": "serve", "containerPort": _plan(overlay).config.router.port} in container["ports"]
        assert "/readyz" not in json.dumps(service["spec"]["rayClusterConfig"])


# -- kustomize ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", sorted([*OVERLAYS, *(f"{name}/storage" for name in OVERLAYS)]))
def test_overlay_builds_with_kubectl_kustomize(folder: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is not installed, so the k8s/ overlays cannot be built: install kubectl >= 1.21 "
            "(https://kubernetes.io/docs/tasks/tools/)"
        )
    version = json.loads(subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True).stdout)
    minor = int(version["clientVersion"]["minor"].rstrip("+"))
    if minor < 21:
        # kubectl 1.20 (Debian 12's kubernetes-client) embeds kustomize 2.0.3, which reads a directory only under
        # the deprecated `bases:`.
        pytest.fail(f"kubectl 1.{minor} cannot build overlays that list their base under resources: use >= 1.21")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / folder)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.load_all(done.stdout, Loader=_Loader) if d is not None]
    # What the kustomization lists, and the base for an overlay: the RayJob is left out on purpose.
    (kustomization,) = _docs(K8S / "overlays" / folder / "kustomization.yaml")
    listed = [f"overlays/{folder}/{r}" for r in kustomization["resources"] if r.endswith(".yaml")]
    with_base = ("base/",) if "../../base" in kustomization["resources"] else ()
    expected = [doc for path, doc in _objects(K8S) if path in listed or path.startswith(with_base)]
    expected = [d for d in expected if d.get("kind") != "Kustomization"]

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    assert sorted(built, key=key) == sorted(expected, key=key)


# -- GPU groups and autoscaling ---------------------------------------------------------------------------------


def test_gpu_group_is_sized_from_the_plan_bundles() -> None:
    overlay = OVERLAYS["gpu-prod"]
    plan, service = _plan(overlay), _service(overlay)
    llama = plan.models[0]
    assert llama.spec.resources.num_gpus > 0
    replica_gpus = sum(b.get("GPU", 0) for b in llama.bundles)
    assert replica_gpus == llama.spec.resources.num_gpus * llama.spec.parallelism.world_size == 2
    workers = _workers(service)
    gpu = workers["gpu-a10g"]
    resources = gpu["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"][GPU_RESOURCE] == resources["limits"][GPU_RESOURCE] == "2"
    assert gpu["rayStartParams"]["num-gpus"] == "2"
    # As Ray's autoscaler parses it: one pair of quotes stripped, then JSON.
    assert json.loads(gpu["rayStartParams"]["resources"][1:-1]) == {"accelerator_type:A10G": 1}
    pod = gpu["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 2)  # the model's scaling, one replica per pod
    # The weights claim only where a replica reads from it; no GPUs on the CPU group or the head.
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["modelfleet-weights", "modelfleet-batch"]
    cpu_pod = workers["cpu"]["template"]["spec"]
    assert [v["name"] for v in cpu_pod["volumes"]] == ["batch-files"] and "tolerations" not in cpu_pod
    for container in _ray_containers(service):
        if container is not pod["containers"][0]:
            assert GPU_RESOURCE not in container["resources"]["limits"]
    assert service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_ray_autoscaler_reads_groups_that_hold_every_replica(name: str) -> None:
    overlay = OVERLAYS[name]
    plan, cluster = _plan(overlay), _service(overlay)["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and _upgrade_type(overlay) == "NewCluster"
    head = _node_type_from_group_spec(cluster["headGroupSpec"], is_head=True)
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]
    node_types = [_node_type_from_group_spec(g, is_head=False) for g in cluster["workerGroupSpecs"]]
    for group, node in zip(cluster["workerGroupSpecs"], node_types, strict=True):
        assert (node["min_workers"], node["max_workers"]) == (group["minReplicas"], group["maxReplicas"])
    for model in plan.models:
        packed: dict[str, float] = {}
        for bundle in model.bundles:
            for key, amount in bundle.items():
                packed[key] = packed.get(key, 0) + amount
        fits = [n for n in node_types if all(n["resources"].get(k, 0) >= v for k, v in packed.items())]
        assert fits, f"no worker group holds a replica of {model.spec.id}: {packed}"
        low = model.spec.scaling.min_replicas
        assert sum(n["min_workers"] for n in fits) >= (1 if low else 0)


def _upgrade_type(overlay: Overlay) -> str:
    upgrade: str = _service(overlay)["spec"]["upgradeStrategy"]["type"]
    return upgrade


def _config(**models: dict[str, Any]) -> ServingConfig:
    return ServingConfig.model_validate({"models": [{"id": k, "task": "generate", **v} for k, v in models.items()]})


def test_bounds_pack_shared_gpus_and_spread_bundles() -> None:
    config = _config(
        shared={"engine": "vllm", "source": "/m/a", "resources": {"num_gpus": 0.5, "accelerator_type": "L4"},
                "scaling": {"min_replicas": 2, "max_replicas": 4}},
        spread={"engine": "vllm", "source": "/m/b", "resources": {"num_gpus": 1, "accelerator_type": "H100"},
                "parallelism": {"tensor_parallel_size": 2, "placement_strategy": "STRICT_SPREAD"}},
    )  # fmt: skip
    groups = {g.name: g for g in plan_worker_groups(compile_plan(config), PROFILES["gpu"])}
    assert set(groups) == {"cpu", "gpu-l4", "gpu-h100"}
    # Two half-GPU replicas per 1-GPU pod; a spread replica takes one pod per bundle.
    assert (groups["gpu-l4"].gpus, groups["gpu-l4"].min_replicas, groups["gpu-l4"].max_replicas) == (1, 1, 2)
    assert (groups["gpu-h100"].gpus, groups["gpu-h100"].min_replicas, groups["gpu-h100"].max_replicas) == (1, 2, 2)
    service = rayservice(compile_plan(config), RenderOptions(profile="gpu"))
    h100 = _workers(service)["gpu-h100"]["template"]["spec"]
    (term,) = h100["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"][0]["values"][0] == "NVIDIA-H100-80GB-HBM3"
    assert _crd_errors(service) == []


def test_cpu_profile_refuses_gpu_models() -> None:
    with pytest.raises(RenderError, match="--profile gpu"):
        rayservice(_plan(OVERLAYS["gpu-prod"]), RenderOptions(profile="cpu", weights_pvc="w"))


def test_unknown_accelerator_needs_a_node_label_value() -> None:
    config = _config(m={"engine": "vllm", "source": "/x", "resources": {"num_gpus": 1, "accelerator_type": "MI300X"}})
    with pytest.raises(RenderError, match="--gpu-node-value MI300X="):
        rayservice(compile_plan(config), RenderOptions(profile="gpu"))
    options = RenderOptions(profile="gpu", gpu_node_label="gpu.example/model", gpu_node_values={"MI300X": ("mi300x",)})
    pod = _workers(rayservice(compile_plan(config), options))["gpu-mi300x"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu.example/model": "mi300x"}


def test_weights_under_the_mount_need_a_claim() -> None:
    with pytest.raises(RenderError, match="--weights-pvc"):
        rayservice(_plan(OVERLAYS["gpu-prod"]), RenderOptions(profile="gpu"))


def test_api_keys_are_never_rendered() -> None:
    config = ServingConfig.model_validate(
        {"models": [{"id": "e", "task": "generate", "engine": "echo"}], "router": {"api_keys": ["sk-secret"]}}
    )
    with pytest.raises(RenderError, match="api_keys"):
        rayservice(compile_plan(config), RenderOptions())


def test_app_name_must_be_a_rayservice_name() -> None:
    config = ServingConfig.model_validate(
        {"name": "Model_Fleet", "models": [{"id": "e", "task": "generate", "engine": "echo"}]}
    )
    with pytest.raises(RenderError, match="lowercase"):
        rayservice(compile_plan(config), RenderOptions())


# -- the command ----------------------------------------------------------------------------------------------


def test_render_k8s_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ROOT / "deployments" / "configs" / "gpu.yaml"
    args = ["render-k8s", str(config), "--profile", "gpu", "--weights-pvc", "w", "--files-pvc", "f"]
    args += ["--out", str(tmp_path)]
    assert main([*args, "--overlay", "mine", "--image", "registry.example/mf:1"]) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [
        "base/dashboards.yaml",
        "base/kustomization.yaml",
        "base/podmonitor.yaml",
        "dashboards/modelfleet-cluster.json",
        "dashboards/modelfleet-model.json",
        "dashboards/modelfleet-overview.json",
        "overlays/mine/head-pdb.yaml",
        "overlays/mine/kustomization.yaml",
        "overlays/mine/rayjob.yaml",
        "overlays/mine/rayservice.yaml",
        "overlays/mine/storage/files-pvc.yaml",
        "overlays/mine/storage/kustomization.yaml",
        "overlays/mine/storage/weights-fill.yaml",
        "overlays/mine/storage/weights-pvc.yaml",
        "ray-auth-secret.template.yaml",
    ]
    assert "wrote" in capsys.readouterr().out
    (service,) = _docs(tmp_path / "overlays" / "mine" / "rayservice.yaml")
    assert {c["image"] for c in _ray_containers(service)} == {"registry.example/mf:1"}
    assert main(["render-k8s", str(config), "--weights-pvc", "w", "--out", str(tmp_path)]) == 2  # cpu profile
    assert "--profile gpu" in capsys.readouterr().err
    assert main(["render-k8s", "--profile", "gpu"]) == 2  # options without a config
