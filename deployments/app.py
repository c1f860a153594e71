"""build_app: turns a ServingConfig, through its deployment plan, into a Serve application (the import_path of
every Serve config)."""

# No `from __future__ import annotations` here: Serve reads build_app's type hint at run time to
# validate the `args:` of a Serve config into a ServingConfig.

from ray import serve
from ray.serve import Application, Deployment

from deployments.api.ingress import OpenAIIngress, app
from deployments.config import ServingConfig
from deployments.plan import DeploymentPlan, compile_plan
from deployments.replica import ModelReplica

__all__ = ["build_app", "build_app_from_plan"]


def build_app(args: ServingConfig) -> Application:
    """Build the modelfleet app: one ModelReplica deployment per model behind one OpenAI router.

    Args:
        args: the serving config (a dict from a Serve YAML is validated into one).

    Returns:
        The Serve application; deploy it with `serve.run` or a Serve config's `import_path`.

    Raises:
        PlanError: a model's engine settings contradict each other or the spec.
    """
    config = args if isinstance(args, ServingConfig) else ServingConfig.model_validate(args)
    return build_app_from_plan(compile_plan(config))


def build_app_from_plan(plan: DeploymentPlan) -> Application:
    """Build the app of an already compiled plan (what `modelfleet deploy` does, with its node's CPU split).

    Each deployment carries the plan's code version for it. Without one, Serve gives every deployment of a
    `serve.run` a new random version, and so restarts every replica on every redeploy; with it, a redeploy restarts
    only the replicas of models whose plan changed, and rolls the router over (it is built from the whole config).
    Serve 2.60 keeps `version` as an internal option only (`_internal=True`), which is what it uses itself.
    """
    replicas = {
        model.spec.versioned_id: _versioned(
            serve.deployment(ModelReplica).options(**model.serve_options), model.code_version
        ).bind(model)
        for model in plan.models
    }
    ingress = _versioned(
        serve.deployment(serve.ingress(app)(OpenAIIngress)).options(**plan.router_options), plan.router_version
    )
    return ingress.bind(plan.config, replicas, plan.models, plan.pipelines)


def _versioned(deployment: Deployment, version: str) -> Deployment:
    return deployment.options(version=version, _internal=True)
