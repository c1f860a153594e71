"""ModelReplica: the Serve deployment that owns one Engine; request ids, warm-up, health and lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from deployments import autoscaling, cpus, engines, metrics
from deployments.engines.protocol import (
    ClassifyRequest,
    ClassifyResult,
    EmbeddingEngine,
    EmbedRequest,
    EmbedResult,
    Engine,
    GenerateChunk,
    GenerateRequest,
    ReplicaTimes,
    SamplingConfig,
    ScoreRequest,
    ScoreResult,
    ScoringEngine,
    TokenizeRequest,
    TokenizeResult,
    TokenizingEngine,
    TokenLogprob,
    ToolCallDelta,
    merge_tool_calls,
)
from deployments.engines.vllm_lora import LoRAMixin, check_adapters
from deployments.errors import EngineDeadError, EngineStartError, InvalidRequestError
from deployments.plan import ModelPlan
from models.spec import AdapterSpec

__all__ = ["ModelReplica"]

logger = logging.getLogger(__name__)

# The start-up line goes through Serve's logger, whose records Ray keeps (a worker drops other loggers' INFO records):
# in the replica's Serve log, or its worker's stderr log once vLLM is imported there. `cluster.startup_timing`
# reads it from either.
_start_logger = logging.getLogger("ray.serve.modelfleet")
# How long a wedged replica's engine may take to shut down before the replica's actor is ended anyway.
_WEDGED_SHUTDOWN_S = 10.0


class ModelReplica:
    """Loads the model's engine at start, answers one real request (warm-up), then serves.

    Serve marks a replica RUNNING only after `__init__` returns, so a running replica has already
    answered a real request: that is what readiness means here.
    """

    async def __init__(self, plan: ModelPlan, *, engine_cls: type[Engine] | None = None) -> None:
        spec = self.spec = plan.spec
        self.replica_id = _serve_replica_id()
        self.progress = Progress()
        self._ending: asyncio.Task[None] | None = None
        cls = engine_cls or engines.resolve(spec.engine, spec.task)
        self.engine = cls(spec, plan.engine)
        engine = self.engine
        self.adapters: Adapters | None = None
        if spec.adapters and isinstance(engine, LoRAMixin):
            self.adapters = Adapters(engine, spec.max_loaded_adapters)
        started = time.monotonic()
        await self.engine.start()
        if self.engine.computes_out_of_process:
            # The engine's processes are started (and keep their priority): this process now only moves
            # requests and tokens, and yields the CPU to them when it is contended.
            cpus.lower_priority()
        engine_s = time.monotonic() - started
        await self._warm_up()
        self.ready_after_s = time.monotonic() - started
        self.metrics = metrics.ReplicaMetrics(spec.versioned_id)  # as the router labels it
        self.load = autoscaling.LoadSignals()
        self.metrics.ready()
        _start_logger.info(
            "model %s ready (%s engine) in %.1f s: %s",
            spec.id,
            spec.engine,
            self.ready_after_s,
            _start_split(engine_s, getattr(self.engine, "start_times", {}), self.ready_after_s - engine_s),
        )

    async def _warm_up(self) -> None:
        if self.spec.task == "generate":
            request = GenerateRequest(request_id="warmup", prompt="Hello", sampling=SamplingConfig(max_tokens=1))
            async for _ in self.engine.generate(request):
                pass
        elif self.spec.task == "classify":
            await self._scoring().classify(ClassifyRequest(request_id="warmup", inputs=("Hello",)))
        elif self.spec.task == "score":
            await self._scoring().score(ScoreRequest(request_id="warmup", queries=("Hello",), documents=("Hello",)))
        else:
            await self._embed(EmbedRequest(request_id="warmup", inputs=("Hello",)))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream output chunks (called with a streaming handle); the first one names this replica and carries its
        time stamps."""
        track = self.metrics.start()
        last: GenerateChunk | None = None
        try:
            with self.progress.request():
                await self._load_adapter(request)
                async for chunk in self.engine.generate(request):
                    self.progress.made()
                    if track.times is None:
                        # The first chunk, not the last: the API layer sends the response headers before the rest.
                        chunk = chunk.model_copy(
                            update={"replica": self.replica_id, "times": self._first_output(track)}
                        )
                    last = chunk
                    yield chunk
        finally:
            track.finish(*_tokens(last))

    async def complete(self, request: GenerateRequest) -> GenerateChunk:
        """The whole output as one chunk: text joined, final counts and finish reason."""
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        calls: list[ToolCallDelta] = []
        last: GenerateChunk | None = None
        track = self.metrics.start()
        try:
            with self.progress.request():
                await self._load_adapter(request)
                async for chunk in self.engine.generate(request):
                    self.progress.made()
                    if track.times is None:
                        self._first_output(track)
                    parts.append(chunk.text)
                    logprobs.extend(chunk.logprobs or ())
                    calls.extend(chunk.tool_calls or ())
                    last = chunk
        finally:
            track.finish(*_tokens(last))
        if last is None:  # an engine always yields a final chunk; guard the contract anyway
            raise InvalidRequestError("the engine produced no output", param=None)
        return GenerateChunk(
            text="".join(parts),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason,
            logprobs=tuple(logprobs) if request.sampling.logprobs is not None else None,
            tool_calls=merge_tool_calls(calls) if calls else None,
            replica=self.replica_id,
            times=track.times,
        )

    async def _load_adapter(self, request: GenerateRequest) -> None:
        """Load the request's LoRA adapter on this replica if it is not loaded (Serve's multiplexing: see `Adapters`).

        Raises:
            ModelNotFoundError: the model has no adapter of that name (now).
        """
        if request.adapter is not None:
            if self.adapters is None:
                raise InvalidRequestError(f"model '{self.spec.id}' has no LoRA adapters", param="model")
            await self.adapters.use(request.adapter)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's hook for the deployment's `user_config` (`deployments.plan.adapter_user_config`), called after
        `__init__` and again, in place, when only it changed: the model's LoRA adapters from now on. A removed or
        repointed adapter this replica holds is unloaded; new ones load on their first request.

        Raises:
            EngineStartError: a new adapter's folder is not a peft adapter within `max_lora_rank` (the message names
                it), or the model's engine has no LoRA support.
        """
        adapters = tuple(AdapterSpec.model_validate(a) for a in user_config.get("adapters", ()))
        if self.adapters is None:
            if adapters:
                raise EngineStartError(f"model '{self.spec.id}' runs the {self.spec.engine} engine: it has no LoRA")
            return
        check_adapters(self.spec, adapters)
        await self.adapters.update(adapters)

    def _tokenizer(self) -> TokenizingEngine:
        if not isinstance(self.engine, TokenizingEngine):
            raise InvalidRequestError(
                f"model '{self.spec.id}' runs on the {self.spec.engine} engine, which has no tokenizer", param="model"
            )
        return self.engine

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResult:
        """Token ids of a text or of chat messages, as generation would see them.

        Raises:
            InvalidRequestError: the engine has no tokenizer, or the messages cannot be rendered.
        """
        return await self._tokenizer().tokenize(request)

    async def detokenize(self, tokens: tuple[int, ...]) -> str:
        """The text of token ids.

        Raises:
            InvalidRequestError: the engine has no tokenizer, or an id is outside the vocabulary.
        """
        return await self._tokenizer().detokenize(tokens)

    async def describe(self) -> dict[str, Any]:
        """What the model card shows that only the loaded engine knows: `max_model_len`."""
        length = getattr(self.engine, "context_length", None)
        return {"max_model_len": int(length) if length else None}

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed the request's inputs.

        Raises:
            InvalidRequestError: this model does not embed.
        """
        track = self.metrics.start()
        tokens = 0
        try:
            with self.progress.request():
                result = await self._embed(request)
                self.progress.made()
            tokens = result.prompt_tokens
            return result.model_copy(update={"replica": self.replica_id, "times": track.first_output()})
        finally:
            track.finish(prompt_tokens=tokens)

    async def _embed(self, request: EmbedRequest) -> EmbedResult:
        if not isinstance(self.engine, EmbeddingEngine) or self.spec.task != "embed":
            raise InvalidRequestError(f"model '{self.spec.id}' does not serve embeddings", param="model")
        return await self.engine.embed(request)

    def _scoring(self) -> ScoringEngine:
        if not isinstance(self.engine, ScoringEngine) or self.spec.task not in ("classify", "score"):
            raise InvalidRequestError(
                f"model '{self.spec.id}' serves task '{self.spec.task}', not classification or scoring", param="model"
            )
        return self.engine

    async def classify(self, request: ClassifyRequest) -> ClassifyResult:
        """Classify the request's inputs.

        Raises:
            InvalidRequestError: this model does not classify, or an input is invalid.
        """
        track = self.metrics.start()
        tokens = 0
        try:
            with self.progress.request():
                result = await self._scoring().classify(request)
                self.progress.made()
            tokens = result.prompt_tokens
            return result.model_copy(update={"replica": self.replica_id, "times": track.first_output()})
        finally:
            track.finish(prompt_tokens=tokens)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Score the request's (query, document) pairs.

        Raises:
            InvalidRequestError: this model does not score, or a pair is invalid.
        """
        track = self.metrics.start()
        tokens = 0
        try:
            with self.progress.request():
                result = await self._scoring().score(request)
                self.progress.made()
            tokens = result.prompt_tokens
            return result.model_copy(update={"replica": self.replica_id, "times": track.first_output()})
        finally:
            track.finish(prompt_tokens=tokens)

    def _first_output(self, track: metrics.ReplicaRequest) -> ReplicaTimes:
        """A generation's first output: its stamps, also kept for the autoscaling policy's time to first token."""
        times = track.first_output()
        self.load.first_output(times.received_at, times.first_output_at)
        return times

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook (called only when the model autoscales): this replica's recent time to first token and its
        waiting and running requests, for the 'queue' policy (deployments.autoscaling)."""
        return self.load.report(waiting=self.metrics.waiting, running=self.metrics.running)

    async def ready(self) -> bool:
        """True: a replica that answers has finished warm-up."""
        return True

    async def placement(self) -> dict[str, Any]:
        """Where Ray put this replica: node, GPU ids, CUDA_VISIBLE_DEVICES and placement-group bundles."""
        import ray
        from ray.util import get_current_placement_group

        group = get_current_placement_group()
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            # Set by Ray for the GPUs it assigned to this actor; read here only to report it.
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "bundles": group.bundle_specs if group is not None else None,
        }

    async def check_health(self) -> None:
        """Serve's periodic health check (every `health.period_s`); an EngineDeadError makes Serve replace the
        replica: the engine's own check failed, or the engine is wedged (it holds requests and gave no output for
        `health.stall_timeout_s`)."""
        stalled_s = self.progress.stalled_s()
        if stalled_s > self.spec.health.stall_timeout_s:
            message = (
                f"model '{self.spec.id}': the engine holds {self.progress.in_flight} requests and gave no output for "
                f"{stalled_s:.0f} s (health.stall_timeout_s: {self.spec.health.stall_timeout_s:g}): it is wedged"
            )
            logger.error("%s; ending replica %s so that Serve replaces it", message, self.replica_id)
            if self._ending is None:
                self._ending = asyncio.get_running_loop().create_task(self._end())
            raise EngineDeadError(message)
        await self.engine.check_health()

    async def _end(self) -> None:
        """End this replica's actor now (a wedged engine). Draining would only hold its requests, which will never
        be answered, until the drain timeout: ended, they fail with the replica's death, and the router sends them
        again to another replica or the one Serve starts in its place."""
        import ray

        try:
            await asyncio.wait_for(self.engine.shutdown(), _WEDGED_SHUTDOWN_S)
        except Exception:  # noqa: BLE001 - a wedged engine may not stop cleanly: the actor ends anyway
            logger.exception("the wedged engine of model %s did not shut down cleanly", self.spec.id)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def __del__(self) -> None:
        if hasattr(self, "metrics"):  # not when __init__ failed
            self.metrics.stopped()
        await self.engine.shutdown()


