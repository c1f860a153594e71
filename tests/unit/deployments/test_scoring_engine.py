"""SequenceClassificationEngine driven directly with asyncio on the tiny classifier and cross-encoder, checked against
the same models run in-process with plain transformers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from deployments.engines import resolve
from deployments.engines.protocol import ClassifyRequest, GenerateRequest, PoolingOptions, ScoreRequest
from deployments.engines.scoring import SequenceClassificationEngine
from deployments.errors import EngineStartError, InvalidRequestError
from models.registry import resolve_source
from models.spec import ModelSpec
from models.tiny import TINY_CLASSIFIER_LABELS

T = TypeVar("T")

TIMEOUT_S = 120.0
CONTEXT = 32
TEXTS = ("the cat sees the dog", "a quick red robot builds a house", "hello")
QUERY = "the capital city of France"
DOCS = ("Paris is the capital of France", "the dog runs in the garden", "Berlin", "a big old book")


def run(coro: Awaitable[T], timeout: float = TIMEOUT_S) -> T:
    """Run one coroutine on a fresh event loop, bounded by `timeout`."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_source("tiny-bert-classifier", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_source("tiny-cross-encoder", cache_dir=tmp_path_factory.mktemp("cache"))


def spec(source: Path, task: str, **overrides: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "id": f"test-{task}",
        "task": task,
        "engine": "transformers",
        "source": str(source),
        "context_length": CONTEXT,
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
    }
    return ModelSpec(**{**fields, **overrides})


class _Running:
    """An engine started on its own event loop thread for the module (the worker outlives single `run` calls)."""

    def __init__(self, model_spec: ModelSpec) -> None:
        self.engine = SequenceClassificationEngine(model_spec)
        self.loop = asyncio.new_event_loop()

    def __call__(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, TIMEOUT_S))

    def close(self) -> None:
        self(self.engine.shutdown())
        self.loop.close()


@pytest.fixture(scope="module")
def classifier(classifier_dir: Path) -> Iterator[_Running]:
    running = _Running(spec(classifier_dir, "classify"))
    running(running.engine.start())
    yield running
    running.close()


@pytest.fixture(scope="module")
def cross_encoder(cross_encoder_dir: Path) -> Iterator[_Running]:
    running = _Running(spec(cross_encoder_dir, "score"))
    running(running.engine.start())
    yield running
    running.close()


