"""OpenAI wire models: the request and response bodies of the HTTP API, and their mapping to engine types."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from deployments.engines.protocol import ChatMessage, SamplingConfig

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "ErrorBody",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "new_id",
]


def new_id(prefix: str) -> str:
    """An OpenAI-style object id, e.g. `chatcmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    # Clients send fields we do not model (logit_bias, metadata, ...): ignore them, as OpenAI's own API does.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class _TextPart(_Request):
    type: Literal["text"]
    text: str


class _Message(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[_TextPart] | None = None

    def flat(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return ChatMessage(role=self.role, content=content or "")


class _StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    model: str = Field(min_length=1, description="Id of a served model (see GET /v1/models).")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16, description="How many choices to generate (each one is its own request).")
    stop: str | list[str] | None = Field(None, description="Up to 4 sequences where generation stops.")
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = Field(None, description="The end user; a model with routing policy 'session' keys on it.")

    @field_validator("stop")
    @classmethod
    def _stop_limit(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    def _sampling(self, max_tokens: int, logprobs: int | None) -> SamplingConfig:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingConfig(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stop,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    """Body of POST /v1/chat/completions."""

    messages: list[_Message] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default: the model's limit).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (newer clients).")
    logprobs: bool = Field(False, description="Return the log probability of each output token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token (needs logprobs).")

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        """The messages flattened to text."""
        return tuple(m.flat() for m in self.messages)

    def sampling(self, default_max_tokens: int) -> SamplingConfig:
        """Engine sampling settings; `default_max_tokens` applies when the client sets no limit."""
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(self.max_completion_tokens or self.max_tokens or default_max_tokens, logprobs)


class CompletionRequest(_SamplingFields):
    """Body of POST /v1/completions."""

    prompt: str | list[str] = Field(description="The prompt (a list must hold exactly one string).")
    max_tokens: int = Field(16, ge=1, description="Most tokens to generate.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Log probabilities of the top k tokens.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("only one prompt per request is supported: send a string or a list of one string")
        return value

    @property
    def text(self) -> str:
        """The single prompt string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def sampling(self) -> SamplingConfig:
        """Engine sampling settings."""
        return self._sampling(self.max_tokens, self.logprobs)


class EmbeddingRequest(_Request):
    """Body of POST /v1/embeddings."""

    model: str = Field(min_length=1)
    input: str | list[str] = Field(description="A text or a list of texts (at most 2048).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Accepted only if equal to the model's own size.")
    user: str | None = Field(None, description="The end user; a model with routing policy 'session' keys on it.")

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= 2048:
            raise ValueError("input must hold between 1 and 2048 texts")
        return value

    @property
    def texts(self) -> tuple[str, ...]:
        """The inputs as a tuple."""
        return (self.input,) if isinstance(self.input, str) else tuple(self.input)


class ModelCard(_Response):
    """One entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "modelfleet"
    task: str
    engine: str


class ModelList(_Response):
    """Body of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_Response):
    """The `error` object of an OpenAI error response."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    """Every error the API returns: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorBody


def usage(prompt_tokens: int, completion_tokens: int = 0) -> dict[str, Any]:
    """A `usage` object as a dict."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
