"""Router: maps a model id to its replicas' DeploymentHandle and turns Ray failures into ServingErrors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol, TypeVar

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments import autoscaling, timing
from deployments.config import ServingConfig
from deployments.engines.protocol import (
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateChunk,
    GenerateRequest,
    ScoreRequest,
    ScoreResult,
    TokenizeRequest,
    TokenizeResult,
)
from deployments.errors import (
    ColdStartError,
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


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


R = TypeVar("R", bound=_Cancellable)  # a DeploymentResponse, or its generator form
_READY_TIMEOUT_S = 10.0
# How often a request held for a model at zero replicas looks whether a replica runs yet.
_COLD_POLL_S = 0.5
# Retry-After of a cold-start 503 before this router has seen the model start once (then: its last start time).
_COLD_RETRY_AFTER_S = 10
_TASK_NAMES = {
    "generate": "text generation (chat and completions)",
    "embed": "embeddings",
    "classify": "classification (/classify)",
    "score": "scoring of text pairs (/score and /rerank)",
}
Task = Literal["generate", "embed", "classify", "score"]


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
        # Scale to zero: replica counts from Serve's controller, requests held per model while it starts, how long
        # its last start took, and the models that have answered a readiness call (deployments.autoscaling).
        self._replicas = autoscaling.ReplicaCounts()
        self._held = dict.fromkeys(self._specs, 0)
        self._cold_start_s: dict[str, float] = {}
        self._answered: set[str] = set()

    @property
    def specs(self) -> list[ModelSpec]:
        """The served models, in config order."""
        return list(self._specs.values())

    def spec_for(self, model_id: str, task: Task) -> ModelSpec:
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
        response = await self._send(model_id, lambda: self._unary[model_id].complete.remote(request))
        result = await self._call(response)
        watch.result(result)
        return result

    async def embed(self, model_id: str, request: EmbedRequest) -> EmbedResult:
        """Embed the request's inputs.

        Raises:
            ServingError: any failure, already mapped.
        """
        self.spec_for(model_id, "embed")
        watch = timing.dispatch(model_id)
        response = await self._send(model_id, lambda: self._unary[model_id].embed.remote(request))
        result = await self._call(response)
        watch.result(result)
        return result

    async def classify(self, model_id: str, request: ClassifyRequest) -> ClassifyResult:
        """Classify the request's inputs.

        Raises:
            ServingError: any failure, already mapped.
        """
        self.spec_for(model_id, "classify")
        watch = timing.dispatch(model_id)
        result = await self._call(await self._send(model_id, lambda: self._unary[model_id].classify.remote(request)))
        watch.result(result)
        return result

    async def score(self, model_id: str, request: ScoreRequest) -> ScoreResult:
        """Score the request's (query, document) pairs (/score and /rerank).

        Raises:
            ServingError: any failure, already mapped.
        """
        self.spec_for(model_id, "score")
        watch = timing.dispatch(model_id)
        result = await self._call(await self._send(model_id, lambda: self._unary[model_id].score.remote(request)))
        watch.result(result)
        return result

    async def stream(self, model_id: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream output chunks as the replica produces them.

        Raises:
            ServingError: any failure, already mapped; raised from the iteration.
        """
        self.spec_for(model_id, "generate")
        watch = timing.dispatch(model_id)
        response = await self._send(model_id, lambda: self._streaming[model_id].generate.remote(request))
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
            # Serve's cancel() re-raises the failure of a request that never reached a replica (a full queue's
            # BackPressureError, already mapped above): it would replace the 429 with Serve's plain-text 503.
            with contextlib.suppress(serve.exceptions.RayServeException):
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
        return await self._call(await self._send(model_id, lambda: self._unary[model_id].tokenize.remote(request)))

    async def detokenize(self, model_id: str, tokens: tuple[int, ...]) -> str:
        """The text of token ids on the model's tokenizer.

        Raises:
            ServingError: any failure, already mapped.
        """
        self.spec(model_id)
        return await self._call(await self._send(model_id, lambda: self._unary[model_id].detokenize.remote(tokens)))

    async def describe(self, model_id: str) -> dict[str, Any]:
        """What a replica of the model reports about the loaded model (`max_model_len`), cached once known;
        empty when no replica answers within the readiness timeout, or when the model is cold (asking would start
        a replica)."""
        if model_id not in self._described:
            if await self.state(model_id) == "cold":
                return {}
            try:
                info = await asyncio.wait_for(self._unary[model_id].describe.remote(), _READY_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a model card without the engine's facts is still a card
                return {}
            self._described[model_id] = info
        return self._described[model_id]

    async def replicas(self, model_id: str) -> autoscaling.Replicas | None:
        """The model's replicas as Serve's controller counts them (cached briefly); None: it did not say."""
        return await self._replicas.get(self._specs[model_id].deployment_name)

    async def state(self, model_id: str) -> Literal["ready", "cold", "starting"] | None:
        """'ready': a replica runs. 'cold': a model that scales to zero has none running (a request starts one and
        waits for it). 'starting': another model has none running yet. None: Serve's controller did not say."""
        replicas = await self.replicas(model_id)
        if replicas is None:
            return None
        if replicas.running > 0:
            return "ready"
        return "cold" if self._specs[model_id].scaling.min_replicas == 0 else "starting"

    async def readiness(self) -> dict[str, bool]:
        """Per model: whether a replica answers a real request now, or the model is cold: scaled to zero, or
        starting again after it once answered (asking a cold model would start a replica)."""

        async def one(model_id: str) -> bool:
            if self._specs[model_id].scaling.min_replicas == 0:
                replicas = await self.replicas(model_id)
                if replicas is not None and replicas.running == 0 and (replicas.at_zero or model_id in self._answered):
                    return True
            try:
                ready = bool(await asyncio.wait_for(self._unary[model_id].ready.remote(), _READY_TIMEOUT_S))
            except Exception:  # noqa: BLE001 - readiness reports, it never raises
                return False
            if ready:
                self._answered.add(model_id)
            return ready

        results = await asyncio.gather(*(one(mid) for mid in self._specs))
        return dict(zip(self._specs, results, strict=True))

    async def _send(self, model_id: str, send: Callable[[], R]) -> R:
        """Send a request to the model's handle; for a model at zero replicas, hold it until a replica runs.

        The held request is already queued at Serve's handle: that is what makes Serve start a replica (its
        scale-from-zero path). At most `cold_start_queue` requests are held per router replica, each for at most
        `cold_start_timeout_s`.

        Raises:
            ColdStartError: too many requests are held already, or no replica started in time.
        """
        scaling = self._specs[model_id].scaling
        if scaling.min_replicas > 0 or await self._warm(model_id):
            return send()
        retry = math.ceil(self._cold_start_s.get(model_id, _COLD_RETRY_AFTER_S))
        if self._held[model_id] >= scaling.cold_start_queue:
            raise ColdStartError(
                f"The model '{model_id}' is starting from zero replicas and {self._held[model_id]} requests already "
                f"wait for it (its cold_start_queue); retry in {retry} s",
                retry_after_s=retry,
            )
        response = send()
        self._held[model_id] += 1
        started = time.monotonic()
        try:
            while not await self._warm(model_id):
                if time.monotonic() - started >= scaling.cold_start_timeout_s:
                    response.cancel()
                    raise ColdStartError(
                        f"The model '{model_id}' is starting from zero replicas and none started within its "
                        f"cold_start_timeout_s of {scaling.cold_start_timeout_s:g} s; retry in {retry} s",
                        retry_after_s=retry,
                    )
                await asyncio.sleep(_COLD_POLL_S)
            self._cold_start_s[model_id] = time.monotonic() - started
        finally:
            self._held[model_id] -= 1
        return response

    async def _warm(self, model_id: str) -> bool:
        """A replica of the model runs (or Serve's controller did not say: then Serve's own queue holds it)."""
        replicas = await self.replicas(model_id)
        return replicas is None or replicas.running > 0

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
