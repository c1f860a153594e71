"""The engine interface: what a replica asks of the thing that runs one model, and its internal types.

Engines never import Ray or FastAPI: they are driven with plain asyncio in unit tests.
"""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncIterator, Collection, Iterable
from typing import Any, Literal

from pydantic import Field, model_validator

from deployments.errors import InvalidRequestError
from deployments.plan import EnginePlan, plan_engine
from models.spec import FrozenModel, ModelSpec

__all__ = [
    "ChatMessage",
    "Classification",
    "ClassifyRequest",
    "ClassifyResult",
    "EmbedRequest",
    "EmbedResult",
    "EmbeddingEngine",
    "Engine",
    "FinishReason",
    "GenerateChunk",
    "GenerateRequest",
    "ReplicaTimes",
    "PoolingOptions",
    "SamplingConfig",
    "ScoreRequest",
    "ScoreResult",
    "ScoringEngine",
    "StructuredOutput",
    "TokenLogprob",
    "TokenizeRequest",
    "TokenizeResult",
    "TokenizingEngine",
    "ToolCall",
    "ToolCallDelta",
    "ToolFunction",
    "check_context",
    "check_output_budget",
    "check_token_ids",
    "merge_tool_calls",
    "require_basic_sampling",
]

FinishReason = Literal["stop", "length", "tool_calls"]


class StructuredOutput(FrozenModel):
    """A constraint on the output text (vLLM's structured outputs): exactly one kind is set."""

    json_schema: dict[str, Any] | None = Field(None, description="The output is JSON valid against this schema.")
    json_object: bool = Field(False, description="The output is a JSON object.")
    regex: str | None = Field(None, description="The output matches this regular expression.")
    choice: tuple[str, ...] | None = Field(None, description="The output is one of these strings.")
    grammar: str | None = Field(None, description="The output follows this EBNF/Lark grammar.")
    param: str = Field("response_format", description="The request field that asked for it (errors name it).")

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredOutput:
        kinds = [self.json_schema is not None, self.json_object, self.regex is not None]
        kinds += [self.choice is not None, self.grammar is not None]
        if sum(kinds) != 1:
            raise ValueError(f"{self.param}: set exactly one of json, json_object, regex, choice and grammar")
        return self


class SamplingConfig(FrozenModel):
    """How to pick output tokens; already validated by the API layer."""

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: int | None = Field(
        None, ge=0, le=20, description="None: no logprobs; k: the sampled token's logprob and the top k."
    )
    top_k: int = Field(0, ge=-1, description="Sample among the k most likely tokens; 0 or -1: all of them.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens less likely than min_p x the top token's.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, description="Above 1 discourages repeated tokens.")
    min_tokens: int = Field(0, ge=0, description="Tokens generated before EOS or a stop string may end the output.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the output text.")
    logit_bias: tuple[tuple[int, float], ...] = Field((), description="(token id, bias added to its logit) pairs.")
    structured: StructuredOutput | None = Field(None, description="A constraint on the output (structured outputs).")

    def advanced(self) -> list[str]:
        """Names of the options set away from their defaults that not every engine implements (request field names)."""
        defaults = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "top_k": 0, "min_p": 0.0}
        defaults |= {"repetition_penalty": 1.0, "min_tokens": 0, "ignore_eos": False, "skip_special_tokens": True}
        used = [name for name, default in defaults.items() if getattr(self, name) != default]
        if self.top_k == -1:
            used.remove("top_k")  # -1 is vLLM's spelling of "all tokens", like 0
        if self.logprobs is not None:
            used.append("logprobs")
        if self.logit_bias:
            used.append("logit_bias")
        if self.structured is not None:
            used.append(self.structured.param)
        return used


def require_basic_sampling(sampling: SamplingConfig, engine: str, supported: Collection[str] = ()) -> None:
    """For engines without some sampling options: refuse them by name rather than silently ignore them.

    Args:
        sampling: the request's settings.
        engine: the engine's name, for the message.
        supported: the `advanced()` names this engine implements.

    Raises:
        InvalidRequestError: an option outside `supported` is set.
    """
    used = [name for name in sampling.advanced() if name not in supported]
    if used:
        raise InvalidRequestError(
            f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} not supported by the {engine} engine; "
            "leave them unset or serve the model on vllm",
            param=used[0],
        )


