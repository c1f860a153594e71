"""Model versions on a real cluster: `model@version` and the bare id (the default version) through the official
client, `/v1/models`, the OpenAPI enums, and live changes (`modelfleet models add|set-default|remove`, as library
calls on the recorded config) that restart no replica of an untouched model, seen through `x-modelfleet-replica`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from cluster import deploy as deploying
from cluster import model_changes
from cluster.local import ClusterState
from models.spec import ModelSpec

pytestmark = pytest.mark.slow

APP = "versions"
REPLICA = "x-modelfleet-replica"
TIMEOUT_S = 60.0


def _echo(model_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": model_id, "task": "generate", "engine": "echo", "resources": {"num_cpus": 0.25}, **fields}


@pytest.fixture(scope="module")
def base(deploy: Callable[[dict[str, Any]], str]) -> str:
    return deploy(
        {
            "name": APP,
            "route_prefix": "/versions",
            "models": [
                _echo("chat", version="1", default=True),
                # The same engine as version 1, with its own output limit; replica ids tell the versions apart.
                _echo("chat", version="2", max_output_tokens=32),
                _echo("other"),
            ],
        }
    )


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def _replica(base: str, model: str) -> str:
    """The replica that answered one chat completion of `model` (the model has one replica)."""
    raw = _client(base).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "one two three"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "one two three"
    assert completion.model == model
    replica = raw.headers[REPLICA]
    assert replica
    return replica


def test_requests_name_a_version_or_get_the_default(base: str) -> None:
    one, two = _replica(base, "chat@1"), _replica(base, "chat@2")
    assert one != two
    assert _replica(base, "chat") == one  # the default version
    with pytest.raises(openai.NotFoundError) as err:
        _client(base).chat.completions.create(model="chat@3", messages=[{"role": "user", "content": "hi"}])
    body = err.value.response.json()["error"]
    assert body["param"] == "model" and "chat@3" in body["message"] and body["type"] == "not_found_error"
    # Version 2's own limit applies to it, not version 1's.
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        _client(base).completions.create(model="chat@2", prompt="hi", max_tokens=33)
    assert _client(base).completions.create(model="chat@1", prompt="hi", max_tokens=33).choices[0].text == "hi"


def test_models_list_every_version_and_the_bare_id(base: str) -> None:
    client = _client(base)
    assert [m.id for m in client.models.list()] == ["chat@1", "chat", "chat@2", "other"]
    assert client.models.retrieve("chat@2").id == "chat@2"
    assert client.models.retrieve("chat").id == "chat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("chat@9")
    document = httpx.get(f"{base}/openapi.json", timeout=TIMEOUT_S).json()
    enum = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["enum"]
    assert enum == ["chat", "chat@1", "chat@2", "other"]


def test_live_changes_restart_no_untouched_replica(base: str) -> None:
    state = ClusterState(pid=0, gcs_address="in-process", temp_dir="", log_file="", num_cpus=8)
    before = {m: _replica(base, m) for m in ("chat@1", "chat@2", "other")}

    config = model_changes.running_config(APP)
    added = model_changes.add_models(config, [ModelSpec.model_validate(_echo("added"))])
    assert deploying.deploy(added, state, timeout_s=180) == base
    assert _replica(base, "added") not in before.values()

    switched = model_changes.set_default(model_changes.running_config(APP), "chat@2")
    deploying.deploy(switched, state, timeout_s=180)
    assert _replica(base, "chat") == before["chat@2"]  # the bare id now reaches version 2, the same replica

    removed = model_changes.remove_model(model_changes.running_config(APP), "chat@1")
    deploying.deploy(removed, state, timeout_s=180)
    with pytest.raises(openai.NotFoundError):
        _client(base).chat.completions.create(model="chat@1", messages=[{"role": "user", "content": "hi"}])
    assert [m.id for m in _client(base).models.list()] == ["chat@2", "chat", "other", "added"]

    # Three redeploys (a model added, the default switched, a version removed): the replicas of the models they did
    # not touch are the same Serve replicas as before.
    assert {m: _replica(base, m) for m in ("chat@2", "other")} == {m: before[m] for m in ("chat@2", "other")}
