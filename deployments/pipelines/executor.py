"""Runs pipelines in the router replica over the Router's calls (replica handles; no HTTP between steps)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

from deployments import metrics
from deployments.engines.protocol import (
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateChunk,
    GenerateRequest,
    PoolingOptions,
    ScoreRequest,
    ScoreResult,
)
from deployments.errors import (
    ColdStartError,
    EngineDeadError,
    InvalidRequestError,
    OverloadedError,
    RequestTimeoutError,
    ServingError,
)
from deployments.pipelines import nodes
from deployments.pipelines.retrieval import Retriever
from deployments.pipelines.spec import PipelinePlan, PipelineSpec
from deployments.router import Router

__all__ = ["CallContext", "PipelineCalls", "Pipelines"]

T = TypeVar("T")
# Failures after which a fallback tries its next target: the target is full (429), has no replica or lost it
# (503), or ran past its step timeout (408). A client error (4xx) would fail the same way everywhere.
_FALL_THROUGH = (OverloadedError, ColdStartError, EngineDeadError, RequestTimeoutError)
# The one-shot requests (no stream) a pipeline passes to its models, and their results.
Pooled = EmbedRequest | ClassifyRequest | ScoreRequest
PooledResult = EmbedResult | ClassifyResult | ScoreResult


@dataclass
class CallContext:
    """What one HTTP request brings to its pipeline: headers, `user`, chat `metadata`; and what answered it."""

    headers: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: The models that answered, in the order they did (each once).
    models: list[str] = field(default_factory=list)
    #: A classification ensemble that votes: per input, how many models gave each label (the outermost one's).
    votes: list[dict[str, int]] | None = None

    def answered(self, model_id: str) -> None:
        """Record that `model_id` answered a step."""
        if model_id not in self.models:
            self.models.append(model_id)


@dataclass(frozen=True)
class _Step:
    """A model (or an ensemble, run as one step) that can answer, with the request it gets."""

    target: str
    payload: GenerateRequest | Pooled
    timeout_s: float


class Pipelines:
    """The config's pipelines, run over a Router."""

    def __init__(self, router: Router, plans: Sequence[PipelinePlan], timeout_s: float) -> None:
        """Args:
        router: the router of the models.
        plans: the pipelines (`DeploymentPlan.pipelines`).
        timeout_s: the router's request_timeout_s: each step's limit unless the pipeline sets step_timeout_s.
        """
        self.router = router
        self.plans = {p.spec.id: p for p in plans}
        self._timeout_s = timeout_s
        self._retrievers = {
            p.spec.id: Retriever(p.spec.retrieve.passages or ()) for p in plans if p.spec.retrieve is not None
        }
        self._rng = random.Random()

    def serves(self, model_id: str) -> bool:
        """Whether `model_id` names a pipeline."""
        return model_id in self.plans

    def plan_for(self, pipeline_id: str, task: str) -> PipelinePlan:
        """The pipeline's plan, checked to serve `task`.

        Raises:
            InvalidRequestError: the pipeline serves another task.
        """
        plan = self.plans[pipeline_id]
        if plan.task != task:
            raise InvalidRequestError(
                f"The pipeline '{pipeline_id}' serves task '{plan.task}', not '{task}'", param="model"
            )
        return plan

    def max_output_tokens(self, pipeline_id: str) -> int:
        """The lowest output limit among the generation models the pipeline may reach."""
        specs = [self.router.spec(m) for m in self.plans[pipeline_id].models]
        return min(s.max_output_tokens for s in specs if s.task == "generate")

    def calls(self, context: CallContext) -> PipelineCalls:
        """A router-shaped view for one HTTP request (what `Completion` calls; see PipelineCalls)."""
        return PipelineCalls(self, context)

    # -- generate ----------------------------------------------------------------------------------------------

    async def complete(self, pipeline_id: str, request: GenerateRequest, ctx: CallContext) -> GenerateChunk:
        """The whole output of the pipeline.

        Raises:
            ServingError: a step failed (fallback: every target did); the message names the pipeline and step.
        """
        failures: list[tuple[str, ServingError]] = []
        async for step in self._steps(pipeline_id, request, ctx):
            try:
                call = self.router.complete(step.target, cast("GenerateRequest", step.payload))
                result = await self._limit(call, pipeline_id, step.target, step.timeout_s)
            except _FALL_THROUGH as exc:
                failures.append((step.target, exc))
                continue
            except ServingError as exc:
                raise _named(pipeline_id, step.target, exc) from None
            ctx.answered(step.target)
            return result
        raise _exhausted(pipeline_id, failures)

    async def stream(
        self, pipeline_id: str, request: GenerateRequest, ctx: CallContext
    ) -> AsyncIterator[GenerateChunk]:
        """The pipeline's output, streamed. A fallback moves on only before a target's first chunk: a stream
        that has sent tokens is never switched to another model.

        Raises:
            ServingError: as `complete`; after the first chunk, the streaming model's own error.
        """
        failures: list[tuple[str, ServingError]] = []
        async for step in self._steps(pipeline_id, request, ctx):
            chunks = self.router.stream(step.target, cast("GenerateRequest", step.payload))
            try:
                first = await self._limit(anext(chunks, None), pipeline_id, step.target, step.timeout_s)
            except _FALL_THROUGH as exc:
                await chunks.aclose()  # type: ignore[attr-defined]
                failures.append((step.target, exc))
                continue
            except ServingError as exc:
                await chunks.aclose()  # type: ignore[attr-defined]
                raise _named(pipeline_id, step.target, exc) from None
            ctx.answered(step.target)
            if first is None:
                return
            yield first
            try:
                async for chunk in chunks:
                    yield chunk
            except ServingError as exc:
                raise _named(pipeline_id, step.target, exc) from None
            return
        raise _exhausted(pipeline_id, failures)

    # -- embed, classify, score -------------------------------------------------------------------------------

    async def embed(self, pipeline_id: str, request: EmbedRequest, ctx: CallContext) -> EmbedResult:
        """The pipeline's embeddings.

        Raises:
            ServingError: as `complete`.
        """
        return cast("EmbedResult", await self._pooled(pipeline_id, request, ctx))

    async def classify(self, pipeline_id: str, request: ClassifyRequest, ctx: CallContext) -> ClassifyResult:
        """The pipeline's classifications (an ensemble: merged by its `merge`; `ctx.votes` has a vote's tallies).

        Raises:
            ServingError: as `complete`.
        """
        return cast("ClassifyResult", await self._pooled(pipeline_id, request, ctx))

    async def score(self, pipeline_id: str, request: ScoreRequest, ctx: CallContext) -> ScoreResult:
        """The pipeline's scores (for /score and /rerank).

        Raises:
            ServingError: as `complete`.
        """
        return cast("ScoreResult", await self._pooled(pipeline_id, request, ctx))

    async def _pooled(self, pipeline_id: str, request: Pooled, ctx: CallContext) -> PooledResult:
        failures: list[tuple[str, ServingError]] = []
        async for step in self._steps(pipeline_id, request, ctx):
            try:
                return await self._pooled_step(pipeline_id, step, ctx)
            except _FALL_THROUGH as exc:
                failures.append((step.target, exc))
        raise _exhausted(pipeline_id, failures)

    def _call(self, target: str, payload: Pooled) -> Awaitable[PooledResult]:
        if isinstance(payload, EmbedRequest):
            return self.router.embed(target, payload)
        if isinstance(payload, ClassifyRequest):
            return self.router.classify(target, payload)
        return self.router.score(target, payload)

    async def _pooled_step(self, pipeline_id: str, step: _Step, ctx: CallContext) -> PooledResult:
        payload = cast("Pooled", step.payload)
        plan = self.plans.get(step.target)
        if plan is None:
            try:
                result = await self._limit(self._call(step.target, payload), pipeline_id, step.target, step.timeout_s)
            except _FALL_THROUGH:
                raise
            except ServingError as exc:
                raise _named(pipeline_id, step.target, exc) from None
            ctx.answered(step.target)
            return result
        # An ensemble: every target at once, each through its own steps (a target may itself be a pipeline).
        targets = [t.model for t in plan.spec.targets or ()]
        results = await asyncio.gather(
            *(self._pooled_one(pipeline_id, t, payload, ctx, step.timeout_s) for t in targets)
        )
        merge = plan.spec.merge or ""
        if isinstance(payload, ClassifyRequest):
            per_model = [cast("ClassifyResult", r).classifications for r in results]
            merged, tallies = nodes.merge_classifications(per_model, merge, targets, plan.labels)
            ctx.votes = list(tallies) if merge == "vote" else None  # the outermost ensemble's, set last
            tokens = sum(r.prompt_tokens for r in results)
            return ClassifyResult(classifications=merged, prompt_tokens=tokens)
        vectors = nodes.merge_embeddings([cast("EmbedResult", r).embeddings for r in results], merge, targets)
        return EmbedResult(embeddings=vectors, prompt_tokens=sum(r.prompt_tokens for r in results))

    async def _pooled_one(
        self, pipeline_id: str, target: str, request: Pooled, ctx: CallContext, timeout_s: float
    ) -> PooledResult:
        if target in self.plans:
            return await self._pooled(target, request, ctx)
        return await self._pooled_step(pipeline_id, _Step(target, request, timeout_s), ctx)

    # -- resolution --------------------------------------------------------------------------------------------

    async def _steps(
        self, target: str, payload: GenerateRequest | Pooled, ctx: CallContext, timeout_s: float | None = None
    ) -> AsyncIterator[_Step]:
        """The models that may answer `payload` sent to `target`, in the order to try them (more than one only
        under a fallback). Ensembles are yielded whole: they run as one step."""
        plan = self.plans.get(target)
        if plan is None:
            yield _Step(target, payload, timeout_s or self._timeout_s)
            return
        spec = plan.spec
        own_timeout = spec.step_timeout_s or timeout_s
        if spec.kind == "ensemble":
            yield _Step(target, payload, own_timeout or self._timeout_s)
            return
        if spec.kind == "fallback":
            for t in spec.targets or ():
                async for step in self._steps(t.model, payload, ctx, own_timeout):
                    yield step
            return
        if spec.kind == "split":
            key = ctx.headers.get(spec.sticky) or ctx.user or None
            choice = nodes.split_choice([(t.model, t.weight or 0.0) for t in spec.targets or ()], key, self._rng)
        elif spec.kind == "switch":
            text = _prompt_text(payload)
            label = await self._label(spec, payload.request_id, text, ctx, own_timeout or self._timeout_s)
            choice = nodes.switch_choice(spec, text, ctx.headers, ctx.metadata, label)
        else:  # sequence
            # A sequence serves 'generate' (checked at load): its payload is a GenerateRequest.
            payload = await self._fill(spec, cast("GenerateRequest", payload), ctx, own_timeout or self._timeout_s)
            choice = spec.model or ""
        async for step in self._steps(choice, payload, ctx, own_timeout):
            yield step

    async def _fill(
        self, spec: PipelineSpec, request: GenerateRequest, ctx: CallContext, timeout_s: float
    ) -> GenerateRequest:
        """A sequence's retrieval and template: the request with its question replaced by the filled prompt."""
        question = nodes.question_of(request)
        passages: list[str] = []
        label = await self._label(spec, request.request_id, question, ctx, timeout_s) or ""
        retrieve = spec.retrieve
        if retrieve is not None:
            embedder = retrieve.model

            async def embed(texts: Sequence[str]) -> Sequence[Sequence[float]]:
                embed_request = EmbedRequest(request_id=f"{request.request_id}-retrieve", inputs=tuple(texts))
                try:
                    result = await self._limit(self.router.embed(embedder, embed_request), spec.id, embedder, timeout_s)
                except ServingError as exc:
                    raise _named(spec.id, embedder, exc) from None
                return result.embeddings

            index = await self._retrievers[spec.id].index(embed)
            passages = index.nearest((await embed([question]))[0], retrieve.top_k)
            ctx.answered(embedder)
        return nodes.with_question(request, nodes.render(spec.template or "{question}", question, passages, label))

    async def _label(
        self, spec: PipelineSpec, request_id: str, text: str, ctx: CallContext, timeout_s: float
    ) -> str | None:
        """The classifier step: the most likely label of `text` (its class index where the model names none);
        None for a pipeline without a classifier. Inputs longer than the classifier's context are cut to it."""
        if spec.classifier is None:
            return None
        request = ClassifyRequest(
            request_id=f"{request_id}-classify", inputs=(text,), options=PoolingOptions(truncate_prompt_tokens=-1)
        )
        if spec.classifier in self.plans:  # a pipeline of classifiers (an ensemble's vote, a fallback...)
            result = await self.classify(spec.classifier, request, ctx)
        else:
            try:
                result = await self._limit(
                    self.router.classify(spec.classifier, request), spec.id, spec.classifier, timeout_s
                )
            except ServingError as exc:
                raise _named(spec.id, spec.classifier, exc) from None
            ctx.answered(spec.classifier)
        return nodes.label_of(result.classifications[0])

    async def _limit(self, awaitable: Awaitable[T], pipeline_id: str, target: str, timeout_s: float) -> T:
        """Await one step within its timeout (a RequestTimeoutError naming the step past it), and record its latency
        (`modelfleet_pipeline_step_seconds`; for a stream, to the step's first chunk) with its outcome."""
        started = time.monotonic()
        outcome = "error"
        try:
            result = await asyncio.wait_for(awaitable, timeout_s)
            outcome = "ok"
            return result
        except TimeoutError:
            outcome = "timeout"
            raise RequestTimeoutError(
                f"step '{target}' gave no answer within {timeout_s:g} s (waited {time.monotonic() - started:.1f} s)"
            ) from None
        except ServingError as exc:
            outcome = str(exc.status_code)
            raise
        finally:
            tags = {"model": pipeline_id, "step": target, "outcome": outcome}
            metrics.observe(metrics.PIPELINE_STEP_LATENCY, time.monotonic() - started, tags)


