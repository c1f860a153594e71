"""An Ingress in front of the RayService that ends TLS (Serve's proxy speaks plain HTTP inside the cluster).

It routes the host to KubeRay's serve Service (`<app>-serve-svc`, the Serve port), which holds only the pods whose
proxies answer. The certificate is a `kubernetes.io/tls` Secret of the user's (cert-manager, or `kubectl create
secret tls`). The annotations are ingress-nginx's, read from the config: the read and send timeouts follow the
router's request timeout (nginx's 60 s would cut long generations), buffering is off so streamed tokens reach the
client as they come, and the body limit is the Files API's largest upload. Other controllers ignore them.
"""

from __future__ import annotations

import math
from typing import Any

from cluster.k8s.constants import APP_LABELS
from deployments.config import ServingConfig

__all__ = ["TLS_SECRET", "ingress", "serve_service"]

TLS_SECRET = "modelfleet-tls"


def serve_service(app_name: str) -> str:
    """The Service KubeRay creates for a RayService's Serve proxies."""
    return f"{app_name}-serve-svc"


def ingress(config: ServingConfig, *, host: str, ingress_class: str, tls_secret: str = TLS_SECRET) -> dict[str, Any]:
    """The Ingress (networking.k8s.io/v1) that serves `host` over HTTPS from the app's serve Service."""
    timeout_s = str(math.ceil(config.router.request_timeout_s))
    backend = {"service": {"name": serve_service(config.name), "port": {"number": config.router.port}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": config.name,
            "labels": dict(APP_LABELS),
            "annotations": {
                "nginx.ingress.kubernetes.io/proxy-read-timeout": timeout_s,
                "nginx.ingress.kubernetes.io/proxy-send-timeout": timeout_s,
                "nginx.ingress.kubernetes.io/proxy-buffering": "off",
                "nginx.ingress.kubernetes.io/proxy-body-size": str(config.batches.max_file_bytes),
            },
        },
        "spec": {
            "ingressClassName": ingress_class,
            "tls": [{"hosts": [host], "secretName": tls_secret}],
            "rules": [
                {
                    "host": host,
                    "http": {
                        "paths": [
                            {"path": config.route_prefix, "pathType": "Prefix", "backend": backend},
                        ]
                    },
                }
            ],
        },
    }
