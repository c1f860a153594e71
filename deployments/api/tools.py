"""Tool calling on the wire: `tools`, `tool_choice` and the tool calls of assistant turns in the history."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from deployments.api.wire import WireRequest
from deployments.engines.protocol import ToolCall, ToolCallDelta, ToolFunction

__all__ = ["MessageToolCall", "NamedToolChoice", "ToolDefinition", "tool_call_json"]

_NAME = r"^[A-Za-z0-9_.:-]{1,64}$"


class _FunctionDefinition(WireRequest):
    name: str = Field(pattern=_NAME, description="The function's name (letters, digits, _ . : -; up to 64).")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema of the arguments (an object).")
    strict: bool | None = Field(None, description="Accepted either way: forced calls are always constrained.")

    def internal(self) -> ToolFunction:
        return ToolFunction(
            name=self.name, description=self.description, parameters=self.parameters, strict=self.strict
        )


class ToolDefinition(WireRequest):
    """One entry of `tools`."""

    type: Literal["function"]
    function: _FunctionDefinition


class _NamedFunction(WireRequest):
    name: str = Field(pattern=_NAME)


class NamedToolChoice(WireRequest):
    """`tool_choice` naming the function the model must call."""

    type: Literal["function"]
    function: _NamedFunction


class _CalledFunction(WireRequest):
    name: str = Field(min_length=1)
    arguments: str = Field(description="The arguments as a JSON text.")


class MessageToolCall(WireRequest):
    """A tool call of an earlier assistant turn, sent back in the history."""

    id: str = Field(min_length=1)
    type: Literal["function"]
    function: _CalledFunction

    def internal(self) -> ToolCall:
        return ToolCall(id=self.id, name=self.function.name, arguments=self.function.arguments)


def tool_call_json(call: ToolCallDelta, *, delta: bool) -> dict[str, Any]:
    """A tool call as OpenAI writes it: whole in a message; in a stream chunk, id and name on its first piece only."""
    function: dict[str, Any] = {"arguments": call.arguments}
    if call.name is not None or not delta:
        function = {"name": call.name, **function}
    out: dict[str, Any] = {"index": call.index} if delta else {}
    if call.id is not None or not delta:
        out |= {"id": call.id, "type": "function"}
    return {**out, "function": function}
