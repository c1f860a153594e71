"""Batch inference over OpenAI batch files, shared by the CLI's Ray jobs and the HTTP Batches API: the line format,
the job spec, the worker that runs a model's engine, the job's driver, and the job API calls."""

from __future__ import annotations

from deployments.batch.progress import Progress
from deployments.batch.spec import BatchJobSpec

__all__ = ["BatchJobSpec", "Progress"]
