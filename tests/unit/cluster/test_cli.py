from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import DEFAULT_CONFIG, main


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(DEFAULT_CONFIG)]) == 0
    assert "OK (2 model(s): smollm2, minilm)" in capsys.readouterr().out


def test_validate_reports_each_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {id: a, task: chat, engine: echo, resources: {num_gpu: 1}}\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "models.0.task" in err and "'generate', 'embed', 'classify' or 'score'" in err
    assert "models.0.resources.num_gpu: unknown key" in err


def test_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "ServingConfig"


def test_models_lists_packaged(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m-instruct", "all-minilm-l6-v2", "tiny-llama", "tiny-bert"):
        assert name in out


def test_status_without_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELFLEET_HOME", str(tmp_path))
    assert main(["status", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"cluster": None, "deployments": []}
    assert main(["down"]) == 0


def test_plan_prints_the_deployment_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from deployments.config import load_config
    from deployments.plan import DeploymentPlan, compile_plan

    monkeypatch.setenv("MODELFLEET_HOME", str(tmp_path))  # no local cluster: no CPU split
    assert main(["plan", str(DEFAULT_CONFIG)]) == 0
    assert DeploymentPlan.model_validate_json(capsys.readouterr().out) == compile_plan(load_config(DEFAULT_CONFIG))
    assert main(["plan", "--engine-cpus", "0"]) == 0
    smollm2 = DeploymentPlan.model_validate_json(capsys.readouterr().out).models[0]
    assert smollm2.engine.env == {"VLLM_CPU_OMP_THREADS_BIND": "0"}
    assert main(["plan", "--engine-cpus", "zero"]) == 1
    assert "not a CPU list" in capsys.readouterr().err
