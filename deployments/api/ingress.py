"""The OpenAI-compatible HTTP API: FastAPI routes, request limits, auth, SSE and error bodies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from deployments import auth, cpus
from deployments.api import batches, files
from deployments.api import pipelines as pipeline_api
from deployments.api.completions import Completion
from deployments.api.embeddings import embedding_body
from deployments.api.errors import validation_message
from deployments.api.limits import LimitsMiddleware, error_response, limits
from deployments.api.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from deployments.api.openapi import ServedAPI
from deployments.api.scoring import (
    ClassificationRequest,
    ClassificationResponse,
    RerankRequest,
    RerankResponse,
    ScoreResponse,
    ScoreTextsRequest,
    classification_body,
    rerank_body,
    score_body,
)
from deployments.api.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from deployments.config import ServingConfig
from deployments.engines.protocol import EmbedRequest, GenerateRequest
from deployments.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    ServingError,
)
from deployments.pipelines.executor import Pipelines
from deployments.pipelines.spec import PipelinePlan, plan_pipelines
from deployments.plan import ModelPlan, plan_model
from deployments.router import Router
from models.spec import ModelSpec, adapter_names, served_names

__all__ = ["REPLICA_HEADER", "OpenAIIngress", "app"]

logger = logging.getLogger(__name__)

# Which Serve replica(s) served a request (comma-separated when `n` choices landed on several): for operators, and
# for the routing tests.
REPLICA_HEADER = "x-modelfleet-replica"
# A completion answers JSON, or server-sent events when `stream` is true: the document names both.
_COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion (JSON), or its chunks as server-sent events when `stream` is true: each "
        "event's data is a chunk object, and the last one is `[DONE]`.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"anyOf": [{"type": "object"}, {"const": "[DONE]"}]}},
        },
    }
}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 429, 500, 503)
}


def _request_id(request: Request) -> str:
    # Set for every HTTP request by LimitsMiddleware, the outermost layer.
    rid: str = request.scope["modelfleet.request_id"]
    return rid


def _session_key(spec: ModelSpec, request: Request, user: str | None) -> str | None:
    """The session key a model with routing policy 'session' routes by: its session header, else `user`."""
    if spec.routing.policy != "session":
        return None
    return request.headers.get(spec.routing.session_header) or user or None


def _replica_header(replicas: list[str]) -> dict[str, str]:
    return {REPLICA_HEADER: ",".join(replicas)} if replicas else {}


app = ServedAPI(
    title="modelfleet",
    summary="OpenAI-compatible API over a Ray Serve model cluster",
    version="0.1.0",
    responses=_ERROR_RESPONSES,
)


@app.exception_handler(RequestValidationError)
async def _on_validationerror_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc.errors())
    return error_response(InvalidRequestError(message, param=param), _request_id(request))


@app.exception_handler(StarletteHTTPException)
async def _on_httperror_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    kind = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}.get(status)
    body = ErrorResponse(error=ErrorBody(message=str(exc.detail), type=kind or "invalid_request_error", code=status))
    headers = dict(exc.headers or {})
    if status == 405:  # `Allow`, as HTTP requires: every method of the path (Starlette names one route's only)
        headers["Allow"] = _allowed_methods(request)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)


def _allowed_methods(request: Request) -> str:
    """The methods of every route whose path matches the request's (the routes of one path may be several)."""
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


@app.exception_handler(ServingError)
async def _on_servingerror_response(request: Request, exc: ServingError) -> JSONResponse:
    return error_response(exc, _request_id(request))


@app.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc, _request_id(request))


app.add_middleware(LimitsMiddleware)
app.include_router(files.router)
app.include_router(batches.router)


