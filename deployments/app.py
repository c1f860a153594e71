"""build_app: turns a ServingConfig into a Serve application (the import_path of every Serve config)."""

# No `from __future__ import annotations` here: Serve reads build_app's type hint at run time to
# validate the `args:` of a Serve config into a ServingConfig.

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.api.ingress import OpenAIIngress, app
from deployments.config import ServingConfig
from deployments.replica import ModelReplica
from models.spec import ModelSpec

__all__ = ["build_app", "replica_options"]

INGRESS_NAME = "router"


def replica_options(spec: ModelSpec) -> dict[str, Any]:
    """Serve deployment options for one model: name, replicas or autoscaling, and Ray resources."""
    actor: dict[str, Any] = {"num_cpus": spec.resources.num_cpus, "num_gpus": spec.resources.num_gpus}
    if spec.resources.accelerator_type:
        actor["accelerator_type"] = spec.resources.accelerator_type
    if spec.resources.memory_gb:
        actor["memory"] = int(spec.resources.memory_gb * 2**30)
    scaling = spec.scaling
    options: dict[str, Any] = {
        "name": spec.deployment_name,
        "ray_actor_options": actor,
        "max_ongoing_requests": scaling.max_ongoing_requests,
        # Loading weights and a warm-up answer can take minutes on a busy CPU.
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 10,
    }
    if scaling.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "initial_replicas": scaling.initial_replicas
            if scaling.initial_replicas is not None
            else max(scaling.min_replicas, 1),
            "target_ongoing_requests": scaling.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = scaling.max_replicas
    return options


def build_app(args: ServingConfig) -> Application:
    """Build the modelfleet app: one ModelReplica deployment per model behind one OpenAI router.

    Args:
        args: the serving config (a dict from a Serve YAML is validated into one).

    Returns:
        The Serve application; deploy it with `serve.run` or a Serve config's `import_path`.
    """
    config = args if isinstance(args, ServingConfig) else ServingConfig.model_validate(args)
    replicas = {
        spec.id: serve.deployment(ModelReplica).options(**replica_options(spec)).bind(spec)
        for spec in config.models
    }
    ingress = serve.deployment(serve.ingress(app)(OpenAIIngress)).options(
        name=INGRESS_NAME,
        num_replicas=config.router.num_replicas,
        max_ongoing_requests=config.router.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.router.num_cpus},
    )
    return ingress.bind(config, replicas)
