"""POST /tokenize and /detokenize bodies, in vLLM's shapes (a completion prompt or chat messages)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from deployments.api.openai_models import _Message
from deployments.api.tools import ToolDefinition
from deployments.api.wire import OnlyFalse, WireRequest
from deployments.engines.protocol import TokenizeRequest

__all__ = [
    "DetokenizeRequest",
    "DetokenizeResponse",
    "TokenizeChatRequest",
    "TokenizeCompletionRequest",
    "TokenizeResponse",
]

_TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class TokenizeCompletionRequest(WireRequest):
    """Tokenize a text as /v1/completions would."""

    model: str = Field(min_length=1, description="Id of a served model.")
    prompt: str = Field(description="The text.")
    add_special_tokens: bool = Field(True, description="Add the tokenizer's special tokens (BOS), as completions do.")
    return_token_strs: bool = Field(False, description="Also return each token's text.")

    def internal(self, request_id: str) -> TokenizeRequest:
        return TokenizeRequest(
            request_id=request_id,
            prompt=self.prompt,
            add_special_tokens=self.add_special_tokens,
            return_token_strs=self.return_token_strs,
        )


class TokenizeChatRequest(WireRequest):
    """Tokenize chat messages as /v1/chat/completions would render them."""

    model: str = Field(min_length=1, description="Id of a served model.")
    messages: list[_Message] = Field(min_length=1)
    add_generation_prompt: bool = Field(True, description="End with the opening of the assistant's turn.")
    add_special_tokens: OnlyFalse = Field(
        False, description="Only false: the chat template places the special tokens itself (vLLM's default)."
    )
    return_token_strs: bool = Field(False, description="Also return each token's text.")
    tools: list[ToolDefinition] | None = Field(None, min_length=1, description="Tools for the chat template.")

    def internal(self, request_id: str) -> TokenizeRequest:
        return TokenizeRequest(
            request_id=request_id,
            messages=tuple(m.flat() for m in self.messages),
            tools=tuple(t.function.internal() for t in self.tools or ()),
            add_special_tokens=self.add_special_tokens,
            add_generation_prompt=self.add_generation_prompt,
            return_token_strs=self.return_token_strs,
        )


class TokenizeResponse(BaseModel):
    """Body of a /tokenize answer."""

    model_config = ConfigDict(protected_namespaces=())

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(WireRequest):
    """Turn token ids back into text."""

    model: str = Field(min_length=1, description="Id of a served model.")
    tokens: list[_TokenId] = Field(description="Token ids.")


class DetokenizeResponse(BaseModel):
    """Body of a /detokenize answer."""

    prompt: str
