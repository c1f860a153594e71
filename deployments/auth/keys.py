"""API keys by hash: the `router.keys` entries, the key ring a router replica checks bearer tokens against, and the
tenant (a key's name, models and limits) bound to the request being served."""

from __future__ import annotations

import contextvars
import hashlib
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import Field, SecretStr, field_validator, model_validator

from deployments.errors import ModelNotFoundError
from models.spec import FrozenModel

__all__ = [
    "ApiKeyConfig",
    "KeyRing",
    "Tenant",
    "check_model",
    "current_tenant",
    "generate_key",
    "key_entry_yaml",
    "key_sha256",
    "may_use",
]

KEY_PREFIX = "sk-mf-"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ApiKeyConfig(FrozenModel):
    """One API key: where its secret comes from (a hash, an environment variable or a file), what it may use, and
    its limits. `modelfleet keys create NAME` makes a key and prints this entry."""

    name: str = Field(
        description="The key's name: shown in metrics (`key` label) and rate-limit messages; never the key itself."
    )
    sha256: str | None = Field(
        None, description="Hex SHA-256 of the key (what `modelfleet keys create` prints); the key is never stored."
    )
    key_env: str | None = Field(
        None,
        description="Name of an environment variable holding the key, read by each router replica when it starts "
        "(the variable must be set in the Ray workers' environment).",
    )
    key_file: Path | None = Field(
        None,
        description="Absolute path of a file holding the key (surrounding whitespace ignored), read by each router "
        "replica when it starts (a mounted Kubernetes Secret, for example).",
    )
    models: tuple[str, ...] | None = Field(
        None,
        description="Ids of the models and pipelines this key may use; default: all. Any other model answers 404, "
        "as an unknown one does, and /v1/models lists only these.",
    )
    rpm: int | None = Field(
        None, ge=1, description="Requests per minute (a token bucket of this size, refilled evenly); default: none."
    )
    tpm: int | None = Field(
        None,
        ge=1,
        description="Tokens per minute, prompt plus completion, charged as used: a request is admitted while the "
        "bucket is not in debt; default: none.",
    )
    tokens_per_day: int | None = Field(
        None,
        ge=1,
        description="Tokens per day, prompt plus completion (a bucket of this size refilled evenly over 24 h); "
        "default: none.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(
                f"key name '{name}' must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
        return name

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, digest: str | None) -> str | None:
        if digest is not None and not _HEX64.match(digest.lower()):
            raise ValueError(
                "`sha256` must be 64 hex digits (the SHA-256 of the key, as `modelfleet keys create` prints)"
            )
        return digest.lower() if digest is not None else None

    @field_validator("key_file")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_absolute():
            raise ValueError(f"`key_file` must be an absolute path, not '{path}': router replicas run in Ray's folders")
        return path

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyConfig:
        given = [f for f in ("sha256", "key_env", "key_file") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(
                f"key '{self.name}' needs exactly one of `sha256`, `key_env`, `key_file` "
                f"(got {', '.join(given) or 'none'})"
            )
        return self


def key_sha256(key: str | bytes) -> str:
    """Hex SHA-256 of a key, as `ApiKeyConfig.sha256` holds it."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def generate_key() -> str:
    """A new random key: `sk-mf-` and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_entry_yaml(name: str, key: str) -> str:
    """The `router.keys` entry of a key, by hash (YAML, indented as a list item)."""
    ApiKeyConfig.model_validate({"name": name, "sha256": key_sha256(key)})  # the name is checked as the config would
    return f"- name: {name}\n  sha256: {key_sha256(key)}\n"


@dataclass(frozen=True)
class Tenant:
    """What one key may do: its name, its models (None: all) and its limits (None: none)."""

    name: str
    models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None

    @property
    def limited(self) -> bool:
        """The key has a limit, so each request asks the quota store."""
        return self.rpm is not None or self.tpm is not None or self.tokens_per_day is not None

    def may_use(self, model_id: str) -> bool:
        """The key may use this model or pipeline (`id@version`: a key of the bare id may use its every version)."""
        return self.models is None or model_id in self.models or model_id.partition("@")[0] in self.models


class _RouterKeys(Protocol):
    """The key fields of `deployments.config.RouterConfig` (not imported: the config imports this module)."""

    @property
    def api_keys(self) -> tuple[SecretStr, ...]: ...
    @property
    def keys(self) -> tuple[ApiKeyConfig, ...]: ...


class KeyRing:
    """The keys a router replica accepts, by SHA-256 digest: a bearer token is hashed and looked up."""

    def __init__(self, tenants: dict[bytes, Tenant] | None = None) -> None:
        self._by_digest = dict(tenants or {})

    @classmethod
    def from_config(cls, router: _RouterKeys) -> KeyRing:
        """The ring of `router.keys` (their secrets read now: env vars, files) and the plain `router.api_keys`.

        Raises:
            ValueError: a key's variable or file is missing or empty, or two entries hold the same key.
        """
        ring: dict[bytes, Tenant] = {}

        def add(digest: bytes, tenant: Tenant) -> None:
            if digest in ring:
                raise ValueError(f"keys '{ring[digest].name}' and '{tenant.name}' are the same key: give each its own")
            ring[digest] = tenant

        for i, plain in enumerate(router.api_keys):
            add(hashlib.sha256(plain.get_secret_value().encode()).digest(), Tenant(name=f"api_keys.{i}"))
        for entry in router.keys:
            tenant = Tenant(
                name=entry.name,
                models=frozenset(entry.models) if entry.models is not None else None,
                rpm=entry.rpm,
                tpm=entry.tpm,
                tokens_per_day=entry.tokens_per_day,
            )
            add(_digest(entry), tenant)
        return cls(ring)

    @classmethod
    def from_plain(cls, keys: Iterable[bytes | str]) -> KeyRing:
        """A ring of plain keys, without names of their own (`api_keys.<i>`), models or limits."""
        tenants = {}
        for i, key in enumerate(keys):
            raw = key.encode() if isinstance(key, str) else key
            tenants[hashlib.sha256(raw).digest()] = Tenant(name=f"api_keys.{i}")
        return cls(tenants)

    @property
    def enabled(self) -> bool:
        """Keys are configured: every request but the probes needs one."""
        return bool(self._by_digest)

    @property
    def tenants(self) -> list[Tenant]:
        return list(self._by_digest.values())

    def resolve(self, token: bytes) -> Tenant | None:
        """The tenant of a bearer token, or None for an unknown one (a dict lookup on its digest: no timing leak
        of the keys themselves)."""
        if not token:
            return None
        return self._by_digest.get(hashlib.sha256(token).digest())


def _digest(entry: ApiKeyConfig) -> bytes:
    if entry.sha256 is not None:
        return bytes.fromhex(entry.sha256)
    if entry.key_env is not None:
        value = os.environ.get(entry.key_env, "").strip()
        where = f"the environment variable {entry.key_env}"
    else:
        path = entry.key_file or Path()  # _one_source: set when the others are not
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"key '{entry.name}': cannot read key_file {path}: {exc.strerror}") from None
        where = f"the file {path}"
    if not value:
        raise ValueError(f"key '{entry.name}': {where} is unset or empty in this router replica")
    return hashlib.sha256(value.encode()).digest()


# The tenant of the HTTP request being served in this context: set by the outermost middleware, read by the routes
# (model access) and where usage is known (deployments.auth.limits.charge). None: keys are off, or an open path.
_tenant: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar("modelfleet_tenant", default=None)


def bind_tenant(tenant: Tenant | None) -> None:
    """The request served in this context is `tenant`'s (None: no key)."""
    _tenant.set(tenant)


def current_tenant() -> Tenant | None:
    """The tenant of the request served in this context, or None."""
    return _tenant.get()


def check_model(model_id: str) -> None:
    """Refuse a model the current key may not use exactly as an unknown model is refused, naming only the key's
    models, so that other tenants' models are not revealed.

    Raises:
        ModelNotFoundError: the current key may not use `model_id`.
    """
    tenant = _tenant.get()
    if tenant is None or tenant.may_use(model_id):
        return
    # The same message as the router's for an unknown id, over the key's own models.
    raise ModelNotFoundError(
        f"The model '{model_id}' does not exist. Served models: {', '.join(sorted(tenant.models or ()))}"
    )


def may_use(model_id: str) -> bool:
    """The current key may use `model_id` (always, without a key): what /v1/models lists."""
    tenant = _tenant.get()
    return tenant is None or tenant.may_use(model_id)
