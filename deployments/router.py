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
from ray.serve.handle import DeploymentHandle

from deployments import autoscaling, metrics, timing
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
    EngineError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestTimeoutError,
    ServingError,
)
from deployments.failures import ReplicaLostError, map_failure, may_retry
from deployments.migration import StreamProgress
from models.spec import ModelSpec, adapter_names, served_names

__all__ = ["Router"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


R = TypeVar("R", bound=_Cancellable)  # a DeploymentResponse, or its generator form
_READY_TIMEOUT_S = 10.0
# Readiness reads Serve's controller (cached): at most this long, then the last answer stands.
_CONTROLLER_TIMEOUT_S = 5.0
# Readiness probe of a model the controller says nothing about: it waits in the replica's queue, so a model that
# answered before and is busy now counts as ready when it times out.
_PROBE_TIMEOUT_S = 2.0
# Pause before sending a request again after its replica was lost, times the attempt: Serve's handle learns of the
# death from the failure itself and routes the retry elsewhere (or holds it until the restarted replica runs).
_RETRY_BACKOFF_S = 0.2
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
        # Keyed by `id@version` (the bare id of an unversioned model); `_names` adds the bare id of each default
        # version. Public methods take any served name and resolve it once, in spec_for/spec.
        self._specs = {spec.versioned_id: spec for spec in config.models}
        self._names = served_names(config.models)
        # LoRA adapters: each name -> its base model's spec; a request naming one runs on the base's deployment.
        self._adapters = adapter_names(config.models)
        missing = set(self._specs) - set(handles)
        if missing:
            raise ValueError(f"no deployment handle for models {sorted(missing)}")
        # Configure each handle once: every .options() call builds a new handle.
        self._unary = {mid: handles[mid].options(stream=False) for mid in self._specs}
        self._streaming = {mid: handles[mid].options(stream=True) for mid in self._specs}
        self._adapter_handles: dict[tuple[str, bool], DeploymentHandle] = {}
        self._timeout_s = config.router.request_timeout_s
        self._max_retries = config.router.max_retries
        self._max_migrations = config.router.max_migrations
        self._last_ready: dict[str, bool] = {}
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
        spec = self._resolve(model_id)
        timing.label_model(spec.versioned_id)
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
        request = self._with_adapter(model_id, request)
        model_id = self.spec_for(model_id, "generate").versioned_id
        watch = timing.dispatch(model_id)
        result: GenerateChunk = await self._unary_call(model_id, "complete", request, request.request_id)
        watch.result(result)
        return result

    async def embed(self, model_id: str, request: EmbedRequest) -> EmbedResult:
        """Embed the request's inputs.

        Raises:
            ServingError: any failure, already mapped.
        """
        model_id = self.spec_for(model_id, "embed").versioned_id
        watch = timing.dispatch(model_id)
        result: EmbedResult = await self._unary_call(model_id, "embed", request, request.request_id)
        watch.result(result)
        return result

    async def classify(self, model_id: str, request: ClassifyRequest) -> ClassifyResult:
        """Classify the request's inputs.

        Raises:
            ServingError: any failure, already mapped.
        """
        model_id = self.spec_for(model_id, "classify").versioned_id
        watch = timing.dispatch(model_id)
        result = await self._unary_call(model_id, "classify", request, request.request_id)
        watch.result(result)
        return result

    async def score(self, model_id: str, request: ScoreRequest) -> ScoreResult:
        """Score the request's (query, document) pairs (/score and /rerank).

        Raises:
            ServingError: any failure, already mapped.
        """
        model_id = self.spec_for(model_id, "score").versioned_id
        watch = timing.dispatch(model_id)
        result = await self._unary_call(model_id, "score", request, request.request_id)
        watch.result(result)
        return result

    async def stream(self, model_id: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream output chunks as the replica produces them. A stream whose replica is lost before its first chunk
        is sent again (see `max_retries`); after it, the stream migrates: it goes on on another replica from the
        tokens already relayed (see `max_migrations` and `deployments.migration`), or, where it cannot, ends with
        the error.

        Raises:
            ServingError: any failure, already mapped; raised from the iteration.
        """
        request = self._with_adapter(model_id, request)
        model_id = self.spec_for(model_id, "generate").versioned_id
        watch = timing.dispatch(model_id)
        deadline = time.monotonic() + self._timeout_s
        attempt = 0
        handle = self._handle(model_id, request, stream=True)
        progress = StreamProgress(request)
        current = request
        while True:
            response = await self._send(model_id, lambda sent=current: handle.generate.remote(sent))
            try:
                while True:
                    try:
                        chunk = await self._call(anext(response), deadline - time.monotonic())
                    except StopAsyncIteration:
                        return
                    except ReplicaLostError as exc:
                        if not progress.started:
                            attempt += 1
                            await self._before_retry(model_id, "stream", request.request_id, exc, attempt, deadline)
                            break
                        going_on = await self._migrate(model_id, progress, exc, deadline)
                        if isinstance(going_on, GenerateChunk):  # nothing was left to generate
                            yield going_on
                            return
                        current = going_on
                        break
                    chunk, ended = progress.relay(chunk)
                    watch.chunk(chunk)
                    yield chunk
                    if ended:
                        return
            except ServingError:
                watch.failed()
                raise
            finally:
                # Serve's cancel() re-raises the failure of a request that never reached a replica (a full queue's
                # BackPressureError, already mapped above): it would replace the 429 with Serve's plain-text 503.
                with contextlib.suppress(serve.exceptions.RayServeException):
                    response.cancel()

    async def _migrate(
        self, model_id: str, progress: StreamProgress, exc: ReplicaLostError, deadline: float
    ) -> GenerateRequest | GenerateChunk:
        """The continuation of a stream whose replica was lost after its first chunk, counted and logged.

        Raises:
            ReplicaLostError: `exc` itself, when the stream cannot migrate, has migrated `max_migrations` times, or
                its time is up.
        """
        left = deadline - time.monotonic()
        why = progress.not_migratable()
        if why is None and progress.migrations >= self._max_migrations:
            why = "max_migrations"
        if why is None and left <= 0:
            why = "timeout"
        metrics.count_migration(model_id, why or "migrated")
        if why is not None:
            raise exc
        logger.warning(
            "migrating stream %s of model %s (%d of at most %d): %s",
            progress.request.request_id,
            model_id,
            progress.migrations + 1,
            self._max_migrations,
            exc.reason,
        )
        await asyncio.sleep(min(_RETRY_BACKOFF_S, left))
        return progress.continuation()

    def spec(self, model_id: str) -> ModelSpec:
        """The spec of `model_id`, whatever its task.

        Raises:
            ModelNotFoundError: no model has this id.
        """
        return self._resolve(model_id)

    def _resolve(self, model_id: str) -> ModelSpec:
        """The spec `model_id` names: a served name, or a LoRA adapter's name (its base model's spec)."""
        spec = self._names.get(model_id) or self._adapters.get(model_id)
        if spec is None:
            served = ", ".join([*self._names, *self._adapters])
            raise ModelNotFoundError(f"The model '{model_id}' does not exist. Served models: {served}")
        return spec

    def adapter_of(self, model_id: str) -> ModelSpec | None:
        """The base model's spec when `model_id` names a LoRA adapter, else None."""
        return self._adapters.get(model_id)

    def _with_adapter(self, model_id: str, request: GenerateRequest) -> GenerateRequest:
        """`request` set to run with the adapter `model_id` names, if it names one."""
        if model_id in self._adapters and model_id not in self._names:
            return request.model_copy(update={"adapter": model_id})
        return request

    def _handle(self, model_id: str, payload: Any, stream: bool = False) -> DeploymentHandle:
        """The handle a call of the model goes through: for a request with a LoRA adapter, one whose multiplexed
        model id is the adapter's name, so that Serve prefers a replica that has it loaded (made once per adapter)."""
        handles = self._streaming if stream else self._unary
        adapter = payload.adapter if isinstance(payload, GenerateRequest) else None
        if adapter is None:
            return handles[model_id]
        key = (adapter, stream)
        if key not in self._adapter_handles:
            self._adapter_handles[key] = handles[model_id].options(multiplexed_model_id=adapter)
        return self._adapter_handles[key]

    async def tokenize(self, model_id: str, request: TokenizeRequest) -> TokenizeResult:
        """Token ids of a text or chat messages on the model's tokenizer.

        Raises:
            ServingError: any failure, already mapped.
        """
        model_id = self.spec(model_id).versioned_id
        result: TokenizeResult = await self._unary_call(model_id, "tokenize", request, request.request_id)
        return result

    async def detokenize(self, model_id: str, tokens: tuple[int, ...]) -> str:
        """The text of token ids on the model's tokenizer.

        Raises:
            ServingError: any failure, already mapped.
        """
        model_id = self.spec(model_id).versioned_id
        text: str = await self._unary_call(model_id, "detokenize", tokens, None)
        return text

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
        """Per model: whether a replica answers real requests now, or the model is cold: scaled to zero, or
        starting again after it once answered (asking a cold model would start a replica).

        Read from Serve's controller (cached briefly), never from a call queued behind requests: Serve marks a
        replica RUNNING only once its warm-up answered a real request, and a busy replica is still ready. Only where
        the controller does not say, a replica is asked, briefly; a model that answered before and does not answer
        in time is busy, not unready. Answers within about `_CONTROLLER_TIMEOUT_S + _PROBE_TIMEOUT_S` under any load.
        """

        async def one(model_id: str) -> bool:
            try:
                replicas = await asyncio.wait_for(self.replicas(model_id), _CONTROLLER_TIMEOUT_S)
            except TimeoutError:  # the controller is slow to answer: what it said last still stands
                return self._last_ready.get(model_id, False)
            if replicas is None:
                ready = await self._probe(model_id)
            elif replicas.running > 0:
                ready = True
            else:
                scales_to_zero = self._specs[model_id].scaling.min_replicas == 0
                ready = scales_to_zero and (replicas.at_zero or model_id in self._answered)
            if ready and (replicas is None or replicas.running > 0):
                self._answered.add(model_id)
            self._last_ready[model_id] = ready
            return ready

        results = await asyncio.gather(*(one(mid) for mid in self._specs))
        return dict(zip(self._specs, results, strict=True))

    async def _probe(self, model_id: str) -> bool:
        """Ask a replica of the model whether it is ready, for at most `_PROBE_TIMEOUT_S`: no answer in time means
        busy (ready) for a model that answered before, else not ready."""
        try:
            return bool(await asyncio.wait_for(self._unary[model_id].ready.remote(), _PROBE_TIMEOUT_S))
        except TimeoutError:
            return model_id in self._answered
        except Exception:  # noqa: BLE001 - readiness reports, it never raises
            return False

    async def _unary_call(self, model_id: str, method: str, payload: Any, request_id: str | None) -> Any:
        """Call a non-streaming (idempotent) replica method; if the replica holding the call is lost before it
        returns, send it again (the same payload, so the same request id), at most `max_retries` times, all within
        `request_timeout_s`.

        Raises:
            ServingError: any failure, already mapped; `EngineDeadError` (503) once the retries are spent.
        """
        deadline = time.monotonic() + self._timeout_s
        attempt = 0
        call = getattr(self._handle(model_id, payload), method)
        while True:
            response = await self._send(model_id, lambda: call.remote(payload))
            try:
                return await self._call(response, deadline - time.monotonic())
            except ReplicaLostError as exc:
                attempt += 1
                await self._before_retry(model_id, method, request_id, exc, attempt, deadline)

    async def _before_retry(
        self, model_id: str, what: str, request_id: str | None, exc: ReplicaLostError, attempt: int, deadline: float
    ) -> None:
        """Count and log retry number `attempt` of a request whose replica was lost, and pause briefly.

        Raises:
            ReplicaLostError: `exc` itself, once `max_retries` are spent or the request's time is up.
        """
        left = deadline - time.monotonic()
        if not may_retry(attempt, self._max_retries, left):
            if attempt > 1:
                exc.message = f"{exc.message} (sent {attempt} times, each replica was lost)"
                exc.args = (exc.message,)
            raise exc
        metrics.count_retry(model_id, exc.reason)
        logger.warning(
            "retrying %s request %s of model %s (%d of at most %d): %s",
            what,
            request_id or "-",
            model_id,
            attempt,
            self._max_retries,
            exc.reason,
        )
        await asyncio.sleep(min(_RETRY_BACKOFF_S * attempt, left))

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
        except (RayTaskError, RayActorError, serve.exceptions.RayServeException) as exc:
            mapped = map_failure(exc)
            # An unexpected failure keeps Ray's error as its cause, for the logs.
            raise mapped from (exc if type(mapped) is EngineError else None)
