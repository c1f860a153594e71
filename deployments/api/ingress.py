"""The OpenAI-compatible HTTP API: FastAPI routes, request limits, auth, SSE and error bodies."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import cpus, timing
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
from deployments.router import Router
from models.spec import ModelSpec

__all__ = ["REPLICA_HEADER", "OpenAIIngress", "app"]

logger = logging.getLogger(__name__)

_OPEN_PATHS = {"/healthz", "/health", "/readyz", "/openapi.json", "/docs"}
# Which Serve replica(s) served a request (comma-separated when `n` choices landed on several): for operators, and
# for the routing tests.
REPLICA_HEADER = "x-modelfleet-replica"
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
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # the app may live under a route prefix
            path = path[len(root) :]
        if not _limits.api_keys or path in _OPEN_PATHS:
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


app = FastAPI(
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
    # Starlette's own headers: `Allow` on a 405, as HTTP requires.
    return JSONResponse(body.model_dump(), status_code=status, headers=exc.headers)


@app.exception_handler(ServingError)
async def _on_serving_error(request: Request, exc: ServingError) -> JSONResponse:
    return _error(exc, _request_id(request))


@app.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return _error(exc, _request_id(request))


app.add_middleware(_LimitsMiddleware)


class OpenAIIngress:
    """The front door: parses OpenAI requests, asks the router, and writes OpenAI responses."""

    def __init__(self, config: ServingConfig, replicas: Mapping[str, DeploymentHandle]) -> None:
        self.config = config
        self.router = Router(config, replicas)
        _limits.max_body_bytes = config.router.max_body_bytes
        _limits.api_keys = tuple(k.get_secret_value().encode() for k in config.router.api_keys)
        # Routing moves bytes; the engines' processes come first when the CPU is contended.
        cpus.lower_priority()

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the router process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: 200 only when every model has a replica that answers real requests."""
        models = await self.router.readiness()
        ready = all(models.values())
        return JSONResponse({"ready": ready, "models": models}, status_code=200 if ready else 503)

    @app.get("/health")
    async def health(self) -> Response:
        """vLLM's probe path: 200 with no body while the router answers."""
        return Response(status_code=200)

    async def _card(self, spec: ModelSpec) -> ModelCard:
        info = await self.router.describe(spec.id)
        root = str(spec.source) if spec.source else spec.id
        return ModelCard(
            id=spec.id, task=spec.task, engine=spec.engine, root=root, max_model_len=info.get("max_model_len")
        )

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(self) -> ModelList:
        """The served models."""
        return ModelList(data=list(await asyncio.gather(*(self._card(s) for s in self.router.specs))))

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(self, model_id: str) -> ModelCard:
        """One served model."""
        spec = next((s for s in self.router.specs if s.id == model_id), None)
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

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion, streamed as SSE when `stream` is true."""
        spec = self.router.spec_for(body.model, "generate")
        gen = GenerateRequest(
            request_id=_request_id(request),
            messages=body.chat_messages(),
            sampling=body.sampling(spec.max_output_tokens),
            routing_key=_session_key(spec, request, body.user),
            **body.tool_fields(),
        )
        return await self._generate(body, [gen], chat=True)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        """Text completion, streamed as SSE when `stream` is true; one set of `n` choices per prompt."""
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
