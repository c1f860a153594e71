"""What `modelfleet deploy` checks on this machine before deploying, and what the router checks at its start: each
file or folder a config names fails the deploy with the field and the path, never a request later."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cluster.cli import main
from cluster.local import ClusterError
from cluster.preflight import check_local_files
from deployments.api import files
from deployments.config import BatchesConfig, ServingConfig

ECHO = {"id": "chat", "task": "generate", "engine": "echo"}


def _config(**extra: Any) -> ServingConfig:
    return ServingConfig.model_validate({"models": [extra.pop("model", ECHO)], **extra})


def _lora(path: Path) -> dict[str, Any]:
    return {
        "id": "base",
        "task": "generate",
        "engine": "vllm",
        "source": str(path.parent),
        "adapters": [{"name": "sql", "path": str(path)}],
    }


def test_a_missing_adapter_folder_fails_the_deploy_by_field(tmp_path: Path) -> None:
    config = _config(model=_lora(tmp_path / "gone"), batches={"enabled": False})
    with pytest.raises(ClusterError, match=r"models\.0\.adapters\.0\.path: the adapter folder .*gone of model 'base'"):
        check_local_files(config)
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    check_local_files(_config(model=_lora(tmp_path / "ok"), batches={"enabled": False}))


def test_a_missing_model_folder_fails_the_deploy_by_field(tmp_path: Path) -> None:
    model = {"id": "m", "task": "embed", "engine": "transformers", "source": str(tmp_path / "nowhere")}
    with pytest.raises(ClusterError, match=r"models\.0\.source: no model folder at .*nowhere for model 'm'"):
        check_local_files(_config(model=model))
    check_local_files(_config(model={**model, "source": "all-minilm-l6-v2"}))  # packaged: prepared, not a folder
    check_local_files(_config(model={**model, "source": "deployments"}))  # relative to the project root


def test_a_batch_folder_that_is_a_file_fails_the_deploy_and_the_router_start(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    with pytest.raises(ClusterError, match=f"batches.files_dir: cannot write to {taken}"):
        check_local_files(_config(batches={"files_dir": str(taken)}))
    with pytest.raises(RuntimeError, match=f"batches.files_dir: cannot write to {taken}"):
        files.configure(BatchesConfig(files_dir=taken))
    files.configure(BatchesConfig(files_dir=tmp_path / "new"))  # created at the router's start
    assert (tmp_path / "new" / "files").is_dir() and (tmp_path / "new" / "batches").is_dir()


def test_deploy_of_a_config_with_missing_documents_fails_before_any_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELFLEET_HOME", str(tmp_path / "home"))
    path = tmp_path / "rag.yaml"
    path.write_text(
        "models:\n  - {id: chat, task: generate, engine: echo}\n  - {id: emb, task: embed, engine: echo}\n"
        "pipelines:\n  - {id: rag, kind: sequence, model: chat, template: '{passages} {question}',\n"
        "     retrieve: {model: emb, documents: my-docs}}\n"
    )
    assert main(["deploy", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pipelines.0.retrieve: `documents` 'my-docs' does not exist" in err and str(tmp_path / "my-docs") in err


def test_deploy_and_serve_take_a_port_and_the_dashboard_is_on_by_default() -> None:
    from cluster.cli import _config as config_of
    from cluster.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["up"]).dashboard is True
    assert parser.parse_args(["up", "--no-dashboard"]).dashboard is False
    assert parser.parse_args(["serve", "--port", "8123"]).port == 8123
    with pytest.raises(SystemExit):
        parser.parse_args(["deploy", "--port", "70000"])
    assert config_of(None, 8123).router.port == 8123
