"""ServingConfig and RouterConfig: the app-level schema, loaded from YAML and passed to `build_app`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from deployments.pipelines.spec import PipelineSpec, plan_pipelines
from models.settings import get_settings
from models.spec import FrozenModel, ModelSpec

__all__ = [
    "BatchesConfig",
    "ConfigError",
    "RouterConfig",
    "ServingConfig",
    "format_validation_error",
    "load_config",
]


class ConfigError(ValueError):
    """Raised when a config file cannot be read or does not match the schema; the message names each field."""


class RouterConfig(FrozenModel):
    """The HTTP front door: where it listens and what it accepts."""

    host: str = Field("127.0.0.1", description="Address Serve's HTTP proxy binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the OpenAI-compatible HTTP API.")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted; larger bodies get a 413."
    )
    api_keys: tuple[SecretStr, ...] = Field(
        (), description="If set, requests need `Authorization: Bearer <key>` with one of these keys (else 401)."
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Longest a request may take end to end before it is cancelled (408)."
    )
    num_replicas: int = Field(1, ge=1, description="Replicas of the router (ingress) deployment.")
    num_cpus: float = Field(0.5, ge=0, description="Logical CPUs reserved for each router replica.")
    max_ongoing_requests: int = Field(1024, ge=1, description="Most requests one router replica holds at once.")


class BatchesConfig(FrozenModel):
    """OpenAI's Files and Batches API (`/v1/files`, `/v1/batches`): uploaded files, and batches run as Ray jobs."""

    enabled: bool = Field(
        True,
        description="Serve `/v1/files` and `/v1/batches`. A batch runs as a Ray job, so the cluster needs Ray's job "
        "API (its dashboard: `modelfleet up --dashboard`); without it creating a batch answers 503.",
    )
    files_dir: Path | None = Field(
        None,
        description="Absolute folder of uploaded files and batch results, on the machine of the router replica "
        "and the batch job's driver (the same machine on a local cluster; a shared volume elsewhere). "
        "Default: MODELFLEET_HOME/files.",
    )
    max_file_bytes: int = Field(
        209_715_200, ge=1024, description="Largest file `POST /v1/files` accepts (bytes); larger uploads get a 413."
    )

    @field_validator("files_dir")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_absolute():
            raise ValueError(
                f"`files_dir` must be an absolute path, not '{path}': the router replica and the batch jobs run "
                "in Ray's own working folders"
            )
        return path

    def folder(self) -> Path:
        """The files folder: `files_dir`, else MODELFLEET_HOME/files of this process's environment."""
        return self.files_dir or get_settings().home / "files"


class ServingConfig(FrozenModel):
    """Everything one modelfleet app serves: the models and the router in front of them."""

    name: str = Field("modelfleet", description="Serve application name.")
    route_prefix: str = Field("/", description="HTTP path prefix the app is served under.")
    models: tuple[ModelSpec, ...] = Field(description="The models to serve; clients pick one by its `id`.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="HTTP API settings.")
    batches: BatchesConfig = Field(
        default_factory=BatchesConfig, description="OpenAI's Files and Batches API, backed by Ray jobs."
    )
    pipelines: tuple[PipelineSpec, ...] = Field(
        (),
        description="Virtual models composed of the models (sequence, switch, ensemble, split, fallback); clients "
        "call each by its `id` like a model.",
    )

    @field_validator("models")
    @classmethod
    def _models_unique(cls, models: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
        if not models:
            raise ValueError("`models` is empty: list at least one model")
        seen: set[str] = set()
        for spec in models:
            if spec.id in seen:
                raise ValueError(f"model id '{spec.id}' appears twice: every model needs its own `id`")
            seen.add(spec.id)
        return models

    @model_validator(mode="after")
    def _prefix(self) -> ServingConfig:
        if not self.route_prefix.startswith("/"):
            raise ValueError("`route_prefix` must start with '/'")
        return self

    @model_validator(mode="after")
    def _pipelines(self) -> ServingConfig:
        plan_pipelines(self.models, self.pipelines)  # raises with the field and the fix
        return self

    def model(self, model_id: str) -> ModelSpec | None:
        """The spec with this id, or None."""
        return next((m for m in self.models if m.id == model_id), None)


def format_validation_error(exc: ValidationError, *, source: str = "config") -> str:
    """One line per problem: `models.0.scaling.max_replicas: Input should be ... (got 0)`."""
    lines = [f"{source} is invalid ({exc.error_count()} problem{'s' if exc.error_count() != 1 else ''}):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key: remove it or check its spelling against the config reference"
        got = err.get("input")
        got_text = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"  - {where}: {msg}{got_text}")
    return "\n".join(lines)


def load_config(path: str | Path) -> ServingConfig:
    """Read and validate a YAML config file.

    Raises:
        ConfigError: the file is missing, is not YAML, or does not match the schema.
    """
    path = Path(path)
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping with a `models:` list")
    try:
        return ServingConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=str(path))) from None
