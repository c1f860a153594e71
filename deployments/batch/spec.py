"""BatchJobSpec: everything a batch job runs with, handed from the submitting client to the job's entrypoint."""

from __future__ import annotations

import shlex

from pydantic import Field

from deployments.plan import ModelPlan
from models.spec import FrozenModel

__all__ = ["ENTRYPOINT_MODULE", "BatchJobSpec", "partial_path"]

#: The module the job's driver runs (`python -m ENTRYPOINT_MODULE SPEC_JSON`).
ENTRYPOINT_MODULE = "deployments.batch.job"


def partial_path(output: str) -> str:
    """Where a job writes its output until every line is there; renamed to `output` when the job succeeds."""
    return output + ".partial"


class BatchJobSpec(FrozenModel):
    """One batch job: the model's plan (what its replicas start with), the files, and how the work is split."""

    model: ModelPlan = Field(description="The plan of the model that answers every line (its engine and resources).")
    input: str = Field(description="Absolute path of the input JSONL file (OpenAI batch format) on the cluster.")
    output: str = Field(description="Absolute path of the output JSONL file the job writes on the cluster.")
    errors: str | None = Field(
        None,
        description="Absolute path of a second output file that takes the failed lines (OpenAI's error file); "
        "None: every line goes to `output`.",
    )
    endpoint: str | None = Field(
        None,
        description="The one url every line must name (OpenAI's batch `endpoint`); None: any url the model serves.",
    )
    names: tuple[str, ...] = Field(
        (),
        description="More names a line's `body.model` may give the model besides its `id@version` (the bare id "
        "of the default version, when the batch was asked for by it).",
    )
    batch_size: int = Field(
        16, ge=1, le=4096, description="Input lines per batch handed to an engine; they run concurrently."
    )
    concurrency: int = Field(1, ge=1, le=64, description="Engines (Ray Data actors) working at once, one per actor.")

    def entrypoint(self, python: str) -> str:
        """The shell command of the job's driver, run with the cluster's interpreter `python`."""
        return f"{shlex.quote(python)} -m {ENTRYPOINT_MODULE} {shlex.quote(self.model_dump_json())}"
