"""The Serve config a RayService deploys (its `serveConfigV2`): the app's import path with the ServingConfig as
`args`, so that the cluster compiles the same plan from the same config (`deployments.app:build_app`)."""

from __future__ import annotations

from typing import Any

from cluster.k8s.errors import RenderError
from deployments.plan import DeploymentPlan

__all__ = ["IMPORT_PATH", "POD_HOST", "serve_config"]

IMPORT_PATH = "deployments.app:build_app"
# Inside a pod Serve's proxy must listen on the pod's address, not the config's (local) router.host.
POD_HOST = "0.0.0.0"


def serve_config(plan: DeploymentPlan, *, working_dir: str) -> dict[str, Any]:
    """The Serve deploy config (Serve's `ServeDeploySchema`) of a plan.

    Deployment options are not written here: `build_app` compiles them from `args`, as everywhere else.

    Args:
        plan: the compiled plan; its config becomes the app's `args`, as written (unset fields stay unset).
        working_dir: the app's runtime_env working_dir, a URI (`local:///app` for code in the image).

    Raises:
        RenderError: the config holds API keys, which would be written in clear into the manifest, or
            router.tls (not rendered: TLS ends in front of the RayService).
    """
    config = plan.config
    if config.router.api_keys:
        raise RenderError(
            "router.api_keys would be written in clear into the RayService: render a config without them "
            "(keys from a Kubernetes Secret are not supported yet)"
        )
    if config.router.tls is not None:
        # Serve's proxy would need the key in the pod, and KubeRay's Service and probes speak plain HTTP to it.
        raise RenderError(
            "router.tls is not rendered into Kubernetes manifests: terminate TLS in front of the RayService (an "
            "Ingress or Gateway with the certificate in a TLS Secret) and render the config without router.tls"
        )
    return {
        "http_options": {"host": POD_HOST, "port": config.router.port},
        "applications": [
            {
                "name": config.name,
                "route_prefix": config.route_prefix,
                "import_path": IMPORT_PATH,
                "runtime_env": {"working_dir": working_dir},
                "args": config.model_dump(mode="json", exclude_unset=True),
            }
        ],
    }
