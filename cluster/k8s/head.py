"""The head survives: GCS fault tolerance on an external Redis, and no voluntary eviction of the head pod.

Without GCS fault tolerance a lost head takes the whole Ray cluster with it: every worker, every replica. With it
(`gcsFaultToleranceOptions`, KubeRay >= 1.3), the GCS keeps its tables in Redis; a restarted head reloads them,
and the workers, their replicas and Serve's proxies keep serving while it is away (Ray waits 60 s for the GCS by
default). KubeRay's HA sample gives the Redis as an address and its password from a Secret, as here; the Redis is
the user's (a managed Redis, or a Redis with persistence in the cluster), never part of the rendered tree.

The head pod is the one pod that must not be moved for convenience: a PodDisruptionBudget keeps drains and
evictions through the eviction API from taking it, and the cluster autoscaler's `safe-to-evict: "false"` keeps it
from emptying the head's node to scale down.
"""

from __future__ import annotations

from typing import Any

from cluster.k8s.constants import APP_LABELS

__all__ = [
    "HEAD_COMPONENT",
    "HEAD_POD_ANNOTATIONS",
    "REDIS_PASSWORD_KEY",
    "REDIS_SECRET",
    "create_redis_secret_command",
    "gcs_fault_tolerance",
    "head_disruption_budget",
]

# The component label of the serving cluster's head pod (the PodDisruptionBudget selects it).
HEAD_COMPONENT = "ray-head"
# Read by the Kubernetes cluster autoscaler: it never removes the node of a pod that carries it.
HEAD_POD_ANNOTATIONS = {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
REDIS_SECRET = "modelfleet-redis"
REDIS_PASSWORD_KEY = "password"


def gcs_fault_tolerance(redis_address: str, secret_name: str = REDIS_SECRET) -> dict[str, Any]:
    """The RayCluster `gcsFaultToleranceOptions` of an external Redis (KubeRay 1.7's schema).

    Args:
        redis_address: `host:port`, or a `redis://` / `rediss://` URL (TLS).
        secret_name: the Secret whose key `password` holds Redis's password.
    """
    return {
        "redisAddress": redis_address,
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": secret_name, "key": REDIS_PASSWORD_KEY}}},
    }


def head_disruption_budget(app_name: str) -> dict[str, Any]:
    """The PodDisruptionBudget (policy/v1) that keeps voluntary disruptions off the serving cluster's head.

    `minAvailable: 1` holds the one head in place; during a NewCluster upgrade, with two heads, the old one may go.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": f"{app_name}-head", "labels": dict(APP_LABELS)},
        "spec": {
            "minAvailable": 1,
            "selector": {"matchLabels": {**APP_LABELS, "app.kubernetes.io/component": HEAD_COMPONENT}},
        },
    }


def create_redis_secret_command(secret_name: str = REDIS_SECRET) -> str:
    """The shell command that creates the Redis password Secret (in kubectl's namespace)."""
    return f'kubectl create secret generic {secret_name} --from-literal={REDIS_PASSWORD_KEY}="$REDIS_PASSWORD"'
