"""The HTTP side of pipelines: chat, completions, embeddings, classify, score and rerank bodies for a `model` that
names a pipeline, and its /v1/models card. The ingress hands such requests here; responses are built by the same
code as a model's, and each request is counted in `modelfleet_pipeline_requests`."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from deployments import metrics
from deployments.api.completions import Completion, check_generations, generations_at_once
from deployments.api.embeddings import embedding_body
from deployments.api.openai_models import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModelCard
from deployments.api.scoring import (
    ClassificationRequest,
    RerankRequest,
    ScoreTextsRequest,
    classification_body,
    rerank_body,
    score_body,
)
from deployments.api.sse import event
from deployments.engines.protocol import EmbedRequest, GenerateRequest
from deployments.errors import InvalidRequestError, ServingError
from deployments.pipelines.executor import CallContext, Pipelines
from deployments.pipelines.spec import PipelinePlan

if TYPE_CHECKING:
    from deployments.router import Router

__all__ = [
    "MODELS_HEADER",
    "chat",
    "classify",
    "completions",
    "embeddings",
    "model_card",
    "rerank",
    "score",
]

# The models that answered a pipeline request, in order (comma-separated); the body says the same in a
# `modelfleet` field, which OpenAI and vLLM clients ignore.
MODELS_HEADER = "x-modelfleet-models"


def _context(request: Request, user: str | None, metadata: dict[str, str] | None = None) -> CallContext:
    return CallContext(headers={k.lower(): v for k, v in request.headers.items()}, user=user, metadata=metadata or {})


def _answered(ctx: CallContext) -> dict[str, str]:
    return {MODELS_HEADER: ",".join(ctx.models)} if ctx.models else {}


def _tag(ctx: CallContext, *, votes: bool = False) -> dict[str, Any]:
    """The body's `modelfleet` field: the models that answered (/classify: and a voting ensemble's tallies)."""
    tag: dict[str, Any] = {"models": list(ctx.models)}
    if votes and ctx.votes is not None:
        tag["votes"] = ctx.votes
    return tag


B = TypeVar("B", bound=Any)
R = TypeVar("R", bound=Response)


def _counted(
    handler: Callable[[Pipelines, B, Request, str], Awaitable[R]],
) -> Callable[[Pipelines, B, Request, str], Awaitable[R]]:
    """The handler, counting its request in `modelfleet_pipeline_requests` with the status it answers (a stream:
    its 200; an error: the status its body goes out with)."""

    @functools.wraps(handler)
    async def counted(pipelines: Pipelines, body: B, request: Request, request_id: str) -> R:
        status = 500
        try:
            response = await handler(pipelines, body, request, request_id)
            status = response.status_code
            return response
        except ServingError as exc:
            status = exc.status_code
            raise
        except ValidationError:
            status = 400  # as the ingress's error handler answers it
            raise
        finally:
            endpoint = getattr(request.scope.get("route"), "path", "other")
            tags = {"model": body.model, "endpoint": endpoint, "status": str(status)}
            metrics.instrument(metrics.PIPELINE_REQUESTS).inc(1, tags=tags)

    return counted


@_counted
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


@_counted
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


@_counted
async def embeddings(pipelines: Pipelines, body: EmbeddingRequest, request: Request, request_id: str) -> JSONResponse:
    """POST /v1/embeddings for a pipeline.

    Raises:
        ServingError: as `chat`.
    """
    pipelines.plan_for(body.model, "embed")
    ctx = _context(request, body.user)
    embed = EmbedRequest(request_id=request_id, inputs=body.texts, routing_key=body.user)
    result = await pipelines.embed(body.model, embed, ctx)
    payload = embedding_body(body, result) | {"modelfleet": _tag(ctx)}
    return JSONResponse(payload, headers=_answered(ctx))


@_counted
async def classify(
    pipelines: Pipelines, body: ClassificationRequest, request: Request, request_id: str
) -> JSONResponse:
    """POST /classify for a pipeline (texts only: its models may use different tokenizers). The body is vLLM's,
    with `modelfleet.models` (and a voting ensemble's `modelfleet.votes`: per input, label -> models that gave it).

    Raises:
        ServingError: as `chat`; a prompt given as token ids is refused (param `input`).
    """
    pipelines.plan_for(body.model, "classify")
    internal = body.internal(request_id, body.user)
    if any(not isinstance(text, str) for text in internal.inputs):
        raise InvalidRequestError(
            f"'{body.model}' is a pipeline: send the input as text (its models may use different tokenizers)",
            param="input",
        )
    ctx = _context(request, body.user)
    result = await pipelines.classify(body.model, internal, ctx)
    response_id = body.response_id("classify", request_id)
    payload = classification_body(body, result, response_id) | {"modelfleet": _tag(ctx, votes=True)}
    return JSONResponse(payload, headers=_answered(ctx))


@_counted
async def score(pipelines: Pipelines, body: ScoreTextsRequest, request: Request, request_id: str) -> JSONResponse:
    """POST /score for a pipeline of cross-encoders (split, fallback, switch).

    Raises:
        ServingError: as `chat`.
    """
    pipelines.plan_for(body.model, "score")
    ctx = _context(request, body.user)
    result = await pipelines.score(body.model, body.internal(request_id, body.user), ctx)
    payload = score_body(body, result, body.response_id("score", request_id)) | {"modelfleet": _tag(ctx)}
    return JSONResponse(payload, headers=_answered(ctx))


@_counted
async def rerank(pipelines: Pipelines, body: RerankRequest, request: Request, request_id: str) -> JSONResponse:
    """POST /rerank for a pipeline of cross-encoders (split, fallback, switch).

    Raises:
        ServingError: as `chat`.
    """
    pipelines.plan_for(body.model, "score")
    ctx = _context(request, body.user)
    result = await pipelines.score(body.model, body.internal(request_id, body.user), ctx)
    payload = rerank_body(body, result, body.response_id("score", request_id)) | {"modelfleet": _tag(ctx)}
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
    most = _generations_at_once(pipelines, body.model)
    limit = f"the pipeline '{body.model}' takes at most {most} (the scaling.max_queued_requests of its models)"
    check_generations(body, len(gens), most, limit)
    # PipelineCalls has the two Router methods Completion calls (complete, stream), with the same signatures.
    calls = cast("Router", pipelines.calls(ctx))
    completion = Completion(calls, body, gens, chat=chat, echo=echo)
    if not body.stream:
        payload = await completion.response()
        payload["modelfleet"] = _tag(ctx)
        return JSONResponse(payload, headers=_answered(ctx))
    # stream() waits for every choice's first chunk: the models that answer are known before the headers go.
    stream = await completion.stream()
    return StreamingResponse(_tagged(stream, ctx), media_type="text/event-stream", headers=_answered(ctx))


def _generations_at_once(pipelines: Pipelines, name: str) -> int | None:
    """Most generations a request to model or pipeline `name` can start at once (None: no bound). All of a
    request's choices go to one target: a split or switch may pick any of its targets (the smallest bound), a
    fallback moves on to the next target when one refuses (the largest), a sequence sends them to its model."""
    plan = pipelines.plans.get(name)
    if plan is None:
        return generations_at_once(pipelines.router.spec(name).scaling)
    spec = plan.spec
    if spec.kind == "sequence":
        return _generations_at_once(pipelines, spec.model or "")
    targets = [t.model for t in spec.targets or ()] + [r.model for r in spec.rules or ()]
    bounds = [_generations_at_once(pipelines, t) for t in [*targets, *([spec.default] if spec.default else [])]]
    if spec.kind == "fallback":
        return None if None in bounds else max(b for b in bounds if b is not None)
    known = [b for b in bounds if b is not None]
    return min(known) if known else None


async def _tagged(stream: AsyncIterator[bytes], ctx: CallContext) -> AsyncIterator[bytes]:
    """The SSE body with the `modelfleet` field added to its first event."""
    first = True
    async for piece in stream:
        if first and piece.startswith(b"data: {"):
            first = False
            payload: dict[str, Any] = json.loads(piece[len(b"data: ") :])
            payload["modelfleet"] = _tag(ctx)
            piece = event(payload)
        yield piece


def model_card(plan: PipelinePlan) -> ModelCard:
    """The pipeline's entry in /v1/models: a model whose `pipeline` field gives its kind and steps."""
    spec = plan.spec
    pipeline: dict[str, Any] = {"kind": spec.kind, "steps": spec.steps(), "models": list(plan.models)}
    if spec.description:
        pipeline["description"] = spec.description
    return ModelCard(id=spec.id, task=plan.task, engine="pipeline", pipeline=pipeline)