def check_output_budget(spec: ModelSpec, sampling: SamplingConfig) -> None:
    """Refuse a `max_tokens` above the model's `max_output_tokens`, before any work.

    Raises:
        InvalidRequestError: it is above.
    """
    if sampling.max_tokens > spec.max_output_tokens:
        raise InvalidRequestError(
            f"max_tokens is {sampling.max_tokens}; this model allows at most {spec.max_output_tokens}",
            param="max_tokens",
        )


def check_context(context_length: int, prompt_tokens: int, sampling: SamplingConfig, param: str) -> None:
    """Refuse a request whose prompt plus `max_tokens` does not fit the context, before it joins a batch.

    Raises:
        InvalidRequestError: it does not fit; `param` names the prompt when the prompt alone is too long,
            else `max_tokens`.
    """
    if prompt_tokens + sampling.max_tokens > context_length:
        raise InvalidRequestError(
            f"This model's maximum context length is {context_length} tokens; the prompt has {prompt_tokens} "
            f"tokens and max_tokens asks for {sampling.max_tokens} more. Shorten the {param} or lower max_tokens.",
            param=param if prompt_tokens >= context_length else "max_tokens",
        )


def check_token_ids(ids: Iterable[int], vocab_size: int, param: str) -> None:
    """Refuse token ids outside the vocabulary before they reach the model.

    Raises:
        InvalidRequestError: an id is below 0 or at least `vocab_size`.
    """
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"token id {bad} is outside this model's vocabulary (ids 0 to {vocab_size - 1})", param=param
        )


