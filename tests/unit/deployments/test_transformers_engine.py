"""TransformersEngine driven directly with asyncio on tiny random models (and, marked slow, on real small ones)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from deployments.engines.batching import WorkItem
from deployments.engines.decoding import GenerateJob, Sequence
from deployments.engines.protocol import (
    ChatMessage,
    EmbedRequest,
    GenerateChunk,
    GenerateRequest,
    SamplingConfig,
    StructuredOutput,
    TokenizeRequest,
    ToolFunction,
)
from deployments.engines.transformers import TransformersEngine
from deployments.errors import EngineDeadError, EngineError, EngineStartError, InvalidRequestError
from models.registry import ModelPackageNotInstalledError, resolve_source
from models.spec import ModelSpec

T = TypeVar("T")

TIMEOUT_S = 120.0
CONTEXT = 512
MAX_OUTPUT = 1000


def run(coro: Awaitable[T], timeout: float = TIMEOUT_S) -> T:
    """Run one coroutine on a fresh event loop, bounded by `timeout`."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def spec(source: Path | str, task: str = "generate", **overrides: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "id": f"test-{task}",
        "task": task,
        "engine": "transformers",
        "source": str(source),
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
    }
    fields.update(overrides)
    return ModelSpec(**fields)


def chat(text: str, max_tokens: int = 12, **sampling: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id="chat",
        messages=(ChatMessage(role="user", content=text),),
        sampling=SamplingConfig(max_tokens=max_tokens, **sampling),
    )


def completion(prompt: str, max_tokens: int = 12, **sampling: Any) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerateRequest(request_id="cmpl", prompt=prompt, sampling=SamplingConfig(max_tokens=max_tokens, **sampling))


async def collect(engine: TransformersEngine, request: GenerateRequest) -> list[GenerateChunk]:
    return [chunk async for chunk in engine.generate(request)]