class Adapters:
    """The LoRA adapters loaded on one replica, through Serve's model multiplexing: the router sends an adapter's
    requests with the adapter's name as the multiplexed model id, Serve prefers replicas that report it loaded, and
    this replica keeps the `max_loaded` most recently used in Serve's LRU, which matches vLLM's own: an adapter Serve
    loads is added to vLLM (`add_lora`), one it evicts is removed (`remove_lora`), so both hold the same set.
    """

    def __init__(self, engine: LoRAMixin, max_loaded: int) -> None:
        from ray import serve

        self._engine = engine

        async def load(name: str) -> _LoadedAdapter:
            return _LoadedAdapter(engine, await engine.load_adapter(name))

        self._loader = load
        self._load = serve.multiplexed(max_num_models_per_replica=max_loaded)(load)

    async def use(self, name: str) -> None:
        """Make sure the adapter is loaded here (the most recently used now), evicting the least recently used.

        Raises:
            ModelNotFoundError: the model has no adapter of that name (now).
            EngineError: vLLM cannot load it.
        """
        await self._load(name)

    async def update(self, adapters: tuple[AdapterSpec, ...]) -> None:
        """Serve these adapters from now on; unload those of the others (or of their old folders) loaded here."""
        gone = self._engine.set_adapters(adapters)
        # Serve has no call to drop one multiplexed model: its LRU (2.60's _ModelMultiplexWrapper, kept on the
        # loader) is popped here, and the replica's next push tells the controller, so routers stop preferring it.
        lru = getattr(self._loader, "__serve_multiplex_wrapper", None)
        if lru is None:
            return  # nothing loaded yet
        for name in gone:
            loaded = lru.models.pop(name, None)
            if loaded is not None:
                lru._push_multiplexed_replica_info = True
                lru.registered_model_gauge.set(0, tags={"model_id": name})  # as Serve's own eviction does
                await loaded.unload()

    @property
    def loaded(self) -> tuple[str, ...]:
        """The adapters loaded here, least recently used first."""
        lru = getattr(self._loader, "__serve_multiplex_wrapper", None)
        return tuple(lru.models) if lru is not None else ()


