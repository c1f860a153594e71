"""Tool calls in a vLLM model's output, read with vLLM's own pieces: forced calls (`required`, a named function)
constrained to the schema vLLM builds from the tools, and `auto` calls read by vLLM's tool-call parsers.

Imported only by the vLLM engine, after vLLM is.
"""

from __future__ import annotations

from typing import Any

from deployments.engines.protocol import FinishReason, GenerateRequest, ToolCallDelta
from deployments.errors import EngineStartError, InvalidRequestError

__all__ = ["ToolCallReader", "load_parser"]


def load_parser(name: str | None, model_name: str, tokenizer: Any) -> Any:
    """vLLM's composed Parser class for `tool_call_parser` (None when unset), checked against the tokenizer.

    Raises:
        EngineStartError: vLLM has no parser of that name, or it does not fit the tokenizer.
    """
    if name is None:
        return None
    from vllm.parser.parser_manager import ParserManager
    from vllm.tool_parsers import ToolParserManager

    try:
        return ParserManager.get_parser(
            tool_parser_name=name, enable_auto_tools=True, model_name=model_name, tokenizer=tokenizer
        )
    except (TypeError, KeyError, ValueError) as exc:
        known = ", ".join(sorted(ToolParserManager.list_registered()))
        raise EngineStartError(f"tool_call_parser '{name}' cannot be used: {exc}. vLLM's parsers: {known}") from exc


class ToolCallReader:
    """One choice's output, delta by delta, split into content and tool-call deltas (as vLLM's server does)."""

    def __init__(self, request: GenerateRequest, model_id: str, parser_cls: Any, tokenizer: Any, model_config: Any):
        """Raises:
        InvalidRequestError: tool_choice 'auto' on a model without a tool-call parser.
        """
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        self.choice = request.tool_choice
        self._tokenizer = tokenizer
        self._name_sent = False
        self._text = ""
        self.called = False
        if self.choice == "auto" and parser_cls is None:
            raise InvalidRequestError(
                f"tool_choice 'auto' needs a tool-call parser, and model '{model_id}' has none configured: set "
                "`tool_call_parser` in its config, or send tool_choice 'required', a named function or 'none'",
                param="tool_choice",
            )
        tool_choice: Any = self.choice
        if self.choice == "function":
            tool_choice = {"type": "function", "function": {"name": request.tool_name}}
        # The parsers read the request only for its tools and tool choice; the history is rendered elsewhere.
        self._request: Any = ChatCompletionRequest.model_validate(
            {
                "model": model_id,
                "messages": [{"role": "user", "content": ""}],
                "tools": [tool.template_dict() for tool in request.tools],
                "tool_choice": tool_choice,
                "parallel_tool_calls": request.parallel_tool_calls,
            }
        )
        self._parser: Any = None
        if self.choice == "auto":
            tools = self._request.tools
            self._parser = parser_cls(tokenizer, tools, chat_template_kwargs=None, model_config=model_config)
            self._request = self._parser.adjust_request(self._request)

    @property
    def skip_special_tokens(self) -> bool | None:
        """The parser's override (some need the special tokens that mark a call), or None."""
        return self._request.skip_special_tokens if self._parser is not None else None

    def constraint(self) -> dict[str, Any] | None:
        """The JSON schema a forced call's output must follow (vLLM's, built from the tools), or None."""
        from vllm.tool_parsers.utils import get_json_schema_from_tools

        if self.choice not in ("required", "function"):
            return None
        schema = get_json_schema_from_tools(
            tool_choice=self._request.tool_choice,
            tools=self._request.tools,
            parallel_tool_calls=self._request.parallel_tool_calls,
        )
        return schema if isinstance(schema, dict) else None

    def feed(
        self, delta_text: str, delta_ids: list[int], prompt_ids: list[int], *, finished: bool
    ) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """The content and tool-call pieces of one output delta."""
        from vllm.tool_parsers.streaming import (
            extract_named_tool_call_streaming,
            extract_required_tool_call_streaming,
        )

        previous, self._text = self._text, self._text + delta_text
        if self.choice == "function":
            if not delta_text:
                return "", ()
            message, self._name_sent = extract_named_tool_call_streaming(
                delta_text=delta_text,
                function_name=self._request.tool_choice.function.name,
                function_name_returned=self._name_sent,
                tool_call_idx=None,
                tool_call_id_type="random",
                tokenizer=self._tokenizer,
            )
        elif self.choice == "required":
            message, _ = extract_required_tool_call_streaming(
                previous_text=previous, current_text=self._text, tool_call_idx=None, tool_call_id_type="random"
            )
        elif self._parser is not None:  # auto (always has a parser: checked in __init__)
            message = self._parser.parse_delta(
                delta_text=delta_text,
                delta_token_ids=delta_ids,
                request=self._request,
                prompt_token_ids=prompt_ids,
                finished=finished,
            )
        else:
            message = None
        if message is None:
            return "", ()
        calls = tuple(
            ToolCallDelta(
                index=call.index,
                id=call.id,
                name=call.function.name if call.function else None,
                arguments=(call.function.arguments or "") if call.function else "",
            )
            for call in message.tool_calls or ()
        )
        self.called = self.called or bool(calls)
        return (message.content or "") if self.choice == "auto" else "", calls

    def finish_reason(self, reason: FinishReason) -> FinishReason:
        """OpenAI's: 'tool_calls' when `auto` called a tool or `required` ended normally; a named call ends 'stop'."""
        if self.called and (self.choice == "auto" or (self.choice == "required" and reason == "stop")):
            return "tool_calls"
        return reason
