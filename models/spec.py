"""ModelSpec: the one schema that describes a model the cluster serves."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "BatchingConfig",
    "FrozenModel",
    "ModelSpec",
    "ParallelismConfig",
    "ResourcesConfig",
    "ScalingConfig",
]

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class FrozenModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ResourcesConfig(FrozenModel):
    """What one replica of the model asks Ray for."""

    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs reserved for each replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved for each replica (0 on CPU-only machines).")
    accelerator_type: str | None = Field(
        None,
        description="Ray accelerator type the replica must land on, e.g. 'H100' or 'A10G'. Needs num_gpus > 0.",
    )
    memory_gb: float | None = Field(
        None, gt=0, description="Heap memory (GiB) Ray reserves for each replica; unset reserves none."
    )

    @model_validator(mode="after")
    def _accelerator_needs_gpu(self) -> ResourcesConfig:
        if self.accelerator_type is not None and self.num_gpus <= 0:
            raise ValueError(
                "`accelerator_type` is set but `num_gpus` is 0: set `num_gpus` >= 1 or remove `accelerator_type`"
            )
        return self


class ScalingConfig(FrozenModel):
    """How many replicas run, and when Serve adds or removes them."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running (0 allows scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas the autoscaler may start.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas started at deploy time; defaults to min_replicas (at least 1)."
    )
    target_ongoing_requests: float = Field(4.0, gt=0, description="Autoscaling target: in-flight requests per replica.")
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="Most requests one replica holds at once; more queue in the router. Keep it above the batch size.",
    )
    max_queued_requests: int = Field(
        256,
        ge=-1,
        description=(
            "Most requests that may wait for this model's replicas at each router replica when every replica "
            "holds max_ongoing_requests; past it requests get a 429 with Retry-After. -1: wait without bound."
        ),
    )

    @model_validator(mode="after")
    def _bounds(self) -> ScalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"`min_replicas` ({self.min_replicas}) is above `max_replicas` ({self.max_replicas}): "
                "raise max_replicas or lower min_replicas"
            )
        if self.max_queued_requests == 0:
            raise ValueError("`max_queued_requests` must be -1 (no bound) or at least 1")
        if self.initial_replicas is not None and not (self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("`initial_replicas` must lie between `min_replicas` and `max_replicas`")
        return self

    @property
    def autoscaling(self) -> bool:
        """True when Serve should autoscale between min and max replicas."""
        return self.max_replicas > self.min_replicas


class BatchingConfig(FrozenModel):
    """Dynamic batching of concurrent requests inside one replica's engine."""

    max_batch_size: int = Field(8, ge=1, le=1024, description="Most requests run together in one batch.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="How long a batch waits for more requests before it runs (seconds)."
    )


class ParallelismConfig(FrozenModel):
    """How one replica spreads over several workers (vLLM only): one placement-group bundle per worker."""

    tensor_parallel_size: int = Field(1, ge=1, le=64, description="Workers that split each layer (vLLM).")
    pipeline_parallel_size: int = Field(1, ge=1, le=64, description="Workers that split the layer stack (vLLM).")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK",
        description="Ray placement strategy of the workers' bundles; STRICT_PACK keeps them on one node.",
    )

    @property
    def world_size(self) -> int:
        """Workers per replica: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


class ModelSpec(FrozenModel):
    """One model the cluster serves: what it is, which engine runs it, and what it costs."""

    id: str = Field(description="The model name clients send in the `model` field, e.g. 'smollm2'.")
    task: Literal["generate", "embed"] = Field(
        description="'generate' serves /v1/chat/completions and /v1/completions; 'embed' serves /v1/embeddings."
    )
    engine: Literal["vllm", "transformers", "echo"] = Field(
        description=(
            "Engine that runs the model: 'vllm' (LLMs), 'transformers' (PyTorch: embeddings, small models) "
            "or 'echo' (deterministic, no ML)."
        )
    )
    source: str | None = Field(
        None,
        description=(
            "Where the weights come from: a packaged model name (see `modelfleet models`) or a path to a "
            "local model folder. Not used by the echo engine."
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight dtype; 'auto' is float32 on CPU, and on GPU bfloat16 (transformers) or vLLM's choice.",
    )
    context_length: int | None = Field(
        None, ge=16, description="Most tokens (prompt + output) per request; defaults to the model's own limit."
    )
    max_output_tokens: int = Field(1024, ge=1, description="Upper bound for `max_tokens` in one request.")
    normalize: bool = Field(True, description="Embeddings only: L2-normalise each vector.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray resources per replica.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Replica counts and autoscaling.")
    batching: BatchingConfig = Field(
        default_factory=BatchingConfig,
        description="Dynamic batching in the engine (transformers; vLLM batches continuously by itself).",
    )
    parallelism: ParallelismConfig = Field(
        default_factory=ParallelismConfig, description="Tensor/pipeline parallel workers per replica (vLLM)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Engine-specific options, passed through and checked by the engine."
    )

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not _MODEL_ID.match(value):
            raise ValueError(
                "model `id` must be 1-128 characters of letters, digits and . _ : / -, starting with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _engine_needs(self) -> ModelSpec:
        if self.engine != "echo" and not self.source:
            raise ValueError(f"engine '{self.engine}' needs `source`: a packaged model name or a model folder path")
        if self.parallelism.world_size > 1 and self.engine != "vllm":
            raise ValueError(
                f"tensor/pipeline parallelism needs engine 'vllm'; the {self.engine} engine runs in one process: "
                "set parallelism.tensor_parallel_size and pipeline_parallel_size to 1"
            )
        if self.engine == "vllm" and self.task != "generate":
            raise ValueError("the vllm engine serves task 'generate'; serve embeddings with engine 'transformers'")
        if (
            self.resources.num_gpus > 0
            and self.resources.num_gpus != int(self.resources.num_gpus)
            and (self.parallelism.world_size > 1)
        ):
            raise ValueError("with tensor/pipeline parallelism, `num_gpus` (per worker) must be a whole number")
        return self

    @property
    def deployment_name(self) -> str:
        """Stable Serve deployment name; dashboards and autoscaling metrics key on it."""
        return f"replica:{self.id}"
