"""Model versions: `version` and `default` in the spec, their validation, the names requests use, the plan's
deployment names and code versions, and the OpenAPI model enums (no Ray)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deployments.api.ingress import app
from deployments.api.openapi import narrow_openapi
from deployments.config import ServingConfig
from deployments.plan import compile_plan
from models.spec import ModelSpec, served_names


def _echo(model_id: str = "m", **fields: Any) -> dict[str, Any]:
    return {"id": model_id, "task": "generate", "engine": "echo", **fields}


def _config(*models: dict[str, Any], **fields: Any) -> ServingConfig:
    return ServingConfig.model_validate({"models": list(models), **fields})


def test_versions_have_their_own_names_and_deployments() -> None:
    config = _config(_echo(version="1"), _echo(version="2", default=True), _echo("plain"))
    names = served_names(config.models)
    assert list(names) == ["m@1", "m@2", "m", "plain"]
    assert names["m"] is names["m@2"] and names["m@1"].version == "1"
    assert [m.deployment_name for m in compile_plan(config).models] == ["replica:m@1", "replica:m@2", "replica:plain"]
    assert config.model("m") is names["m@2"] and config.model("m@1") is names["m@1"] and config.model("m@3") is None


def test_a_single_version_is_the_default() -> None:
    config = _config(_echo(version="2025-06"))
    assert list(served_names(config.models)) == ["m@2025-06", "m"]
    plan = compile_plan(config)
    assert plan.model("m") is plan.model("m@2025-06") is not None


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([_echo(), _echo()], "appears twice: give each spec of it its own `version`"),
        ([_echo(version="1"), _echo()], "give each spec of it its own `version`"),
        ([_echo(version="1", default=True), _echo(version="1")], "'m@1' appears twice"),
        ([_echo(version="1"), _echo(version="2")], "none sets `default: true`"),
        ([_echo(version="1", default=True), _echo(version="2", default=True)], r"2 set \(m@1, m@2\)"),
    ],
)
def test_version_conflicts_are_refused_by_name(models: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _config(*models)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"version": "a b"}, "`version` must be 1-64 characters"),
        ({"version": ""}, "`version` must be 1-64 characters"),
        ({"default": True}, "`default` applies to a versioned model"),
    ],
)
def test_bad_version_fields_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSpec.model_validate(_echo(**fields))


def test_an_id_cannot_hold_the_version_separator() -> None:
    with pytest.raises(ValidationError, match="model `id` must be"):
        ModelSpec.model_validate(_echo("m@1"))


def test_code_version_follows_what_replicas_are_built_from() -> None:
    base = compile_plan(_config(_echo(version="1", default=True), _echo(version="2"), _echo("other")))
    # Scaling (Serve changes it in place) and the default flag (only the router reads it) keep the code version.
    rescaled = compile_plan(
        _config(
            _echo(version="1"),
            _echo(version="2", default=True),
            _echo("other", scaling={"min_replicas": 2, "max_replicas": 2}),
        )
    )
    assert [m.code_version for m in base.models] == [m.code_version for m in rescaled.models]
    assert rescaled.models[2].serve_options["num_replicas"] == 2
    # What the engine is built from changes it, and only for that model; the router's version follows any change.
    changed = compile_plan(
        _config(_echo(version="1", default=True), _echo(version="2"), _echo("other", max_output_tokens=7))
    )
    assert [a.code_version == b.code_version for a, b in zip(base.models, changed.models, strict=True)] == [
        True,
        True,
        False,
    ]
    assert len({base.router_version, rescaled.router_version, changed.router_version}) == 3
    assert compile_plan(base.config).router_version == base.router_version  # deterministic


def test_openapi_model_enums_name_every_version() -> None:
    specs = _config(_echo(version="1"), _echo(version="2", default=True), _echo("vec", task="embed")).models
    schemas = narrow_openapi(app.openapi(), specs)["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["enum"] == ["m", "m@1", "m@2"]
    assert schemas["EmbeddingRequest"]["properties"]["model"]["enum"] == ["vec"]