def _prompt_text(payload: GenerateRequest | Pooled) -> str:
    """The text a switch looks at: every message's content, the prompt, the embedding or classification inputs
    (text ones), or the score queries."""
    if isinstance(payload, EmbedRequest):
        return "\n".join(payload.inputs)
    if isinstance(payload, ClassifyRequest):
        return "\n".join(text for text in payload.inputs if isinstance(text, str))
    if isinstance(payload, ScoreRequest):
        return "\n".join(payload.queries)
    if payload.messages is not None:
        return "\n".join(m.content for m in payload.messages)
    return payload.prompt or ""


def _copy(exc: ServingError, message: str) -> ServingError:
    """The same error class, status and Retry-After with a new message."""
    if isinstance(exc, ColdStartError):
        return ColdStartError(message, param=exc.param, code=exc.code, retry_after_s=exc.retry_after_s or 5)
    return type(exc)(message, param=exc.param, code=exc.code)


def _named(pipeline_id: str, step: str, exc: ServingError) -> ServingError:
    return _copy(exc, f"pipeline '{pipeline_id}', step '{step}': {exc.message}")


def _exhausted(pipeline_id: str, failures: list[tuple[str, ServingError]]) -> ServingError:
    """The one error of a pipeline whose every target failed: the last failure's kind, each failure named."""
    if not failures:
        return InvalidRequestError(f"pipeline '{pipeline_id}' has no target for this request", param="model")
    if len(failures) == 1:
        return _named(pipeline_id, *failures[0])
    parts = "; ".join(f"'{step}': {exc.status_code} {exc.message}" for step, exc in failures)
    last = failures[-1][1]
    error = _copy(last, f"pipeline '{pipeline_id}': every target failed ({parts})")
    waits = [e.retry_after_s for _, e in failures if e.retry_after_s is not None]
    if waits and isinstance(error, ColdStartError):
        error.retry_after_s = min(waits)
    return error


class PipelineCalls:
    """The Router's `complete`/`stream` for one request's pipeline, so `Completion` builds pipeline responses
    exactly as it builds model responses (same chat/completion bodies, `n`, SSE framing)."""

    def __init__(self, pipelines: Pipelines, context: CallContext) -> None:
        self.pipelines = pipelines
        self.context = context

    async def complete(self, pipeline_id: str, request: GenerateRequest) -> GenerateChunk:
        """See `Pipelines.complete`."""
        return await self.pipelines.complete(pipeline_id, request, self.context)

    def stream(self, pipeline_id: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """See `Pipelines.stream`."""
        return self.pipelines.stream(pipeline_id, request, self.context)
