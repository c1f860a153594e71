"""`router.tls`: the schema, Serve's HTTP options it becomes, and its refusal in Kubernetes manifests (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cluster import deploy as deploying
from cluster.k8s.errors import RenderError
from cluster.k8s.serve_config import serve_config
from cluster.local import ClusterError
from deployments.config import ServingConfig
from deployments.plan import compile_plan


def _config(tls: dict[str, Any]) -> ServingConfig:
    return ServingConfig.model_validate(
        {"models": [{"id": "m", "task": "generate", "engine": "echo"}], "router": {"port": 8443, "tls": tls}}
    )


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    return {"certfile": str(tmp_path / "cert.pem"), "keyfile": str(tmp_path / "key.pem")}


def test_tls_becomes_serves_ssl_options(files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert deploying._http_options(_config(files)) == {
        "host": "127.0.0.1",
        "port": 8443,
        "ssl_certfile": files["certfile"],
        "ssl_keyfile": files["keyfile"],
    }
    config = _config({**files, "keyfile_password_env": "MF_UNIT_KEY_PASSWORD"})
    monkeypatch.delenv("MF_UNIT_KEY_PASSWORD", raising=False)
    with pytest.raises(ClusterError, match="the environment variable MF_UNIT_KEY_PASSWORD is not set"):
        deploying._http_options(config)
    monkeypatch.setenv("MF_UNIT_KEY_PASSWORD", "pw")
    assert deploying._http_options(config)["ssl_keyfile_password"] == "pw"
    assert "pw" not in config.model_dump_json()  # the password never enters the config


def test_tls_files_must_exist_and_be_absolute(files: dict[str, str]) -> None:
    with pytest.raises(ClusterError, match=r"router.tls.keyfile: no such file /nowhere/key.pem"):
        deploying._http_options(_config({**files, "keyfile": "/nowhere/key.pem"}))
    with pytest.raises(ValidationError, match="router.tls.certfile\n.*must be an absolute path"):
        _config({**files, "certfile": "cert.pem"})
    with pytest.raises(ValidationError, match="router.tls.keyfile\n.*Field required"):
        _config({"certfile": files["certfile"]})


def test_kubernetes_manifests_refuse_tls_by_name(files: dict[str, str]) -> None:
    with pytest.raises(RenderError, match="router.tls is not rendered into Kubernetes manifests"):
        serve_config(compile_plan(_config(files)), working_dir="local:///app")
