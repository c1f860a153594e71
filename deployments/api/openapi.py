"""The served OpenAPI document: FastAPI's, narrowed to the config being served.

FastAPI derives the document from the request models, which know every field but not which models are served. The
router knows: each request's `model` becomes an enum of the models that endpoint serves, and `max_tokens` is capped
at the largest `max_output_tokens` among them. Schema-driven clients and fuzzers then generate requests the server
takes, and a name the server would answer with 404 is visibly outside the document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from fastapi import FastAPI

from models.spec import ModelSpec, adapter_names, served_names

__all__ = ["MODEL_FIELDS", "ServedAPI", "narrow_openapi"]

Picks = Callable[[ModelSpec], bool]


def _generates(spec: ModelSpec) -> bool:
    return spec.task == "generate"


def _tokenizes(spec: ModelSpec) -> bool:
    # /tokenize and /detokenize need the engine's tokenizer; the echo engine has none.
    return spec.task == "generate" and spec.engine != "echo"


# Request schema (component name) -> which served models its `model` field may name.
# Endpoints added beside the OpenAI ones register their request schemas here.
MODEL_FIELDS: dict[str, Picks] = {
    "ChatCompletionRequest": _generates,
    "CompletionRequest": _generates,
    "TokenizeCompletionRequest": _tokenizes,
    "TokenizeChatRequest": _tokenizes,
    "DetokenizeRequest": _tokenizes,
    "EmbeddingRequest": lambda spec: spec.task == "embed",
    "ClassificationRequest": lambda spec: spec.task == "classify",
    "ScoreTextsRequest": lambda spec: spec.task == "score",
    "RerankRequest": lambda spec: spec.task == "score",
}
_OUTPUT_FIELDS = {
    "ChatCompletionRequest": ("max_tokens", "max_completion_tokens"),
    "CompletionRequest": ("max_tokens",),
}


def _integer_variant(prop: dict[str, Any]) -> dict[str, Any] | None:
    """The integer schema of a field that may also be null (`anyOf: [integer, null]`), or the field itself."""
    if prop.get("type") == "integer":
        return prop
    return next((v for v in prop.get("anyOf", ()) if v.get("type") == "integer"), None)


def narrow_openapi(document: dict[str, Any], specs: Iterable[ModelSpec]) -> dict[str, Any]:
    """`document` (changed in place) with the served models' names and output limits filled in."""
    specs = list(specs)
    # `id@version`, the bare id of each default version, and each LoRA adapter's name (its base model's spec)
    names = {**served_names(specs), **adapter_names(specs)}
    schemas: dict[str, Any] = document.get("components", {}).get("schemas", {})
    for name, picks in MODEL_FIELDS.items():
        served = [s for s in specs if picks(s)]
        model = schemas.get(name, {}).get("properties", {}).get("model")
        if model is None:
            continue
        # No served model: the endpoint still exists, and any name gets a 404 (an empty enum is invalid JSON Schema).
        if served:
            model["enum"] = sorted(served_name for served_name, spec in names.items() if picks(spec))
        most = max((s.max_output_tokens for s in served), default=None)
        for field in _OUTPUT_FIELDS.get(name, ()):
            integer = _integer_variant(schemas[name]["properties"].get(field, {}))
            if integer is not None and most is not None:
                integer["maximum"] = min(integer.get("maximum", most), most)
    return document


class ServedAPI(FastAPI):
    """A FastAPI app whose OpenAPI document names the served models.

    Serve runs a pickled copy of the app in each replica, so the served models are set on the class (`served`,
    once per process, when the ingress starts) rather than on the instance the module holds.
    """

    served: ClassVar[tuple[ModelSpec, ...]] = ()

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = narrow_openapi(super().openapi(), type(self).served)
        return self.openapi_schema
