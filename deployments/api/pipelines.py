"""The HTTP side of pipelines: chat, completions and embeddings bodies for a `model` that names a pipeline,
and its /v1/models card. The ingress hands such requests here; responses are built by the same code as a model's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deployments.api.completions import Completion
from deployments.api.embeddings import embedding_body
from deployments.api.openai_models import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModelCard
from deployments.api.sse import event
from deployments.engines.protocol import EmbedRequest, GenerateRequest
from deployments.errors import InvalidRequestError
from deployments.pipelines.executor import CallContext, Pipelines
from deployments.pipelines.spec import PipelinePlan

if TYPE_CHECKING:
    from deployments.router import Router

__all__ = ["MODELS_HEADER", "chat", "completions", "embeddings", "model_card"]

# The models that answered a pipeline request, in order (comma-separated); the body says the same in a
# `modelfleet` field, which OpenAI and vLLM clients ignore.
MODELS_HEADER = "x-modelfleet-models"


def _context(request: Request, user: str | None, metadata: dict[str, str] | None = None) -> CallContext:
    return CallContext(headers={k.lower(): v for k, v in request.headers.items()}, user=user, metadata=metadata or {})


def _answered(ctx: CallContext) -> dict[str, str]:
    return {MODELS_HEADER: ",".join(ctx.models)} if ctx.models else {}


async def chat(pipelines: Pipelines, body: ChatCompletionRequest, request: Request, request_id: str) -> Response:
    """POST /v1/chat/completions for a pipeline.

    Raises:
        ServingError: the pipeline serves another task, a field is out of range, or a step failed.
    """
    pipelines.plan_for(body.model, "generate")
    ctx = _context(request, body.user, body.metadata)
    gen = GenerateRequest(
        request_id=request_id,
        messages=body.chat_messages(),
        sampling=body.sampling(pipelines.max_output_tokens(body.model)),
        routing_key=body.user,
        **body.tool_fields(),
    )
    return await _generate(pipelines, ctx, body, [gen], chat=True)


async def completions(pipelines: Pipelines, body: CompletionRequest, request: Request, request_id: str) -> Response:
    """POST /v1/completions for a pipeline (text prompts only: the steps may use different tokenizers).

    Raises:
        ServingError: as `chat`; a prompt given as token ids is refused (param `prompt`).
    """
    pipelines.plan_for(body.model, "generate")
    prompts = body.prompts
    if any(not isinstance(p, str) for p in prompts):
        raise InvalidRequestError(
            f"'{body.model}' is a pipeline: send the prompt as text (its models may use different tokenizers)",
            param="prompt",
        )
    texts = cast("list[str]", prompts)
    gens = [
        GenerateRequest(
            request_id=request_id if len(texts) == 1 else f"{request_id}-p{i}",
            prompt=text,
            sampling=body.sampling(),
            routing_key=body.user,
        )
        for i, text in enumerate(texts)
    ]
    ctx = _context(request, body.user)
    return await _generate(pipelines, ctx, body, gens, chat=False, echo=texts if body.echo else None)


async def embeddings(pipelines: Pipelines, body: EmbeddingRequest, request: Request, request_id: str) -> JSONResponse:
    """POST /v1/embeddings for a pipeline.

    Raises:
        ServingError: as `chat`.
    """
    pipelines.plan_for(body.model, "embed")
    ctx = _context(request, body.user)
    embed = EmbedRequest(request_id=request_id, inputs=body.texts, routing_key=body.user)
    result = await pipelines.embed(body.model, embed, ctx)
    payload = embedding_body(body, result) | {"modelfleet": {"models": ctx.models}}
    return JSONResponse(payload, headers=_answered(ctx))


async def _generate(
    pipelines: Pipelines,
    ctx: CallContext,
    body: ChatCompletionRequest | CompletionRequest,
    gens: list[GenerateRequest],
    *,
    chat: bool,
    echo: list[str] | None = None,
) -> Response:
    # PipelineCalls has the two Router methods Completion calls (complete, stream), with the same signatures.
    calls = cast("Router", pipelines.calls(ctx))
    completion = Completion(calls, body, gens, chat=chat, echo=echo)
    if not body.stream:
        payload = await completion.response()
        payload["modelfleet"] = {"models": ctx.models}
        return JSONResponse(payload, headers=_answered(ctx))
    # stream() waits for every choice's first chunk: the models that answer are known before the headers go.
    stream = await completion.stream()
    return StreamingResponse(_tagged(stream, ctx), media_type="text/event-stream", headers=_answered(ctx))


async def _tagged(stream: AsyncIterator[bytes], ctx: CallContext) -> AsyncIterator[bytes]:
    """The SSE body with the `modelfleet` field added to its first event."""
    first = True
    async for piece in stream:
        if first and piece.startswith(b"data: {"):
            first = False
            payload: dict[str, Any] = json.loads(piece[len(b"data: ") :])
            payload["modelfleet"] = {"models": list(ctx.models)}
            piece = event(payload)
        yield piece


def model_card(plan: PipelinePlan) -> ModelCard:
    """The pipeline's entry in /v1/models: a model whose `pipeline` field gives its kind and steps."""
    spec = plan.spec
    pipeline: dict[str, Any] = {"kind": spec.kind, "steps": spec.steps(), "models": list(plan.models)}
    if spec.description:
        pipeline["description"] = spec.description
    return ModelCard(id=spec.id, task=plan.task, engine="pipeline", pipeline=pipeline)
