"""Batch jobs seen from the client: submit one through Ray's job API (with the cluster's token), follow it, stop it.

Every function returns values and prints nothing (`modelfleet batch` prints). The job itself reads the input and
writes the output at the paths given, on the node its driver runs on: on the local cluster that is this machine.
On a remote cluster those paths would have to exist there (a shared volume); uploading the input and fetching
the output is not done here.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.auth_token import use_token
from cluster.deploy import _WORKING_DIR_EXCLUDES, PROJECT_ROOT
from cluster.local import ClusterError, ClusterState
from deployments.batch.progress import Progress
from deployments.batch.spec import BatchJobSpec, partial_path
from deployments.batch.submission import JobAPIError, JobState, connect, job_state, stop_job, submit_job
from deployments.config import ServingConfig
from deployments.plan import PlanError, plan_model
from models.spec import served_names

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

__all__ = [
    "BatchError",
    "BatchStatus",
    "build_spec",
    "cancel",
    "job_address",
    "logs",
    "status",
    "submit",
    "wait",
]

_POLL_S = 1.0
# Ray's dashboard, which serves the job API, opens some seconds after the head (`modelfleet up` returns before),
# and its job agent registers later still.
_CONNECT_TIMEOUT_S = 60.0


class BatchError(ClusterError):
    """Raised when a batch job cannot be submitted, found, followed or stopped (the message says why)."""


@dataclass(frozen=True)
class BatchStatus:
    """A batch job as `modelfleet batch status` shows it."""

    job_id: str
    status: str  # Ray's JobStatus: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str
    progress: Progress | None  # None until the job has counted its input
    model: str
    input: str
    output: str
    start_time_s: float | None
    end_time_s: float | None

    @property
    def done(self) -> bool:
        """Whether the job has ended (succeeded, failed or stopped)."""
        return JobState(self.job_id, self.status, self.message, self.progress).done

    @property
    def partial_output(self) -> str:
        """Where the lines written so far are, until the job succeeds and renames the file to `output`."""
        return partial_path(self.output)


def job_address(state: ClusterState) -> str:
    """The job API address of the local cluster.

    Raises:
        BatchError: the cluster was started without the dashboard, which serves the job API.
    """
    if state.dashboard_port is None:
        raise BatchError(
            "the local cluster runs without Ray's dashboard, which takes job submissions: "
            "`modelfleet down`, then `modelfleet up` without --no-dashboard"
        )
    return f"http://127.0.0.1:{state.dashboard_port}"


def build_spec(
    config: ServingConfig,
    model_id: str,
    input_path: str | Path,
    output_path: str | Path,
    *,
    engine_cpus: str | None = None,
    batch_size: int | None = None,
    concurrency: int | None = None,
) -> BatchJobSpec:
    """The job spec of running `model_id` of `config` over `input_path` (paths made absolute, on this machine).

    `model_id` is named as requests name it: `id@version`, or the bare id for the default version.

    Args:
        engine_cpus: the cluster's engine cores (`ClusterState.engine_cpus`), handed to the engine as a replica's.
        batch_size: input lines per batch (default: BatchJobSpec's).
        concurrency: engines at once (default: BatchJobSpec's).

    Raises:
        BatchError: no such model, a model the batch runner cannot place (tensor/pipeline parallel), a plan error,
            a missing input, or an output that would overwrite the input.
    """
    names = served_names(config.models)
    spec = names.get(model_id)
    if spec is None:
        known = ", ".join(names)
        raise BatchError(f"config '{config.name}' has no model '{model_id}' (models: {known})")
    if spec.parallelism.world_size > 1:
        raise BatchError(
            f"model '{model_id}' runs on {spec.parallelism.world_size} workers (tensor/pipeline parallel); "
            "batch jobs run single-worker engines only"
        )
    try:
        plan = plan_model(spec, engine_cpus=engine_cpus)
    except PlanError as exc:
        raise BatchError(str(exc)) from None
    source, output = Path(input_path).resolve(), Path(output_path).resolve()
    if not source.is_file():
        raise BatchError(f"input {source} does not exist or is not a file")
    if output == source:
        raise BatchError("the output must not be the input file")
    given = {"batch_size": batch_size, "concurrency": concurrency}
    fields: dict[str, object] = {key: value for key, value in given.items() if value is not None}
    if model_id != spec.versioned_id:  # the bare id of the default version: the lines may name it so
        fields["names"] = (model_id,)
    return BatchJobSpec.model_validate({"model": plan, "input": str(source), "output": str(output), **fields})


def _client(address: str, connect_timeout_s: float = _CONNECT_TIMEOUT_S) -> JobSubmissionClient:
    # The job API checks the same token as the rest of the cluster; the client sends it only in token mode,
    # reading the file that use_token() names (ray._private.authentication.http_token_authentication).
    use_token()
    try:
        return connect(address, timeout_s=connect_timeout_s)
    except JobAPIError as exc:
        raise BatchError(str(exc)) from None


def submit(spec: BatchJobSpec, *, address: str, python: str = sys.executable) -> str:
    """Submit the batch job; it ships the repository as its working_dir, as `deploy` does.

    Args:
        spec: the job (see `build_spec`).
        address: the cluster's job API (`job_address`).
        python: the cluster's Python; this process's on the local cluster (the same virtualenv), whose `bin`
            need not be on the PATH the job's shell gets.

    Returns:
        The job id (its submission id).

    Raises:
        BatchError: the job API refused the job or cannot be reached.
    """
    client = _client(address)
    try:
        return submit_job(
            client,
            spec,
            job_id=f"batch-{uuid.uuid4().hex[:12]}",
            python=python,
            runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": _WORKING_DIR_EXCLUDES},
            timeout_s=_CONNECT_TIMEOUT_S,
        )
    except JobAPIError as exc:
        raise BatchError(str(exc)) from None


def _info_status(client: JobSubmissionClient, job_id: str) -> BatchStatus:
    try:
        state: JobState = job_state(client, job_id)
    except JobAPIError as exc:
        raise BatchError(str(exc)) from None
    meta = state.metadata
    return BatchStatus(
        job_id=job_id,
        status=state.status,
        message=state.message,
        progress=state.progress,
        model=meta.get("model", ""),
        input=meta.get("input", ""),
        output=meta.get("output", ""),
        start_time_s=state.start_time_s,
        end_time_s=state.end_time_s,
    )


def status(job_id: str, *, address: str) -> BatchStatus:
    """The job's state and progress (from the progress lines of its log).

    Raises:
        BatchError: no such job, or the job API cannot be reached.
    """
    return _info_status(_client(address), job_id)


def logs(job_id: str, *, address: str) -> str:
    """Everything the job has logged so far (its driver and, through Ray, its engines).

    Raises:
        BatchError: no such job, or the job API cannot be reached.
    """
    try:
        return _client(address).get_job_logs(job_id)
    except RuntimeError as exc:
        raise BatchError(f"job {job_id}: {exc}") from None


def wait(
    job_id: str,
    *,
    address: str,
    timeout_s: float,
    on_progress: Callable[[BatchStatus], None] = lambda s: None,
) -> BatchStatus:
    """Poll the job until it ends; `on_progress` gets each status whose state or progress changed.

    Raises:
        BatchError: it did not end within `timeout_s` (it keeps running), or the job API failed.
    """
    client = _client(address)
    deadline = time.monotonic() + timeout_s
    seen: tuple[str, Progress | None] | None = None
    while True:
        current = _info_status(client, job_id)
        if (current.status, current.progress) != seen:
            seen = (current.status, current.progress)
            on_progress(current)
        if current.done:
            return current
        if time.monotonic() > deadline:
            raise BatchError(f"job {job_id} was still {current.status} after {timeout_s:.0f} s; it keeps running")
        time.sleep(_POLL_S)


def cancel(job_id: str, *, address: str, timeout_s: float = 60.0) -> BatchStatus:
    """Stop the job (Ray sends its driver SIGTERM, then SIGKILL) and wait until it has ended.

    Lines already written stay in the partial output (`BatchStatus.partial_output`); the output path is written
    only by a job that finished.

    Returns:
        The job's final status: STOPPED, or SUCCEEDED/FAILED when it had already ended.

    Raises:
        BatchError: no such job, the job API failed, or the job did not end within `timeout_s`.
    """
    try:
        stop_job(_client(address), job_id)
    except JobAPIError as exc:
        raise BatchError(str(exc)) from None
    return wait(job_id, address=address, timeout_s=timeout_s)
