"""Live model changes: the configs of the deployed apps (recorded by cluster.deploy), and pure functions that add,
remove or switch the default version of models in them; `modelfleet models` deploys the result."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import SecretBytes, SecretStr, ValidationError

from cluster.local import ClusterError
from deployments.config import ServingConfig, format_validation_error
from models.settings import get_settings
from models.spec import ModelSpec, served_names

__all__ = ["add_models", "record_config", "remove_model", "running_config", "set_default"]

# The configs as deployed, secrets included (mode 0600, beside the cluster's auth token): what `modelfleet models`
# edits and deploys again. The plans that cluster.deploy records show secrets masked: they cannot be deployed again.
_CONFIGS_FILE = "deployed-configs.json"


def record_config(config: ServingConfig) -> None:
    """Keep `config` as deployed, secrets included, readable by this user only (see _CONFIGS_FILE)."""
    path = get_settings().home / _CONFIGS_FILE
    configs = _read_json(path)
    configs[config.name] = _reveal(config.model_dump(mode="python"))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(configs, out)
    partial.replace(path)


def _reveal(value: Any) -> Any:
    """A python-mode dump made JSON-ready with its secrets' values (a JSON dump would mask them)."""
    if isinstance(value, SecretStr | SecretBytes):
        return _reveal(value.get_secret_value())
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, dict):
        return {key: _reveal(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_reveal(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def running_config(app: str | None = None) -> ServingConfig:
    """The config of a deployed app, as `deploy` last deployed it (what `modelfleet models` edits).

    Args:
        app: the app's name; None: the only app deployed.

    Raises:
        ClusterError: no such app was deployed from here, or several were and `app` is None.
    """
    configs = _read_json(get_settings().home / _CONFIGS_FILE)
    if app is None:
        if len(configs) != 1:
            known = ", ".join(sorted(configs)) or "none"
            raise ClusterError(f"name the app to change with --app (deployed apps: {known})")
        app = next(iter(configs))
    if app not in configs:
        known = ", ".join(sorted(configs)) or "none"
        raise ClusterError(
            f"no app '{app}' was deployed from this machine (deployed apps: {known}): `modelfleet deploy CONFIG` first"
        )
    try:
        return ServingConfig.model_validate(configs[app])
    except ValidationError as exc:
        raise ClusterError(format_validation_error(exc, source=f"the recorded config of app '{app}'")) from None


def _with_models(config: ServingConfig, models: list[ModelSpec]) -> ServingConfig:
    """`config` with these models, validated again as a whole (versions, pipelines).

    Raises:
        ClusterError: the result is not a valid config; the message names each field.
    """
    raw = config.model_dump(mode="python")
    raw["models"] = [m.model_dump(mode="python") for m in models]
    try:
        return ServingConfig.model_validate(raw)
    except ValidationError as exc:
        raise ClusterError(format_validation_error(exc, source="the changed config")) from None


def add_models(config: ServingConfig, specs: list[ModelSpec]) -> ServingConfig:
    """`config` with `specs` added (pure). A new version of a served id leaves the bare id where it was (the id's
    single version becomes its explicit default) unless the new spec says `default: true`.

    Raises:
        ClusterError: a spec's `id@version` is served already, or the result is not a valid config.
    """
    models = list(config.models)
    for spec in specs:
        if any(m.versioned_id == spec.versioned_id for m in models):
            raise ClusterError(
                f"model '{spec.versioned_id}' is served already: remove it first (`modelfleet models remove "
                f"{spec.versioned_id}`), or give the new spec another `version`"
            )
        siblings = [i for i, m in enumerate(models) if m.id == spec.id]
        if spec.version is not None:
            for i in siblings:
                if spec.default:
                    models[i] = models[i].model_copy(update={"default": False})
                elif len(siblings) == 1 and models[i].version is not None:
                    models[i] = models[i].model_copy(update={"default": True})
        models.append(spec)
    return _with_models(config, models)


def remove_model(config: ServingConfig, name: str) -> ServingConfig:
    """`config` without the model `name` (pure): `id@version` removes that version; a bare id removes the model,
    all its versions.

    Raises:
        ClusterError: no such model, it is the default version of an id that keeps others, or the result is not a
            valid config (no model left, a pipeline uses it).
    """
    exact = [m for m in config.models if m.versioned_id == name]
    if exact:
        spec = exact[0]
        others = [m for m in config.models if m.id == spec.id and m is not spec]
        if others and served_names(config.models).get(spec.id) is spec:
            raise ClusterError(
                f"'{name}' is the default version of '{spec.id}': make another version the default first "
                f"(`modelfleet models set-default {others[0].versioned_id}`)"
            )
        kept = [m for m in config.models if m is not spec]
    else:
        kept = [m for m in config.models if m.id != name]
        if len(kept) == len(config.models):
            raise ClusterError(f"no model '{name}' is served (served: {', '.join(served_names(config.models))})")
    if not kept:
        raise ClusterError(f"'{name}' is the last model of app '{config.name}': an app serves at least one model")
    return _with_models(config, kept)


def set_default(config: ServingConfig, name: str) -> ServingConfig:
    """`config` with `name` (`id@version`) as the default version of its id (pure): the bare id then reaches it.

    Raises:
        ClusterError: no such version is served.
    """
    spec = next((m for m in config.models if m.version is not None and m.versioned_id == name), None)
    if spec is None:
        versions = [m.versioned_id for m in config.models if m.version is not None]
        raise ClusterError(f"no model version '{name}' is served (versions: {', '.join(versions) or 'none'})")
    models = [m.model_copy(update={"default": m is spec}) if m.id == spec.id else m for m in config.models]
    return _with_models(config, models)
