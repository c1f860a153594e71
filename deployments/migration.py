"""Mid-stream migration: a stream whose replica is lost after some of its tokens reached the client goes on, on
another replica (or the model's restarted one), from the prompt plus the tokens already relayed.

The router sees every chunk it relays, with the token ids of the engines that report them (vLLM, transformers), so
the continuation is exact: the new replica renders the same prompt, appends those ids (`continuation`) and generates
what is left of `max_tokens`. Nothing generated is tokenized again. The client sees one stream: its id, text,
`usage` and `finish_reason` run on across the seam.

Not migrated (the stream ends with the error event, as before): engines that report no token ids (the echo engine),
structured outputs (a grammar would start again mid-document and accept what it should not) and tool calls (the
tool-call parser would start mid-call). Sampling goes on with the same settings: greedy output is the same as
without the loss; a seeded sample starts its random sequence again; presence and frequency penalties no longer count
the tokens before the seam (they are prompt tokens now, for vLLM as for the transformers engine).
"""

from __future__ import annotations

from deployments.engines.protocol import GenerateChunk, GenerateRequest

__all__ = ["StreamProgress"]


class StreamProgress:
    """What the router relayed of one stream, and the continuation request that goes on from there."""

    def __init__(self, request: GenerateRequest) -> None:
        self.request = request
        self.migrations = 0
        self._ids: list[int] = []
        self._ids_known = True
        self._prompt_tokens: int | None = None
        self._offset = 0  # tokens generated before the current attempt
        self._completion_tokens = 0
        self._seam_stops = tuple(s for s in request.sampling.stop if s)
        self._tail = ""  # the end of the relayed text, as long as a stop string could straddle the seam

    @property
    def started(self) -> bool:
        """Some output reached the client."""
        return self._prompt_tokens is not None

    def not_migratable(self) -> str | None:
        """Why this stream cannot go on elsewhere, or None."""
        if not self._ids_known:
            return "engine_without_token_ids"
        if self.request.sampling.structured is not None:
            return "structured_output"
        if self.request.tool_choice != "none":
            return "tool_calls"
        return None

    def relay(self, chunk: GenerateChunk) -> tuple[GenerateChunk, bool]:
        """Record a chunk of the current attempt and return it as the client sees it (usage over the whole stream),
        and whether the router ends the stream here (a stop string that straddles the seam, which the engine could
        not see: its replica goes on until cancelled). A chunk with the engine's own finish is not such an end: the
        replica's stream closes by itself after it."""
        if chunk.token_ids is None:
            self._ids_known = False
        else:
            self._ids.extend(chunk.token_ids)
        if self._prompt_tokens is None:
            self._prompt_tokens = chunk.prompt_tokens
        self._completion_tokens = self._offset + chunk.completion_tokens
        ended = False
        if self.migrations:
            update: dict[str, object] = {
                "prompt_tokens": self._prompt_tokens,
                "completion_tokens": self._completion_tokens,
            }
            cut = self._stop_across_seam(chunk.text)
            if cut is not None:
                update |= {"text": chunk.text[:cut], "finish_reason": "stop"}
                ended = True
            chunk = chunk.model_copy(update=update)
        if self._seam_stops:
            longest = max(len(s) for s in self._seam_stops)
            self._tail = (self._tail + chunk.text)[-(longest - 1) :] if longest > 1 else ""
        return chunk, ended

    def _stop_across_seam(self, text: str) -> int | None:
        """Where in `text` to cut for a stop string that began in the relayed text before it (the engine, which saw
        only its own output, could not see it), or None."""
        if not self._tail:
            return None
        joined = self._tail + text
        seam = len(self._tail)
        hits = [i for s in self._seam_stops if 0 <= (i := joined.find(s)) < seam < i + len(s)]
        if not hits:
            return None
        return max(min(hits) - seam, 0)

    def continuation(self) -> GenerateRequest | GenerateChunk:
        """The request that goes on from here; or, when nothing is left to generate, the stream's last chunk."""
        self.migrations += 1
        done = self._offset = len(self._ids)
        sampling = self.request.sampling
        left = sampling.max_tokens - done
        if left <= 0:
            return GenerateChunk(
                text="",
                prompt_tokens=self._prompt_tokens or 0,
                completion_tokens=self._completion_tokens,
                finish_reason="length",
                token_ids=(),
            )
        update = {"max_tokens": left, "min_tokens": max(sampling.min_tokens - done, 0)}
        return self.request.model_copy(
            update={
                "continuation": tuple(self._ids),
                "sampling": sampling.model_copy(update=update),
            }
        )
