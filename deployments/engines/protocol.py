"""The engine interface: what a replica asks of the thing that runs one model, and its internal types.

Engines never import Ray or FastAPI: they are driven with plain asyncio in unit tests.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Literal

from pydantic import Field, model_validator

from deployments.errors import InvalidRequestError
from deployments.plan import EnginePlan, plan_engine
from models.spec import FrozenModel, ModelSpec

__all__ = [
    "ChatMessage",
    "EmbedRequest",
    "EmbedResult",
    "EmbeddingEngine",
    "Engine",
    "FinishReason",
    "GenerateChunk",
    "GenerateRequest",
    "SamplingConfig",
    "TokenLogprob",
    "check_context",
    "check_output_budget",
    "require_basic_sampling",
]

FinishReason = Literal["stop", "length"]


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

    def advanced(self) -> list[str]:
        """Names of the options set away from their defaults that not every engine implements."""
        used = []
        if self.presence_penalty:
            used.append("presence_penalty")
        if self.frequency_penalty:
            used.append("frequency_penalty")
        if self.logprobs is not None:
            used.append("logprobs")
        return used


def require_basic_sampling(sampling: SamplingConfig, engine: str) -> None:
    """For engines without penalties and logprobs: refuse them rather than silently ignore them.

    Raises:
        InvalidRequestError: an advanced option is set.
    """
    used = sampling.advanced()
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


class ChatMessage(FrozenModel):
    """One chat turn, already flattened to text."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class GenerateRequest(FrozenModel):
    """A generation request: either a raw `prompt` (completions) or `messages` (chat)."""

    request_id: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    routing_key: str | None = Field(
        None, description="Session key for the model's request router (policy 'session'); engines ignore it."
    )

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of `prompt` and `messages` must be given")
        return self


class TokenLogprob(FrozenModel):
    """One generated token's log probability, and the most likely alternatives at that position."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


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
    replica: str | None = Field(
        None, description="The Serve replica that served the request: set on a stream's first chunk and on a result."
    )


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
