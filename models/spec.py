"""ModelSpec: the one schema that describes a model the cluster serves."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from models.frozen import FrozenModel
from models.scaling import ScalingConfig

__all__ = [
    "AdapterSpec",
    "BatchingConfig",
    "FrozenModel",
    "HealthConfig",
    "ModelSpec",
    "ParallelismConfig",
    "ResourcesConfig",
    "RoutingConfig",
    "ScalingConfig",
    "adapter_names",
    "adapter_problem",
    "check_versions",
    "served_names",
]

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Separates a model id from its version in requests (`model@version`); ids cannot contain it.
VERSION_SEPARATOR = "@"
_PARSER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


class AdapterSpec(FrozenModel):
    """A LoRA adapter of the model (vllm engine): requests name it in `model` like a model of its own."""

    name: str = Field(description="The name clients send in `model` to use this adapter, e.g. 'sql-lora'.")
    path: Path = Field(description="Absolute path of the adapter's folder (peft's adapter_config.json and weights).")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _MODEL_ID.match(value):
            raise ValueError(
                "adapter `name` must be 1-128 characters of letters, digits and . _ : / -, starting with a letter or "
                "digit"
            )
        return value

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        if not path.is_absolute():
            raise ValueError(f"must be an absolute path, not '{path}': replicas run in Ray's own working folders")
        return path


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


class BatchingConfig(FrozenModel):
    """Batching of concurrent requests inside one replica's engine (transformers)."""

    max_batch_size: int = Field(
        8,
        ge=1,
        le=1024,
        description=(
            "Most requests run together: in one batch (embeddings, classification, scoring), or decoding at once "
            "(generation, where requests join the running batch at its next step)."
        ),
    )
    batch_wait_timeout_s: float = Field(
        0.01,
        ge=0,
        le=10,
        description=(
            "How long an idle engine waits for more requests before it runs the first batch (seconds); a "
            "generation batch that is already running takes new requests at its next step without waiting."
        ),
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


class RoutingConfig(FrozenModel):
    """Which replica of the model serves a request: chosen in Serve's request router, with no extra hop."""

    policy: Literal["pow2", "session", "prefix"] = Field(
        "pow2",
        description=(
            "'pow2': Serve's default (the less loaded of two random replicas). 'session': requests with the same "
            "session key (the session header, else the OpenAI `user` field) go to the same replica. 'prefix': "
            "requests that share a long prompt prefix go to the replica that served that prefix last (its KV "
            "cache holds it). Both move to the least loaded replica when theirs is gone or overloaded."
        ),
    )
    session_header: str = Field(
        "x-session-id",
        description="policy 'session': the request header holding the session key (case-insensitive).",
    )
    prefix_block_chars: int = Field(
        256,
        ge=16,
        le=65536,
        description=(
            "policy 'prefix': the prompt is hashed in blocks of this many characters (not tokens: the router "
            "does not tokenize; about 4 characters per token in English). Requests match when their prompts "
            "share at least one whole block from the start; shorter prompts are routed as with 'pow2'."
        ),
    )
    prefix_max_chars: int = Field(
        8192,
        ge=16,
        le=1_048_576,
        description="policy 'prefix': only the prompt's first this-many characters are hashed (bounds routing cost).",
    )
    table_size: int = Field(
        65536,
        ge=1,
        le=10_000_000,
        description=(
            "policies 'session' and 'prefix': most keys (sessions, or prefix blocks) each router replica remembers; "
            "the least recently used are forgotten first, and a forgotten key is placed again like a new one."
        ),
    )
    overload_queue_len: int | None = Field(
        None,
        ge=1,
        description=(
            "policies 'session' and 'prefix': a key's replica counts as overloaded when it holds this many "
            "requests (unset: scaling.max_ongoing_requests, i.e. full); the request then goes to the least loaded "
            "replica instead, and the key moves with it."
        ),
    )

    @model_validator(mode="after")
    def _fields_of_policy(self) -> RoutingConfig:
        owners = {
            "session_header": ("session",),
            "prefix_block_chars": ("prefix",),
            "prefix_max_chars": ("prefix",),
            "table_size": ("session", "prefix"),
            "overload_queue_len": ("session", "prefix"),
        }
        fields = type(self).model_fields
        for name, policies in owners.items():
            # Compared with the default, not `model_fields_set`: a dumped config (all fields written) must load again.
            if getattr(self, name) != fields[name].default and self.policy not in policies:
                wanted = " or ".join(f"'{p}'" for p in policies)
                raise ValueError(
                    f"`{name}` applies to policy {wanted}, not '{self.policy}': remove it or set policy: {policies[0]}"
                )
        if self.prefix_max_chars < self.prefix_block_chars:
            raise ValueError(
                f"`prefix_max_chars` ({self.prefix_max_chars}) is below `prefix_block_chars` "
                f"({self.prefix_block_chars}): no block would be hashed; raise prefix_max_chars"
            )
        return self

    @field_validator("session_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError("must be a header name of 1-64 letters, digits and '-', e.g. 'x-session-id'")
        # Header names are case-insensitive: the plan shows one spelling.
        return value.lower()


class HealthConfig(FrozenModel):
    """How a replica is checked, and when it counts as wedged (Serve then replaces it)."""

    period_s: float = Field(10.0, gt=0, description="Seconds between two health checks of a replica (Serve's).")
    timeout_s: float = Field(
        60.0, gt=0, description="A health check that does not answer within this many seconds fails (Serve's)."
    )
    stall_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A replica holding requests whose engine gave no output at all (no token, no result) for this "
        "many seconds is wedged: its next health check fails and it ends, the router sends its requests again, and "
        "Serve starts a replica in its place. Keep it above the longest time one request may take to its first "
        "output when nothing else runs.",
    )


class ModelSpec(FrozenModel):
    """One model the cluster serves: what it is, which engine runs it, and what it costs."""

    id: str = Field(description="The model name clients send in the `model` field, e.g. 'smollm2'.")
    version: str | None = Field(
        None,
        description=(
            "This spec's version of the model, e.g. '2' or '2025-06'. Several specs may share an `id` with different "
            "versions, each its own deployment; a request names `id@version`, or the bare `id` for the default version."
        ),
    )
    default: bool = Field(
        False,
        description=(
            "Versioned models: this version answers requests for the bare `id`. Exactly one version of an id that has "
            "several must set it; a single version is the default without it."
        ),
    )
    task: Literal["generate", "embed", "classify", "score"] = Field(
        description=(
            "'generate' serves /v1/chat/completions and /v1/completions; 'embed' serves /v1/embeddings; "
            "'classify' (a sequence-classification model) serves /classify; 'score' (a cross-encoder: a "
            "sequence classifier with one output) serves /score and /rerank. 'classify' and 'score' run on the "
            "transformers engine only."
        )
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
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig, description="Which replica serves a request (cache-affine routing)."
    )
    health: HealthConfig = Field(
        default_factory=HealthConfig, description="Health checks, and when a replica counts as wedged."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Engine-specific options, passed through and checked by the engine."
    )
    adapters: tuple[AdapterSpec, ...] = Field(
        (),
        description=(
            "vllm only: LoRA adapters of this model, each called by its `name` in `model` (listed in /v1/models with "
            "`root` = this model). A replica loads an adapter on its first request and keeps the "
            "`max_loaded_adapters` most recently used; an adapter's requests go to a replica that has it loaded "
            "(Serve's model multiplexing). Adding, removing or repointing adapters is a redeploy that restarts no "
            "replica of the model (only the router rolls); turning LoRA on or off, or changing "
            "`max_loaded_adapters` or `max_lora_rank`, restarts them."
        ),
    )
    max_loaded_adapters: int = Field(
        1,
        ge=1,
        le=256,
        description="Adapters one replica holds at once (vLLM's max_loras); the least recently used "
        "is unloaded for a new one.",
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        16, description="Largest LoRA rank among the adapters (vLLM's max_lora_rank); vLLM refuses larger ones."
    )
    tool_call_parser: str | None = Field(
        None,
        description=(
            "vllm only: the vLLM tool-call parser that reads tool calls out of this model's output for "
            "`tool_choice: auto` (e.g. 'hermes', 'llama3_json', 'mistral'; `vllm serve --help` lists them). Its "
            "chat template must render `tools`. Unset: `auto` is refused; `required` and named tool choices work "
            "on any model (the output is constrained to the tools' JSON schema)."
        ),
    )

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not _MODEL_ID.match(value):
            raise ValueError(
                "model `id` must be 1-128 characters of letters, digits and . _ : / -, starting with a letter or digit"
            )
        return value

    @field_validator("version")
    @classmethod
    def _valid_version(cls, value: str | None) -> str | None:
        if value is not None and not _VERSION.match(value):
            raise ValueError(
                "model `version` must be 1-64 characters of letters, digits and . _ -, starting with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _default_needs_version(self) -> ModelSpec:
        if self.default and self.version is None:
            raise ValueError(f"model '{self.id}': `default` applies to a versioned model: set `version` or remove it")
        return self

    @model_validator(mode="after")
    def _engine_needs(self) -> ModelSpec:
        if self.engine != "echo" and not self.source:
            raise ValueError(f"engine '{self.engine}' needs `source`: a packaged model name or a model folder path")
        if self.parallelism.world_size > 1 and self.engine != "vllm":
            raise ValueError(
                f"tensor/pipeline parallelism needs engine 'vllm'; the {self.engine} engine runs in one process: "
                "set parallelism.tensor_parallel_size and pipeline_parallel_size to 1"
            )
        if self.tool_call_parser is not None and self.engine != "vllm":
            raise ValueError(
                f"`tool_call_parser` needs engine 'vllm' (vLLM's parsers read the output); the {self.engine} engine "
                "has none: remove it"
            )
        if self.adapters and self.engine != "vllm":
            raise ValueError(
                f"`adapters` (LoRA) need engine 'vllm'; the {self.engine} engine has no adapter support: remove them"
            )
        adapter_names = [a.name for a in self.adapters]
        twice = sorted({n for n in adapter_names if adapter_names.count(n) > 1})
        if twice:
            raise ValueError(f"adapter name(s) {', '.join(twice)} appear twice: every adapter needs its own `name`")
        fields = type(self).model_fields
        for name in ("max_loaded_adapters", "max_lora_rank"):
            if not self.adapters and getattr(self, name) != fields[name].default:
                raise ValueError(f"`{name}` applies to a model with `adapters`: list the adapters or remove it")
        if self.tool_call_parser is not None and not _PARSER_NAME.match(self.tool_call_parser):
            raise ValueError("`tool_call_parser` must be a vLLM parser name such as 'hermes' or 'llama3_json'")
        if self.engine == "vllm" and self.task != "generate":
            raise ValueError(
                f"the vllm engine serves task 'generate'; serve task '{self.task}' with engine 'transformers'"
            )
        if self.task in ("classify", "score") and self.engine != "transformers":
            raise ValueError(
                f"task '{self.task}' needs a sequence-classification model: serve task '{self.task}' with engine "
                "'transformers'"
            )
        if (
            self.resources.num_gpus > 0
            and self.resources.num_gpus != int(self.resources.num_gpus)
            and (self.parallelism.world_size > 1)
        ):
            raise ValueError("with tensor/pipeline parallelism, `num_gpus` (per worker) must be a whole number")
        return self

    @model_validator(mode="after")
    def _adapter_folders(self) -> ModelSpec:
        # Checked here where the folder is visible; a folder of another node is checked by its replica.
        for adapter in self.adapters:
            problem = adapter_problem(adapter, self.max_lora_rank) if adapter.path.exists() else None
            if problem is not None:
                raise ValueError(f"model '{self.id}': {problem}")
        return self

    @model_validator(mode="after")
    def _routing_fits(self) -> ModelSpec:
        routing, most = self.routing, self.scaling.max_ongoing_requests
        if routing.overload_queue_len is not None and routing.overload_queue_len > most:
            raise ValueError(
                f"`routing.overload_queue_len` ({routing.overload_queue_len}) is above `scaling.max_ongoing_requests` "
                f"({most}), which a replica never exceeds: lower overload_queue_len or unset it"
            )
        if routing.policy == "prefix" and self.task != "generate":
            raise ValueError(
                "routing policy 'prefix' follows the prompt's KV cache and needs task 'generate'; "
                "use policy 'pow2' or 'session' for embeddings"
            )
        return self

    @property
    def versioned_id(self) -> str:
        """The name that addresses exactly this spec: `id@version`, or `id` for an unversioned model."""
        return self.id if self.version is None else f"{self.id}{VERSION_SEPARATOR}{self.version}"

    @property
    def deployment_name(self) -> str:
        """Stable Serve deployment name (`replica:<id>`, `replica:<id>@<version>`); dashboards and autoscaling
        metrics key on it."""
        return f"replica:{self.versioned_id}"


def check_versions(models: Iterable[ModelSpec]) -> None:
    """Check that every spec has its own `id@version` and each versioned id exactly one default version.

    Raises:
        ValueError: the message names the field and the fix.
    """
    by_id: dict[str, list[ModelSpec]] = {}
    for spec in models:
        by_id.setdefault(spec.id, []).append(spec)
    for model_id, specs in by_id.items():
        if len(specs) == 1:
            continue
        if any(s.version is None for s in specs):
            raise ValueError(
                f"model id '{model_id}' appears {'twice' if len(specs) == 2 else f'{len(specs)} times'}: give each "
                "spec of it its own `version` (and mark "
                "one `default: true`), or give each its own `id`"
            )
        seen: set[str] = set()
        for s in specs:
            if s.versioned_id in seen:
                raise ValueError(f"model '{s.versioned_id}' appears twice: every spec of an id needs its own `version`")
            seen.add(s.versioned_id)
        defaults = [s.versioned_id for s in specs if s.default]
        if len(defaults) != 1:
            which = "none sets" if not defaults else f"{len(defaults)} set ({', '.join(defaults)})"
            raise ValueError(
                f"model '{model_id}' has {len(specs)} versions and {which} `default: true`: mark exactly one version "
                "as the default (it answers requests for the bare id)"
            )


def served_names(models: Iterable[ModelSpec]) -> dict[str, ModelSpec]:
    """Every name a request may give in `model` -> the spec it addresses: each spec's `id@version` (or bare `id`),
    and the bare `id` of each default version (a version alone under its id is the default). Config order."""
    models = list(models)
    count: dict[str, int] = {}
    for spec in models:
        count[spec.id] = count.get(spec.id, 0) + 1
    names: dict[str, ModelSpec] = {}
    for spec in models:
        names[spec.versioned_id] = spec
        if spec.version is not None and (spec.default or count[spec.id] == 1):
            names[spec.id] = spec
    return names


def adapter_names(models: Iterable[ModelSpec]) -> dict[str, ModelSpec]:
    """Every LoRA adapter's name -> the spec of its base model. Config order."""
    return {adapter.name: spec for spec in models for adapter in spec.adapters}


def adapter_problem(adapter: AdapterSpec, max_lora_rank: int) -> str | None:
    """What is wrong with a LoRA adapter's folder on this node (with the fix), or None: peft's adapter_config.json
    must be there, readable, with a rank within `max_lora_rank`."""
    try:
        rank = json.loads((adapter.path / "adapter_config.json").read_text()).get("r")
    except (OSError, ValueError, AttributeError) as exc:
        return (
            f"adapter '{adapter.name}' has no readable peft adapter_config.json in {adapter.path} "
            f"({type(exc).__name__}): point `path` at a folder saved by peft's save_pretrained"
        )
    if isinstance(rank, int) and rank > max_lora_rank:
        return (
            f"adapter '{adapter.name}' has rank {rank}, above max_lora_rank {max_lora_rank}: raise max_lora_rank to "
            f"at least {rank}"
        )
    return None
