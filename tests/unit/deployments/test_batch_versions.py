"""Model versions where batches and pipelines name a model: `id@version`, or the bare id for the default version
(the Batches API's model lookup, the batch job's line check and worker, `modelfleet batch submit`'s spec, and
pipeline targets). No Ray: the echo engine runs in-process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.jobs import BatchError, build_spec
from deployments.api import batches
from deployments.batch.format import parse_line, validate_body
from deployments.batch.runner import BatchRunner
from deployments.config import ServingConfig
from deployments.errors import InvalidRequestError, ModelNotFoundError
from deployments.pipelines.spec import plan_pipelines
from deployments.plan import plan_model
from models.spec import ModelSpec

ECHO: dict[str, Any] = {"task": "generate", "engine": "echo"}
CONFIG = ServingConfig(
    models=[
        ModelSpec(id="m", version="1", **ECHO),
        ModelSpec(id="m", version="2", default=True, **ECHO),
        ModelSpec(id="solo", version="7", **ECHO),  # a version alone under its id is the default
        ModelSpec(id="plain", **ECHO),
        ModelSpec(id="vec", task="embed", engine="echo"),
    ]
)
V1, V2, SOLO, PLAIN = CONFIG.models[:4]
CHAT = "/v1/chat/completions"


def _line(model: str | None) -> bytes:
    body = {"messages": [{"role": "user", "content": "a b"}], **({"model": model} if model else {})}
    return json.dumps({"custom_id": "r", "method": "POST", "url": CHAT, "body": body}).encode()


def test_a_line_names_the_batch_model_by_id_at_version_or_by_a_name_it_was_asked_for() -> None:
    # No model: the batch's own, by its exact name.
    assert validate_body(parse_line(_line(None), 1, V2), V2).model == "m@2"
    assert validate_body(parse_line(_line("m@2"), 1, V2), V2).model == "m@2"
    # The bare id only when the batch was asked for by it (its default version).
    assert validate_body(parse_line(_line("m"), 1, V2), V2, ("m",)).model == "m"
    with pytest.raises(InvalidRequestError, match="body.model is 'm', but this batch runs model 'm@2'"):
        validate_body(parse_line(_line("m"), 1, V2), V2)
    with pytest.raises(InvalidRequestError, match="this batch runs model 'm@2'"):
        validate_body(parse_line(_line("m@1"), 1, V2), V2, ("m",))
    # An unversioned model keeps its plain id.
    assert validate_body(parse_line(_line("plain"), 1, PLAIN), PLAIN).model == "plain"


@pytest.fixture
def configured() -> Iterator[None]:
    batches.configure(plan_model(spec) for spec in CONFIG.models)
    yield
    batches.configure(())


@pytest.mark.usefixtures("configured")
def test_the_batches_api_picks_a_version_by_name() -> None:
    assert batches._plan_for("m", CHAT).spec.versioned_id == "m@2"
    assert batches._plan_for("m@1", CHAT).spec.versioned_id == "m@1"
    assert batches._plan_for("m@2", CHAT).spec.versioned_id == "m@2"
    assert batches._plan_for("solo", CHAT).spec.versioned_id == "solo@7"
    assert batches._plan_for("plain", CHAT).spec.versioned_id == "plain"
    with pytest.raises(ModelNotFoundError) as unknown:
        batches._plan_for("m@3", CHAT)
    assert "Served models: m@1, m@2, m, solo@7, solo, plain, vec" in unknown.value.message
    with pytest.raises(InvalidRequestError, match="does not serve /v1/embeddings"):
        batches._plan_for("m@1", "/v1/embeddings")


def test_batch_submit_resolves_the_name_and_lets_the_lines_use_it(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(_line("m").decode() + "\n")
    default = build_spec(CONFIG, "m", source, tmp_path / "out.jsonl")
    assert (default.model.spec.versioned_id, default.names) == ("m@2", ("m",))
    assert default.model.serve_options == plan_model(V2).serve_options
    exact = build_spec(CONFIG, "m@1", source, tmp_path / "out.jsonl")
    assert (exact.model.spec.versioned_id, exact.names) == ("m@1", ())
    with pytest.raises(BatchError, match=r"has no model 'm@9' \(models: m@1, m@2, m, solo@7, solo, plain, vec\)"):
        build_spec(CONFIG, "m@9", source, tmp_path / "out.jsonl")


def test_the_batch_worker_answers_lines_of_the_default_version_by_its_bare_id() -> None:
    runner = BatchRunner(plan_model(V2).model_dump_json(), CHAT, ("m",))
    try:
        raws = [_line("m"), _line("m@2"), _line(None), _line("m@1")]
        out = runner({"line": np.arange(1, 5), "raw": np.array(raws, dtype=object)})
    finally:
        runner.close()
    lines = [json.loads(text) for text in out["output"]]
    assert out["failed"].tolist() == [False, False, False, True]
    assert [line["response"]["body"].get("model") for line in lines[:3]] == ["m", "m@2", "m@2"]
    assert [line["response"]["body"]["choices"][0]["message"]["content"] for line in lines[:3]] == ["a b"] * 3
    refused = lines[3]["response"]
    assert refused["status_code"] == 400 and "this batch runs model 'm@2'" in refused["body"]["error"]["message"]


def _pipelines(*pipelines: dict[str, Any]) -> ServingConfig:
    return ServingConfig.model_validate(
        {"models": [m.model_dump(exclude_defaults=True) for m in CONFIG.models], "pipelines": list(pipelines)}
    )


def test_pipeline_targets_name_versions() -> None:
    canary = {
        "id": "canary",
        "kind": "split",
        "targets": [{"model": "m@1", "weight": 9}, {"model": "m@2", "weight": 1}],
    }
    safe = {"id": "safe", "kind": "fallback", "targets": [{"model": "m"}, {"model": "solo"}, {"model": "plain"}]}
    config = _pipelines(canary, safe)
    plans = {p.spec.id: p for p in plan_pipelines(config.models, config.pipelines)}
    assert (plans["canary"].task, plans["canary"].models) == ("generate", ("m@1", "m@2"))
    assert plans["safe"].models == ("m", "solo", "plain")
    with pytest.raises(ValueError, match=r"targets.0.model: 'm@3' is neither a model nor a pipeline; use one of "):
        _pipelines({"id": "p", "kind": "fallback", "targets": [{"model": "m@3"}, {"model": "m"}]})
    with pytest.raises(ValueError, match="'vec@1' is neither a model nor a pipeline"):
        _pipelines({"id": "p", "kind": "fallback", "targets": [{"model": "vec@1"}, {"model": "vec"}]})
