"""/classify, /score and /rerank over real HTTP on a real cluster (issue 9): the tiny BERT classifier and
cross-encoder served by the transformers engine, every endpoint's shape, numbers equal to the same model run
in-process with transformers, rerank order, fields refused by name and wrong-task models refused naming `model`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from models.tiny import TINY_CLASSIFIER_LABELS
from tests.integration.test_api import assert_error

Deploy = Callable[[dict[str, Any]], str]
CONTEXT = 64
TEXTS = ["the cat sees the dog", "a quick red robot builds a house", "hello"]
QUERY = "the capital city of France"
DOCS = ["Paris is the capital of France", "the dog runs in the garden", "Berlin", "a big old book"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def http(deploy: Deploy, classifier_dir: Path, cross_encoder_dir: Path) -> httpx.Client:
    common = {"engine": "transformers", "context_length": CONTEXT, "resources": {"num_cpus": 0.5}}
    base = deploy(
        {
            "name": "scoring",
            "route_prefix": "/scoring",
            "models": [
                {"id": "classifier", "task": "classify", "source": str(classifier_dir), **common},
                {"id": "reranker", "task": "score", "source": str(cross_encoder_dir), **common},
                {"id": "echo-embed", "task": "embed", "engine": "echo", "resources": {"num_cpus": 0.25}},
            ],
        }
    )
    return httpx.Client(base_url=base, timeout=60)


def logits(folder: Path, texts: list[str], pairs: list[str] | None = None) -> torch.Tensor:
    """The model's logits, one input at a time, with plain transformers in this process."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        rows = [
            model(**tokenizer(t, pairs[i] if pairs else None, return_tensors="pt", return_token_type_ids=True)).logits[
                0
            ]
            for i, t in enumerate(texts)
        ]
    return torch.stack(rows)


def token_count(folder: Path, texts: list[str], pairs: list[str] | None = None) -> int:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return sum(len(tokenizer(t, pairs[i] if pairs else None)["input_ids"]) for i, t in enumerate(texts))


def test_cards_show_the_tasks_and_the_document_lists_the_endpoints(http: httpx.Client) -> None:
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert (cards["classifier"]["task"], cards["reranker"]["task"]) == ("classify", "score")
    assert cards["classifier"]["max_model_len"] == CONTEXT
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"):
        assert "post" in paths[path], path


