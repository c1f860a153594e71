"""The batch job's worker: one model replica per Ray Data actor, answering batches of input lines with output lines.

`BatchRunner` is a plain class (Ray Data makes it an actor; the unit tests call it directly). It runs the same
`ModelReplica` a Serve deployment runs (engine start, warm-up, priorities, joined outputs), without Serve, and asks
it through the same calls the router makes, so the response bodies come from the HTTP API's own `Completion`.
The async calls run on a private event loop in a thread of its own, so that whatever the engine keeps running
between calls (vLLM's output handler) keeps running while Ray Data hands the actor its next batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

from deployments.api.completions import Completion
from deployments.api.openai_models import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from deployments.batch.format import (
    BatchRequest,
    LineError,
    embedding_body,
    error_line,
    failure_line,
    is_failure,
    parse_line,
    success_line,
    validate_body,
)
from deployments.engines.protocol import EmbedRequest, GenerateChunk, GenerateRequest
from deployments.plan import ModelPlan
from deployments.replica import ModelReplica

if TYPE_CHECKING:
    from deployments.router import Router

__all__ = ["BatchRunner"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_SHUTDOWN_TIMEOUT_S = 60.0


class _BatchReplica(ModelReplica):
    """A ModelReplica outside Serve. Serve awaits a replica's async `__init__` and `__del__`; here `_start_replica`
    awaits the first and `BatchRunner.close` does the work of the second, which would otherwise be a coroutine
    that nobody awaits when the object is collected."""

    def __del__(self) -> None:  # type: ignore[override]
        pass


async def _start_replica(plan: ModelPlan) -> ModelReplica:
    replica = _BatchReplica.__new__(_BatchReplica)
    await replica.__init__(plan)  # type: ignore[misc]
    return replica


class _ReplicaRouter:
    """The router calls `Completion` makes for a whole response, answered by the replica in this process."""

    def __init__(self, replica: ModelReplica) -> None:
        self.replica = replica

    async def complete(self, model_id: str, request: GenerateRequest) -> GenerateChunk:
        return await self.replica.complete(request)

    async def detokenize(self, model_id: str, tokens: tuple[int, ...]) -> str:
        return await self.replica.detokenize(tokens)


class BatchRunner:
    """Ray Data callable class: starts the model once, then turns each batch of input lines (columns `line`:
    1-based numbers, `raw`: bytes) into output lines (columns `output`: JSON text, `failed`: bool).

    The lines of a batch run concurrently, so an engine that batches (vLLM) gets them all at once.
    """

    def __init__(self, plan_json: str, endpoint: str | None = None, names: tuple[str, ...] = ()) -> None:
        """Args:
            plan_json: the model's `ModelPlan` as JSON (what a replica of the model starts with).
            endpoint: the one url every line must name (see `parse_line`); None: any url the model serves.
            names: more names the lines may give the model than its `id@version` (see `validate_body`).

        Raises:
            EngineStartError: the engine cannot start; the job fails (no line could be answered).
        """
        plan = ModelPlan.model_validate_json(plan_json)
        self.spec = plan.spec
        self.endpoint = endpoint
        self.names = tuple(names)
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="batch-engine-loop", daemon=True)
        self._thread.start()
        try:
            self.replica = self._run(_start_replica(plan))
        except BaseException:
            self._stop_loop()
            raise
        self._router = cast("Router", _ReplicaRouter(self.replica))

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = [(int(n), bytes(raw)) for n, raw in zip(batch["line"], batch["raw"], strict=True)]
        lines = self._run(self._answer_all(pairs))
        return {
            "output": np.array([json.dumps(line, separators=(",", ":")) for line in lines], dtype=object),
            "failed": np.array([is_failure(line) for line in lines], dtype=bool),
        }

    async def _answer_all(self, pairs: list[tuple[int, bytes]]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.answer(n, raw) for n, raw in pairs)))

    async def answer(self, line: int, raw: bytes) -> dict[str, Any]:
        """The output line for input line number `line`; never raises (every failure is the line's result)."""
        try:
            request = parse_line(raw, line, self.spec, endpoint=self.endpoint)
        except LineError as exc:
            return error_line(exc)
        request_id = uuid.uuid4().hex
        try:
            body = await self._respond(request, request_id)
        except Exception as exc:  # noqa: BLE001 - the boundary: a failure is this line's error response
            return failure_line(request, request_id, exc)
        return success_line(request, request_id, body)

    async def _respond(self, request: BatchRequest, request_id: str) -> dict[str, Any]:
        wire = validate_body(request, self.spec, self.names)
        # The engine requests are built as OpenAIIngress builds them (its routes do it inline, so mirrored here).
        if isinstance(wire, EmbeddingRequest):
            result = await self.replica.embed(EmbedRequest(request_id=request_id, inputs=wire.texts))
            return embedding_body(wire, result)
        if isinstance(wire, ChatCompletionRequest):
            gen = GenerateRequest(
                request_id=request_id,
                messages=wire.chat_messages(),
                sampling=wire.sampling(self.spec.max_output_tokens),
                **wire.tool_fields(),
            )
            return await Completion(self._router, wire, [gen], chat=True).response()
        return await self._complete_text(wire, request_id)

    async def _complete_text(self, wire: CompletionRequest, request_id: str) -> dict[str, Any]:
        prompts = wire.prompts
        gens = []
        for i, prompt in enumerate(prompts):
            fields: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
            rid = request_id if len(prompts) == 1 else f"{request_id}-p{i}"
            gens.append(GenerateRequest(request_id=rid, sampling=wire.sampling(), **fields))
        echo = None
        if wire.echo:
            echo = [p if isinstance(p, str) else await self.replica.detokenize(tuple(p)) for p in prompts]
        return await Completion(self._router, wire, gens, chat=False, echo=echo).response()

    def close(self) -> None:
        """Shut the engine down (bounded) and stop the loop; idempotent."""
        if self._closed:
            return
        try:
            # What ModelReplica.__del__ does when Serve tears a replica down.
            self._run(self.replica.engine.shutdown(), timeout_s=_SHUTDOWN_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - best effort at teardown; the process is about to end
            logger.warning("batch runner: engine shutdown failed", exc_info=True)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __del__(self) -> None:
        # Ray Data drops its reference to the UDF when the actor exits gracefully (the dataset is done).
        if getattr(self, "_thread", None) is not None:
            self.close()
