"""What a Ray pod carries besides its shape: a restricted security context, ephemeral storage, the shared memory
of GPU workers, and a stop that lets Serve drain.

- **Security.** Pod Security's `restricted` profile: a fixed non-root user (`IMAGE_UID`:`IMAGE_GID`, the image's
  user), no privilege escalation, no capabilities, the runtime's seccomp profile.
- **Ephemeral storage.** Requested on every pod: Ray's logs and session files, engine caches (`profile.ephemeral_gib`),
  and room to spill the object store to local disk (Ray spills under /tmp/ray when plasma fills).
- **Shared memory.** KubeRay mounts a memory-backed /dev/shm the size of the pod's memory unless one is mounted.
  GPU workers get one sized for what uses it: Ray's object store (its share of the pod's memory; Ray caps the store
  at /dev/shm) plus `profile.shm_gib_per_tp_worker` per tensor/pipeline-parallel worker of a replica (NCCL's
  buffers and vLLM's worker message queues live there). Pages written there count against the pod's memory limit.
- **Drain.** A stopping worker pod first tells Ray its node is draining: Serve then starts each replica of the node
  elsewhere and stops the old one gracefully, finishing its requests (up to the plan's drain timeout). The hook
  waits until no Serve replica runs on the node, at most the plan's longest drain; the grace period covers it.
"""

from __future__ import annotations

import math
from typing import Any

from cluster.k8s.groups import OBJECT_STORE_SHARE, WorkerGroup
from cluster.k8s.profile import Profile
from deployments.plan import DeploymentPlan

__all__ = [
    "IMAGE_GID",
    "IMAGE_UID",
    "SHM_PATH",
    "container_security_context",
    "drain_wait_s",
    "ephemeral_gib",
    "grace_period_s",
    "pod_security_context",
    "pre_stop",
    "shm_gib",
    "shm_volume",
]

# The image's user: `ray` of Ray's own images (uid 1000, group `users`, gid 100), which the modelfleet image
# builds on; it owns /app and the model cache. Every container runs as it.
IMAGE_UID = 1000
IMAGE_GID = 100
SHM_PATH = "/dev/shm"
_SHM_VOLUME = "dshm"
# Serve's own defaults, for a deployment whose options do not set them (the plan sets both).
_SERVE_DRAIN_TIMEOUT_S = 20.0
_SERVE_DRAIN_LOOP_S = 2.0
# After the hook: SIGTERM reaches `ray start`, which stops the node's processes.
_STOP_MARGIN_S = 10


def pod_security_context() -> dict[str, Any]:
    """The pod-level security context of every rendered pod (Pod Security `restricted`)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": IMAGE_UID,
        "runAsGroup": IMAGE_GID,
        "fsGroup": IMAGE_GID,
        # Claims are mounted group-writable for the user without walking every file (weights are large).
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """The container-level security context of every rendered container (KubeRay copies it to its init container)."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def ephemeral_gib(profile: Profile, memory_gib: int) -> int:
    """Ephemeral storage a pod requests: logs and caches, plus its object store's size to spill to."""
    return profile.ephemeral_gib + math.ceil(memory_gib * OBJECT_STORE_SHARE)


def shm_gib(profile: Profile, group: WorkerGroup) -> int:
    """/dev/shm of a GPU worker pod: the object store's share of its memory, plus room per parallel worker."""
    return math.ceil(group.memory_gib * OBJECT_STORE_SHARE) + profile.shm_gib_per_tp_worker * max(group.tp_workers, 1)


def shm_volume(profile: Profile, group: WorkerGroup) -> tuple[dict[str, Any], dict[str, Any]]:
    """The memory-backed /dev/shm of a GPU worker pod: its volume and the Ray container's mount."""
    volume = {"name": _SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib(profile, group)}Gi"}}
    return volume, {"name": _SHM_VOLUME, "mountPath": SHM_PATH}


def drain_wait_s(plan: DeploymentPlan) -> int:
    """The longest a stopped replica of the plan takes to finish its requests (Serve's wait loop and timeout)."""
    options = [plan.router_options, *(m.serve_options for m in plan.models)]
    return math.ceil(
        max(
            float(o.get("graceful_shutdown_timeout_s", _SERVE_DRAIN_TIMEOUT_S))
            + float(o.get("graceful_shutdown_wait_loop_s", _SERVE_DRAIN_LOOP_S))
            for o in options
        )
    )


def grace_period_s(plan: DeploymentPlan) -> int:
    """`terminationGracePeriodSeconds` of every pod: the longest drain of the plan, then the stop itself."""
    return drain_wait_s(plan) + _STOP_MARGIN_S


def pre_stop(plan: DeploymentPlan) -> dict[str, Any]:
    """The worker container's `lifecycle`: drain the Ray node, then wait while a Serve replica still runs on it.

    `ray drain-node` (no node id: this node) tells the GCS the node goes in `grace_period_s`; Serve moves its
    replicas off. Serve replicas run as processes titled `ray::ServeReplica:<app>:<deployment>`; the bracket keeps
    the pattern from matching the shell and grep themselves.
    """
    grace, wait = grace_period_s(plan), drain_wait_s(plan)
    script = (
        "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message 'Kubernetes pod stopping' "
        f"--deadline-remaining-seconds {grace} || true; "
        f"for _ in $(seq {wait}); do grep -qs 'ray::[S]erveReplica' /proc/[0-9]*/cmdline || exit 0; sleep 1; done"
    )
    return {"preStop": {"exec": {"command": ["/bin/bash", "-c", script]}}}
