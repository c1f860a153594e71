"""Replicas that never started, released at once when their deployment goes away.

Serve stops a replica by asking it to shut down and waiting up to `graceful_shutdown_timeout_s` (the plan sets
`request_timeout_s` + 5 s, so long streams can finish) before it kills the actor. A replica whose actor was never
placed cannot answer that call, so deleting, or scaling down, a model that cannot be placed took that whole drain
(305 s by default) for no request at all. Its actor holds nothing, so killing it loses nothing; Serve then sees it
gone and finishes the stop.
"""

from __future__ import annotations

from collections.abc import Iterable

from deployments.plan import ROUTER_DEPLOYMENT, DeploymentPlan

__all__ = ["release_every_unstarted", "release_leaving", "release_unstarted_replicas"]

# GCS states of an actor whose process never ran its constructor.
_NEVER_STARTED = frozenset({"DEPENDENCIES_UNREADY", "PENDING_CREATION"})


def release_unstarted_replicas(app_name: str, deployments: Iterable[str]) -> list[str]:
    """Kill the never-started replica actors of these deployments of the app.

    Only for deployments on their way out: a deployment that is still wanted would start the replica again.

    Returns:
        The names of the actors killed.
    """
    import ray
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX
    from ray.serve._private.constants import SERVE_NAMESPACE

    prefixes = tuple(f"{REPLICA_ID_FULL_ID_STR_PREFIX}{app_name}#{name}#" for name in deployments)
    if not prefixes:
        return []
    # The GCS actor table: Ray's state API would answer the same through the dashboard, which may not run.
    table = ray._private.state.actors()  # noqa: SLF001
    killed = []
    for info in table.values():
        name = info.get("Name") or ""
        if info.get("State") not in _NEVER_STARTED or not name.startswith(prefixes):
            continue
        try:
            ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)
        except ValueError:  # gone meanwhile
            continue
        killed.append(name)
    return killed


def release_every_unstarted() -> None:
    """Release the never-started replicas of every app (Serve is shutting down)."""
    from ray import serve

    try:
        applications = serve.status().applications
    except Exception:  # noqa: BLE001 - the controller is going away
        return
    for name, app in applications.items():
        release_unstarted_replicas(name, app.deployments)


def release_leaving(app_name: str, plan: DeploymentPlan, unplaceable: dict[str, str]) -> None:
    """Release the never-started replicas of the app's deployments that are going: no longer in the plan, or
    unplaceable and scaling down (`cluster.unstarted`)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return
    wanted = {model.deployment_name for model in plan.models} | {ROUTER_DEPLOYMENT}
    leaving = [
        name
        for name, deployment in app.deployments.items()
        if name not in wanted or (name in unplaceable and deployment.replica_states.get("STOPPING", 0))
    ]
    release_unstarted_replicas(app_name, leaving)
