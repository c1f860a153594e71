"""Structured outputs on the wire: OpenAI's `response_format` and vLLM's `structured_outputs` extension."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from deployments.api.wire import OnlyTrue, WireRequest
from deployments.engines.protocol import StructuredOutput

__all__ = ["ResponseFormat", "StructuredOutputs", "structured_output"]


class _TextFormat(WireRequest):
    type: Literal["text"]


class _JSONObjectFormat(WireRequest):
    type: Literal["json_object"]


class _JSONSchema(WireRequest):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The schema's name (letters, digits, _ and -).")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema the output must be valid against.")
    strict: bool | None = Field(
        None, description="Accepted either way: the output is always constrained to the schema (decoding, not hope)."
    )


class _JSONSchemaFormat(WireRequest):
    type: Literal["json_schema"]
    json_schema: _JSONSchema


ResponseFormat = Annotated[_TextFormat | _JSONObjectFormat | _JSONSchemaFormat, Field(discriminator="type")]


# vLLM 0.32 reads `disable_any_whitespace` from the engine's config only (engine_kwargs
# `structured_outputs_config: {disable_any_whitespace: true}`), not per request: the field is not offered here.
class _Constraint(WireRequest):
    pass


class _JSONConstraint(_Constraint):
    json_: dict[str, Any] = Field(alias="json", description="A JSON Schema the output must be valid against.")


class _JSONObjectConstraint(_Constraint):
    json_object: OnlyTrue = Field(description="The output is a JSON object.")


class _RegexConstraint(_Constraint):
    regex: str = Field(min_length=1, description="A regular expression the output matches.")


class _ChoiceConstraint(_Constraint):
    choice: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, description="The output is one of these.")


class _GrammarConstraint(_Constraint):
    grammar: str = Field(min_length=1, description="An EBNF (GBNF or Lark) grammar the output follows.")


# One kind per request, expressed as one member per kind so the OpenAPI document says so.
StructuredOutputs = _JSONConstraint | _JSONObjectConstraint | _RegexConstraint | _ChoiceConstraint | _GrammarConstraint


def structured_output(
    response_format: _TextFormat | _JSONObjectFormat | _JSONSchemaFormat | None,
    structured_outputs: StructuredOutputs | None,
) -> StructuredOutput | None:
    """The engine's constraint; `response_format` (other than text) wins over `structured_outputs`, as in vLLM."""
    if isinstance(response_format, _JSONSchemaFormat):
        return StructuredOutput(json_schema=response_format.json_schema.schema_, param="response_format")
    if isinstance(response_format, _JSONObjectFormat):
        return StructuredOutput(json_object=True, param="response_format")
    if structured_outputs is None:
        return None
    common: dict[str, Any] = {"param": "structured_outputs"}
    if isinstance(structured_outputs, _JSONConstraint):
        return StructuredOutput(json_schema=structured_outputs.json_, **common)
    if isinstance(structured_outputs, _JSONObjectConstraint):
        return StructuredOutput(json_object=True, **common)
    if isinstance(structured_outputs, _RegexConstraint):
        return StructuredOutput(regex=structured_outputs.regex, **common)
    if isinstance(structured_outputs, _ChoiceConstraint):
        return StructuredOutput(choice=tuple(structured_outputs.choice), **common)
    return StructuredOutput(grammar=structured_outputs.grammar, **common)
