"""A stream's progress as the router relays it, and the continuation that goes on from there (no Ray)."""

from __future__ import annotations

from deployments.engines.protocol import GenerateChunk, GenerateRequest, SamplingConfig, StructuredOutput
from deployments.migration import StreamProgress


def _request(**sampling: object) -> GenerateRequest:
    return GenerateRequest(request_id="r", prompt="hi", sampling=SamplingConfig(max_tokens=10, **sampling))


def _chunk(text: str, ids: tuple[int, ...] | None, prompt: int, done: int, finish: str | None = None) -> GenerateChunk:
    return GenerateChunk(
        text=text,
        prompt_tokens=prompt,
        completion_tokens=done,
        token_ids=ids,
        finish_reason=finish,  # type: ignore[arg-type]
    )


def test_the_continuation_carries_the_relayed_ids_and_what_is_left_to_generate() -> None:
    progress = StreamProgress(_request(min_tokens=4))
    assert not progress.started
    for chunk in (_chunk("a", (11,), 3, 1), _chunk("b c", (12, 13), 3, 3)):
        relayed, ended = progress.relay(chunk)
        assert relayed == chunk and not ended  # before a migration, chunks pass as they are
    assert progress.started and progress.not_migratable() is None
    going_on = progress.continuation()
    assert isinstance(going_on, GenerateRequest)
    assert going_on.continuation == (11, 12, 13) and going_on.prompt == "hi" and going_on.request_id == "r"
    assert going_on.sampling.max_tokens == 7 and going_on.sampling.min_tokens == 1
    # The new replica counts its prompt with the continuation, and its output from zero: the client sees the whole.
    relayed, _ = progress.relay(_chunk("d", (14,), 6, 1))
    assert (relayed.prompt_tokens, relayed.completion_tokens, relayed.text) == (3, 4, "d")
    again = progress.continuation()
    assert isinstance(again, GenerateRequest) and again.continuation == (11, 12, 13, 14)
    assert again.sampling.max_tokens == 6 and progress.migrations == 2
    last, ended = progress.relay(_chunk("", (15,), 7, 1, "length"))
    assert not ended, "the engine's own finish: its replica's stream closes by itself"
    assert (last.prompt_tokens, last.completion_tokens, last.finish_reason) == (3, 5, "length")


def test_a_stream_with_nothing_left_ends_with_its_last_chunk() -> None:
    progress = StreamProgress(_request())
    progress.relay(_chunk("x" * 10, tuple(range(10)), 2, 10))
    going_on = progress.continuation()
    assert isinstance(going_on, GenerateChunk)
    assert going_on.finish_reason == "length" and going_on.completion_tokens == 10 and going_on.prompt_tokens == 2


def test_a_stop_string_across_the_seam_ends_the_stream_there() -> None:
    progress = StreamProgress(_request(stop=("END",)))
    progress.relay(_chunk("the E", (1, 2), 2, 2))
    assert isinstance(progress.continuation(), GenerateRequest)
    relayed, ended = progress.relay(_chunk("ND and more", (3, 4), 4, 2))
    assert ended and relayed.text == "" and relayed.finish_reason == "stop"
    # One that the new replica's own output holds whole is the engine's to find: it passes.
    other = StreamProgress(_request(stop=("END",)))
    other.relay(_chunk("the ", (1,), 2, 1))
    other.continuation()
    relayed, ended = other.relay(_chunk("EN", (2,), 3, 1))
    assert not ended and relayed.text == "EN"


def test_what_cannot_migrate_says_why() -> None:
    progress = StreamProgress(_request())
    progress.relay(_chunk("a", None, 2, 1))
    assert progress.not_migratable() == "engine_without_token_ids"
    structured = StreamProgress(_request(structured=StructuredOutput(json_object=True)))
    structured.relay(_chunk("{", (1,), 2, 1))
    assert structured.not_migratable() == "structured_output"
