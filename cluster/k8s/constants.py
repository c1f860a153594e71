"""Names that several manifest modules must agree on: the app label, the Ray container ports."""

from __future__ import annotations

__all__ = [
    "APP_LABELS",
    "METRICS_PORT",
    "METRICS_PORT_NAME",
    "SERVE_PORT_NAME",
]

# On every object and Ray pod the renderer writes; the PodMonitor selects Ray pods by it. Fixed (not the config's
# app name) so that one base serves every overlay.
APP_LABELS = {"app.kubernetes.io/name": "modelfleet"}
# Ray's Prometheus endpoint on every node (KubeRay's default `metrics-export-port`, stated explicitly).
METRICS_PORT = 8080
METRICS_PORT_NAME = "metrics"
# KubeRay's serve Service targets the container port with this name.
SERVE_PORT_NAME = "serve"
