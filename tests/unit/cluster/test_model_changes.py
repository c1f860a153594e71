"""`modelfleet models add|remove|set-default` as pure config edits, and the record of deployed configs (no Ray)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from cluster.local import ClusterError
from cluster.model_changes import add_models, record_config, remove_model, running_config, set_default
from deployments.config import ServingConfig
from models.spec import ModelSpec, served_names


def _echo(model_id: str = "m", **fields: Any) -> dict[str, Any]:
    return {"id": model_id, "task": "generate", "engine": "echo", **fields}


def _config(*models: dict[str, Any], **fields: Any) -> ServingConfig:
    return ServingConfig.model_validate({"models": list(models), **fields})


def _names(config: ServingConfig) -> dict[str, str]:
    return {name: spec.versioned_id for name, spec in served_names(config.models).items()}


def test_adding_a_version_keeps_the_bare_id_where_it_was() -> None:
    config = add_models(_config(_echo(version="1")), [ModelSpec.model_validate(_echo(version="2"))])
    assert _names(config) == {"m@1": "m@1", "m": "m@1", "m@2": "m@2"}
    config = add_models(config, [ModelSpec.model_validate(_echo(version="3", default=True))])
    assert _names(config)["m"] == "m@3"
    assert [m.default for m in config.models] == [False, False, True]


def test_add_refuses_a_served_name_and_an_unversioned_twin() -> None:
    config = _config(_echo(version="1"), _echo("plain"))
    with pytest.raises(ClusterError, match="'m@1' is served already"):
        add_models(config, [ModelSpec.model_validate(_echo(version="1"))])
    with pytest.raises(ClusterError, match="models: model id 'plain' appears twice"):
        add_models(config, [ModelSpec.model_validate(_echo("plain", version="2"))])


def test_set_default_and_remove() -> None:
    config = _config(_echo(version="1", default=True), _echo(version="2"), _echo("other"))
    config = set_default(config, "m@2")
    assert _names(config)["m"] == "m@2"
    with pytest.raises(ClusterError, match="'m@2' is the default version of 'm'.*set-default m@1"):
        remove_model(config, "m@2")
    config = remove_model(config, "m@1")
    assert _names(config) == {"m@2": "m@2", "m": "m@2", "other": "other"}
    assert list(_names(remove_model(config, "m"))) == ["other"]
    with pytest.raises(ClusterError, match="no model 'nope' is served"):
        remove_model(config, "nope")
    with pytest.raises(ClusterError, match="last model"):
        remove_model(_config(_echo()), "m")
    with pytest.raises(ClusterError, match="no model version 'other' is served"):
        set_default(config, "other")


def test_a_pipeline_keeps_its_models() -> None:
    config = _config(
        _echo("a"),
        _echo("b"),
        pipelines=[{"id": "p", "kind": "fallback", "targets": [{"model": "a"}, {"model": "b"}]}],
    )
    with pytest.raises(ClusterError, match="the changed config is invalid"):
        remove_model(config, "b")


def test_the_record_keeps_secrets_for_its_user_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELFLEET_HOME", str(tmp_path))
    with pytest.raises(ClusterError, match="deployed apps: none"):
        running_config()
    config = _config(_echo(version="1"), router={"api_keys": ["sk-secret"]}, name="one")
    record_config(config)
    assert running_config() == config
    assert running_config().router.api_keys[0].get_secret_value() == "sk-secret"
    record_config(config.model_copy(update={"name": "two"}))
    with pytest.raises(ClusterError, match="name the app to change with --app .deployed apps: one, two"):
        running_config()
    assert running_config("two").name == "two"
    assert stat.S_IMODE((tmp_path / "deployed-configs.json").stat().st_mode) == 0o600