class ToolFunction(FrozenModel):
    """A function the model may call (the `function` of an OpenAI tool)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def template_dict(self) -> dict[str, Any]:
        """The tool as chat templates expect it (OpenAI's shape)."""
        function = self.model_dump(exclude_none=True, exclude={"strict"})
        return {"type": "function", "function": function}


class ToolCall(FrozenModel):
    """A call of a function, made by the model in an earlier assistant turn."""

    id: str
    name: str
    arguments: str = Field(description="The arguments as a JSON text.")


class ToolCallDelta(FrozenModel):
    """A piece of a tool call in the output: the first piece of call `index` has its id and name."""

    index: int = Field(ge=0)
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def merge_tool_calls(deltas: Iterable[ToolCallDelta]) -> tuple[ToolCallDelta, ...]:
    """The whole calls that a stream of deltas spells: id and name from each call's first piece, arguments joined."""
    calls: dict[int, ToolCallDelta] = {}
    for delta in deltas:
        last = calls.get(delta.index)
        if last is None:
            calls[delta.index] = delta
        else:
            calls[delta.index] = last.model_copy(
                update={
                    "id": last.id or delta.id,
                    "name": last.name or delta.name,
                    "arguments": last.arguments + delta.arguments,
                }
            )
    return tuple(calls[i] for i in sorted(calls))


class ChatMessage(FrozenModel):
    """One chat turn, already flattened to text."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The turn as Hugging Face chat templates expect it; arguments parsed from JSON, as vLLM passes them."""
        turn: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            turn["name"] = self.name
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            turn["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                for c in self.tool_calls
            ]
        return turn


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON: the template gets the text as the client sent it


class GenerateRequest(FrozenModel):
    """A generation request: a raw `prompt` or `prompt_token_ids` (completions), or `messages` (chat)."""

    request_id: str
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = Field(None, description="The prompt as token ids, used as given.")
    messages: tuple[ChatMessage, ...] | None = None
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    routing_key: str | None = Field(
        None, description="Session key for the model's request router (policy 'session'); engines ignore it."
    )
    adapter: str | None = Field(
        None, description="The LoRA adapter (a name in the spec's `adapters`) to run with; None: the base model."
    )
    tools: tuple[ToolFunction, ...] = Field((), description="Functions the model may call (chat only).")
    tool_choice: Literal["none", "auto", "required", "function"] = Field(
        "none",
        description="'none': no calls; 'auto': the model decides (a tool-call parser reads its output); 'required': "
        "at least one call; 'function': a call of `tool_name`. 'required' and 'function' constrain the output.",
    )
    tool_name: str | None = Field(None, description="tool_choice 'function': the function to call.")
    parallel_tool_calls: bool = Field(True, description="tool_choice 'required': more than one call allowed.")
    continuation: tuple[int, ...] = Field(
        (),
        description="Tokens this request already generated on a replica that was lost (a migrated stream): they "
        "follow the rendered prompt, so generation goes on where it stopped; `sampling` counts only what is left.",
    )

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if sum(x is not None for x in (self.prompt, self.prompt_token_ids, self.messages)) != 1:
            raise ValueError("exactly one of `prompt`, `prompt_token_ids` and `messages` must be given")
        if self.tool_choice != "none" and (self.messages is None or not self.tools):
            raise ValueError("tool_choice needs `messages` and `tools`")
        if (self.tool_choice == "function") != (self.tool_name is not None):
            raise ValueError("tool_name is set exactly when tool_choice is 'function'")
        return self


class TokenLogprob(FrozenModel):
    """One generated token's log probability, and the most likely alternatives at that position."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


class ReplicaTimes(FrozenModel):
    """Wall-clock times (`time.time()`) a replica stamps on a request, for the API layer's latency split."""

    received_at: float = Field(description="The replica's method started: the request left Serve's queue.")
    first_output_at: float = Field(description="The engine gave its first output (embeddings: the result).")


class GenerateChunk(FrozenModel):
    """A piece of generated output. The last chunk of a stream carries `finish_reason`.

    `completion_tokens` counts the tokens generated so far (cumulative), `prompt_tokens` the prompt's.
    `logprobs` has one entry per token in this chunk when the request asked for logprobs.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    tool_calls: tuple[ToolCallDelta, ...] | None = Field(None, description="Pieces of tool calls in this chunk.")
    token_ids: tuple[int, ...] | None = Field(
        None,
        description="The tokens generated since the previous chunk (with any whose text is still held back), from "
        "engines that report them: what a migrated stream continues from. None: the engine does not report them.",
    )
    replica: str | None = Field(
        None, description="The Serve replica that served the request: set on a stream's first chunk and on a result."
    )
    times: ReplicaTimes | None = Field(None, description="Stamped by the replica on a stream's first chunk, a result.")


class EmbedRequest(FrozenModel):
    """A batch of texts to embed, from one client request."""

    request_id: str
    inputs: tuple[str, ...] = Field(min_length=1)
    routing_key: str | None = Field(
        None, description="Session key for the model's request router (policy 'session'); engines ignore it."
    )


class EmbedResult(FrozenModel):
    """One vector per input, in input order, and the number of tokens read."""

    embeddings: tuple[tuple[float, ...], ...]
    prompt_tokens: int
    replica: str | None = Field(None, description="The Serve replica that served the request.")
    times: ReplicaTimes | None = Field(None, description="Set by the replica that served the request.")


class PoolingOptions(FrozenModel):
    """How a classification or scoring input is tokenized and its output read (vLLM's pooling request fields)."""

    truncate_prompt_tokens: int | None = Field(
        None,
        ge=-1,
        description="Keep at most this many tokens per input (-1: the context length); None: refuse longer.",
    )
    truncation_side: Literal["left", "right"] | None = Field(
        None, description="Which end truncation cuts; None: the tokenizer's default (right)."
    )
    use_activation: bool | None = Field(
        None, description="Apply the model's activation (softmax / sigmoid); None: the model's default (yes)."
    )


class ClassifyRequest(FrozenModel):
    """Texts (or token ids) to classify, from one client request."""

    request_id: str
    inputs: tuple[str | tuple[int, ...], ...] = Field(min_length=1, description="Texts, or prompts as token ids.")
    add_special_tokens: bool = Field(True, description="Texts: add the tokenizer's special tokens ([CLS], [SEP]).")
    options: PoolingOptions = Field(default_factory=PoolingOptions)
    routing_key: str | None = Field(
        None, description="Session key for the model's request router (policy 'session'); engines ignore it."
    )


class Classification(FrozenModel):
    """One input's class probabilities (or raw logits without activation) and its most likely label."""

    probs: tuple[float, ...]
    label: str | None = Field(description="The model's name of the most likely class (`id2label`), if it has one.")


class ClassifyResult(FrozenModel):
    """One classification per input, in input order, and the number of tokens read."""

    classifications: tuple[Classification, ...]
    prompt_tokens: int
    replica: str | None = Field(None, description="The Serve replica that served the request.")
    times: ReplicaTimes | None = Field(None, description="Set by the replica that served the request.")


class ScoreRequest(FrozenModel):
    """Text pairs to score with a cross-encoder: `queries[i]` with `documents[i]` (one query: with every document)."""

    request_id: str
    queries: tuple[str, ...] = Field(min_length=1)
    documents: tuple[str, ...] = Field(min_length=1)
    max_tokens_per_query: int = Field(0, ge=0, description="Cut each query to this many tokens first; 0: no cut.")
    max_tokens_per_doc: int = Field(0, ge=0, description="Cut each document to this many tokens first; 0: no cut.")
    fields: tuple[str, str] = Field(
        ("queries", "documents"), description="The request fields that held queries and documents (errors name them)."
    )
    options: PoolingOptions = Field(default_factory=PoolingOptions)
    routing_key: str | None = Field(
        None, description="Session key for the model's request router (policy 'session'); engines ignore it."
    )

    @model_validator(mode="after")
    def _pairs(self) -> ScoreRequest:
        if len(self.queries) not in (1, len(self.documents)):
            raise ValueError("give one query, or as many queries as documents (1:1, 1:N or N:N)")
        return self


class ScoreResult(FrozenModel):
    """One score per pair, in document order, and the number of tokens read."""

    scores: tuple[float, ...]
    prompt_tokens: int
    replica: str | None = Field(None, description="The Serve replica that served the request.")
    times: ReplicaTimes | None = Field(None, description="Set by the replica that served the request.")


class TokenizeRequest(FrozenModel):
    """Text or chat messages to turn into token ids, as the model's generation would."""

    request_id: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    tools: tuple[ToolFunction, ...] = ()
    add_special_tokens: bool = Field(description="Add the tokenizer's special tokens (BOS, ...).")
    add_generation_prompt: bool = Field(True, description="Chat: end with the assistant turn's opening.")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of `prompt` and `messages` must be given")
        return self


class TokenizeResult(FrozenModel):
    """Token ids (and their texts when asked) and the model's context length."""

    tokens: tuple[int, ...]
    token_strs: tuple[str, ...] | None = None
    max_model_len: int


class Engine(abc.ABC):
    """Runs one model inside one replica. Implementations: VLLMEngine, TransformersEngine, EchoEngine."""

    #: True when the model computes in processes of the engine's own (started by `start`), not in the
    #: replica's threads: the replica then lowers its own priority below the engine's.
    computes_out_of_process: bool = False

    def __init__(self, spec: ModelSpec, plan: EnginePlan | None = None) -> None:
        """Args:
            spec: the model.
            plan: what the engine starts with (`ModelPlan.engine` of the deployment plan); compiled from the spec
                alone (no CPU split) when not given.

        Raises:
            PlanError: the spec's engine settings contradict each other (only when `plan` is not given).
        """
        self.spec = spec
        self.plan = plan if plan is not None else plan_engine(spec)

    @abc.abstractmethod
    async def start(self) -> None:
        """Load weights and tokenizer.

        Raises:
            EngineStartError: the model cannot be loaded.
        """

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream the output for one request (an async generator).

        The request is validated (prompt length, output budget) before it joins any batch, so a bad
        request fails alone.

        Raises:
            InvalidRequestError: the prompt does not fit the context, or the model cannot generate.
            EngineError: the engine failed.
        """

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Return if the engine can serve.

        Raises:
            EngineDeadError: the engine no longer answers.
        """

    async def shutdown(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the engine holds."""


class EmbeddingEngine(abc.ABC):
    """Optional capability: engines that embed text mix this in."""

    @abc.abstractmethod
    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed every input of the request.

        Raises:
            InvalidRequestError: an input is too long for the model.
            EngineError: the engine failed.
        """


class ScoringEngine(abc.ABC):
    """Optional capability: engines that run sequence-classification models (task 'classify' or 'score') mix this in."""

    @abc.abstractmethod
    async def classify(self, request: ClassifyRequest) -> ClassifyResult:
        """Classify every input of the request.

        Raises:
            InvalidRequestError: an input is empty or too long, or this model does not classify.
            EngineError: the engine failed.
        """

    @abc.abstractmethod
    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Score every (query, document) pair of the request.

        Raises:
            InvalidRequestError: a pair is too long, or this model does not score.
            EngineError: the engine failed.
        """


class TokenizingEngine(abc.ABC):
    """Optional capability: engines with a tokenizer mix this in (for /tokenize, /detokenize and echo of token ids)."""

    @abc.abstractmethod
    async def tokenize(self, request: TokenizeRequest) -> TokenizeResult:
        """Token ids of a text, or of chat messages rendered with the model's chat template.

        Raises:
            InvalidRequestError: the model has no chat template, or the template rejects the messages.
        """

    @abc.abstractmethod
    async def detokenize(self, tokens: tuple[int, ...]) -> str:
        """The text of token ids.

        Raises:
            InvalidRequestError: an id is outside the vocabulary.
        """
