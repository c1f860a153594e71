"""Router: maps a model id to its replicas' DeploymentHandle and turns Ray failures into ServingErrors."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, Literal, TypeVar

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments import timing
from deployments.config import ServingConfig
from deployments.engines.protocol import (
    EmbedRequest,
    EmbedResult,
    GenerateChunk,
    GenerateRequest,
    TokenizeRequest,
    TokenizeResult,
)
from deployments.errors import (
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    RequestTimeoutError,
    ServingError,
)
from models.spec import ModelSpec

__all__ = ["Router"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_READY_TIMEOUT_S = 10.0
_TASK_NAMES = {"generate": "text generation (chat and completions)", "embed": "embeddings"}


class Router:
    """Routes requests by model id to that model's Serve deployment."""

    def __init__(self, config: ServingConfig, handles: Mapping[str, DeploymentHandle]) -> None:
        self._specs = {spec.id: spec for spec in config.models}
        missing = set(self._specs) - set(handles)
        if missing:
            raise ValueError(f"no deployment handle for models {sorted(missing)}")
        # Configure each handle once: every .options() call builds a new handle.
        self._unary = {mid: handles[mid].options(stream=False) for mid in self._specs}
        self._streaming = {mid: handles[mid].options(stream=True) for mid in self._specs}
        self._timeout_s = config.router.request_timeout_s
        self._described: dict[str, dict[str, Any]] = {}

    @property
    def specs(self) -> list[ModelSpec]:
        """The served models, in config order."""
        return list(self._specs.values())

    def spec_for(self, model_id: str, task: Literal["generate", "embed"]) -> ModelSpec:
        """The spec of `model_id`, checked to serve `task`.

        Raises:
            ModelNotFoundError: no model has this id.
            InvalidRequestError: the model serves another task.
        """
        spec = self._specs.get(model_id)
        if spec is None:
            raise ModelNotFoundError(f"The model '{model_id}' does not exist. Served models: {', '.join(self._specs)}")
        timing.label_model(model_id)
        if spec.task != task:
            raise InvalidRequestError(
                f"The model '{model_id}' serves {_TASK_NAMES[spec.task]}, not {_TASK_NAMES[task]}", param="model"
            )
        return spec

    async def complete(self, model_id: str, request: GenerateRequest) -> GenerateChunk:
        """Generate the whole output at once.

        Raises:
            ServingError: any failure, already mapped (see deployments.errors).
        """
        self.spec_for(model_id, "generate")
        watch = timing.dispatch(model_id)
        result = await self._call(self._unary[model_id].complete.remote(request))
        watch.result(result)
        return result

    async def embed(self, model_id: str, request: EmbedRequest) -> EmbedResult:
        """Embed the request's inputs.

        Raises:
            ServingError: any failure, already mapped.
        """
        self.spec_for(model_id, "embed")
        watch = timing.dispatch(model_id)
        result = await self._call(self._unary[model_id].embed.remote(request))
        watch.result(result)
        return result

    async def stream(self, model_id: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream output chunks as the replica produces them.

        Raises:
            ServingError: any failure, already mapped; raised from the iteration.
        """
        self.spec_for(model_id, "generate")
        watch = timing.dispatch(model_id)
        response = self._streaming[model_id].generate.remote(request)
        deadline = time.monotonic() + self._timeout_s
        try:
            while True:
                try:
                    chunk = await self._call(anext(response), deadline - time.monotonic())
                except StopAsyncIteration:
                    return
                watch.chunk(chunk)
                yield chunk
        except ServingError:
            watch.failed()
            raise
        finally:
            response.cancel()

    def spec(self, model_id: str) -> ModelSpec:
        """The spec of `model_id`, whatever its task.

        Raises:
            ModelNotFoundError: no model has this id.
        """
        spec = self._specs.get(model_id)
        if spec is None:
            raise ModelNotFoundError(f"The model '{model_id}' does not exist. Served models: {', '.join(self._specs)}")
        return spec

    async def tokenize(self, model_id: str, request: TokenizeRequest) -> TokenizeResult:
        """Token ids of a text or chat messages on the model's tokenizer.

        Raises:
            ServingError: any failure, already mapped.
        """
        self.spec(model_id)
        return await self._call(self._unary[model_id].tokenize.remote(request))

    async def detokenize(self, model_id: str, tokens: tuple[int, ...]) -> str:
        """The text of token ids on the model's tokenizer.

        Raises:
            ServingError: any failure, already mapped.
        """
        self.spec(model_id)
        return await self._call(self._unary[model_id].detokenize.remote(tokens))

    async def describe(self, model_id: str) -> dict[str, Any]:
        """What a replica of the model reports about the loaded model (`max_model_len`), cached once known;
        empty when no replica answers within the readiness timeout."""
        if model_id not in self._described:
            try:
                info = await asyncio.wait_for(self._unary[model_id].describe.remote(), _READY_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a model card without the engine's facts is still a card
                return {}
            self._described[model_id] = info
        return self._described[model_id]

    async def readiness(self) -> dict[str, bool]:
        """Per model: whether a replica answers a real request now."""

        async def one(model_id: str) -> bool:
            try:
                return bool(await asyncio.wait_for(self._unary[model_id].ready.remote(), _READY_TIMEOUT_S))
            except Exception:  # noqa: BLE001 - readiness reports, it never raises
                return False

        results = await asyncio.gather(*(one(mid) for mid in self._specs))
        return dict(zip(self._specs, results, strict=True))

    async def _call(self, awaitable: Awaitable[T], timeout_s: float | None = None) -> T:
        """Await a replica call and map Ray's failures to ServingErrors."""
        try:
            return await asyncio.wait_for(awaitable, self._timeout_s if timeout_s is None else max(timeout_s, 0))
        except TimeoutError:
            raise RequestTimeoutError(
                f"The request took longer than the router's limit of {self._timeout_s:g} s and was cancelled"
            ) from None
        except RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, ServingError):
                raise cause from None
            raise EngineError(f"replica failed: {type(cause).__name__}") from exc
        except BackPressureError:
            raise OverloadedError("The model's queue is full; retry later") from None
        except RayActorError:
            raise EngineDeadError("The replica serving this model died; retry shortly") from None
        except serve.exceptions.RayServeException as exc:
            raise EngineError(f"serve error: {type(exc).__name__}") from exc
