"""Prometheus scraping of the Ray pods: a prometheus-operator PodMonitor on every Ray pod's metrics port.

Ray exports its own, Serve's and the app's metrics on each node's metrics port (8080). The `ray_io_cluster` label
is the one Ray's Grafana dashboards filter on (as in KubeRay's Prometheus guide). A Prometheus picks PodMonitors
by its `podMonitorSelector` (kube-prometheus-stack: the label `release: <its release name>`): add that label in
an overlay where the Prometheus needs it. The Grafana dashboards (`cluster.observability`) go in a ConfigMap beside it,
labelled for Grafana's dashboard sidecar (kube-prometheus-stack loads ConfigMaps labelled `grafana_dashboard`).
"""

from __future__ import annotations

from typing import Any

from cluster.k8s.constants import APP_LABELS, METRICS_PORT_NAME
from cluster.observability.dashboards import DASHBOARDS, build, render_json

__all__ = ["DASHBOARDS_CONFIG_MAP", "POD_MONITOR", "dashboards", "dashboards_config_map", "pod_monitor"]

POD_MONITOR = "modelfleet-ray"
DASHBOARDS_CONFIG_MAP = "modelfleet-dashboards"
# The label and folder annotation that Grafana's dashboard sidecar (the Grafana Helm chart) looks for by default.
_SIDECAR_LABEL = {"grafana_dashboard": "1"}
_SIDECAR_FOLDER = {"grafana_folder": "modelfleet"}


def dashboards() -> dict[str, str]:
    """Every dashboard's JSON file text, by file name (`<uid>.json`)."""
    return {f"{board.uid}.json": render_json(build(board)[0]) for board in DASHBOARDS}


def dashboards_config_map() -> dict[str, Any]:
    """The ConfigMap holding every dashboard, for Grafana's dashboard sidecar."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": DASHBOARDS_CONFIG_MAP,
            "labels": {**APP_LABELS, **_SIDECAR_LABEL},
            "annotations": dict(_SIDECAR_FOLDER),
        },
        "data": dashboards(),
    }


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