class OpenAIIngress:
    """The front door: parses OpenAI requests, asks the router, and writes OpenAI responses."""

    def __init__(
        self,
        config: ServingConfig,
        replicas: Mapping[str, DeploymentHandle],
        models: Sequence[ModelPlan] = (),
        pipelines: Sequence[PipelinePlan] | None = None,
    ) -> None:
        """Args:
        config: the serving config.
        replicas: each model's deployment handle.
        models: the models' plans (batches start their engines from them); default: planned here, no CPU split.
        pipelines: the plan's pipelines (run here, over the router); default: planned here.
        """
        self.config = config
        self.router = Router(config, replicas)
        if pipelines is None:
            pipelines = plan_pipelines(config.models, config.pipelines)
        self.pipelines = Pipelines(self.router, pipelines, config.router.request_timeout_s)
        files.configure(config.batches)
        batches.configure(models or [plan_model(spec) for spec in config.models])
        limits.max_body_bytes = config.router.max_body_bytes
        limits.body_timeout_s = config.router.body_timeout_s
        limits.keys = auth.KeyRing.from_config(config.router)
        limits.quotas = None
        if any(tenant.limited for tenant in limits.keys.tenants):
            limits.quotas = auth.Quotas(config.name, config.router.quota_fail_mode)
            limits.quotas.connect()
        # The OpenAPI document names the served models, so schema-driven clients generate requests this config takes.
        ServedAPI.served = tuple(config.models)
        # Routing moves bytes; the engines' processes come first when the CPU is contended.
        cpus.lower_priority()

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the router process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: 200 only when every model has a replica that answers real requests, or is cold (scaled to
        zero: available, and not woken by this probe)."""
        models = await self.router.readiness()
        ready = all(models.values())
        cold = [m for m in models if await self.router.state(m) == "cold"]
        return JSONResponse({"ready": ready, "models": models, "cold": cold}, status_code=200 if ready else 503)

    @app.get("/health", response_class=Response, responses={200: {"description": "The router answers.", "content": {}}})
    async def health(self) -> Response:
        """vLLM's probe path: 200 with no body while the router answers."""
        return Response(status_code=200)

    async def _card(self, spec: ModelSpec, name: str) -> ModelCard:
        """The card of `spec` under `name`: its `id@version`, or the bare id (an unversioned model, or the default
        version, whose card is the same under both names). A LoRA adapter's card (`name` is the adapter's) has its
        base model's facts, with `root` and `parent` the base model's name, as in vLLM."""
        info = await self.router.describe(spec.versioned_id)
        root = str(spec.source) if spec.source else spec.id
        parent = None
        if self.router.adapter_of(name) is not None:
            root = parent = spec.versioned_id
        replicas = await self.router.replicas(spec.versioned_id)
        return ModelCard(
            id=name,
            task=spec.task,
            engine=spec.engine,
            root=root,
            parent=parent,
            max_model_len=info.get("max_model_len"),
            status=await self.router.state(spec.versioned_id),
            replicas=replicas.running if replicas is not None else None,
        )

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(self) -> ModelList:
        """The served models: each version as `id@version`, and the bare id of each default version (and of each
        unversioned model)."""
        names = {**served_names(self.router.specs), **adapter_names(self.router.specs)}
        cards = list(await asyncio.gather(*(self._card(spec, name) for name, spec in names.items())))
        cards += [pipeline_api.model_card(p) for p in self.pipelines.plans.values()]
        return ModelList(data=[card for card in cards if auth.may_use(card.id)])  # a key sees its own models

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(self, model_id: str) -> ModelCard:
        """One served model."""
        auth.check_model(model_id)
        spec = served_names(self.router.specs).get(model_id) or self.router.adapter_of(model_id)
        if spec is None and self.pipelines.serves(model_id):
            return pipeline_api.model_card(self.pipelines.plans[model_id])
        if spec is None:
            raise ModelNotFoundError(f"The model '{model_id}' does not exist")
        return await self._card(spec, model_id)

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request) -> JSONResponse:
        """Token ids of a prompt or of chat messages, as generation sees them (vLLM's endpoint)."""
        auth.check_model(body.model)
        result = await self.router.tokenize(body.model, body.internal(_request_id(request)))
        payload = TokenizeResponse(
            count=len(result.tokens),
            max_model_len=result.max_model_len,
            tokens=list(result.tokens),
            token_strs=list(result.token_strs) if result.token_strs is not None else None,
        )
        return JSONResponse(payload.model_dump())

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(self, body: DetokenizeRequest) -> JSONResponse:
        """The text of token ids (vLLM's endpoint)."""
        auth.check_model(body.model)
        text = await self.router.detokenize(body.model, tuple(body.tokens))
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    @app.post("/classify", response_model=ClassificationResponse)
    async def classify(self, body: ClassificationRequest, request: Request) -> JSONResponse:
        """Class probabilities of texts, from a sequence-classification model (vLLM's endpoint)."""
        auth.check_model(body.model)
        if self.pipelines.serves(body.model):
            return await pipeline_api.classify(self.pipelines, body, request, _request_id(request))
        spec = self.router.spec_for(body.model, "classify")
        rid = _request_id(request)
        result = await self.router.classify(body.model, body.internal(rid, _session_key(spec, request, body.user)))
        response_id = body.response_id("classify", rid)
        headers = _replica_header([result.replica] if result.replica else [])
        return JSONResponse(classification_body(body, result, response_id), headers=headers)

    @app.post("/score", response_model=ScoreResponse)
    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(self, body: ScoreTextsRequest, request: Request) -> JSONResponse:
        """Relevance scores of text pairs, from a cross-encoder (vLLM's endpoint)."""
        auth.check_model(body.model)
        if self.pipelines.serves(body.model):
            return await pipeline_api.score(self.pipelines, body, request, _request_id(request))
        spec = self.router.spec_for(body.model, "score")
        rid = _request_id(request)
        result = await self.router.score(body.model, body.internal(rid, _session_key(spec, request, body.user)))
        response_id = body.response_id("score", rid)
        headers = _replica_header([result.replica] if result.replica else [])
        return JSONResponse(score_body(body, result, response_id), headers=headers)

    @app.post("/rerank", response_model=RerankResponse)
    @app.post("/v1/rerank", response_model=RerankResponse)
    @app.post("/v2/rerank", response_model=RerankResponse)
    async def rerank(self, body: RerankRequest, request: Request) -> JSONResponse:
        """Documents ranked by a cross-encoder's relevance to a query (vLLM's and Jina's endpoint)."""
        auth.check_model(body.model)
        if self.pipelines.serves(body.model):
            return await pipeline_api.rerank(self.pipelines, body, request, _request_id(request))
        spec = self.router.spec_for(body.model, "score")
        rid = _request_id(request)
        result = await self.router.score(body.model, body.internal(rid, _session_key(spec, request, body.user)))
        response_id = body.response_id("score", rid)
        headers = _replica_header([result.replica] if result.replica else [])
        return JSONResponse(rerank_body(body, result, response_id), headers=headers)

    @app.post("/v1/chat/completions", responses=_COMPLETION_RESPONSES)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion, streamed as SSE when `stream` is true."""
        auth.check_model(body.model)
        if self.pipelines.serves(body.model):
            return await pipeline_api.chat(self.pipelines, body, request, _request_id(request))
        spec = self.router.spec_for(body.model, "generate")
        gen = GenerateRequest(
            request_id=_request_id(request),
            messages=body.chat_messages(),
            sampling=body.sampling(spec.max_output_tokens),
            routing_key=_session_key(spec, request, body.user),
            **body.tool_fields(),
        )
        return await self._generate(body, [gen], chat=True)

    @app.post("/v1/completions", responses=_COMPLETION_RESPONSES)
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        """Text completion, streamed as SSE when `stream` is true; one set of `n` choices per prompt."""
        auth.check_model(body.model)
        if self.pipelines.serves(body.model):
            return await pipeline_api.completions(self.pipelines, body, request, _request_id(request))
        spec = self.router.spec_for(body.model, "generate")
        rid = _request_id(request)
        prompts = body.prompts
        gens = []
        for i, prompt in enumerate(prompts):
            fields: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
            gens.append(
                GenerateRequest(
                    request_id=rid if len(prompts) == 1 else f"{rid}-p{i}",
                    sampling=body.sampling(),
                    routing_key=_session_key(spec, request, body.user),
                    **fields,
                )
            )
        echo = None
        if body.echo:
            echo = [p if isinstance(p, str) else await self.router.detokenize(body.model, tuple(p)) for p in prompts]
        return await self._generate(body, gens, chat=False, echo=echo)

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingRequest, request: Request) -> JSONResponse:
        """Embeddings of one text or a list of texts."""
        auth.check_model(body.model)
        if self.pipelines.serves(body.model):
            return await pipeline_api.embeddings(self.pipelines, body, request, _request_id(request))
        spec = self.router.spec_for(body.model, "embed")
        embed = EmbedRequest(
            request_id=_request_id(request), inputs=body.texts, routing_key=_session_key(spec, request, body.user)
        )
        result = await self.router.embed(body.model, embed)
        payload = embedding_body(body, result)
        return JSONResponse(payload, headers=_replica_header([result.replica] if result.replica else []))

    async def _generate(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        gens: list[GenerateRequest],
        *,
        chat: bool,
        echo: list[str] | None = None,
    ) -> Response:
        completion = Completion(self.router, body, gens, chat=chat, echo=echo)
        if not body.stream:
            payload = await completion.response()
            return JSONResponse(payload, headers=_replica_header(completion.replicas))
        # stream() waits for every choice's first chunk, which names its replica, before the headers go out.
        stream = await completion.stream()
        return StreamingResponse(stream, media_type="text/event-stream", headers=_replica_header(completion.replicas))
