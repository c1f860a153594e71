"""Worker groups from a deployment plan: one pod shape per kind of node, and autoscaling bounds from replicas.

Everything comes from the plan: a replica's Ray resources are its placement `bundles` (one per tensor/pipeline
worker, or the replica actor's own demand), its replica counts are those of its Serve options, and the router's
come from `router_options`. Replicas that need GPUs go to a GPU group per accelerator type; everything else
(CPU models, the router) to the CPU group. The head runs no replicas (Ray `num-cpus` 0).

Bounds, per group:
- a pod is at least as large as the largest replica it must hold (all of a replica's bundles on one pod when
  they are packed; one bundle per pod when spread);
- `minReplicas`: the pods that first-fit-decreasing packing needs for every model at its fewest replicas, plus
  the router (the autoscaler adds pods when Ray packs worse);
- `maxReplicas`: enough pods for every model at its most replicas even if no two models share a pod, so the
  autoscaler can always place what Serve asks for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cluster.k8s.errors import RenderError
from cluster.k8s.profile import Profile
from deployments.plan import DeploymentPlan, ModelPlan

__all__ = ["ACCELERATOR_PREFIX", "CPU_GROUP", "OBJECT_STORE_SHARE", "Demand", "WorkerGroup", "plan_worker_groups"]

CPU_GROUP = "cpu"
ACCELERATOR_PREFIX = "accelerator_type:"
# Ray keeps this share of a node's memory for its object store by default; replicas get the rest.
OBJECT_STORE_SHARE = 0.3
_GIB = 1 << 30
_PACKED = ("STRICT_PACK", "PACK")


@dataclass(frozen=True)
class Demand:
    """What one placement unit (a packed replica, or one bundle of a spread one) takes from one pod."""

    cpus: float
    gpus: float
    memory_bytes: float

    @classmethod
    def of(cls, bundles: Iterable[Mapping[str, float]]) -> Demand:
        """The sum of Ray resource bundles."""
        bundles = list(bundles)
        return cls(
            cpus=sum(b.get("CPU", 0.0) for b in bundles),
            gpus=sum(b.get("GPU", 0.0) for b in bundles),
            memory_bytes=sum(b.get("memory", 0.0) for b in bundles),
        )


@dataclass(frozen=True)
class _Unit:
    """Replicas of one deployment as the pods see them."""

    name: str
    demand: Demand
    per_replica: int  # placement units per replica: 1 when packed, one per bundle when spread
    exclusive: bool  # spread: each unit takes a pod of its own
    gpu_workers: int  # engine workers holding GPUs that one unit puts on a pod together
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class WorkerGroup:
    """One KubeRay worker group: the shape of its pods and how many the autoscaler may run."""

    name: str
    cpus: int
    gpus: int
    memory_gib: int
    accelerator_type: str | None
    min_replicas: int
    max_replicas: int
    hosts: tuple[str, ...]  # the deployments whose replicas it is sized for
    tp_workers: int = 0  # the most GPU engine workers (tensor/pipeline parallel) one replica puts on a pod


def plan_worker_groups(plan: DeploymentPlan, profile: Profile) -> tuple[WorkerGroup, ...]:
    """The worker groups of a plan: the CPU group first, then one GPU group per accelerator type.

    Raises:
        RenderError: a model needs GPUs and the profile has none.
    """
    cpu_units: list[_Unit] = [_router_unit(plan)]
    gpu_units: dict[str | None, list[_Unit]] = {}
    for model in plan.models:
        unit = _model_unit(model)
        if unit.demand.gpus <= 0:
            cpu_units.append(unit)
        elif not profile.gpus:
            raise RenderError(
                f"model '{model.spec.id}' asks for GPUs, which the '{profile.name}' profile has none of: "
                "render with --profile gpu"
            )
        else:
            gpu_units.setdefault(_accelerator_type(model), []).append(unit)
    groups = [_group(CPU_GROUP, cpu_units, profile, accelerator_type=None)]
    for kind in sorted(gpu_units, key=lambda k: k or ""):
        groups.append(_group(_gpu_group_name(kind), gpu_units[kind], profile, accelerator_type=kind))
    return tuple(groups)


def _replica_bounds(serve_options: Mapping[str, Any]) -> tuple[int, int]:
    autoscaling = serve_options.get("autoscaling_config")
    if autoscaling:
        return int(autoscaling["min_replicas"]), int(autoscaling["max_replicas"])
    return int(serve_options["num_replicas"]), int(serve_options["num_replicas"])


def _router_unit(plan: DeploymentPlan) -> _Unit:
    options = plan.router_options
    low, high = _replica_bounds(options)
    cpus = float(options.get("ray_actor_options", {}).get("num_cpus", 0.0))
    return _Unit(options["name"], Demand(cpus, 0.0, 0.0), 1, False, 0, low, high)


def _model_unit(model: ModelPlan) -> _Unit:
    low, high = _replica_bounds(model.serve_options)
    gpu_bundles = sum(1 for b in model.bundles if b.get("GPU", 0.0) > 0)
    if model.strategy in _PACKED:
        return _Unit(model.deployment_name, Demand.of(model.bundles), 1, False, gpu_bundles, low, high)
    # Spread bundles may each need a node of their own (STRICT_SPREAD must): size a pod for the largest one.
    largest = max((Demand.of([b]) for b in model.bundles), key=lambda d: (d.gpus, d.cpus, d.memory_bytes))
    return _Unit(model.deployment_name, largest, len(model.bundles), True, min(gpu_bundles, 1), low, high)


def _accelerator_type(model: ModelPlan) -> str | None:
    kinds = {k.removeprefix(ACCELERATOR_PREFIX) for b in model.bundles for k in b if k.startswith(ACCELERATOR_PREFIX)}
    return kinds.pop() if kinds else None


def _gpu_group_name(accelerator_type: str | None) -> str:
    if accelerator_type is None:
        return "gpu"
    return "gpu-" + re.sub(r"[^a-z0-9]+", "-", accelerator_type.lower()).strip("-")


def _pod_memory_gib(memory_bytes: float) -> int:
    """Memory of a pod whose Ray `memory` resource must hold `memory_bytes` beside the object store."""
    return math.ceil(memory_bytes / (1 - OBJECT_STORE_SHARE) / _GIB) if memory_bytes else 0


def _group(name: str, units: list[_Unit], profile: Profile, *, accelerator_type: str | None) -> WorkerGroup:
    gpus = math.ceil(max(u.demand.gpus for u in units))
    least = profile.cpus_per_gpu * gpus if gpus else profile.worker_cpus
    cpus = max(math.ceil(max(u.demand.cpus for u in units)), least)
    shaped = profile.memory_gib_per_gpu * gpus if gpus else profile.memory_gib_per_cpu * cpus
    memory_gib = max(shaped, max(_pod_memory_gib(u.demand.memory_bytes) for u in units))
    pod = Demand(cpus, gpus, memory_gib * _GIB * (1 - OBJECT_STORE_SHARE))
    return WorkerGroup(
        name=name,
        cpus=cpus,
        gpus=gpus,
        memory_gib=memory_gib,
        accelerator_type=accelerator_type,
        min_replicas=_fewest_pods(units, pod),
        max_replicas=sum(math.ceil(u.max_replicas * u.per_replica / _fits(u.demand, pod)) for u in units),
        hosts=tuple(u.name for u in units),
        tp_workers=max(u.gpu_workers for u in units),
    )


def _fits(unit: Demand, pod: Demand) -> int:
    """How many such units one empty pod holds (at least 1: pods are sized for their largest unit)."""
    counts = [
        math.floor(have / need + 1e-9)
        for need, have in ((unit.cpus, pod.cpus), (unit.gpus, pod.gpus), (unit.memory_bytes, pod.memory_bytes))
        if need > 0
    ]
    return max(1, min(counts, default=1_000_000))


def _fewest_pods(units: list[_Unit], pod: Demand) -> int:
    """First-fit decreasing: the pods that hold every unit at its fewest replicas (spread units alone)."""
    pods = sum(u.min_replicas * u.per_replica for u in units if u.exclusive)
    items = [u.demand for u in units if not u.exclusive for _ in range(u.min_replicas)]
    free: list[list[float]] = []
    for item in sorted(items, key=lambda d: (d.gpus, d.cpus, d.memory_bytes), reverse=True):
        need = (item.cpus, item.gpus, item.memory_bytes)
        for room in free:
            if all(n <= r + 1e-9 for n, r in zip(need, room, strict=True)):
                room[:] = [r - n for n, r in zip(need, room, strict=True)]
                break
        else:
            free.append([pod.cpus - item.cpus, pod.gpus - item.gpus, pod.memory_bytes - item.memory_bytes])
    return pods + len(free)