def reference_logits(folder: Path, texts: list[str], pairs: list[str] | None = None, **kwargs: Any) -> torch.Tensor:
    """The model's logits, one input at a time, with plain transformers."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    rows = []
    with torch.inference_mode():
        for i, text in enumerate(texts):
            pair = pairs[i] if pairs is not None else None
            encoded = tokenizer(text, pair, return_tensors="pt", return_token_type_ids=True, **kwargs)
            rows.append(model(**encoded).logits[0])
    return torch.stack(rows)


def test_resolve_picks_the_classification_engine_by_task() -> None:
    assert resolve("transformers", "classify") is SequenceClassificationEngine
    assert resolve("transformers", "score") is SequenceClassificationEngine
    assert resolve("transformers", "embed") is not SequenceClassificationEngine


def test_only_transformers_serves_classification_tasks() -> None:
    for task in ("classify", "score"):
        for engine in ("vllm", "echo"):
            with pytest.raises(ValidationError, match=f"serve task '{task}' with engine 'transformers'"):
                ModelSpec(id="m", task=task, engine=engine, source="tiny-cross-encoder")


def test_classify_matches_transformers_softmax(classifier: _Running, classifier_dir: Path) -> None:
    result = classifier(classifier.engine.classify(ClassifyRequest(request_id="r", inputs=TEXTS)))
    expected = reference_logits(classifier_dir, list(TEXTS)).softmax(-1)
    assert len(result.classifications) == len(TEXTS)
    for got, want in zip(result.classifications, expected.tolist(), strict=True):
        assert got.probs == pytest.approx(want, abs=1e-4)
        assert sum(got.probs) == pytest.approx(1.0, abs=1e-5)
        assert got.label == TINY_CLASSIFIER_LABELS[max(range(3), key=want.__getitem__)]
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    assert result.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)


def test_classify_without_activation_returns_logits(classifier: _Running, classifier_dir: Path) -> None:
    request = ClassifyRequest(request_id="r", inputs=TEXTS[:1], options=PoolingOptions(use_activation=False))
    result = classifier(classifier.engine.classify(request))
    assert result.classifications[0].probs == pytest.approx(
        reference_logits(classifier_dir, list(TEXTS[:1]))[0].tolist(), abs=1e-4
    )


def test_concurrent_requests_share_batches_and_keep_their_answers(classifier: _Running) -> None:
    alone = [classifier(classifier.engine.classify(ClassifyRequest(request_id=t, inputs=(t,)))) for t in TEXTS]

    async def together() -> list[Any]:
        requests = [ClassifyRequest(request_id=f"c{i}", inputs=(t,)) for i, t in enumerate(TEXTS * 3)]
        return list(await asyncio.gather(*(classifier.engine.classify(r) for r in requests)))

    for i, result in enumerate(classifier(together())):
        assert result.classifications[0].probs == pytest.approx(alone[i % 3].classifications[0].probs, abs=1e-5)


def test_token_ids_classify_like_their_text(classifier: _Running, classifier_dir: Path) -> None:
    ids = tuple(AutoTokenizer.from_pretrained(classifier_dir)(TEXTS[1])["input_ids"])
    by_text = classifier(classifier.engine.classify(ClassifyRequest(request_id="t", inputs=(TEXTS[1],))))
    by_ids = classifier(classifier.engine.classify(ClassifyRequest(request_id="i", inputs=(ids,))))
    assert by_ids.classifications[0].probs == pytest.approx(by_text.classifications[0].probs, abs=1e-6)
    assert by_ids.prompt_tokens == len(ids)
    with pytest.raises(InvalidRequestError) as bad:
        classifier(classifier.engine.classify(ClassifyRequest(request_id="b", inputs=((1, 10**6),))))
    assert bad.value.param == "input"


def test_truncation_keeps_the_special_tokens(classifier: _Running, classifier_dir: Path) -> None:
    text = TEXTS[1]  # 9 tokens with [CLS] and [SEP]
    for side in ("right", "left"):
        options = PoolingOptions(truncate_prompt_tokens=5, truncation_side=side)
        result = classifier(
            classifier.engine.classify(ClassifyRequest(request_id="t", inputs=(text,), options=options))
        )
        assert result.prompt_tokens == 5
        tokenizer = AutoTokenizer.from_pretrained(classifier_dir, truncation_side=side)
        model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
        with torch.inference_mode():
            want = model(**tokenizer(text, truncation=True, max_length=5, return_tensors="pt")).logits.softmax(-1)
        assert result.classifications[0].probs == pytest.approx(want[0].tolist(), abs=1e-4)


def test_long_inputs_are_refused_unless_truncated(classifier: _Running) -> None:
    long_text = " ".join(["cat"] * (CONTEXT + 5))
    with pytest.raises(InvalidRequestError) as refused:
        classifier(classifier.engine.classify(ClassifyRequest(request_id="l", inputs=("hello", long_text))))
    assert refused.value.param == "input"
    assert "input 1 has" in refused.value.message
    options = PoolingOptions(truncate_prompt_tokens=-1)
    cut = classifier(classifier.engine.classify(ClassifyRequest(request_id="l", inputs=(long_text,), options=options)))
    assert cut.prompt_tokens == CONTEXT
    for wanted in (0, 2, CONTEXT + 1):
        options = PoolingOptions(truncate_prompt_tokens=wanted)
        with pytest.raises(InvalidRequestError) as bad:
            classifier(classifier.engine.classify(ClassifyRequest(request_id="b", inputs=("hi",), options=options)))
        assert bad.value.param == "truncate_prompt_tokens"


def test_an_empty_input_is_refused(classifier: _Running) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        classifier(classifier.engine.classify(ClassifyRequest(request_id="e", inputs=("",), add_special_tokens=False)))
    assert refused.value.param == "input"


def test_score_matches_transformers_sigmoid(cross_encoder: _Running, cross_encoder_dir: Path) -> None:
    result = cross_encoder(cross_encoder.engine.score(ScoreRequest(request_id="s", queries=(QUERY,), documents=DOCS)))
    want = reference_logits(cross_encoder_dir, [QUERY] * len(DOCS), list(DOCS)).sigmoid()[:, 0]
    assert result.scores == pytest.approx(want.tolist(), abs=1e-4)
    assert len(set(result.scores)) == len(DOCS)  # distinct, so a ranking by them is meaningful
    tokenizer = AutoTokenizer.from_pretrained(cross_encoder_dir)
    assert result.prompt_tokens == sum(len(tokenizer(QUERY, d)["input_ids"]) for d in DOCS)
    pairs = ScoreRequest(request_id="n", queries=DOCS[:2], documents=DOCS[2:])
    paired = cross_encoder(cross_encoder.engine.score(pairs))
    want = reference_logits(cross_encoder_dir, list(DOCS[:2]), list(DOCS[2:])).sigmoid()[:, 0]
    assert paired.scores == pytest.approx(want.tolist(), abs=1e-4)
    raw = ScoreRequest(
        request_id="r", queries=(QUERY,), documents=DOCS[:1], options=PoolingOptions(use_activation=False)
    )
    logits = reference_logits(cross_encoder_dir, [QUERY], list(DOCS[:1]))[:, 0]
    assert cross_encoder(cross_encoder.engine.score(raw)).scores == pytest.approx(logits.tolist(), abs=1e-4)


def test_score_needs_one_query_or_one_per_document() -> None:
    with pytest.raises(ValidationError, match="1:1, 1:N or N:N"):
        ScoreRequest(request_id="x", queries=("a", "b"), documents=("a", "b", "c"))


def test_per_text_token_limits(cross_encoder: _Running, cross_encoder_dir: Path) -> None:
    request = ScoreRequest(request_id="m", queries=(QUERY,), documents=DOCS[:1], max_tokens_per_doc=2)
    result = cross_encoder(cross_encoder.engine.score(request))
    # "Paris is" is the document's first two tokens.
    want = reference_logits(cross_encoder_dir, [QUERY], ["Paris is"]).sigmoid()[:, 0]
    assert result.scores == pytest.approx(want.tolist(), abs=1e-4)
    request = ScoreRequest(request_id="q", queries=(QUERY,), documents=DOCS[:1], max_tokens_per_query=3)
    want = reference_logits(cross_encoder_dir, ["the capital city"], list(DOCS[:1])).sigmoid()[:, 0]
    assert cross_encoder(cross_encoder.engine.score(request)).scores == pytest.approx(want.tolist(), abs=1e-4)
    too_many = ScoreRequest(request_id="t", queries=(QUERY,), documents=DOCS[:1], max_tokens_per_doc=CONTEXT)
    with pytest.raises(InvalidRequestError) as refused:
        cross_encoder(cross_encoder.engine.score(too_many))
    assert refused.value.param == "max_tokens_per_doc"


def test_a_pair_too_long_names_the_field(cross_encoder: _Running) -> None:
    long_doc = " ".join(["dog"] * CONTEXT)
    request = ScoreRequest(request_id="l", queries=(QUERY,), documents=("cat", long_doc), fields=("text_1", "text_2"))
    with pytest.raises(InvalidRequestError) as refused:
        cross_encoder(cross_encoder.engine.score(request))
    assert refused.value.param == "text_2"
    truncated = request.model_copy(update={"options": PoolingOptions(truncate_prompt_tokens=-1)})
    assert cross_encoder(cross_encoder.engine.score(truncated)).prompt_tokens <= 2 * CONTEXT


def test_wrong_task_is_refused_naming_model(classifier: _Running, cross_encoder: _Running) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        classifier(classifier.engine.score(ScoreRequest(request_id="s", queries=("a",), documents=("b",))))
    assert refused.value.param == "model"
    with pytest.raises(InvalidRequestError) as refused:
        cross_encoder(cross_encoder.engine.classify(ClassifyRequest(request_id="c", inputs=("a",))))
    assert refused.value.param == "model"

    async def first_chunk() -> None:
        async for _ in classifier.engine.generate(GenerateRequest(request_id="g", prompt="hi")):
            pass

    with pytest.raises(InvalidRequestError) as refused:
        classifier(first_chunk())
    assert refused.value.param == "model"


def test_score_task_needs_one_output(classifier_dir: Path) -> None:
    engine = SequenceClassificationEngine(spec(classifier_dir, "score"))
    with pytest.raises(EngineStartError, match="serve it with task 'classify'"):
        run(engine.start())


def test_unknown_engine_kwargs_are_refused(classifier_dir: Path) -> None:
    engine = SequenceClassificationEngine(spec(classifier_dir, "classify", engine_kwargs={"pooling": "cls"}))
    with pytest.raises(EngineStartError, match="unknown engine_kwargs"):
        run(engine.start())
