"""The OpenAI-compatible HTTP API: FastAPI routes, request limits, auth, SSE and error bodies."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import cpus, timing
from deployments.api import batches, files
from deployments.api import pipelines as pipeline_api
from deployments.api.completions import Completion
from deployments.api.embeddings import embedding_body
from deployments.api.errors import to_error_response, validation_message
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
    AuthenticationError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestTooLargeError,
    ServingError,
)
from deployments.pipelines.executor import Pipelines
from deployments.pipelines.spec import PipelinePlan, plan_pipelines
from deployments.plan import ModelPlan, plan_model
from deployments.router import Router
from models.spec import ModelSpec

__all__ = ["REPLICA_HEADER", "OpenAIIngress", "app"]

logger = logging.getLogger(__name__)

_OPEN_PATHS = {"/healthz", "/health", "/readyz", "/openapi.json", "/docs"}
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
    # Set for every HTTP request by _LimitsMiddleware, the outermost layer.
    rid: str = request.scope["modelfleet.request_id"]
    return rid


@functools.cache
def _route_paths() -> frozenset[str]:
    """The app's route templates (known once every route is registered)."""
    return frozenset(str(getattr(route, "path", "")) for route in app.routes)


def _session_key(spec: ModelSpec, request: Request, user: str | None) -> str | None:
    """The session key a model with routing policy 'session' routes by: its session header, else `user`."""
    if spec.routing.policy != "session":
        return None
    return request.headers.get(spec.routing.session_header) or user or None


def _replica_header(replicas: list[str]) -> dict[str, str]:
    return {REPLICA_HEADER: ",".join(replicas)} if replicas else {}


def _error(exc: BaseException, request_id: str) -> JSONResponse:
    status, body = to_error_response(exc, request_id)
    # Serve's proxy sets the x-request-id response header (the client's own id, or one it generated).
    retry_after = exc.retry_after_s if isinstance(exc, ServingError) else None
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@dataclass
class _Limits:
    """Per-process request limits; set from the config when the ingress replica starts."""

    max_body_bytes: int = 1_048_576
    api_keys: tuple[bytes, ...] = ()


_limits = _Limits()


class _LimitsMiddleware:
    """Outermost ASGI middleware: API-key check (401) and body-size limit (413) before any parsing.

    Pure ASGI rather than BaseHTTPMiddleware so streamed responses pass through untouched. The body is
    read here, bounded, and replayed to the app, so chunked uploads without Content-Length are capped too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The metrics of every HTTP request, refused ones included: this is the outermost layer.
        record = timing.RequestRecord.begin()
        try:
            await self._limit(scope, receive, record.wrap(send))
        finally:
            record.finish(scope, _route_paths())

    async def _limit(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        scope["modelfleet.request_id"] = rid
        failure = self._check_auth(scope, headers)
        upload_limit = files.upload_limit() if _path(scope) == files.UPLOAD_PATH and scope["method"] == "POST" else None
        if failure is None and upload_limit is not None:
            # A file upload streams on to its route, which spools it to disk: bounded as it arrives, not buffered.
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > upload_limit:
                failure = _upload_too_large(upload_limit)
            else:
                await self.app(scope, _bounded(receive, upload_limit), send)
                return
        body = b""
        if failure is None:
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > _limits.max_body_bytes:
                failure = self._too_large()
            else:
                body, failure = await self._read_body(receive)
        if failure is not None:
            await _error(failure, rid)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect as usual
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    def _check_auth(scope: Scope, headers: dict[bytes, bytes]) -> ServingError | None:
        if not _limits.api_keys or _path(scope) in _OPEN_PATHS:
            return None
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if any(hmac.compare_digest(token, key) for key in _limits.api_keys):
            return None
        return AuthenticationError("Missing or invalid API key: send `Authorization: Bearer <key>`")

    async def _read_body(self, receive: Receive) -> tuple[bytes, ServingError | None]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > _limits.max_body_bytes:
                return b"", self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    @staticmethod
    def _too_large() -> RequestTooLargeError:
        return RequestTooLargeError(
            f"Request body is larger than the limit of {_limits.max_body_bytes} bytes", code="request_too_large"
        )


def _path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):  # the app may live under a route prefix
        path = path[len(root) :]
    return str(path)


def _upload_too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"Upload is larger than the limit of {limit} bytes (`batches.max_file_bytes` and the form's framing)",
        param="file",
        code="file_too_large",
    )


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive`, failing with a 413 once the body has grown past `limit` bytes (a chunked upload has no length)."""
    size = 0

    async def bounded() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise _upload_too_large(limit)  # raised inside the route's form parsing: its error handler answers
        return message

    return bounded


app = ServedAPI(
    title="modelfleet",
    summary="OpenAI-compatible API over a Ray Serve model cluster",
    version="0.1.0",
    responses=_ERROR_RESPONSES,
)


@app.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc.errors())
    return _error(InvalidRequestError(message, param=param), _request_id(request))


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
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
async def _on_serving_error(request: Request, exc: ServingError) -> JSONResponse:
    return _error(exc, _request_id(request))


@app.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return _error(exc, _request_id(request))


app.add_middleware(_LimitsMiddleware)
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
        batches.configure({m.spec.id: m for m in models or [plan_model(spec) for spec in config.models]})
        _limits.max_body_bytes = config.router.max_body_bytes
        _limits.api_keys = tuple(k.get_secret_value().encode() for k in config.router.api_keys)
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

    async def _card(self, spec: ModelSpec) -> ModelCard:
        info = await self.router.describe(spec.id)
        root = str(spec.source) if spec.source else spec.id
        replicas = await self.router.replicas(spec.id)
        return ModelCard(
            id=spec.id,
            task=spec.task,
            engine=spec.engine,
            root=root,
            max_model_len=info.get("max_model_len"),
            status=await self.router.state(spec.id),
            replicas=replicas.running if replicas is not None else None,
        )

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(self) -> ModelList:
        """The served models."""
        cards = list(await asyncio.gather(*(self._card(s) for s in self.router.specs)))
        return ModelList(data=cards + [pipeline_api.model_card(p) for p in self.pipelines.plans.values()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(self, model_id: str) -> ModelCard:
        """One served model."""
        spec = next((s for s in self.router.specs if s.id == model_id), None)
        if spec is None and self.pipelines.serves(model_id):
            return pipeline_api.model_card(self.pipelines.plans[model_id])
        if spec is None:
            raise ModelNotFoundError(f"The model '{model_id}' does not exist")
        return await self._card(spec)

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request) -> JSONResponse:
        """Token ids of a prompt or of chat messages, as generation sees them (vLLM's endpoint)."""
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
        text = await self.router.detokenize(body.model, tuple(body.tokens))
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    @app.post("/classify", response_model=ClassificationResponse)
    async def classify(self, body: ClassificationRequest, request: Request) -> JSONResponse:
        """Class probabilities of texts, from a sequence-classification model (vLLM's endpoint)."""
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
        spec = self.router.spec_for(body.model, "score")
        rid = _request_id(request)
        result = await self.router.score(body.model, body.internal(rid, _session_key(spec, request, body.user)))
        response_id = body.response_id("score", rid)
        headers = _replica_header([result.replica] if result.replica else [])
        return JSONResponse(rerank_body(body, result, response_id), headers=headers)

    @app.post("/v1/chat/completions", responses=_COMPLETION_RESPONSES)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion, streamed as SSE when `stream` is true."""
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
