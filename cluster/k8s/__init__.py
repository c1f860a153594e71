"""Kubernetes manifests from a deployment plan: a KubeRay RayService per config, kustomize base and overlays.

`render_overlay` renders one config; `render_tree` renders the committed tree (`COMMITTED_OVERLAYS`) that
`modelfleet render-k8s` (`make k8s`) writes into k8s/.
"""

from __future__ import annotations

from cluster.k8s.errors import RenderError
from cluster.k8s.profile import PROFILES, RenderOptions
from cluster.k8s.rayservice import rayservice
from cluster.k8s.tree import COMMITTED_OVERLAYS, DEFAULT_OUT, PROJECT_ROOT, Overlay, render_overlay, render_tree

__all__ = [
    "COMMITTED_OVERLAYS",
    "DEFAULT_OUT",
    "PROFILES",
    "PROJECT_ROOT",
    "Overlay",
    "RenderError",
    "RenderOptions",
    "rayservice",
    "render_overlay",
    "render_tree",
]
