"""Batch inference as Ray jobs: the models of a serving config, run over an OpenAI batch file with Ray Data."""

from __future__ import annotations

from cluster.jobs.client import BatchError, BatchStatus, build_spec, cancel, job_address, logs, status, submit, wait
from deployments.batch.progress import Progress
from deployments.batch.spec import BatchJobSpec

__all__ = [
    "BatchError",
    "BatchJobSpec",
    "BatchStatus",
    "Progress",
    "build_spec",
    "cancel",
    "job_address",
    "logs",
    "status",
    "submit",
    "wait",
]