class _LoadedAdapter:
    """An adapter loaded into the engine, as Serve's multiplexer holds it: it awaits the object's `__del__` when it
    evicts it. That `__del__` is set on the instance, so the garbage collector (which looks it up on the type) never
    calls it a second time."""

    def __init__(self, engine: LoRAMixin, request: Any) -> None:
        self._engine = engine
        self.request = request
        self.__dict__["__del__"] = self.unload

    async def unload(self) -> None:
        if self.request is not None:
            request, self.request = self.request, None
            await self._engine.unload_adapter(request)


class Progress:
    """Requests in flight in a replica and when its engine last gave output (a chunk, a result or an error): an
    engine that holds requests and gives nothing is wedged (`ModelReplica.check_health`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.in_flight = 0
        self._clock = clock
        self._at = clock()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """One request in flight for the block; an error it raises is an answer too (not a cancellation)."""
        if self.in_flight == 0:
            self._at = self._clock()  # idle until now: the wait starts with this request
        self.in_flight += 1
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            self.made()
            raise
        finally:
            self.in_flight -= 1

    def made(self) -> None:
        """The engine gave output."""
        self._at = self._clock()

    def stalled_s(self) -> float:
        """Seconds since the engine last gave output while it held requests (0 when it holds none)."""
        return self._clock() - self._at if self.in_flight else 0.0


def _tokens(last: GenerateChunk | None) -> tuple[int, int]:
    """(prompt, generated) tokens of a request whose last chunk so far is `last`."""
    return (last.prompt_tokens, last.completion_tokens) if last is not None else (0, 0)


def _start_split(engine_s: float, engine_times: dict[str, float], warm_up_s: float) -> str:
    """The replica's start-up, phase by phase: "engine start 29.0 s (import 5.1 s, build 23.9 s), warm-up 0.4 s"."""
    inner = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in engine_times.items())
    return f"engine start {engine_s:.1f} s" + (f" ({inner})" if inner else "") + f", warm-up {warm_up_s:.1f} s"


def _serve_replica_id() -> str | None:
    """This Serve replica's id (the suffix Serve's logs and `serve status` show), or None outside a replica."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None
