"""Pipelines on a real cluster, through the official `openai` client: split, fallback, switch, sequence (RAG),
ensemble, streaming, and the `x-modelfleet-models` header that says which models answered."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

MODELS = "x-modelfleet-models"
TIMEOUT_S = 120.0  # every request's bound
ROOT = Path(__file__).resolve().parents[2]
# A passage of the shipped document set (docs/rag/quorvath.md), word for word: the echo embedding of this exact
# text is the passage's own vector, so retrieval must rank it first.
PASSAGE = (
    "The capital of the island of Quorvath is Bellmarrow, a harbour town of slate roofs built around a round "
    "stone lighthouse."
)
TEMPLATE = "FACTS {passages} QUESTION {question}"
# The tiny classifier's labels (models.tiny.TINY_CLASSIFIER_LABELS), each sent to its own target.
MOOD_TARGETS = {"negative": "stable", "neutral": "canary", "positive": "spare"}


def _echo(model_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": model_id, "task": "generate", "engine": "echo", "resources": {"num_cpus": 0.1}, **fields}


def _embed(model_id: str, dimensions: int) -> dict[str, Any]:
    return {
        "id": model_id,
        "task": "embed",
        "engine": "echo",
        "resources": {"num_cpus": 0.1},
        "engine_kwargs": {"dimensions": dimensions},
    }


@pytest.fixture(scope="module")
def tiny_classifier(model_cache: Path) -> Path:
    from models.registry import resolve_source

    return resolve_source("tiny-bert-classifier", cache_dir=model_cache)


@pytest.fixture(scope="module")
def base(deploy: Callable[[dict[str, Any]], str], tiny_llama: Path, tiny_bert: Path, tiny_classifier: Path) -> str:
    return deploy(
        {
            "name": "pipelines",
            "route_prefix": "/pipelines",
            "models": [
                _echo("stable", engine_kwargs={"fail_marker": "__fail__"}),
                _echo("canary"),
                # One request at a time and one waiting: the rest of a burst is refused at once (429).
                _echo(
                    "primary",
                    scaling={"max_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1},
                    engine_kwargs={"token_delay_s": 0.2},
                ),
                _echo("spare"),
                _echo("slowpoke", engine_kwargs={"token_delay_s": 2.0}),
                _embed("echo-embed", 16),
                _embed("echo-embed-8", 8),
                {
                    "id": "tiny-embed",
                    "task": "embed",
                    "engine": "transformers",
                    "source": str(tiny_bert),
                    "context_length": 128,
                    "resources": {"num_cpus": 0.5},
                },
                {
                    "id": "tiny",
                    "task": "generate",
                    "engine": "transformers",
                    "source": str(tiny_llama),
                    "context_length": 512,
                    "max_output_tokens": 16,
                    "resources": {"num_cpus": 0.5},
                },
                {
                    "id": "mood",
                    "task": "classify",
                    "engine": "transformers",
                    "source": str(tiny_classifier),
                    "resources": {"num_cpus": 0.25},
                },
            ],
            "pipelines": [
                {
                    "id": "canary-split",
                    "kind": "split",
                    "targets": [{"model": "stable", "weight": 80}, {"model": "canary", "weight": 20}],
                },
                {"id": "overflow", "kind": "fallback", "targets": [{"model": "primary"}, {"model": "spare"}]},
                {
                    "id": "patient",
                    "kind": "fallback",
                    "targets": [{"model": "slowpoke"}, {"model": "spare"}],
                    "step_timeout_s": 1.0,
                },
                {"id": "guarded", "kind": "fallback", "targets": [{"model": "stable"}, {"model": "spare"}]},
                {
                    "id": "by-prompt",
                    "kind": "switch",
                    "rules": [
                        {"header": "x-tier", "equals": "gold", "model": "canary"},
                        {"metadata": "team", "regex": "^search", "model": "spare"},
                        {"regex": "(?i)\\bcanary\\b", "model": "canary"},
                        {"max_prompt_tokens": 4, "model": "spare"},
                    ],
                    "default": "stable",
                },
                {
                    "id": "echo-rag",
                    "kind": "sequence",
                    "retrieve": {"model": "echo-embed", "documents": "docs/rag", "top_k": 1},
                    "template": TEMPLATE,
                    "model": "canary-split",
                },
                {
                    "id": "tiny-rag",
                    "kind": "sequence",
                    "retrieve": {"model": "tiny-embed", "documents": "docs/rag", "top_k": 2},
                    "template": "Facts: {passages}\nQuestion: {question}",
                    "model": "tiny",
                },
                {
                    "id": "by-mood",
                    "kind": "switch",
                    "classifier": "mood",
                    "rules": [{"label": label, "model": target} for label, target in MOOD_TARGETS.items()],
                    "default": "slowpoke",
                },
                {
                    "id": "tagged",
                    "kind": "sequence",
                    "classifier": "mood",
                    "template": "{label} says {question}",
                    "model": "spare",
                },
                {
                    "id": "joined",
                    "kind": "ensemble",
                    "targets": [{"model": "echo-embed"}, {"model": "echo-embed-8"}],
                    "merge": "concatenate",
                },
            ],
        }
    )


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    # No client retries: every failure the server sends must show in the test.
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


@pytest.fixture(scope="module")
def http(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=TIMEOUT_S) as c:
        yield c


def _chat(
    client: openai.OpenAI, model: str, text: str, headers: dict[str, str] | None = None, **body: Any
) -> tuple[str, str]:
    """(the answer, the x-modelfleet-models header) of a non-streamed chat."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], extra_headers=headers, **body
    )
    completion = raw.parse()
    assert completion.model_extra and completion.model_extra["modelfleet"]["models"] == raw.headers[MODELS].split(",")
    return completion.choices[0].message.content or "", raw.headers[MODELS]


