"""Batch jobs through Ray's job API (`JobSubmissionClient`): submit one, read its state and progress, stop it.

Shared by the CLI (`cluster.jobs`, from outside the cluster) and the HTTP Batches API (from the ingress replica,
inside it). These calls block (the SDK uses `requests`): the HTTP API runs them in a thread. The caller makes the
client send the cluster's token (Ray's SDK sends it whenever this process runs in token mode).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deployments.batch.progress import Progress, last_progress
from deployments.batch.spec import BatchJobSpec

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

__all__ = ["JOB_KIND", "JobAPIError", "JobState", "connect", "job_state", "stop_job", "submit_job"]

#: metadata `kind` of the jobs modelfleet submits.
JOB_KIND = "modelfleet-batch"
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_POLL_S = 1.0
# Ray's job agent registers some seconds after the dashboard: until then a submission is answered 500 with this
# text (ray/dashboard/modules/job/job_head.py) and no job is created, so it is safe to send again.
_AGENT_NOT_READY = "No available agent to submit job"


class JobAPIError(RuntimeError):
    """Raised when Ray's job API cannot be reached, refuses a call, or does not know the job (message says which)."""


@dataclass(frozen=True)
class JobState:
    """A batch job as Ray's job API reports it, with the progress its log reports."""

    job_id: str
    status: str  # Ray's JobStatus: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str
    progress: Progress | None  # None until the job has counted its input
    metadata: dict[str, str] = field(default_factory=dict)
    start_time_s: float | None = None
    end_time_s: float | None = None

    @property
    def done(self) -> bool:
        """Whether the job has ended (succeeded, failed or stopped)."""
        return self.status in _TERMINAL


def connect(address: str, *, timeout_s: float) -> JobSubmissionClient:
    """A job client of the cluster whose job API (dashboard) is at `address`, retried while it does not answer.

    Raises:
        JobAPIError: nothing answered within `timeout_s`, or it answered and refused this client.
    """
    from ray.job_submission import JobSubmissionClient

    # At INFO, Ray lists every file a working_dir upload skips.
    logging.getLogger("ray").setLevel(logging.WARNING)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return JobSubmissionClient(address)
        except ConnectionError as exc:
            if time.monotonic() > deadline:
                raise JobAPIError(f"cannot reach the job API at {address} ({timeout_s:.0f} s): {exc}") from None
        except RuntimeError as exc:  # it answered, and refused (a wrong token, an old Ray)
            raise JobAPIError(f"the job API at {address} refused this client: {exc}") from None
        time.sleep(_POLL_S)


def submit_job(
    client: JobSubmissionClient,
    spec: BatchJobSpec,
    *,
    job_id: str,
    python: str,
    runtime_env: dict[str, Any] | None,
    metadata: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> str:
    """Submit the batch job `spec` as `job_id`; its driver runs `python -m deployments.batch.job`.

    Args:
        python: the cluster's interpreter (the job's shell need not have it on its PATH).
        runtime_env: where the job finds the code (a `working_dir`, or a PYTHONPATH in `env_vars`).
        metadata: more job metadata, beside the kind, model and files.
        timeout_s: how long to retry while the cluster's job agent has not registered yet.

    Returns:
        The job id.

    Raises:
        JobAPIError: the job API refused the job, or its agent never answered.
    """
    meta = {"kind": JOB_KIND, "model": spec.model.spec.versioned_id, "input": spec.input, "output": spec.output}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(
                entrypoint=spec.entrypoint(python),
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata={**meta, **(metadata or {})},
            )
        except RuntimeError as exc:
            # The SDK raises a bare RuntimeError carrying the HTTP answer, so only its text tells this case apart.
            if _AGENT_NOT_READY not in str(exc):
                raise JobAPIError(f"the job API refused the batch job: {exc}") from None
            if time.monotonic() > deadline:
                raise JobAPIError(
                    f"the cluster's job agent did not answer in {timeout_s:.0f} s. Ray's dashboard agents listen on "
                    "port 52365 unless told otherwise: if another Ray cluster on this machine holds it, this one "
                    "cannot take jobs (its dashboard_agent.log says 'address already in use')"
                ) from None
        time.sleep(_POLL_S)


def job_state(client: JobSubmissionClient, job_id: str) -> JobState:
    """The job's state, and its progress read from its log.

    Raises:
        JobAPIError: no such job, or the job API failed.
    """
    try:
        info = client.get_job_info(job_id)
        log = client.get_job_logs(job_id)
    except RuntimeError as exc:  # the SDK raises RuntimeError for every HTTP error, 404 included
        raise JobAPIError(f"job {job_id}: {exc}") from None
    return JobState(
        job_id=job_id,
        status=str(getattr(info.status, "value", info.status)),
        message=info.message or "",
        progress=last_progress(log),
        metadata=dict(info.metadata or {}),
        start_time_s=info.start_time / 1000 if info.start_time else None,
        end_time_s=info.end_time / 1000 if info.end_time else None,
    )


def stop_job(client: JobSubmissionClient, job_id: str) -> None:
    """Ask Ray to stop the job (its driver gets SIGTERM, then SIGKILL); returns at once.

    Raises:
        JobAPIError: no such job, or the job API failed.
    """
    try:
        client.stop_job(job_id)
    except RuntimeError as exc:
        raise JobAPIError(f"job {job_id}: {exc}") from None
