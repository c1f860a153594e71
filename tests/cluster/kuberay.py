"""What the KubeRay operator (v1.7) would run in a Ray pod of a rendered RayService: the container's command line,
generated from the group's rayStartParams and the container's resource limits as ray-operator's `pod.go` does
(`setMissingRayStartParams`, `generateRayStartCommand`, `convertParamMap`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

__all__ = [
    "DEFAULT_HEAD_PORT",
    "DEFAULT_SERVE_PORT",
    "container_command",
    "quantity",
    "ray_start_command",
    "wait_gcs_command",
]

DEFAULT_HEAD_PORT = 6379
DEFAULT_SERVE_PORT = 8000
_DEFAULT_METRICS_PORT = 8080
_DEFAULT_DASHBOARD_AGENT_LISTEN_PORT = 52365
# `ray start` flags that take an explicit true/false; any other "true" is a bare switch and "false" is dropped.
_EXPLICIT_BOOLEANS = ("log-color", "include-dashboard", "include-log-monitor")
_SUFFIXES = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_QUANTITY = re.compile(r"^([0-9.]+)(m|[kMGT]i?|)$")


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ('500m', '4', '16Gi') as a number (cores, bytes)."""
    found = _QUANTITY.match(str(value))
    if found is None:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = float(found.group(1)), found.group(2)
    return number / 1000 if suffix == "m" else number * _SUFFIXES[suffix]


def ray_start_command(
    node_type: Literal["head", "worker"],
    ray_start_params: Mapping[str, str],
    limits: Mapping[str, Any],
    *,
    head_host: str,
    head_port: int = DEFAULT_HEAD_PORT,
) -> str:
    """The `ray start` line of a head or worker pod (`head_host`: the head Service's name, for workers)."""
    params = dict(ray_start_params)
    if node_type == "worker":
        params.setdefault("address", f"{head_host}:{head_port}")
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", str(_DEFAULT_METRICS_PORT))
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", str(_DEFAULT_DASHBOARD_AGENT_LISTEN_PORT))
    # Quantity.Value(): the quantity rounded up to a whole number of cores or bytes.
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(math.ceil(quantity(limits["cpu"])))
    if "memory" not in params and "memory" in limits:
        params["memory"] = str(math.ceil(quantity(limits["memory"])))
    if "num-gpus" not in params and quantity(limits.get("nvidia.com/gpu", 0)):
        params["num-gpus"] = str(math.ceil(quantity(limits["nvidia.com/gpu"])))
    flags = ""
    for option in sorted(params):
        argument = params[option]
        if argument.lower() in ("true", "false") and option not in _EXPLICIT_BOOLEANS:
            if argument.lower() == "true":
                flags += f" --{option} "
        else:
            flags += f" --{option}={argument} "
    return ("ray start --head" if node_type == "head" else "ray start") + flags


def container_command(start: str) -> list[str]:
    """The Ray container's command as KubeRay sets it: a login bash that raises the open-files limit first."""
    return ["/bin/bash", "-lc", "--", f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start}"]


def wait_gcs_command(head_host: str, head_port: int = DEFAULT_HEAD_PORT) -> list[str]:
    """The command of a worker pod's `wait-gcs-ready` init container: the worker's Ray starts only once the head's
    GCS answers (a worker started before it exits: "No node info found for head node in GCS")."""
    check = f"ray health-check --address {head_host}:{head_port} >/dev/null 2>&1"
    return ["/bin/bash", "-lc", "--", f"until {check}; do sleep 5; done"]
