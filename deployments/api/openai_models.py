"""OpenAI wire models: the request and response bodies of the HTTP API, and their mapping to engine types."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from deployments.api.structured import ResponseFormat, StructuredOutputs, structured_output
from deployments.api.tools import MessageToolCall, NamedToolChoice, ToolDefinition
from deployments.api.wire import OnlyFalse, WireRequest
from deployments.engines.protocol import ChatMessage, SamplingConfig, StructuredOutput, ToolFunction
from deployments.errors import InvalidRequestError

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "ErrorBody",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "ModelPermission",
    "new_id",
]


def new_id(prefix: str) -> str:
    """An OpenAI-style object id, e.g. `chatcmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


_Request = WireRequest
# Seeds are 64-bit signed integers, as in vLLM's server (torch's generator takes no more).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
_Stop = Annotated[str, Field(min_length=1, description="A stop sequence (not empty).")]
_TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
_Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


def _int64(schema: dict[str, Any]) -> None:
    """The document states the 64-bit range as OpenAPI's `format: int64`: as `minimum`/`maximum` it would be written
    as floats (9.223372036854775e+18), which no JSON reader takes back exactly."""
    for variant in schema.get("anyOf", [schema]):
        if variant.get("type") == "integer":
            variant.pop("minimum", None)
            variant.pop("maximum", None)
            variant["format"] = "int64"


def _only_pattern_keys(schema: dict[str, Any]) -> None:
    """The document states what validation does: keys other than the pattern's are refused."""
    for variant in schema.get("anyOf", [schema]):
        if "patternProperties" in variant:
            variant["additionalProperties"] = False


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class _TextPart(_Request):
    type: Literal["text"]
    text: str


class _Message(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | Annotated[list[_TextPart], Field(min_length=1)] | None = None
    name: str | None = Field(None, description="The participant's name; passed to the chat template.")
    tool_calls: list[MessageToolCall] | None = Field(None, description="assistant turns: the calls the model made.")
    tool_call_id: str | None = Field(None, description="tool turns: the call this result answers.")
    # What an SDK sends back when a client appends a response's message to the history: accepted when empty.
    refusal: None = None
    annotations: None = None
    audio: None = None
    function_call: None = None

    def flat(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return ChatMessage(
            role=self.role,
            content=content or "",
            name=self.name,
            tool_calls=tuple(c.internal() for c in self.tool_calls or ()),
            tool_call_id=self.tool_call_id,
        )


class _StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    model: str = Field(min_length=1, description="Id of a served model (see GET /v1/models).")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16, description="How many choices to generate (each one is its own request).")
    stop: _Stop | list[_Stop] | None = Field(None, max_length=4, description="Up to 4 sequences where output stops.")
    seed: int | None = Field(
        None,
        ge=SEED_MIN,
        le=SEED_MAX,
        description="A 64-bit seed for reproducible sampling.",
        json_schema_extra=_int64,
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = Field(None, description="The end user; a model with routing policy 'session' keys on it.")
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], _Bias] | None = Field(
        None,
        description="Token id (as a string) -> bias from -100 to 100 added to its logit.",
        json_schema_extra=_only_pattern_keys,
    )
    response_format: ResponseFormat | None = Field(
        None, description="'json_object' or 'json_schema' constrain the output (wins over structured_outputs)."
    )
    # vLLM's extensions to the OpenAI API.
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM: one constraint on the output: json (a schema), json_object, regex, choice, grammar."
    )
    top_k: int = Field(0, ge=-1, description="vLLM: sample among the k most likely tokens; 0 or -1: all.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM: drop tokens below min_p x the top probability.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, description="vLLM: above 1 discourages repetition.")
    min_tokens: int = Field(
        0, ge=0, description="vLLM: tokens generated before EOS or a stop may end the output (at most max_tokens)."
    )
    ignore_eos: bool = Field(False, description="vLLM: keep generating past the end-of-sequence token.")
    skip_special_tokens: bool = Field(True, description="vLLM: leave special tokens out of the text.")

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
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            min_tokens=min(self.min_tokens, max_tokens),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
            structured=self.structured(),
        )

    def structured(self) -> StructuredOutput | None:
        """The constraint on the output, if any."""
        return structured_output(self.response_format, self.structured_outputs)

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
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="Alternatives per token; above 0 it turns logprobs on by itself."
    )
    tools: list[ToolDefinition] | None = Field(None, min_length=1, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description=(
            "'none', 'auto' (the default with tools; needs the model's tool_call_parser), 'required' or a named "
            "function. 'required' and named calls constrain the output to the tools' schemas (any model on vllm)."
        ),
    )
    parallel_tool_calls: bool | None = Field(None, description="tool_choice 'required': allow more than one call.")
    # Fields that only describe the request: accepted, not acted on.
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Describes the request (recorded nowhere yet)."
    )
    store: OnlyFalse | None = Field(None, description="Completions are never stored: only false is accepted.")
    service_tier: Literal["auto", "default"] | None = Field(None, description="One tier is served: auto or default.")
    safety_identifier: str | None = Field(None, max_length=64, description="Describes the end user (not acted on).")

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_fits(cls, value: object, info: ValidationInfo) -> object:
        tools: list[ToolDefinition] = info.data.get("tools") or []
        if value not in (None, "none") and not tools:
            raise ValueError("tool_choice needs tools: send the functions in `tools`, or set tool_choice to 'none'")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names function '{value.function.name}', which is not in `tools`")
        return value

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        """The messages flattened to text."""
        return tuple(m.flat() for m in self.messages)

    def sampling(self, default_max_tokens: int) -> SamplingConfig:
        """Engine sampling settings; `default_max_tokens` (the model's limit) applies when the client sets none.

        Raises:
            InvalidRequestError: either alias is above the model's limit (the one not used is checked too).
        """
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value > default_max_tokens:
                raise InvalidRequestError(
                    f"{name} is {value}; this model allows at most {default_max_tokens}", param=name
                )
        logprobs = (self.top_logprobs or 0) if self.logprobs or self.top_logprobs else None
        return self._sampling(self.max_completion_tokens or self.max_tokens or default_max_tokens, logprobs)

    def tool_fields(self) -> dict[str, Any]:
        """The GenerateRequest fields of tool calling: tools, tool_choice, tool_name, parallel_tool_calls."""
        tools: tuple[ToolFunction, ...] = tuple(t.function.internal() for t in self.tools or ())
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if tools else "none")
        fields: dict[str, Any] = {"tools": tools, "parallel_tool_calls": self.parallel_tool_calls is not False}
        if isinstance(choice, NamedToolChoice):
            return fields | {"tool_choice": "function", "tool_name": choice.function.name}
        return fields | {"tool_choice": choice}


class CompletionRequest(_SamplingFields):
    """Body of POST /v1/completions."""

    # `echo` with `logprobs` would ask for the prompt's logprobs, which no engine returns: the document says so.
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["echo", "logprobs"],
                "properties": {"echo": {"const": True}, "logprobs": {"type": "integer"}},
            }
        }
    )

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=64)]
        | Annotated[list[_TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[_TokenId], Field(min_length=1)]], Field(min_length=1, max_length=64)]
    ) = Field(
        description=(
            "A text, a list of texts, token ids, or a list of token-id lists. Each prompt gets `n` choices, "
            "indexed prompt by prompt (choice index = prompt index x n + i)."
        )
    )
    max_tokens: int = Field(16, ge=1, description="Most tokens to generate.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Log probabilities of the top k tokens.")
    echo: bool = Field(False, description="Put the prompt before the output in each choice's text.")
    suffix: None = Field(None, description="Not supported (no fill-in-the-middle): leave it unset or null.")
    best_of: int | None = Field(
        None, ge=1, le=1, description="Only 1: each choice is one sample (no server-side choice among several)."
    )

    @field_validator("suffix", mode="before")
    @classmethod
    def _no_suffix(cls, value: object) -> None:
        if value is not None:
            raise ValueError("suffix is not supported: no served model does fill-in-the-middle; leave it unset")
        return None

    @field_validator("echo")
    @classmethod
    def _echo_without_logprobs(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("logprobs") is not None:
            raise ValueError("echo with logprobs (the prompt's logprobs) is not supported: drop one of them")
        return value

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, one entry each: texts, or token-id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]
        return cast("list[str] | list[list[int]]", self.prompt)

    def sampling(self) -> SamplingConfig:
        """Engine sampling settings."""
        return self._sampling(self.max_tokens, self.logprobs)


class EmbeddingRequest(_Request):
    """Body of POST /v1/embeddings."""

    model: str = Field(min_length=1)
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)] = Field(
        description="A text or a list of 1-2048 texts."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Accepted only if equal to the model's own size.")
    user: str | None = Field(None, description="The end user; a model with routing policy 'session' keys on it.")

    @property
    def texts(self) -> tuple[str, ...]:
        """The inputs as a tuple."""
        return (self.input,) if isinstance(self.input, str) else tuple(self.input)


class ModelPermission(_Response):
    """vLLM's (and OpenAI's legacy) permission entry of a model card: serving allowed, training not."""

    id: str = Field(default_factory=lambda: new_id("modelperm"))
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(_Response):
    """One entry of GET /v1/models, with vLLM's fields."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "modelfleet"
    task: str
    engine: str
    root: str | None = Field(None, description="Where the weights come from (the model's source).")
    parent: str | None = Field(None, description="A LoRA adapter's base model; unset for a model.")
    max_model_len: int | None = Field(None, description="Most tokens (prompt + output) per request.")
    status: Literal["ready", "cold", "starting"] | None = Field(
        None,
        description=(
            "'ready': a replica runs. 'cold': the model scales to zero and no replica runs now; it is available, and "
            "a request starts one and waits for it. 'starting': no replica runs yet. Unset: not known."
        ),
    )
    replicas: int | None = Field(None, description="Replicas running now (0 when cold); unset: not known.")
    pipeline: dict[str, Any] | None = Field(
        None, description="Set for a pipeline (engine 'pipeline'): its `kind`, `steps` and the `models` it may call."
    )
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


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
