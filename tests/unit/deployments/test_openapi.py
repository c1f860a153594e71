"""The served OpenAPI document names the served models, and request types are as strict as it says."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from deployments.api.ingress import app
from deployments.api.openai_models import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from deployments.api.openapi import ServedAPI, narrow_openapi
from models.spec import ModelSpec

pytestmark = pytest.mark.unit

SPECS = (
    ModelSpec(id="chat-a", task="generate", engine="echo", max_output_tokens=64),
    ModelSpec(id="chat-b", task="generate", engine="vllm", source="x", max_output_tokens=512),
    ModelSpec(id="vec", task="embed", engine="echo"),
)


def _document() -> dict[str, Any]:
    return narrow_openapi(app.openapi(), SPECS)["components"]["schemas"]


def test_model_fields_list_the_models_each_endpoint_serves() -> None:
    schemas = _document()
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["enum"] == ["chat-a", "chat-b"]
    assert schemas["EmbeddingRequest"]["properties"]["model"]["enum"] == ["vec"]
    assert schemas["TokenizeCompletionRequest"]["properties"]["model"]["enum"] == ["chat-b"]  # echo: no tokenizer
    max_tokens = schemas["CompletionRequest"]["properties"]["max_tokens"]
    assert (
        max_tokens.get("maximum", next((v for v in max_tokens.get("anyOf", ()) if "maximum" in v), {}).get("maximum"))
        == 512
    )


def test_the_served_app_keeps_its_document_per_process() -> None:
    served = ServedAPI(title="t")

    @served.post("/v1/embeddings")
    def embed(body: EmbeddingRequest) -> dict[str, str]:
        return {}

    ServedAPI.served = SPECS
    try:
        document = TestClient(served).get("/openapi.json").json()
    finally:
        ServedAPI.served = ()
    assert document["components"]["schemas"]["EmbeddingRequest"]["properties"]["model"]["enum"] == ["vec"]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (ChatCompletionRequest, {**CHAT, "store": 0}),  # a Literal matches by equality: 0 == False
        (ChatCompletionRequest, {**CHAT, "logprobs": 0}),
        (ChatCompletionRequest, {**CHAT, "max_tokens": "5"}),
        (ChatCompletionRequest, {**CHAT, "seed": 2**63}),
        (CompletionRequest, {"model": "m", "prompt": "x", "echo": 1}),
        (CompletionRequest, {"model": "m", "prompt": "x", "best_of": 2}),
        (EmbeddingRequest, {"model": "m", "input": []}),
    ],
)
def test_types_are_strict(model: type, body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        model.model_validate(body)


def test_integers_still_pass_as_numbers() -> None:
    assert ChatCompletionRequest.model_validate({**CHAT, "temperature": 1, "store": False}).temperature == 1


def test_both_output_limits_are_checked() -> None:
    from deployments.errors import InvalidRequestError

    body = ChatCompletionRequest.model_validate({**CHAT, "max_tokens": 100, "max_completion_tokens": 5})
    with pytest.raises(InvalidRequestError) as info:
        body.sampling(64)
    assert info.value.param == "max_tokens"
