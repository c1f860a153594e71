from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.config import ConfigError, ServingConfig, load_config
from models.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted((ROOT / "deployments" / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    config = load_config(path)
    assert config.models


def test_default_config_serves_chat_and_embeddings() -> None:
    config = load_config(ROOT / "deployments" / "configs" / "default.yaml")
    assert {m.task for m in config.models} == {"generate", "embed"}
    assert config.router.host == "127.0.0.1" and config.router.port == 8000


def test_unknown_key_names_the_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "models:\n  - {id: a, task: generate, engine: echo, replicas: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "models.0.replicas" in str(info.value)
    assert "unknown key" in str(info.value)


def test_bad_value_names_field_and_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "models:\n  - {id: a, task: generate, engine: echo, scaling: {max_replicas: 0}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "models.0.scaling.max_replicas" in str(info.value)
    assert "(got 0)" in str(info.value)


def test_cross_field_errors_say_the_fix() -> None:
    with pytest.raises(ValidationError, match="raise max_replicas or lower min_replicas"):
        ModelSpec(id="a", task="generate", engine="echo", scaling={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValidationError, match="set `num_gpus` >= 1"):
        ModelSpec(id="a", task="generate", engine="echo", resources={"accelerator_type": "H100"})
    with pytest.raises(ValidationError, match="needs `source`"):
        ModelSpec(id="a", task="generate", engine="transformers")


def test_duplicate_and_empty_models_rejected() -> None:
    spec = {"id": "a", "task": "generate", "engine": "echo"}
    with pytest.raises(ValidationError, match="appears twice"):
        ServingConfig(models=[spec, spec])
    with pytest.raises(ValidationError, match="at least one model"):
        ServingConfig(models=[])


def test_bad_model_id_rejected() -> None:
    with pytest.raises(ValidationError, match="model `id`"):
        ModelSpec(id="has space", task="generate", engine="echo")


def test_missing_and_non_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "models: [\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_write(tmp_path, "- 1\n"))


def test_config_is_frozen() -> None:
    spec = ModelSpec(id="a", task="generate", engine="echo")
    with pytest.raises(ValidationError):
        spec.id = "b"  # type: ignore[misc]
