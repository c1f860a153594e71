"""The RayJob of a plan: batch inference (`deployments.batch.job`, the job `modelfleet batch` and `/v1/batches` run)
on a Ray cluster of its own, created for the job and deleted after it.

Why its own cluster (`rayClusterSpec`) rather than the RayService's (`clusterSelector`): KubeRay selects a cluster
only by its `ray.io/cluster` name, and a RayService's RayCluster has a generated name that changes with every
upgrade (`upgradeStrategy: NewCluster`), so no committed manifest can name it. A cluster of its own also keeps a
long batch from taking the serving replicas' CPUs or GPUs, and costs nothing once the job ends. It is the same
cluster the RayService would run for the batch's model alone (the same pods, groups, autoscaling and files claim).

The job is not part of the overlay's kustomization, and carries no `suspend`: `kubectl apply -k` never touches
it, so re-applying the serving overlay can neither start a batch nor stop one that runs (a `suspend: true` in an
applied manifest would set a running job back to suspended, which deletes its cluster). Put the input on the files
claim, then start a run with `kubectl create -f overlays/<name>/rayjob.yaml`; delete the finished RayJob before the
next run.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from cluster.k8s.constants import APP_LABELS
from cluster.k8s.errors import RenderError
from cluster.k8s.profile import RenderOptions
from cluster.k8s.rayservice import rayservice
from cluster.k8s.storage import FILES_MOUNT
from deployments.batch.spec import BatchJobSpec
from deployments.plan import DeploymentPlan, compile_plan

__all__ = ["BATCH_CLAIM", "BATCH_MOUNT", "batch_model", "rayjob"]

#: The files claim the job reads its input from and writes its output to, unless the overlay names its own.
BATCH_CLAIM = "modelfleet-batch"
BATCH_MOUNT = FILES_MOUNT
# The job's cluster stays this long after the job ends (its logs can still be read), then KubeRay deletes it.
_TTL_AFTER_FINISHED_S = 600
# KubeRay names the job's RayCluster after it, with a suffix; the same bound as a RayService's name.
_MAX_NAME = 47
_PYTHON = "python"  # the image's interpreter


def batch_model(plan: DeploymentPlan) -> str:
    """The model the RayJob runs: the config's first generating model a batch can run (one worker per engine),
    else its first such model of any task.

    Raises:
        RenderError: every model runs tensor/pipeline parallel, which batch jobs do not.
    """
    single = [m.spec for m in plan.models if m.spec.parallelism.world_size == 1]
    if not single:
        raise RenderError("no model of the config runs on one worker: batch jobs run single-worker engines only")
    return next((s for s in single if s.task == "generate"), single[0]).id


def _runtime_env(working_dir: str) -> str:
    if working_dir.startswith("local://"):
        # Code in the image: on the path of the driver and of every Ray Data worker.
        return f"env_vars:\n  PYTHONPATH: {working_dir.removeprefix('local://')}\n"
    return f"working_dir: {working_dir}\n"


def rayjob(plan: DeploymentPlan, options: RenderOptions) -> dict[str, Any]:
    """The RayJob (ray.io/v1) that runs `batch_model(plan)` over `BATCH_MOUNT/input.jsonl` on the batch claim,
    writing `output.jsonl` (answered lines) and `errors.jsonl` (failed lines) beside it.

    Raises:
        RenderError: as `rayservice` for the model's cluster, or no model a batch can run.
    """
    model_id = batch_model(plan)
    config = plan.config
    name = f"{config.name}-batch"
    if len(name) > _MAX_NAME:
        raise RenderError(f"the RayJob's name '{name}' is longer than {_MAX_NAME} characters: shorten the app name")
    alone = compile_plan(config.model_copy(update={"models": tuple(m for m in config.models if m.id == model_id)}))
    # Every pod mounts the files claim: the driver (on the head) writes the output, read tasks run on workers.
    with_files = options.model_copy(update={"files_pvc": options.files_pvc or BATCH_CLAIM})
    cluster = rayservice(alone, with_files)["spec"]["rayClusterConfig"]
    # The job's head lives as long as its driver: no Redis of its own, and outside the serving head's
    # PodDisruptionBudget.
    cluster.pop("gcsFaultToleranceOptions", None)
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        labels = group["template"]["metadata"]["labels"]
        labels["app.kubernetes.io/component"] = "batch-" + labels["app.kubernetes.io/component"]
    files = PurePosixPath(BATCH_MOUNT)
    model_plan = alone.model(model_id)
    if model_plan is None:  # compile_plan keeps every model it is given
        raise RenderError(f"model '{model_id}' has no plan")
    spec = BatchJobSpec(
        model=model_plan,
        input=str(files / "input.jsonl"),
        output=str(files / "output.jsonl"),
        errors=str(files / "errors.jsonl"),
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": dict(APP_LABELS)},
        "spec": {
            "entrypoint": spec.entrypoint(_PYTHON),
            "runtimeEnvYAML": _runtime_env(options.working_dir),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": _TTL_AFTER_FINISHED_S,
            "rayClusterSpec": cluster,
        },
    }
