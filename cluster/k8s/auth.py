"""Ray token authentication on Kubernetes, through KubeRay's own mechanism (`authOptions`, KubeRay >= 1.5.1).

With `authOptions: {mode: token, secretName: S}` the operator adds `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN`
(from key `auth_token` of Secret S) to every Ray container, the autoscaler's included, and its own dashboard
client reads the same Secret; it creates no Secret of its own when `secretName` is set. The Secret is the user's:
created once per namespace (`kubectl create secret generic ...`, see k8s/README.md), never part of the
kustomize tree, so that `kubectl apply -k` can never overwrite a real token with a placeholder. A token that
outlives RayCluster upgrades (NewCluster) keeps clients working across them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AUTH_SECRET", "AUTH_TOKEN_KEY", "auth_options", "create_secret_command", "secret_template"]

AUTH_SECRET = "modelfleet-ray-auth"
# KubeRay's key (RAY_AUTH_TOKEN_SECRET_KEY) in the Secret it reads.
AUTH_TOKEN_KEY = "auth_token"


def auth_options(secret_name: str = AUTH_SECRET) -> dict[str, Any]:
    """The RayCluster `authOptions` that turn token authentication on with the named Secret."""
    return {"mode": "token", "secretName": secret_name}


def secret_template(secret_name: str = AUTH_SECRET) -> dict[str, Any]:
    """The token Secret with an empty token, to fill in before applying it.

    Left empty, Ray refuses to start (token mode without a token), so an unfilled template can never run a
    cluster with a known token.
    """
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": secret_name},
        "type": "Opaque",
        "stringData": {AUTH_TOKEN_KEY: ""},
    }


def create_secret_command(secret_name: str = AUTH_SECRET) -> str:
    """The shell command that creates the token Secret with a fresh random token (in kubectl's namespace)."""
    return f'kubectl create secret generic {secret_name} --from-literal={AUTH_TOKEN_KEY}="$(openssl rand -hex 32)"'
