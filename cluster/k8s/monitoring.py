"""Prometheus scraping of the Ray pods: a prometheus-operator PodMonitor on every Ray pod's metrics port.

Ray exports its own, Serve's and the app's metrics on each node's metrics port (8080). The `ray_io_cluster` label
is the one Ray's Grafana dashboards filter on (as in KubeRay's Prometheus guide). A Prometheus picks PodMonitors
by its `podMonitorSelector` (kube-prometheus-stack: the label `release: <its release name>`): add that label in
an overlay where the Prometheus needs it. Grafana dashboards come later, as a ConfigMap beside this one.
"""

from __future__ import annotations

from typing import Any

from cluster.k8s.constants import APP_LABELS, METRICS_PORT_NAME

__all__ = ["POD_MONITOR", "pod_monitor"]

POD_MONITOR = "modelfleet-ray"


def pod_monitor() -> dict[str, Any]:
    """The PodMonitor (monitoring.coreos.com/v1) of every modelfleet Ray pod in its namespace."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": POD_MONITOR, "labels": dict(APP_LABELS)},
        "spec": {
            # KubeRay labels every Ray pod it creates `ray.io/is-ray-node: "yes"`; the app label keeps other
            # Ray clusters of the namespace out.
            "selector": {"matchLabels": {**APP_LABELS, "ray.io/is-ray-node": "yes"}},
            "podMetricsEndpoints": [
                {
                    "port": METRICS_PORT_NAME,
                    "relabelings": [
                        {
                            "action": "replace",
                            "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                            "targetLabel": "ray_io_cluster",
                        },
                        {
                            "action": "replace",
                            "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_node_type"],
                            "targetLabel": "ray_io_node_type",
                        },
                    ],
                }
            ],
        },
    }
