"""EchoEngine: a real, deterministic engine with no ML dependencies, for tests and dry runs."""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
from collections.abc import AsyncIterator

from deployments.engines.protocol import (
    EmbeddingEngine,
    EmbedRequest,
    EmbedResult,
    Engine,
    GenerateChunk,
    GenerateRequest,
    check_context,
    check_output_budget,
    require_basic_sampling,
)
from deployments.errors import EngineStartError, InvalidRequestError
from deployments.plan import EnginePlan
from models.spec import ModelSpec

__all__ = ["EchoEngine"]

_DEFAULT_CONTEXT = 4096
_ALLOWED_KWARGS = {"dimensions", "token_delay_s", "fail_marker", "wedge_after"}


class EchoEngine(Engine, EmbeddingEngine):
    """Echoes the last input back, one whitespace-separated word per token.

    A completion of "a b c" with max_tokens=2 yields "a", " b" and finish_reason "length"; with
    max_tokens >= 3 it yields all three words and "stop". Embeddings are unit vectors derived from a
    hash of the text (`dimensions`, default 16). `token_delay_s` slows streaming for tests;
    `fail_marker` makes a request whose input contains it fail after its first token, like an engine
    crashing mid-request (for fault tests). `wedge_after: N` (a test hook) wedges the engine after N requests
    (generate or embed calls, the replica's warm-up included): every later request is accepted and never
    answered, while the engine's own health check still passes, like an engine whose scheduler hangs.
    """

    def __init__(self, spec: ModelSpec, plan: EnginePlan | None = None) -> None:
        super().__init__(spec, plan)
        self.context_length = spec.context_length or _DEFAULT_CONTEXT
        self._dimensions = 16
        self._token_delay_s = 0.0
        self._fail_marker: str | None = None
        self._wedge_after: int | None = None
        self._requests = 0

    async def start(self) -> None:
        unknown = set(self.spec.engine_kwargs) - _ALLOWED_KWARGS
        if unknown:
            raise EngineStartError(
                f"echo engine: unknown engine_kwargs {sorted(unknown)}; allowed: {sorted(_ALLOWED_KWARGS)}"
            )
        self._dimensions = int(self.spec.engine_kwargs.get("dimensions", 16))
        self._token_delay_s = float(self.spec.engine_kwargs.get("token_delay_s", 0.0))
        self._fail_marker = self.spec.engine_kwargs.get("fail_marker")
        wedge = self.spec.engine_kwargs.get("wedge_after")
        if wedge is not None and (not isinstance(wedge, int) or isinstance(wedge, bool) or wedge < 1):
            raise EngineStartError(f"echo engine: wedge_after must be an integer >= 1, got {wedge!r}")
        self._wedge_after = wedge

    async def _maybe_wedge(self) -> None:
        """Past `wedge_after` requests: wait forever (cancellable), as a wedged engine does."""
        self._requests += 1
        if self._wedge_after is not None and self._requests > self._wedge_after:
            await asyncio.Event().wait()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if self.spec.task != "generate":
            raise InvalidRequestError(f"model '{self.spec.id}' serves embeddings, not text generation", param="model")
        await self._maybe_wedge()
        if request.tool_choice != "none":
            raise InvalidRequestError(
                f"tool_choice '{request.tool_choice}' is not supported by the echo engine: set it to 'none'",
                param="tool_choice",
            )
        if request.prompt_token_ids is not None:
            raise InvalidRequestError("the echo engine has no tokenizer: send the prompt as text", param="prompt")
        if request.messages is not None:
            prompt_words = [w for m in request.messages for w in m.content.split()]
            source = request.messages[-1].content.split()
            param = "messages"
        else:
            prompt_words = (request.prompt or "").split()
            source = prompt_words
            param = "prompt"
        sampling = request.sampling
        require_basic_sampling(sampling, "echo", ("skip_special_tokens",))
        check_output_budget(self.spec, sampling)
        check_context(self.context_length, len(prompt_words), sampling, param)
        failing = bool(self._fail_marker) and self._fail_marker in " ".join(source)
        words = source or ["echo"]
        count = min(sampling.max_tokens, len(words))
        text_so_far = ""
        for i in range(count):
            piece = words[i] if i == 0 else " " + words[i]
            candidate = text_so_far + piece
            hit = next((s for s in sampling.stop if s and s in candidate), None)
            if hit is not None:
                cut = candidate[: candidate.index(hit)]
                yield GenerateChunk(
                    text=cut[len(text_so_far) :],
                    prompt_tokens=len(prompt_words),
                    completion_tokens=i + 1,
                    finish_reason="stop",
                )
                return
            text_so_far = candidate
            if failing and i == 1:
                raise RuntimeError(f"echo engine: simulated failure on marker {self._fail_marker!r}")
            if self._token_delay_s:
                await asyncio.sleep(self._token_delay_s)
            last = i == count - 1
            finish = None
            if last:
                finish = "stop" if count == len(words) else "length"
            yield GenerateChunk(
                text=piece, prompt_tokens=len(prompt_words), completion_tokens=i + 1, finish_reason=finish
            )

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        if self.spec.task != "embed":
            raise InvalidRequestError(f"model '{self.spec.id}' generates text, not embeddings", param="model")
        await self._maybe_wedge()
        vectors = []
        tokens = 0
        for i, text in enumerate(request.inputs):
            words = text.split()
            if len(words) > self.context_length:
                raise InvalidRequestError(
                    f"input[{i}] has {len(words)} tokens, above this model's context of {self.context_length}",
                    param="input",
                )
            tokens += len(words)
            vectors.append(self._vector(text))
        return EmbedResult(embeddings=tuple(vectors), prompt_tokens=tokens)

    def _vector(self, text: str) -> tuple[float, ...]:
        raw: list[float] = []
        counter = 0
        while len(raw) < self._dimensions:
            digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
            raw.extend(v / 2**31 for v in struct.unpack("<8i", digest))
            counter += 1
        raw = raw[: self._dimensions]
        if self.spec.normalize:
            norm = math.sqrt(sum(v * v for v in raw)) or 1.0
            raw = [v / norm for v in raw]
        return tuple(raw)

    async def check_health(self) -> None:
        return None