def text_of(chunks: list[GenerateChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


async def one_batch(run_batch: Callable[[list[WorkItem[Any]]], None], payloads: list[Any]) -> list[list[object]]:
    """Run `payloads` as exactly one batch of an engine's batch function, off the loop as its worker does.

    Returns the values sent for each payload, in order (their callbacks run on this loop before the thread's
    result comes back).
    """
    loop = asyncio.get_running_loop()
    received: list[list[object]] = [[] for _ in payloads]
    items = [WorkItem(payload, loop, values.append) for payload, values in zip(payloads, received, strict=True)]
    await asyncio.to_thread(run_batch, items)
    assert all(item.done for item in items), "the batch left items without a final value"
    return received


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def llama_dir(cache_dir: Path) -> Path:
    return resolve_source("tiny-llama", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def bert_dir(cache_dir: Path) -> Path:
    return resolve_source("tiny-bert", cache_dir=cache_dir)


@contextlib.contextmanager
def started(model_spec: ModelSpec) -> Iterator[TransformersEngine]:
    engine = TransformersEngine(model_spec)
    run(engine.start())
    try:
        yield engine
    finally:
        run(engine.shutdown())


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> Iterator[TransformersEngine]:
    with started(spec(llama_dir, context_length=CONTEXT, max_output_tokens=MAX_OUTPUT)) as engine:
        yield engine


@pytest.fixture(scope="module")
def embedder(bert_dir: Path) -> Iterator[TransformersEngine]:
    with started(spec(bert_dir, task="embed")) as engine:
        yield engine


PROMPTS = [f"Hello number {i}, " + "the quick brown fox " * i for i in range(8)]


# -- the cheap vLLM extensions, token ids, tokenize (issue 9) -------------------------------------------------


def test_token_ids_tokenize_and_detokenize(llm: TransformersEngine) -> None:
    tokens = run(llm.tokenize(TokenizeRequest(request_id="t", prompt="the quick fox", add_special_tokens=True)))
    assert tokens.max_model_len == CONTEXT and tokens.token_strs is None
    assert "the quick fox" in run(llm.detokenize(tokens.tokens))
    by_ids = GenerateRequest(
        request_id="ids", prompt_token_ids=tokens.tokens, sampling=SamplingConfig(max_tokens=6, temperature=0.0)
    )
    assert text_of(run(collect(llm, by_ids))) == text_of(
        run(collect(llm, completion("the quick fox", 6, temperature=0.0)))
    )
    with pytest.raises(InvalidRequestError) as info:
        run(collect(llm, by_ids.model_copy(update={"prompt_token_ids": (10**7,)})))
    assert info.value.param == "prompt"


def test_min_tokens_ignore_eos_and_logit_bias(llm: TransformersEngine) -> None:
    chunks = run(collect(llm, completion("Hi", 10, min_tokens=10, ignore_eos=True, top_k=3, min_p=0.1, seed=1)))
    assert (chunks[-1].completion_tokens, chunks[-1].finish_reason) == (10, "length")
    token = run(llm.tokenize(TokenizeRequest(request_id="f", prompt="river", add_special_tokens=False))).tokens[0]
    out = run(collect(llm, completion("Hi", 3, temperature=0.0, logit_bias=((token, 100.0),), repetition_penalty=1.1)))
    assert text_of(out) == run(llm.detokenize((token,) * 3))


def test_what_it_lacks_is_refused_by_name(llm: TransformersEngine) -> None:
    structured = completion("Hi", 3, structured=StructuredOutput(json_object=True, param="response_format"))
    with pytest.raises(InvalidRequestError) as info:
        run(collect(llm, structured))
    assert info.value.param == "response_format"
    tools = chat("Hi").model_copy(
        update={"tools": (ToolFunction(name="f"),), "tool_choice": "function", "tool_name": "f"}
    )
    with pytest.raises(InvalidRequestError) as info:
        run(collect(llm, tools))
    assert info.value.param == "tool_choice"


# -- generation: stream structure -----------------------------------------------------------------------


def test_chat_stream_structure(llm: TransformersEngine) -> None:
    request = chat("Hello there, how are you?", max_tokens=12, temperature=0.0)
    chunks = run(collect(llm, request))

    expected_prompt = llm._tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there, how are you?"}], add_generation_prompt=True, return_dict=False
    )
    assert all(chunk.prompt_tokens == len(expected_prompt) for chunk in chunks)
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert all(chunk.text for chunk in chunks[:-1]), "only the last chunk may be empty"
    counts = [chunk.completion_tokens for chunk in chunks]
    assert counts == sorted(counts) and counts[0] >= 1
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 12


def test_completion_stream_counts_prompt(llm: TransformersEngine) -> None:
    prompt = "The quick brown fox"
    chunks = run(collect(llm, completion(prompt, max_tokens=5)))
    assert chunks[-1].prompt_tokens == len(llm._tokenizer.encode(prompt))
    assert chunks[-1].completion_tokens == 5
    assert chunks[-1].finish_reason == "length"
    assert text_of(chunks)


# -- generation: determinism and batching ---------------------------------------------------------------


def test_greedy_is_deterministic(llm: TransformersEngine) -> None:
    first = run(collect(llm, completion(PROMPTS[3], max_tokens=16)))
    second = run(collect(llm, completion(PROMPTS[3], max_tokens=16)))
    assert text_of(first) == text_of(second)
    assert [c.completion_tokens for c in first] == [c.completion_tokens for c in second]


def test_batching_does_not_change_greedy_output(llm: TransformersEngine) -> None:
    requests = [completion(prompt, max_tokens=10 + 2 * i) for i, prompt in enumerate(PROMPTS)]
    alone = [text_of(run(collect(llm, request))) for request in requests]

    # All eight in one batch (prompts of different lengths, left-padded; rows leave as they finish). The batch
    # function runs them directly: how the queue groups concurrent requests depends on timing.
    received = run(one_batch(llm._generate_batch, [llm._prepare_generate(request) for request in requests]))
    batched = [[value for value in values if isinstance(value, GenerateChunk)] for values in received]
    assert [len(chunks) for chunks in batched] == [len(values) for values in received], received
    assert [text_of(chunks) for chunks in batched] == alone
    assert [chunks[-1].completion_tokens for chunks in batched] == [10 + 2 * i for i in range(8)]

    async def together() -> list[list[GenerateChunk]]:
        return list(await asyncio.gather(*(collect(llm, request) for request in requests)))

    # Through the queue, concurrent requests get the same answers however they are grouped.
    assert [text_of(chunks) for chunks in run(together())] == alone


def test_seeded_sampling_is_reproducible(llm: TransformersEngine) -> None:
    def sample(seed: int) -> str:
        request = completion(PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)
        return text_of(run(collect(llm, request)))

    assert sample(1234) == sample(1234)
    assert len({sample(seed) for seed in range(4)}) > 1, "different seeds should give different samples"


# -- generation: stop strings ---------------------------------------------------------------------------


def test_stop_string_across_chunks(llm: TransformersEngine) -> None:
    chunks = run(collect(llm, completion(PROMPTS[2], max_tokens=20)))
    full = text_of(chunks)
    k = next(i for i in range(1, len(chunks) - 1) if len(chunks[i].text) >= 2 and len(chunks[i + 1].text) >= 2)
    stop = chunks[k].text[-2:] + chunks[k + 1].text[:2]  # straddles the boundary of two chunks
    expected = full[: full.index(stop)]

    stopped = run(collect(llm, completion(PROMPTS[2], max_tokens=20, stop=(stop,))))
    assert text_of(stopped) == expected
    assert stopped[-1].finish_reason == "stop"
    assert all(stop not in chunk.text for chunk in stopped)
    assert stopped[-1].completion_tokens < 20


def test_partial_stop_match_is_flushed_at_the_end(llm: TransformersEngine) -> None:
    full = text_of(run(collect(llm, completion(PROMPTS[2], max_tokens=20))))
    never = full[-1] + "\x00never"  # the output ends in a prefix of this stop string, which never completes
    chunks = run(collect(llm, completion(PROMPTS[2], max_tokens=20, stop=(never,))))
    assert text_of(chunks) == full
    assert chunks[-1].finish_reason == "length"


def test_incremental_detokenization_holds_back_partial_characters(llm: TransformersEngine) -> None:
    text = "café naïve 東京 🙂 done"
    ids = llm._decoder.encode(text, add_special_tokens=False)
    received: list[object] = []

    async def drive() -> None:
        loop = asyncio.get_running_loop()
        job = GenerateJob([1], SamplingConfig(max_tokens=len(ids), temperature=0.0))
        sequence = Sequence(WorkItem(job, loop, received.append), llm._decoder, frozenset(), llm.device)
        done = [sequence.push(token) for token in ids]
        assert done == [False] * (len(ids) - 1) + [True]
        await asyncio.sleep(0)

    run(drive())
    chunks = [c for c in received if isinstance(c, GenerateChunk)]
    assert len(chunks) == len(received)
    assert "".join(c.text for c in chunks) == text
    assert all("\ufffd" not in c.text for c in chunks)


# -- generation: validation happens before batching -----------------------------------------------------


def test_context_overflow_fails_alone(llm: TransformersEngine) -> None:
    too_long = "the quick brown fox " * 100
    no_room = "the quick brown fox " * 25
    assert len(llm._tokenizer.encode(too_long)) > CONTEXT > len(llm._tokenizer.encode(no_room)) + 12
    requests = [
        *(completion(prompt, max_tokens=8) for prompt in PROMPTS[:4]),
        completion(too_long, max_tokens=8),
        completion(no_room, max_tokens=400),
    ]
    before = llm.stats

    async def all_at_once() -> list[Any]:
        return list(await asyncio.gather(*(collect(llm, r) for r in requests), return_exceptions=True))

    results = run(all_at_once())
    for good in results[:4]:
        assert isinstance(good, list) and good[-1].finish_reason == "length"
    overflow, budget = results[4], results[5]
    assert isinstance(overflow, InvalidRequestError) and overflow.param == "prompt"
    assert f"maximum context length is {CONTEXT} tokens" in overflow.message
    assert isinstance(budget, InvalidRequestError) and budget.param == "max_tokens"
    assert "max_tokens asks for 400" in budget.message
    assert llm.stats.items - before.items == 4, "invalid requests must never join a batch"


def test_chat_context_overflow_names_messages(llm: TransformersEngine) -> None:
    with pytest.raises(InvalidRequestError) as info:
        run(collect(llm, chat("the quick brown fox " * 100, max_tokens=4)))
    assert info.value.param == "messages"


def test_max_tokens_above_model_limit(llm: TransformersEngine) -> None:
    with pytest.raises(InvalidRequestError) as info:
        run(collect(llm, completion("hi", max_tokens=MAX_OUTPUT + 1)))
    assert info.value.param == "max_tokens"
    assert str(MAX_OUTPUT) in info.value.message


def test_generate_model_cannot_embed(llm: TransformersEngine) -> None:
    with pytest.raises(InvalidRequestError):
        run(llm.embed(EmbedRequest(request_id="e", inputs=("hello",))))


# -- generation: cancellation, failures, shutdown -------------------------------------------------------


def test_closed_stream_stops_generation(llm: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the client closes the stream, the worker stops at the step it is in: no more forward passes for it.

    The worker waits in its second forward pass until the stream is closed, so what it does after the close
    does not depend on timing.
    """
    forward = llm._model.forward
    passes: list[int] = []
    closed = threading.Event()

    def counted(*args: Any, **kwargs: Any) -> Any:
        passes.append(len(passes) + 1)
        if len(passes) == 2:
            closed.wait(TIMEOUT_S)
        return forward(*args, **kwargs)

    monkeypatch.setattr(llm._model, "forward", counted)

    async def abandon_then_short() -> GenerateChunk:
        stream = cast(AsyncGenerator[GenerateChunk, None], llm.generate(completion(PROMPTS[0], max_tokens=240)))
        first = await anext(stream)  # the prompt's forward pass made the first token
        await stream.aclose()  # the client went away
        closed.set()
        await collect(llm, completion("hi", max_tokens=1))  # one forward pass, run once the long batch has ended
        return first

    first = run(abandon_then_short())
    assert first.completion_tokens == 1 and first.finish_reason is None
    assert len(passes) == 3, (
        f"{len(passes) - 1} forward passes for the long request; its stream was closed during the second"
    )


class _Fatal(BaseException):
    """Stands in for something that kills a thread (not an ordinary Exception)."""


def test_failed_batch_fails_only_its_requests(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with started(spec(llama_dir)) as engine:
        model = engine._model

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("simulated kernel failure")

        monkeypatch.setattr(model, "forward", broken)
        with pytest.raises(EngineError) as info:
            run(collect(engine, completion("hi")))
        assert type(info.value) is EngineError
        assert "Traceback" not in info.value.message and "simulated" not in info.value.message
        monkeypatch.undo()

        run(engine.check_health())
        assert run(collect(engine, completion("hi", max_tokens=3)))[-1].completion_tokens == 3
        assert engine.stats.failed_batches == 1


def test_dead_worker_fails_health_check(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with started(spec(llama_dir)) as engine:

        def fatal(*args: Any, **kwargs: Any) -> Any:
            raise _Fatal()

        monkeypatch.setattr(engine._model, "forward", fatal)
        with pytest.raises(EngineDeadError):
            run(collect(engine, completion("hi")))
        with pytest.raises(EngineDeadError):
            run(engine.check_health())
        with pytest.raises(EngineDeadError):
            run(collect(engine, completion("hi")))


def test_shutdown_fails_running_requests(llama_dir: Path) -> None:
    engine = TransformersEngine(spec(llama_dir))
    run(engine.start())

    async def interrupted() -> None:
        stream = engine.generate(completion("hi", max_tokens=1000))
        await anext(stream)
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass

    run(interrupted())
    with pytest.raises(EngineDeadError):
        run(engine.check_health())
    with pytest.raises(EngineDeadError):
        run(collect(engine, completion("hi")))


# -- start-up -------------------------------------------------------------------------------------------


def test_unknown_engine_kwargs(llama_dir: Path) -> None:
    engine = TransformersEngine(spec(llama_dir, engine_kwargs={"tensor_parallel_size": 2}))
    with pytest.raises(EngineStartError) as info:
        run(engine.start())
    assert "tensor_parallel_size" in info.value.message
    assert "num_threads" in info.value.message and "pooling" in info.value.message


@pytest.mark.parametrize(
    ("task", "kwargs"),
    [("generate", {"pooling": "mean"}), ("embed", {"pooling": "max"}), ("generate", {"num_threads": 0})],
)
def test_bad_engine_kwargs(llama_dir: Path, task: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(EngineStartError):
        run(TransformersEngine(spec(llama_dir, task=task, engine_kwargs=kwargs)).start())


def test_unloadable_source(tmp_path: Path) -> None:
    engine = TransformersEngine(spec(tmp_path))  # an empty folder
    with pytest.raises(EngineStartError) as info:
        run(engine.start())
    assert str(tmp_path) in info.value.message
    with pytest.raises(EngineDeadError):
        run(engine.check_health())


def test_context_length_above_model_limit(llama_dir: Path) -> None:
    with pytest.raises(EngineStartError, match="max_position_embeddings"):
        run(TransformersEngine(spec(llama_dir, context_length=10**6)).start())


def test_cpu_defaults(llm: TransformersEngine) -> None:
    run(llm.check_health())
    assert llm.device.type == "cpu"
    assert str(llm._model.dtype) == "torch.float32"
    assert llm.context_length == CONTEXT


# -- embeddings -----------------------------------------------------------------------------------------

TEXTS = ("hello world", "a", "the quick brown fox jumps over the lazy dog " * 5, "embeddings are vectors")


def test_embeddings_shape_and_norm(embedder: TransformersEngine) -> None:
    result = run(embedder.embed(EmbedRequest(request_id="e", inputs=TEXTS)))
    hidden = embedder._model.config.hidden_size
    assert len(result.embeddings) == len(TEXTS)
    assert all(len(vector) == hidden for vector in result.embeddings)
    assert all(math.isclose(math.hypot(*vector), 1.0, abs_tol=1e-5) for vector in result.embeddings)
    assert result.prompt_tokens == sum(len(ids) for ids in embedder._tokenizer(list(TEXTS))["input_ids"])


def test_embeddings_same_alone_and_batched(embedder: TransformersEngine) -> None:
    alone = [run(embedder.embed(EmbedRequest(request_id="e", inputs=(text,)))).embeddings[0] for text in TEXTS]

    # All four in one padded batch, run by the batch function directly (the queue's grouping depends on timing).
    received = run(one_batch(embedder._embed_batch, embedder._tokenizer(list(TEXTS))["input_ids"]))
    assert all(len(values) == 1 and isinstance(values[0], tuple) for values in received), received
    in_one_batch = [cast(tuple[float, ...], values[0]) for values in received]

    async def concurrent() -> list[Any]:
        requests = [EmbedRequest(request_id=str(i), inputs=(text,)) for i, text in enumerate(TEXTS)]
        return list(await asyncio.gather(*(embedder.embed(r) for r in requests)))

    through_the_queue = [result.embeddings[0] for result in run(concurrent())]
    for vectors in (in_one_batch, through_the_queue):
        for a, b in zip(alone, vectors, strict=True):
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_large_embed_request_is_split(embedder: TransformersEngine) -> None:
    inputs = tuple(f"text number {i} " * (i % 5 + 1) for i in range(20))
    before = embedder.stats
    result = run(embedder.embed(EmbedRequest(request_id="big", inputs=inputs)))
    after = embedder.stats
    assert len(result.embeddings) == 20
    assert after.max_batch_size_seen <= 8
    assert after.batches - before.batches >= 3
    single = run(embedder.embed(EmbedRequest(request_id="one", inputs=(inputs[13],)))).embeddings[0]
    assert max(abs(x - y) for x, y in zip(single, result.embeddings[13], strict=True)) < 1e-5


def test_embed_input_too_long(embedder: TransformersEngine) -> None:
    with pytest.raises(InvalidRequestError) as info:
        run(embedder.embed(EmbedRequest(request_id="e", inputs=("ok", "word " * 2000))))
    assert info.value.param == "input"
    assert "input 1" in info.value.message


def test_embed_model_cannot_generate(embedder: TransformersEngine) -> None:
    with pytest.raises(InvalidRequestError):
        run(collect(embedder, completion("hi")))


def test_cls_pooling_without_normalisation(bert_dir: Path) -> None:
    with started(spec(bert_dir, task="embed", normalize=False, engine_kwargs={"pooling": "cls"})) as engine:
        vector = run(engine.embed(EmbedRequest(request_id="e", inputs=("hello world",)))).embeddings[0]
        assert not math.isclose(math.hypot(*vector), 1.0, abs_tol=1e-3)


# -- real small models (slow) ---------------------------------------------------------------------------


def _packaged(name: str, cache_dir: Path) -> Path:
    try:
        return resolve_source(name, cache_dir=cache_dir)
    except ModelPackageNotInstalledError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(cache_dir: Path) -> None:
    source = _packaged("smollm2-135m-instruct", cache_dir)
    with started(spec(source, max_output_tokens=64)) as engine:
        chunks = run(collect(engine, chat("What is the capital of France?", max_tokens=24, temperature=0.0)))
        assert "Paris" in text_of(chunks)
        assert chunks[-1].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_minilm_embeddings(cache_dir: Path) -> None:
    source = _packaged("all-minilm-l6-v2", cache_dir)
    with started(spec(source, task="embed")) as engine:
        result = run(engine.embed(EmbedRequest(request_id="e", inputs=("cat", "kitten", "car"))))
        cat, kitten, car = result.embeddings
        assert len(cat) == 384

        def cosine(a: tuple[float, ...], b: tuple[float, ...]) -> float:
            return sum(x * y for x, y in zip(a, b, strict=True))

        assert cosine(cat, kitten) > cosine(cat, car)


# -- placement ----------------------------------------------------------------------------------------------


def test_batch_thread_computes_on_the_engine_cores(bert_dir: Path) -> None:
    from deployments import cpus
    from deployments.plan import plan_engine

    core = min(cpus.usable_cpus())
    model = spec(bert_dir, task="embed")
    engine = TransformersEngine(model, plan_engine(model, engine_cpus=str(core)))  # the deployment plan's cores
    run(engine.start())
    try:
        result = run(engine.embed(EmbedRequest(request_id="pinned", inputs=("on the engine core",))))
        assert len(result.embeddings) == 1
        thread = engine._worker._thread  # the batch thread: where the model computes
        assert thread.native_id is not None and os.sched_getaffinity(thread.native_id) == {core}
    finally:
        run(engine.shutdown())
    assert len(cpus.usable_cpus()) == 1 or cpus.usable_cpus() != {core}  # the calling thread was not moved
