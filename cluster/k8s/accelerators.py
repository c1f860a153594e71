"""Which Kubernetes nodes a GPU worker group lands on: node selection per Ray accelerator type, and tolerations.

A spec's `resources.accelerator_type` is Ray's name for a GPU model ('A10G', 'H100'), the name Ray derives from
the device name and advertises as the resource `accelerator_type:<T>`. Kubernetes nodes carry the GPU model in a
label instead: by default `nvidia.com/gpu.product`, which NVIDIA's GPU Feature Discovery (part of the GPU
operator) sets to the device name with spaces as dashes ('NVIDIA-A10G'). One Ray type can match several product
names (memory sizes, SXM or PCIe), so a group selects on all of them. A type missing from the table, or a
cluster that labels nodes differently, needs `--gpu-node-label` / `--gpu-node-value TYPE=VALUE[,VALUE]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cluster.k8s.errors import RenderError

__all__ = ["GPU_NODE_LABEL", "GPU_PRODUCTS", "GPU_RESOURCE", "GPU_TOLERATIONS", "gpu_node_placement"]

GPU_NODE_LABEL = "nvidia.com/gpu.product"
# The extended resource NVIDIA's device plugin advertises; whole GPUs only.
GPU_RESOURCE = "nvidia.com/gpu"
# GPU Feature Discovery product names (device names, spaces as dashes) per Ray accelerator type.
GPU_PRODUCTS: Mapping[str, tuple[str, ...]] = {
    "T4": ("Tesla-T4",),
    "A10G": ("NVIDIA-A10G",),
    "L4": ("NVIDIA-L4",),
    "L40S": ("NVIDIA-L40S",),
    "A100": ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-PCIE-40GB", "NVIDIA-A100-80GB-PCIe"),
    "H100": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"),
}
# Managed GPU node pools (EKS, GKE, AKS) and the GPU operator's docs taint GPU nodes with this key, so that only
# pods that asked for GPUs land there.
GPU_TOLERATIONS: tuple[dict[str, str], ...] = ({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},)


def gpu_node_placement(
    accelerator_type: str | None, *, label: str = GPU_NODE_LABEL, overrides: Mapping[str, tuple[str, ...]] | None = None
) -> dict[str, Any]:
    """The pod spec fields that put a GPU worker pod on a node with the given GPU model.

    Args:
        accelerator_type: Ray's accelerator type of the group's models; None: any GPU node.
        label: the node label that holds the GPU model.
        overrides: label values per accelerator type, before the built-in table.

    Returns:
        `tolerations`, and `nodeSelector` (one label value) or a required node affinity (several).

    Raises:
        RenderError: the accelerator type has no known label value.
    """
    placement: dict[str, Any] = {"tolerations": [dict(t) for t in GPU_TOLERATIONS]}
    if accelerator_type is None:
        return placement  # the nvidia.com/gpu request alone keeps the pod on GPU nodes
    values = (overrides or {}).get(accelerator_type) or GPU_PRODUCTS.get(accelerator_type)
    if not values:
        raise RenderError(
            f"no value of node label {label} is known for accelerator type '{accelerator_type}': pass "
            f"--gpu-node-value {accelerator_type}=<the label's value on those nodes>"
        )
    if len(values) == 1:
        placement["nodeSelector"] = {label: values[0]}
    else:
        term = {"matchExpressions": [{"key": label, "operator": "In", "values": list(values)}]}
        required = {"nodeSelectorTerms": [term]}
        placement["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}
    return placement
