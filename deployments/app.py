"""build_app: turns a ServingConfig into a Serve application (the import_path of every Serve config)."""

# No `from __future__ import annotations` here: Serve reads build_app's type hint at run time to
# validate the `args:` of a Serve config into a ServingConfig.

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.api.ingress import OpenAIIngress, app
from deployments.config import ServingConfig
from deployments.replica import ModelReplica
from models.spec import ModelSpec, ResourcesConfig

__all__ = ["build_app", "placement_bundles", "replica_options"]

INGRESS_NAME = "router"


def _accelerator(resources: ResourcesConfig) -> dict[str, float]:
    # Ray advertises an accelerator as the custom resource `accelerator_type:<name>`; a tiny request for it
    # pins a bundle to such a node, exactly as the actor option `accelerator_type` does.
    if not resources.accelerator_type:
        return {}
    return {f"accelerator_type:{resources.accelerator_type}": 0.001}


def placement_bundles(spec: ModelSpec) -> list[dict[str, float]] | None:
    """One bundle per tensor/pipeline-parallel worker, or None for a single-worker replica.

    As in Ray Serve LLM, the first bundle also holds the replica actor itself (CPUs only): the engine's
    workers, started by vLLM inside this placement group, take the GPUs. CPU-only specs get CPU bundles.
    """
    world = spec.parallelism.world_size
    if world == 1:
        return None
    r = spec.resources
    if r.num_gpus > 0:
        worker = {"GPU": r.num_gpus, **_accelerator(r)}
        first = {"CPU": r.num_cpus, **worker}
    else:
        worker = {"CPU": r.num_cpus}
        first = {"CPU": 2 * r.num_cpus}
    return [first] + [dict(worker) for _ in range(world - 1)]


def replica_options(spec: ModelSpec) -> dict[str, Any]:
    """Serve deployment options for one model: name, replicas or autoscaling, and Ray placement."""
    r = spec.resources
    bundles = placement_bundles(spec)
    actor: dict[str, Any] = {"num_cpus": r.num_cpus}
    if bundles is None:
        # A single worker runs inside the replica: the replica itself holds the GPU (Ray then sets
        # CUDA_VISIBLE_DEVICES for it) and lands on a node of the asked accelerator type.
        actor["num_gpus"] = r.num_gpus
        if r.accelerator_type:
            actor["accelerator_type"] = r.accelerator_type
    if r.memory_gb:
        actor["memory"] = int(r.memory_gb * 2**30)
    scaling = spec.scaling
    options: dict[str, Any] = {
        "name": spec.deployment_name,
        "ray_actor_options": actor,
        "max_ongoing_requests": scaling.max_ongoing_requests,
        # Loading weights and a warm-up answer can take minutes on a busy CPU.
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 10,
        # A replica whose engine cannot start (bad weights path, GPUs on a CPU build) fails the same way
        # every time: report it after 3 tries instead of Serve's default 20.
        "max_constructor_retry_count": 3,
    }
    if bundles is not None:
        options["placement_group_bundles"] = bundles
        options["placement_group_strategy"] = spec.parallelism.placement_strategy
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
        spec.id: serve.deployment(ModelReplica).options(**replica_options(spec)).bind(spec) for spec in config.models
    }
    ingress = serve.deployment(serve.ingress(app)(OpenAIIngress)).options(
        name=INGRESS_NAME,
        num_replicas=config.router.num_replicas,
        max_ongoing_requests=config.router.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.router.num_cpus},
    )
    return ingress.bind(config, replicas)