def test_classify_matches_transformers(http: httpx.Client, classifier_dir: Path) -> None:
    r = http.post("/classify", json={"model": "classifier", "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("classify-") and body["object"] == "list" and body["model"] == "classifier"
    assert isinstance(body["created"], int)
    want = logits(classifier_dir, TEXTS).softmax(-1).tolist()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    for data, probs in zip(body["data"], want, strict=True):
        assert data["probs"] == pytest.approx(probs, abs=TOLERANCE)
        assert data["num_classes"] == len(TINY_CLASSIFIER_LABELS)
        assert data["label"] == TINY_CLASSIFIER_LABELS[max(range(3), key=probs.__getitem__)]
    tokens = token_count(classifier_dir, TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


def test_classify_options(http: httpx.Client, classifier_dir: Path) -> None:
    ids = AutoTokenizer.from_pretrained(classifier_dir)(TEXTS[1])["input_ids"]
    one = http.post("/classify", json={"model": "classifier", "input": TEXTS[1]}).json()
    by_ids = http.post("/classify", json={"model": "classifier", "input": ids}).json()
    assert by_ids["data"][0]["probs"] == pytest.approx(one["data"][0]["probs"], abs=1e-6)
    raw = http.post("/classify", json={"model": "classifier", "input": [TEXTS[0]], "use_activation": False}).json()
    assert raw["data"][0]["probs"] == pytest.approx(logits(classifier_dir, TEXTS[:1])[0].tolist(), abs=TOLERANCE)
    cut = http.post("/classify", json={"model": "classifier", "input": TEXTS[1], "truncate_prompt_tokens": 4})
    assert cut.json()["usage"]["prompt_tokens"] == 4
    named = http.post("/classify", json={"model": "classifier", "input": "hi", "request_id": "abc"})
    assert named.json()["id"] == "classify-abc"


def test_long_input_is_refused_unless_truncated(http: httpx.Client) -> None:
    long_text = " ".join(["cat"] * (CONTEXT + 8))
    assert_error(http.post("/classify", json={"model": "classifier", "input": long_text}), 400, "input")
    r = http.post("/classify", json={"model": "classifier", "input": long_text, "truncate_prompt_tokens": -1})
    assert r.json()["usage"]["prompt_tokens"] == CONTEXT
    big = {"model": "classifier", "input": "hi", "truncate_prompt_tokens": CONTEXT + 1}
    assert_error(http.post("/classify", json=big), 400, "truncate_prompt_tokens")


@pytest.mark.parametrize(
    ("path", "first", "second"),
    [
        ("/score", "queries", "documents"),
        ("/v1/score", "queries", "items"),
        ("/score", "data_1", "data_2"),
        ("/v1/score", "text_1", "text_2"),
    ],
)
def test_score_in_every_spelling(
    http: httpx.Client, cross_encoder_dir: Path, path: str, first: str, second: str
) -> None:
    r = http.post(path, json={"model": "reranker", first: QUERY, second: DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("score-") and body["object"] == "list" and body["model"] == "reranker"
    want = logits(cross_encoder_dir, [QUERY] * len(DOCS), DOCS).sigmoid()[:, 0].tolist()
    assert [d["index"] for d in body["data"]] == list(range(len(DOCS)))
    assert {d["object"] for d in body["data"]} == {"score"}
    assert [d["score"] for d in body["data"]] == pytest.approx(want, abs=TOLERANCE)
    tokens = token_count(cross_encoder_dir, [QUERY] * len(DOCS), DOCS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


def test_score_pairs_one_to_one(http: httpx.Client, cross_encoder_dir: Path) -> None:
    r = http.post("/score", json={"model": "reranker", "text_1": DOCS[:2], "text_2": DOCS[2:]})
    want = logits(cross_encoder_dir, DOCS[:2], DOCS[2:]).sigmoid()[:, 0].tolist()
    assert [d["score"] for d in r.json()["data"]] == pytest.approx(want, abs=TOLERANCE)
    mismatch = {"model": "reranker", "text_1": DOCS[:2], "text_2": DOCS}
    assert_error(http.post("/score", json=mismatch), 400, "text_1")


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_orders_by_score(http: httpx.Client, cross_encoder_dir: Path, path: str) -> None:
    r = http.post(path, json={"model": "reranker", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("score-") and body["model"] == "reranker"
    want = logits(cross_encoder_dir, [QUERY] * len(DOCS), DOCS).sigmoid()[:, 0].tolist()
    order = sorted(range(len(DOCS)), key=lambda i: want[i], reverse=True)
    assert [res["index"] for res in body["results"]] == order
    for res in body["results"]:
        assert res["document"] == {"text": DOCS[res["index"]], "multi_modal": None}
        assert res["relevance_score"] == pytest.approx(want[res["index"]], abs=TOLERANCE)
    tokens = token_count(cross_encoder_dir, [QUERY] * len(DOCS), DOCS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    top = http.post(path, json={"model": "reranker", "query": QUERY, "documents": DOCS, "top_n": 2}).json()
    assert [res["index"] for res in top["results"]] == order[:2]


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/classify", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ("/classify", {"padding": "max_length"}, "padding"),
        ("/classify", {"cache_salt": "salt"}, "cache_salt"),
        ("/classify", {"priority": 1}, "priority"),
        ("/classify", {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ("/score", {"instruction": "judge relevance"}, "instruction"),
        ("/score", {"chat_template_kwargs": {}}, "chat_template_kwargs"),
        ("/score", {"items": DOCS}, "items"),
        ("/score", {"max_tokens_per_doc": CONTEXT}, "max_tokens_per_doc"),
        ("/rerank", {"mm_processor_kwargs": {}}, "mm_processor_kwargs"),
        ("/rerank", {"documents": [{"content": [{"type": "text", "text": "x"}]}]}, "documents"),
        ("/rerank", {"top_n": -1}, "top_n"),
    ],
)
def test_unimplemented_fields_are_refused_by_name(
    http: httpx.Client, path: str, extra: dict[str, Any], param: str
) -> None:
    base: dict[str, Any] = {
        "/classify": {"model": "classifier", "input": "hi"},
        "/score": {"model": "reranker", "queries": QUERY, "documents": DOCS},
        "/rerank": {"model": "reranker", "query": QUERY, "documents": DOCS},
    }[path]
    assert_error(http.post(path, json={**base, **extra}), 400, param)


def test_a_missing_side_is_named(http: httpx.Client) -> None:
    assert_error(http.post("/score", json={"model": "reranker", "data_1": QUERY}), 400, "data_2")


def test_wrong_task_is_400_naming_model(http: httpx.Client) -> None:
    assert_error(http.post("/v1/embeddings", json={"model": "classifier", "input": "hi"}), 400, "model")
    assert_error(http.post("/classify", json={"model": "reranker", "input": "hi"}), 400, "model")
    assert_error(http.post("/classify", json={"model": "echo-embed", "input": "hi"}), 400, "model")
    assert_error(http.post("/rerank", json={"model": "classifier", "query": "q", "documents": ["d"]}), 400, "model")
    chat = {"model": "classifier", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(http.post("/v1/chat/completions", json=chat), 400, "model")
    assert_error(http.post("/score", json={"model": "nope", "queries": "q", "documents": "d"}), 404, "model")
