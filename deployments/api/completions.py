"""Chat and text completion responses: `n` choices fanned out over the router, OpenAI bodies and SSE chunks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from deployments.api.errors import to_error_response
from deployments.api.openai_models import SEED_MAX, SEED_MIN, ChatCompletionRequest, CompletionRequest, new_id, usage
from deployments.api.sse import DONE, event
from deployments.api.tools import tool_call_json
from deployments.auth.limits import charge
from deployments.engines.protocol import GenerateChunk, GenerateRequest, TokenLogprob
from deployments.errors import InvalidRequestError
from deployments.router import Router
from models.scaling import ScalingConfig

__all__ = ["Completion", "SYSTEM_FINGERPRINT", "check_generations", "generations_at_once"]

SYSTEM_FINGERPRINT = "modelfleet-0.1.0"
_END = object()


def _choices_of(request: GenerateRequest, n: int) -> list[GenerateRequest]:
    """`n` independent engine requests; a seeded request gets seeds seed, seed+1, ... so choices differ."""
    if n == 1:
        return [request]
    out = []
    for i in range(n):
        sampling = request.sampling
        if sampling.seed is not None:
            seed = sampling.seed + i
            if seed > SEED_MAX:  # wrap around within the 64-bit range
                seed += SEED_MIN - SEED_MAX - 1
            sampling = sampling.model_copy(update={"seed": seed})
        out.append(request.model_copy(update={"request_id": f"{request.request_id}-{i}", "sampling": sampling}))
    return out


def generations_at_once(scaling: ScalingConfig) -> int | None:
    """Most generations of one model that a request may start at once: the bound of the router's queue for the
    model (`max_queued_requests`, past which Serve refuses with a 429: see the plan). A request's choices all start
    at once and Serve counts each as queued until a replica takes it, so every choice past that bound is refused
    whatever the replicas hold (measured: 320 choices against a queue of 256 and one idle replica of 64 get a
    429). None when the queue has no bound (-1)."""
    if scaling.max_queued_requests < 0:
        return None
    return scaling.max_queued_requests


def _check_fits(router: Router, body: ChatCompletionRequest | CompletionRequest, prompts: int) -> None:
    """Refuse a request whose choices (`prompts` x `n`) could never all be queued, with a 400 naming the limit,
    where a 429 would tell the client to retry what can never succeed.

    Raises:
        InvalidRequestError: the request asks more generations than the model takes at once.
    """
    if not isinstance(router, Router):  # a pipeline's calls: the pipeline checks its own bound
        return
    most = generations_at_once(router.spec_for(body.model, "generate").scaling)
    check_generations(
        body, prompts, most, f"the model '{body.model}' takes at most {most} (its scaling.max_queued_requests)"
    )


def check_generations(
    body: ChatCompletionRequest | CompletionRequest, prompts: int, most: int | None, limit: str
) -> None:
    """Refuse a request whose choices (`prompts` x `n`) are more than `most` (None: no bound); `limit` says whose
    bound it is.

    Raises:
        InvalidRequestError: naming the limit, and `n` or `prompt`.
    """
    wanted = prompts * body.n
    if most is None or wanted <= most:
        return
    asked = f"{prompts} prompts x n={body.n}" if prompts > 1 else f"n={body.n}"
    param = "n" if body.n > 1 and prompts <= most else "prompt"
    raise InvalidRequestError(
        f"This request asks {wanted} generations at once ({asked}); {limit}: lower `n` or send fewer prompts per "
        "request",
        param=param,
    )


def _chat_logprobs(tokens: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    if tokens is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(tok, lp) for tok, lp in t.top]} for t in tokens
        ]
    }


def _text_logprobs(tokens: tuple[TokenLogprob, ...] | None, offset: int = 0) -> dict[str, Any] | None:
    if tokens is None:
        return None
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "text_offset": offsets,
        "token_logprobs": [t.logprob for t in tokens],
        "tokens": [t.token for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
    }


class Completion:
    """One chat or text completion request, from engine chunks to OpenAI JSON or SSE."""

    def __init__(
        self,
        router: Router,
        body: ChatCompletionRequest | CompletionRequest,
        requests: list[GenerateRequest],
        *,
        chat: bool,
        echo: list[str] | None = None,
    ) -> None:
        """Args:
        router: where the choices go.
        body: the client's request.
        requests: one engine request per prompt (chat: one); each gets `body.n` choices, indexed prompt by
            prompt.
        chat: a chat completion (else a text completion).
        echo: completions with `echo`: each prompt's text, put before its choices' output.

        Raises:
            InvalidRequestError: more choices than the model's replicas and queue can ever hold at once.
        """
        _check_fits(router, body, len(requests))
        self.router = router
        self.body = body
        self.chat = chat
        self.requests = [choice for request in requests for choice in _choices_of(request, body.n)]
        self.request_id = requests[0].request_id
        # Per choice: the text that comes before the output (the echoed prompt), sent with the first chunk.
        self.prefixes = [text for text in echo for _ in range(body.n)] if echo else [""] * len(self.requests)
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        #: The replicas that serve the choices, once known (response() or stream() returned), in choice order.
        self.replicas: list[str] = []

    def _served_by(self, chunks: list[GenerateChunk] | list[GenerateChunk | None]) -> None:
        self.replicas = list(dict.fromkeys(c.replica for c in chunks if c is not None and c.replica))

    def _choice(self, index: int, chunk: GenerateChunk, *, delta: bool, text_offset: int = 0) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            calls = [tool_call_json(c, delta=delta) for c in chunk.tool_calls or ()]
            if delta:
                choice["delta"] = {"content": chunk.text} | ({"tool_calls": calls} if calls else {})
            else:
                choice["message"] = {
                    "role": "assistant",
                    "content": None if calls and not chunk.text else chunk.text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": calls,
                }
            choice["logprobs"] = _chat_logprobs(chunk.logprobs)
        else:
            choice["text"] = chunk.text
            choice["logprobs"] = _text_logprobs(chunk.logprobs, text_offset)
        choice["finish_reason"] = chunk.finish_reason
        choice["stop_reason"] = None
        return choice

    def _envelope(self, *, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if chunk and self.chat else kind,
            "created": self.created,
            "model": self.body.model,
        }

    async def response(self) -> dict[str, Any]:
        """The whole (non-streamed) response body.

        Raises:
            ServingError: any choice failed.
        """
        outs = await asyncio.gather(*(self.router.complete(self.body.model, r) for r in self.requests))
        self._served_by(outs)
        outs = [o.model_copy(update={"text": p + o.text}) if p else o for o, p in zip(outs, self.prefixes, strict=True)]
        charge(self._prompt_tokens(outs), sum(o.completion_tokens for o in outs))  # to the request's API key, if any
        return {
            **self._envelope(chunk=False),
            "choices": [self._choice(i, out, delta=False) for i, out in enumerate(outs)],
            "service_tier": None,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": {
                **usage(self._prompt_tokens(outs), sum(o.completion_tokens for o in outs)),
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
        }

    def _prompt_tokens(self, outs: list[GenerateChunk]) -> int:
        """Every prompt's tokens once (each prompt has `n` choices), as vLLM counts them."""
        return sum(out.prompt_tokens for out in outs[:: self.body.n])

    async def stream(self) -> AsyncIterator[bytes]:
        """Start every choice's stream and wait for its first chunk, then return the SSE body.

        Waiting first means a request the engine rejects (prompt too long, ...) gets its real status
        code instead of a 200 followed by an error event.

        Raises:
            ServingError: a choice failed before its first chunk.
        """
        streams = [self.router.stream(self.body.model, r) for r in self.requests]
        try:
            firsts = await asyncio.gather(*(anext(s, None) for s in streams))
        except BaseException:
            await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)  # type: ignore[attr-defined]
            raise
        self._served_by(firsts)
        return self._sse(streams, firsts)

    async def _sse(
        self, streams: list[AsyncIterator[GenerateChunk]], firsts: list[GenerateChunk | None]
    ) -> AsyncIterator[bytes]:
        base = self._envelope(chunk=True)
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(index: int, stream: AsyncIterator[GenerateChunk]) -> None:
            try:
                async for chunk in stream:
                    await queue.put((index, chunk))
            except Exception as exc:  # noqa: BLE001 - forwarded to the boundary below
                await queue.put((index, exc))
            await queue.put((index, _END))

        offsets = [0] * len(streams)
        last: list[GenerateChunk | None] = list(firsts)
        firsts = [
            c.model_copy(update={"text": p + c.text}) if p and c is not None else c
            for c, p in zip(firsts, self.prefixes, strict=True)
        ]

        def frame(index: int, chunk: GenerateChunk) -> bytes:
            choice = self._choice(index, chunk, delta=True, text_offset=offsets[index])
            offsets[index] += len(chunk.text)
            payload = {**base, "choices": [choice]}
            if chunk.finish_reason is not None:  # as vLLM's server does, on each choice's final chunk
                payload["system_fingerprint"] = SYSTEM_FINGERPRINT
            return event(payload)

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams) if firsts[i] is not None]
        try:
            if self.chat:
                for i in range(len(streams)):
                    role = {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    yield event({**base, "choices": [role]})
            for i, first in enumerate(firsts):
                if first is not None:
                    yield frame(i, first)
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is _END:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    last[index] = item
                    yield frame(index, item)
            if self.body.include_usage and all(c is not None for c in last):
                done = [c for c in last if c is not None]
                totals = usage(self._prompt_tokens(done), sum(c.completion_tokens for c in done))
                yield event({**base, "choices": [], "usage": totals, "system_fingerprint": SYSTEM_FINGERPRINT})
        except Exception as exc:  # noqa: BLE001 - the boundary: a mid-stream failure becomes an error event
            _, error_body = to_error_response(exc, self.request_id)
            yield event(error_body.model_dump())
        finally:
            for task in tasks:
                task.cancel()
            # The tokens streamed, also when the client left or a choice failed: to the request's API key, if any.
            got = [c for c in last[:: self.body.n] if c is not None], [c for c in last if c is not None]
            charge(sum(c.prompt_tokens for c in got[0]), sum(c.completion_tokens for c in got[1]))
        yield DONE