def _stream(client: openai.OpenAI, model: str, text: str, **body: Any) -> tuple[str, str, list[Any]]:
    """(the streamed answer, the header, the chunks) of a streamed chat."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], stream=True, **body
    )
    chunks = list(raw.parse())
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return answer, raw.headers[MODELS], chunks


def test_models_lists_pipelines_with_their_steps(client: openai.OpenAI) -> None:
    cards = {m.id: m for m in client.models.list().data}
    card = cards["echo-rag"].model_extra or {}
    assert card["engine"] == "pipeline" and card["task"] == "generate"
    assert card["pipeline"]["kind"] == "sequence"
    assert card["pipeline"]["steps"] == ["echo-embed", "canary-split"]
    assert card["pipeline"]["models"] == ["echo-embed", "stable", "canary"]
    assert (client.models.retrieve("joined").model_extra or {})["pipeline"]["kind"] == "ensemble"


def test_split_80_20_over_500_requests_from_100_users_is_sticky(client: openai.OpenAI) -> None:
    def one(i: int) -> tuple[str, str]:
        user = f"user-{i % 100}"
        answer, models = _chat(client, "canary-split", f"hello {i}", user=user)
        assert answer == f"hello {i}"
        return user, models

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(500)))
    seen: dict[str, set[str]] = defaultdict(set)
    for user, models in results:
        seen[user].add(models)
    assert all(len(targets) == 1 for targets in seen.values()), {u: t for u, t in seen.items() if len(t) > 1}
    share = Counter(models for _, models in results)["stable"] / len(results)
    assert 0.75 <= share <= 0.85, f"stable got {share:.0%} of 500 requests"
    # The session header wins over `user`, and keeps its own target too.
    by_header = {_chat(client, "canary-split", "x", {"x-session-id": "s-7"}, user=f"u{i}")[1] for i in range(5)}
    assert len(by_header) == 1


def test_fallback_absorbs_a_burst_with_no_failures(client: openai.OpenAI, base: str) -> None:
    text = "one two three four five"  # 5 tokens x 0.2 s: each request holds `primary` for about 1 s

    def one(i: int) -> str:
        if i % 2:
            answer, models, _ = _stream(client, "overflow", text)
        else:
            answer, models = _chat(client, "overflow", text)
        assert answer == text
        return models

    with ThreadPoolExecutor(12) as pool:
        served = Counter(pool.map(one, range(24)))
    assert set(served) <= {"primary", "spare"} and served["spare"] > 0 and served["primary"] > 0, served
    # The same burst sent to `primary` itself: the overflow is refused at once, with 429 and Retry-After in the
    # OpenAI error body, streamed requests too.
    with httpx.Client(base_url=base, timeout=TIMEOUT_S) as http, ThreadPoolExecutor(12) as pool:
        body = {"model": "primary", "messages": [{"role": "user", "content": text}]}
        statuses = list(
            pool.map(lambda i: http.post("/v1/chat/completions", json={**body, "stream": i % 2 == 1}), range(12))
        )
    refused = [r for r in statuses if r.status_code == 429]
    assert refused, [r.status_code for r in statuses]
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error" for r in refused)


def test_fallback_on_a_step_timeout(client: openai.OpenAI) -> None:
    assert _chat(client, "patient", "slow words here") == ("slow words here", "spare")
    answer, models, _ = _stream(client, "patient", "slow words here")
    assert (answer, models) == ("slow words here", "spare")


def test_a_stream_that_sent_tokens_is_never_switched(http: httpx.Client) -> None:
    body = {"model": "guarded", "messages": [{"role": "user", "content": "first __fail__ third"}], "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers[MODELS] == "stable"
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    assert text == "first" and "error" in events[-1], events
    assert "pipeline 'guarded', step 'stable'" in events[-1]["error"]["message"]


def test_switch_rules(client: openai.OpenAI) -> None:
    long = "a prompt that is clearly longer than sixteen characters"
    assert _chat(client, "by-prompt", long, {"x-tier": "gold"})[1] == "canary"
    assert _chat(client, "by-prompt", long, metadata={"team": "search-eu"})[1] == "spare"
    assert _chat(client, "by-prompt", f"{long} for the Canary")[1] == "canary"
    assert _chat(client, "by-prompt", "tiny")[1] == "spare"
    assert _chat(client, "by-prompt", long) == (long, "stable")
    answer, models, chunks = _stream(client, "by-prompt", long, extra_headers={"x-tier": "gold"})
    assert (answer, models) == (long, "canary")
    assert chunks[0].model_extra["modelfleet"] == {"models": ["canary"]}


def test_sequence_retrieves_the_passage_and_fills_the_template(client: openai.OpenAI) -> None:
    answer, models = _chat(client, "echo-rag", PASSAGE, user="reader-1")
    assert answer == " ".join(TEMPLATE.format(passages=PASSAGE, question=PASSAGE).split())
    assert models.split(",")[0] == "echo-embed" and models.split(",")[1] in {"stable", "canary"}
    streamed, streamed_models, _ = _stream(client, "echo-rag", PASSAGE, user="reader-1")
    assert (streamed, streamed_models) == (answer, models)
    completion = client.completions.create(model="echo-rag", prompt=PASSAGE, max_tokens=200)
    assert completion.choices[0].text == answer


def test_sequence_on_tiny_models(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-rag", messages=[{"role": "user", "content": "Where is Quorvath?"}], max_tokens=8
    )
    completion = raw.parse()
    assert raw.headers[MODELS] == "tiny-embed,tiny"
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert completion.usage is not None and completion.usage.prompt_tokens > 20  # the passages are in the prompt
    chunks = list(
        client.chat.completions.create(
            model="tiny-rag", messages=[{"role": "user", "content": "Where is Quorvath?"}], max_tokens=8, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}


@pytest.mark.parametrize("text", ["the weather is fine today", "I did not like that film at all", "ok"])
def test_classify_then_route_and_classify_then_answer(client: openai.OpenAI, http: httpx.Client, text: str) -> None:
    direct = http.post("/classify", json={"model": "mood", "input": text})
    assert direct.status_code == 200, direct.text
    label = direct.json()["data"][0]["label"]
    assert _chat(client, "by-mood", text) == (text, f"mood,{MOOD_TARGETS[label]}")
    assert _chat(client, "tagged", text) == (f"{label} says {text}", "mood,spare")
    answer, models, _ = _stream(client, "tagged", text)
    assert (answer, models) == (f"{label} says {text}", "mood,spare")


def test_ensemble_concatenates_embeddings(client: openai.OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(model="joined", input=["alpha", "beta"])
    joined = raw.parse()
    assert raw.headers[MODELS] == "echo-embed,echo-embed-8"
    a = client.embeddings.create(model="echo-embed", input=["alpha", "beta"])
    b = client.embeddings.create(model="echo-embed-8", input=["alpha", "beta"])
    for i in range(2):
        assert joined.data[i].embedding == a.data[i].embedding + b.data[i].embedding
    assert joined.model == "joined"


def test_pipeline_errors_are_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="canary-split", input="x")
    assert "serves task 'generate'" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="canary-split", prompt=[1, 2, 3])
    assert info.value.body["param"] == "prompt"  # type: ignore[index]


@pytest.mark.slow
def test_rag_example_answers_from_the_document_set(deploy: Callable[[dict[str, Any]], str]) -> None:
    """The shipped rag.yaml, with the real SmolLM2 and MiniLM: the answer is only in docs/rag/."""
    config = yaml.safe_load((ROOT / "deployments" / "configs" / "rag.yaml").read_text())
    base = deploy({**config, "name": "rag", "route_prefix": "/rag"})
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=300, max_retries=0)
    question = "What is the capital of the island of Quorvath?"
    raw = client.chat.completions.with_raw_response.create(
        model="rag", messages=[{"role": "user", "content": question}], max_tokens=40, temperature=0
    )
    assert raw.headers[MODELS] == "minilm,smollm2"
    assert "Bellmarrow" in (raw.parse().choices[0].message.content or "")
    stream = client.chat.completions.create(
        model="rag", messages=[{"role": "user", "content": question}], max_tokens=40, temperature=0, stream=True
    )
    assert "Bellmarrow" in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
