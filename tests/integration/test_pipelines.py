"""Pipelines on a real cluster, through the official `openai` client (httpx for /classify, /score and /rerank,
which it lacks): split, fallback, switch, sequence (RAG), ensembles of embeddings and of classifiers, streaming,
the `x-modelfleet-models` header that says which models answered, and the pipeline request counter."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import metric_samples

MODELS = "x-modelfleet-models"
TIMEOUT_S = 120.0  # every request's bound
# A passage of the shipped document set (docs/rag/quorvath.md), word for word: the echo embedding of this exact
# text is the passage's own vector, so retrieval must rank it first.
PASSAGE = (
    "The capital of the island of Quorvath is Bellmarrow, a harbour town of slate roofs built around a round "
    "stone lighthouse."
)
TEMPLATE = "FACTS {passages} QUESTION {question}"
# The tiny classifier's labels (models.tiny.TINY_CLASSIFIER_LABELS), each sent to its own target.
MOOD_TARGETS = {"negative": "stable", "neutral": "canary", "positive": "spare"}
# Inputs the classifier ensembles are checked on; with the heads below, the three classifiers disagree on some.
MOOD_TEXTS = [
    "the weather is fine today",
    "I did not like that film at all",
    "ok",
    "the cat sees a big dog",
    "hello thanks please",
    "the king writes a letter to the queen",
    "a quick red robot",
    "no never very late",
]
VOTERS = ("mood", "mood-b", "mood-c")
# Every label a vote can give (mood-c says 'upbeat'), each to a target.
VOTE_TARGETS = {**MOOD_TARGETS, "upbeat": "spare"}
METRICS_DEADLINE_S = 90.0  # Ray's metrics agent exports every few seconds


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


def _redrawn_head(source: Path, target: Path, seed: int, labels: tuple[str, ...] | None = None) -> Path:
    """The tiny classifier with its classification head drawn again from `seed` (a second model that answers
    differently), and its labels renamed when `labels` is given."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(source)
    torch.manual_seed(seed)
    model.classifier.weight.data.normal_(0.0, 0.2)
    model.classifier.bias.data.zero_()
    if labels is not None:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def mood_variants(tiny_classifier: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """mood-b: the same labels, another head; mood-c: another head, and 'upbeat' where the others say 'positive'."""
    folder = tmp_path_factory.mktemp("moods")
    return (
        _redrawn_head(tiny_classifier, folder / "mood-b", 1),
        _redrawn_head(tiny_classifier, folder / "mood-c", 6, ("negative", "neutral", "upbeat")),
    )


def _classifier(model_id: str, source: Path, task: str = "classify") -> dict[str, Any]:
    return {
        "id": model_id,
        "task": task,
        "engine": "transformers",
        "source": str(source),
        "resources": {"num_cpus": 0.25},
    }


@pytest.fixture(scope="module")
def base(
    deploy: Callable[[dict[str, Any]], str],
    tiny_llama: Path,
    tiny_bert: Path,
    tiny_classifier: Path,
    mood_variants: tuple[Path, Path],
    cross_encoder_dir: Path,
) -> str:
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
                _classifier("mood", tiny_classifier),
                _classifier("mood-b", mood_variants[0]),
                _classifier("mood-c", mood_variants[1]),
                _classifier("cross", cross_encoder_dir, task="score"),
            ],
            "pipelines": [
                {
                    "id": "canary-split",
                    "kind": "split",
                    "targets": [{"model": "stable", "weight": 80}, {"model": "canary", "weight": 20}],
                },
                {"id": "overflow", "kind": "fallback", "targets": [{"model": "primary"}, {"model": "spare"}]},
                {
                    "id": "tight-split",
                    "kind": "split",
                    "targets": [{"model": "primary", "weight": 50}, {"model": "canary", "weight": 50}],
                },
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
                {"id": "mood-vote", "kind": "ensemble", "targets": [{"model": m} for m in VOTERS], "merge": "vote"},
                {
                    "id": "mood-avg",
                    "kind": "ensemble",
                    "targets": [{"model": "mood"}, {"model": "mood-b"}],
                    "merge": "average",
                },
                {
                    "id": "mood-split",
                    "kind": "split",
                    "targets": [{"model": "mood", "weight": 50}, {"model": "mood-b", "weight": 50}],
                },
                # No classifier answers within a microsecond: every request falls back to mood-b.
                {
                    "id": "mood-hasty",
                    "kind": "fallback",
                    "targets": [{"model": "mood"}, {"model": "mood-c"}],
                    "step_timeout_s": 0.000001,
                },
                {"id": "mood-safe", "kind": "fallback", "targets": [{"model": "mood-hasty"}, {"model": "mood-b"}]},
                # A switch whose classifier is the voting ensemble.
                {
                    "id": "by-vote",
                    "kind": "switch",
                    "classifier": "mood-vote",
                    "rules": [{"label": label, "model": target} for label, target in VOTE_TARGETS.items()],
                    "default": "slowpoke",
                },
                # Called by the metrics test only, so that its counter starts from nothing.
                {
                    "id": "counted",
                    "kind": "ensemble",
                    "targets": [{"model": "mood"}, {"model": "mood-b"}],
                    "merge": "vote",
                },
                {
                    "id": "cross-switch",
                    "kind": "switch",
                    "rules": [{"header": "x-tier", "equals": "gold", "model": "cross"}],
                    "default": "cross",
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


def test_more_choices_than_a_pipelines_models_can_queue_is_a_400(client: openai.OpenAI) -> None:
    """A split may send every choice to `primary`, which queues one: n=2 can never all start there, so it is refused
    by name whichever target the user would get; a fallback moves on to `spare`, which takes them."""
    for user in ("u1", "u2", "u3", "u4"):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="tight-split", messages=[{"role": "user", "content": "hi"}], n=2, user=user
            )
        body: Any = info.value.body
        assert body["param"] == "n" and "the pipeline 'tight-split' takes at most 1" in body["message"], body
    reply = client.chat.completions.create(model="overflow", messages=[{"role": "user", "content": "hi"}], n=2)
    assert [c.message.content for c in reply.choices] == ["hi", "hi"]


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


# -- classification and scoring pipelines (httpx: the openai client has no /classify, /score or /rerank) ----------


def _classify(http: httpx.Client, model: str, texts: list[str], **headers: str) -> httpx.Response:
    response = http.post("/classify", json={"model": model, "input": texts}, headers=headers)
    assert response.status_code == 200, response.text
    return response


def _expected_vote(answers: dict[str, list[dict[str, Any]]], i: int) -> tuple[str, dict[str, int]]:
    """The vote's rules, written out again: majority, then the voters' summed probability, then target order."""
    ballots = [(answers[m][i]["label"], max(answers[m][i]["probs"])) for m in VOTERS]
    tally = Counter(label for label, _ in ballots)
    weight: dict[str, float] = defaultdict(float)
    for label, p in ballots:
        weight[label] += p
    most = max(tally.values())
    tied = [label for label, _ in ballots if tally[label] == most]
    best = max(weight[label] for label in tied)
    return next(label for label in tied if weight[label] == best), dict(tally)


def test_vote_ensemble_on_classify_merges_each_models_own_answer(http: httpx.Client) -> None:
    answers = {m: _classify(http, m, MOOD_TEXTS).json()["data"] for m in VOTERS}
    disagreements = [i for i in range(len(MOOD_TEXTS)) if len({answers[m][i]["label"] for m in VOTERS}) > 1]
    assert disagreements, f"the three heads agree on every input: the vote is not exercised ({answers})"
    response = _classify(http, "mood-vote", MOOD_TEXTS)
    body = response.json()
    assert set(response.headers[MODELS].split(",")) == set(VOTERS)
    assert sorted(body["modelfleet"]["models"]) == sorted(VOTERS)
    assert body["model"] == "mood-vote" and body["object"] == "list" and body["id"].startswith("classify-")
    assert body["usage"]["prompt_tokens"] == sum(
        _classify(http, m, MOOD_TEXTS).json()["usage"]["prompt_tokens"] for m in VOTERS
    )
    for i, item in enumerate(body["data"]):
        label, tally = _expected_vote(answers, i)
        assert item["index"] == i and item["label"] == label, (i, answers, item)
        assert body["modelfleet"]["votes"][i] == tally
        # The probabilities of the first voter for the winner: its own answer, whole.
        first = next(m for m in VOTERS if answers[m][i]["label"] == label)
        assert item["probs"] == pytest.approx(answers[first][i]["probs"], abs=1e-5)
        assert item["num_classes"] == len(item["probs"])


def test_average_ensemble_on_classify_is_the_mean_of_each_models_probabilities(http: httpx.Client) -> None:
    answers = {m: _classify(http, m, MOOD_TEXTS).json()["data"] for m in ("mood", "mood-b")}
    response = _classify(http, "mood-avg", MOOD_TEXTS)
    body = response.json()
    assert set(response.headers[MODELS].split(",")) == {"mood", "mood-b"} and "votes" not in body["modelfleet"]
    labels = ("negative", "neutral", "positive")  # both models' id2label, in class order
    for i, item in enumerate(body["data"]):
        mean = [(a + b) / 2 for a, b in zip(answers["mood"][i]["probs"], answers["mood-b"][i]["probs"], strict=True)]
        assert item["probs"] == pytest.approx(mean, abs=1e-5)
        assert item["label"] == labels[max(range(3), key=mean.__getitem__)] and item["num_classes"] == 3


def test_split_fallback_and_switch_on_classify(http: httpx.Client, client: openai.OpenAI) -> None:
    direct = {m: _classify(http, m, MOOD_TEXTS[:3]).json()["data"] for m in ("mood", "mood-b")}
    seen: dict[str, set[str]] = defaultdict(set)
    for i in range(24):
        user = f"reader-{i % 8}"
        response = http.post("/classify", json={"model": "mood-split", "input": MOOD_TEXTS[:3], "user": user})
        assert response.status_code == 200, response.text
        target = response.headers[MODELS]
        seen[user].add(target)
        assert [d["label"] for d in response.json()["data"]] == [d["label"] for d in direct[target]]
    assert all(len(t) == 1 for t in seen.values()), seen  # sticky per user
    assert set().union(*seen.values()) == {"mood", "mood-b"}, seen  # 8 users, 50/50: both targets drawn
    # Fallback: the first target (itself a fallback of two classifiers) times out at every step: mood-b answers.
    response = _classify(http, "mood-safe", MOOD_TEXTS[:3])
    assert response.headers[MODELS] == "mood-b"
    assert [d["label"] for d in response.json()["data"]] == [d["label"] for d in direct["mood-b"]]
    # A switch whose classifier is the voting ensemble: the vote's label picks the target.
    text = MOOD_TEXTS[1]
    label = _classify(http, "mood-vote", [text]).json()["data"][0]["label"]
    answer, models = _chat(client, "by-vote", text)
    assert answer == text and models.split(",")[-1] == VOTE_TARGETS[label]
    assert set(models.split(",")[:-1]) == set(VOTERS)


def test_classify_pipeline_errors_are_openai_errors(http: httpx.Client) -> None:
    response = http.post("/classify", json={"model": "mood-vote", "input": [[101, 102, 103]]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    response = http.post("/classify", json={"model": "canary-split", "input": "x"})
    assert response.status_code == 400 and "serves task 'generate'" in response.json()["error"]["message"]
    response = http.post("/score", json={"model": "mood-split", "queries": "a", "documents": ["b"]})
    assert response.status_code == 400 and "serves task 'classify'" in response.json()["error"]["message"]


def test_score_and_rerank_through_a_switch(http: httpx.Client) -> None:
    pairs = {"queries": "where is the capital", "documents": ["Paris is the capital of France", "a quick dog"]}
    direct = http.post("/score", json={"model": "cross", **pairs}).json()
    for headers in ({}, {"x-tier": "gold"}):
        response = http.post("/score", json={"model": "cross-switch", **pairs}, headers=headers)
        assert response.status_code == 200 and response.headers[MODELS] == "cross", response.text
        scores = [d["score"] for d in response.json()["data"]]
        assert scores == pytest.approx([d["score"] for d in direct["data"]], abs=1e-5)
    body = {"model": "cross-switch", "query": pairs["queries"], "documents": pairs["documents"], "top_n": 1}
    response = http.post("/v1/rerank", json=body)
    assert response.status_code == 200 and response.headers[MODELS] == "cross", response.text
    best = max(range(2), key=lambda i: direct["data"][i]["score"])
    assert [r["index"] for r in response.json()["results"]] == [best]
    assert response.json()["modelfleet"] == {"models": ["cross"]}


def _pipeline_requests() -> dict[tuple[str, str, str], float]:
    """`modelfleet_pipeline_requests` of this module's app by (pipeline, endpoint, status), summed over every
    node's metrics port."""
    totals: dict[tuple[str, str, str], float] = defaultdict(float)
    for labels, value in metric_samples("ray_modelfleet_pipeline_requests_total", "pipelines"):
        totals[labels["model"], labels["endpoint"], labels["status"]] += value
    return totals


def test_pipeline_requests_are_counted_by_pipeline_and_status(http: httpx.Client) -> None:
    for _ in range(3):
        _classify(http, "counted", ["count me"])
    assert http.post("/classify", json={"model": "counted", "input": [[1, 2]]}).status_code == 400
    expected = {("counted", "/classify", "200"): 3.0, ("counted", "/classify", "400"): 1.0}

    def counted() -> dict[tuple[str, str, str], float]:
        return {key: value for key, value in _pipeline_requests().items() if key[0] == "counted"}

    deadline = time.monotonic() + METRICS_DEADLINE_S
    while (got := counted()) != expected and time.monotonic() < deadline:
        time.sleep(2)
    assert got == expected, f"after {METRICS_DEADLINE_S:.0f} s the metrics ports show {got}, not {expected}"
