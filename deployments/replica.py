"""ModelReplica: the Serve deployment that owns one Engine; request ids, warm-up, health and lifecycle."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from deployments import cpus, engines
from deployments.engines.protocol import (
    EmbeddingEngine,
    EmbedRequest,
    EmbedResult,
    Engine,
    GenerateChunk,
    GenerateRequest,
    SamplingConfig,
    TokenLogprob,
)
from deployments.errors import InvalidRequestError
from deployments.plan import ModelPlan

__all__ = ["ModelReplica"]

logger = logging.getLogger(__name__)


class ModelReplica:
    """Loads the model's engine at start, answers one real request (warm-up), then serves.

    Serve marks a replica RUNNING only after `__init__` returns, so a running replica has already
    answered a real request: that is what readiness means here.
    """

    async def __init__(self, plan: ModelPlan, *, engine_cls: type[Engine] | None = None) -> None:
        spec = self.spec = plan.spec
        self.replica_id = _serve_replica_id()
        cls = engine_cls or engines.resolve(spec.engine)
        self.engine = cls(spec, plan.engine)
        started = time.monotonic()
        await self.engine.start()
        if self.engine.computes_out_of_process:
            # The engine's processes are started (and keep their priority): this process now only moves
            # requests and tokens, and yields the CPU to them when it is contended.
            cpus.lower_priority()
        await self._warm_up()
        self.ready_after_s = time.monotonic() - started
        logger.info("model %s ready (%s engine) in %.1f s", spec.id, spec.engine, self.ready_after_s)

    async def _warm_up(self) -> None:
        if self.spec.task == "generate":
            request = GenerateRequest(request_id="warmup", prompt="Hello", sampling=SamplingConfig(max_tokens=1))
            async for _ in self.engine.generate(request):
                pass
        else:
            await self.embed(EmbedRequest(request_id="warmup", inputs=("Hello",)))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream output chunks (called with a streaming handle); the first one names this replica."""
        first = True
        async for chunk in self.engine.generate(request):
            if first:
                # The first chunk, not the last: the API layer sends the response headers before the rest.
                chunk = chunk.model_copy(update={"replica": self.replica_id})
                first = False
            yield chunk

    async def complete(self, request: GenerateRequest) -> GenerateChunk:
        """The whole output as one chunk: text joined, final counts and finish reason."""
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        last: GenerateChunk | None = None
        async for chunk in self.engine.generate(request):
            parts.append(chunk.text)
            logprobs.extend(chunk.logprobs or ())
            last = chunk
        if last is None:  # an engine always yields a final chunk; guard the contract anyway
            raise InvalidRequestError("the engine produced no output", param=None)
        return GenerateChunk(
            text="".join(parts),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason,
            logprobs=tuple(logprobs) if request.sampling.logprobs is not None else None,
            replica=self.replica_id,
        )

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed the request's inputs.

        Raises:
            InvalidRequestError: this model does not embed.
        """
        if not isinstance(self.engine, EmbeddingEngine) or self.spec.task != "embed":
            raise InvalidRequestError(f"model '{self.spec.id}' does not serve embeddings", param="model")
        result = await self.engine.embed(request)
        return result.model_copy(update={"replica": self.replica_id})

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
        """Serve's periodic health check; an EngineDeadError makes Serve replace the replica."""
        await self.engine.check_health()

    async def __del__(self) -> None:
        await self.engine.shutdown()


def _serve_replica_id() -> str | None:
    """This Serve replica's id (the suffix Serve's logs and `serve status` show), or None outside a replica."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None
