"""ServingConfig and RouterConfig: the app-level schema, loaded from YAML and passed to `build_app`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from models.spec import FrozenModel, ModelSpec

__all__ = ["ConfigError", "RouterConfig", "ServingConfig", "format_validation_error", "load_config"]


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


class ServingConfig(FrozenModel):
    """Everything one modelfleet app serves: the models and the router in front of them."""

    name: str = Field("modelfleet", description="Serve application name.")
    route_prefix: str = Field("/", description="HTTP path prefix the app is served under.")
    models: tuple[ModelSpec, ...] = Field(description="The models to serve; clients pick one by its `id`.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="HTTP API settings.")

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
