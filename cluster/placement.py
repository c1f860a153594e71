"""Can the cluster ever place a model's replica? Serve only says 'UPDATING'; this says why it waits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["unschedulable_reason"]

Resources = Mapping[str, float]


def _fits(demand: Resources, node: Resources) -> bool:
    return all(node.get(key, 0.0) + 1e-9 >= amount for key, amount in demand.items() if amount > 0)


def _total(bundles: Sequence[Resources]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            total[key] = total.get(key, 0.0) + amount
    return total


def _show(resources: Resources) -> str:
    keys = sorted(k for k in resources if k == "CPU" or k == "GPU" or k.startswith("accelerator_type:"))
    return "{" + ", ".join(f"{k}: {resources[k]:g}" for k in keys) + "}"


def unschedulable_reason(bundles: Sequence[Resources], strategy: str, nodes: Sequence[Resources]) -> str | None:
    """Why no node set of this cluster can ever hold the replica (by total resources), or None if one can.

    Args:
        bundles: what one replica needs (`ModelPlan.bundles`).
        strategy: the placement strategy of the bundles.
        nodes: each alive node's total resources.
    """
    offered = "; ".join(_show(n) for n in nodes) or "no nodes"
    if strategy == "STRICT_PACK" or len(bundles) == 1:
        need = _total(bundles)
        if any(_fits(need, node) for node in nodes):
            return None
        what = "one node" if len(bundles) == 1 else f"one node (STRICT_PACK of {len(bundles)} bundles)"
        return f"no node can hold {_show(need)} for {what}; nodes offer {offered}"
    if strategy == "STRICT_SPREAD":
        usable = [n for n in nodes if all(_fits(b, n) for b in bundles)]
        if len(usable) >= len(bundles):
            return None
        return f"STRICT_SPREAD needs {len(bundles)} nodes that each hold {_show(bundles[0])}; nodes offer {offered}"
    for bundle in bundles:
        if not any(_fits(bundle, node) for node in nodes):
            return f"no node can hold the bundle {_show(bundle)}; nodes offer {offered}"
    if not _fits(_total(bundles), _total(nodes)):
        return f"the cluster in total cannot hold {_show(_total(bundles))}; nodes offer {offered}"
    return None
