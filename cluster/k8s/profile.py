"""Render profiles (what the pods of a CPU or a GPU cluster look like) and the options of one render."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import MappingProxyType
from typing import Literal

from pydantic import Field

from cluster.k8s.accelerators import GPU_NODE_LABEL
from cluster.k8s.errors import RenderError
from models.spec import FrozenModel

__all__ = ["IMAGE_WORKDIR", "PROFILES", "Profile", "RenderOptions", "default_image"]

# Where the image holds the repository root (Serve's working_dir: `deployments.app:build_app` imports from it).
IMAGE_WORKDIR = "/app"


@dataclass(frozen=True)
class Profile:
    """Pod shapes of one kind of cluster. Pods are made at least as large as the largest replica they must hold.

    Attributes:
        name: 'cpu' or 'gpu'.
        head_cpus / head_memory_gib: the head pod (GCS, dashboard, Serve controller and a proxy; no replicas).
        worker_cpus: cores of a CPU worker pod (Ray advertises the same number of CPUs).
        memory_gib_per_cpu: memory of a CPU worker pod per core.
        cpus_per_gpu / memory_gib_per_gpu: cores and memory of a GPU worker pod per GPU (tokenisation, the
            engine's scheduler and weight loading run on the host).
        gpus: whether GPU worker groups may be rendered.
        idle_timeout_s: how long the autoscaler keeps an idle worker pod.
        worker_env: environment of the worker containers, besides the plan's Ray environment.
        ephemeral_gib: local disk a pod requests for logs and caches (Ray's session files, engine compile caches),
            besides room to spill its object store.
        shm_gib_per_tp_worker: /dev/shm of a GPU worker pod per tensor/pipeline-parallel worker of a replica,
            besides the object store (NCCL buffers, vLLM's worker message queues).
    """

    name: Literal["cpu", "gpu"]
    head_cpus: int
    head_memory_gib: int
    worker_cpus: int
    memory_gib_per_cpu: int
    cpus_per_gpu: int
    memory_gib_per_gpu: int
    gpus: bool
    idle_timeout_s: int
    worker_env: Mapping[str, str] = field(default_factory=dict)
    ephemeral_gib: int = 10
    shm_gib_per_tp_worker: int = 2


PROFILES: Mapping[str, Profile] = MappingProxyType(
    {
        "cpu": Profile(
            name="cpu",
            head_cpus=1,
            head_memory_gib=4,
            worker_cpus=4,
            memory_gib_per_cpu=4,
            cpus_per_gpu=0,
            memory_gib_per_gpu=0,
            gpus=False,
            idle_timeout_s=60,
            # A pod's core ids are known only inside it (a CFS quota, or a cpuset under the kubelet's static CPU
            # manager), so the plan is compiled without engine cores, as build_app compiles it in the cluster.
            # vLLM's CPU build would otherwise bind its threads to every core of a NUMA node of the host ('auto'),
            # far more threads than the pod's quota; unbound, it computes with OMP_NUM_THREADS threads, which
            # Ray sets to the replica's logical CPUs (resources.num_cpus). A spec's own
            # engine_kwargs.cpu_omp_threads_bind still wins: the engine sets it in its own process.
            worker_env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"},
        ),
        "gpu": Profile(
            name="gpu",
            head_cpus=2,
            head_memory_gib=8,
            worker_cpus=4,
            memory_gib_per_cpu=4,
            cpus_per_gpu=4,
            memory_gib_per_gpu=24,
            gpus=True,
            # GPU nodes take minutes to provision and a model minutes to load: keep them through short lulls.
            idle_timeout_s=300,
            # torch.compile and CUDA graph caches of the engines, besides Ray's logs.
            ephemeral_gib=20,
        ),
    }
)


def default_image(profile: str) -> str:
    """`modelfleet:<version>-<profile>`: the project's image, built with vLLM's CPU or CUDA build.

    Raises:
        RenderError: modelfleet is not installed, so its version is unknown.
    """
    try:
        version = metadata.version("modelfleet")
    except metadata.PackageNotFoundError:
        raise RenderError(
            "modelfleet is not installed (pip install -e .), so the image tag is unknown: pass --image"
        ) from None
    return f"modelfleet:{version}-{profile}"


class RenderOptions(FrozenModel):
    """How one config is rendered into a RayService: everything that is not in the config or its plan."""

    profile: Literal["cpu", "gpu"] = Field(default="cpu", description="Pod shapes and worker groups: 'cpu' or 'gpu'.")
    image: str | None = Field(
        default=None,
        description="Container image of every Ray pod: Ray, the engines and the repository at /app (packaged "
        "models need their packages in it). Unset: modelfleet:<version>-<profile>.",
    )
    working_dir: str = Field(
        default=f"local://{IMAGE_WORKDIR}",
        description="Serve's runtime_env working_dir: the code in the image (local://), or a remote zip URL.",
    )
    weights_pvc: str | None = Field(
        default=None, description="PersistentVolumeClaim holding model weights, mounted read-only into the worker pods."
    )
    weights_size: str = Field(default="100Gi", description="Storage the rendered weights claim asks for.")
    files_pvc: str | None = Field(
        default=None,
        description="ReadWriteMany PersistentVolumeClaim mounted at /batch on every Ray pod: uploaded files and batch "
        "results (batches.files_dir, /batch/files unless set under /batch) and the RayJob's input and output. "
        "Needed when several router replicas serve batches.",
    )
    files_size: str = Field(default="50Gi", description="Storage the rendered files claim asks for.")
    storage_class: str | None = Field(
        default=None,
        description="StorageClass of the rendered claims: file storage that offers ReadWriteMany and ReadOnlyMany "
        "(NFS, EFS, Filestore, Azure Files, CephFS). Unset: the cluster's default class.",
    )
    weights_mount: str = Field(
        default="/models", description="Where the weights claim is mounted; sources may point there."
    )
    redis_address: str | None = Field(
        default=None,
        description="External Redis of GCS fault tolerance (host:port, or a redis:// or rediss:// URL): the head "
        "can restart without taking the workers down. Unset: no GCS fault tolerance.",
    )
    redis_secret: str = Field(
        default="modelfleet-redis", description="Secret whose key `password` holds the Redis password."
    )
    ingress_host: str | None = Field(
        default=None,
        description="Render an Ingress that serves this host over HTTPS (TLS ends there, with the certificate in "
        "Secret modelfleet-tls). Unset: no Ingress.",
    )
    ingress_class: str = Field(default="nginx", description="IngressClass of the rendered Ingress.")
    gpu_node_label: str = Field(
        default=GPU_NODE_LABEL, description="Node label that names a node's GPU model (GPU worker groups select on it)."
    )
    gpu_node_values: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Per Ray accelerator type, the values of gpu_node_label its nodes carry (overrides the "
        "built-in table of NVIDIA GPU Feature Discovery product names).",
    )
