"""Cache-affine routing on a real cluster: `session` and `prefix` policies, seen through `x-modelfleet-replica`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest

REPLICA = "x-modelfleet-replica"
TIMEOUT_S = 60.0  # every request's bound: a routing bug that leaves a request unrouted fails here, not hangs
BLOCK = 64  # prefix_block_chars of the `prefixed` model


def _echo(model_id: str, routing: dict[str, Any], *, max_ongoing: int, **overrides: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "task": "generate",
        "engine": "echo",
        "resources": {"num_cpus": 0.25},
        "scaling": {"min_replicas": 2, "max_replicas": 2, "max_ongoing_requests": max_ongoing},
        # Slow enough that a long request holds its replica while the test sends the next one.
        "engine_kwargs": {"token_delay_s": 0.05},
        "routing": routing,
        **overrides,
    }


@pytest.fixture(scope="module")
def base(deploy: Callable[[dict[str, Any]], str]) -> str:
    return deploy(
        {
            "name": "routing",
            "route_prefix": "/routing",
            "models": [
                # One request at a time per replica: a held request makes its replica overloaded.
                _echo("sticky", {"policy": "session"}, max_ongoing=1),
                # Overloaded at one ongoing request, below its max_ongoing_requests of 2.
                _echo(
                    "prefixed",
                    {"policy": "prefix", "prefix_block_chars": BLOCK, "overload_queue_len": 1},
                    max_ongoing=2,
                ),
                {
                    "id": "sticky-embed",
                    "task": "embed",
                    "engine": "echo",
                    "resources": {"num_cpus": 0.25},
                    "routing": {"policy": "session", "session_header": "X-Conversation"},
                },
            ],
        }
    )


@pytest.fixture(scope="module")
def http(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=TIMEOUT_S) as client:
        yield client


def _served_by(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    replica = response.headers.get(REPLICA)
    assert replica, f"no {REPLICA} header: {dict(response.headers)}"
    return replica


def _complete(http: httpx.Client, model: str, prompt: str, headers: dict[str, str] | None = None, **body: Any) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, **body}
    return _served_by(http.post("/v1/completions", json=body, headers=headers))


@contextmanager
def _holding(http: httpx.Client, model: str, prompt: str, headers: dict[str, str] | None = None) -> Iterator[str]:
    """A streamed request that keeps its replica busy (200 tokens, 10 s) until the block ends; yields that replica.

    The first event has arrived when the block starts, so the replica has accepted the request. Leaving the block
    closes the stream, and Serve cancels the rest.
    """
    body = {"model": model, "prompt": prompt, "max_tokens": 200, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        replica = _served_by(response)
        # Held until the block ends: a line iterator that is garbage-collected closes the response, and Serve
        # would cancel the request early.
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"choices"' in first, first
        yield replica


def _words(tag: str, count: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(count))


def _assert_affine(placements: dict[str, list[str]]) -> None:
    """Every key on one replica, and the keys spread over both replicas."""
    split = {key: set(replicas) for key, replicas in placements.items() if len(set(replicas)) != 1}
    assert not split, f"keys served by more than one replica: {split}"
    used = {replicas[0] for replicas in placements.values()}
    assert len(used) == 2, f"every key landed on {used}: {dict(placements)}"


# -- session --------------------------------------------------------------------------------------------------


def test_a_session_header_keeps_each_session_on_one_replica(http: httpx.Client) -> None:
    placements: dict[str, list[str]] = defaultdict(list)
    for turn in range(3):
        for session in range(20):
            sid = f"header-session-{session}"
            placements[sid].append(_complete(http, "sticky", f"turn {turn}", {"x-session-id": sid}))
    _assert_affine(placements)


def test_the_user_field_is_the_session_key_without_a_header(base: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    placements: dict[str, list[str]] = defaultdict(list)
    for turn in range(3):
        for user in range(20):
            raw = client.chat.completions.with_raw_response.create(
                model="sticky",
                messages=[{"role": "user", "content": f"turn {turn}"}],
                max_tokens=1,
                user=f"user-{user}",
            )
            assert raw.parse().choices[0].message.content == "turn"
            placements[f"user-{user}"].append(raw.headers[REPLICA])
    _assert_affine(placements)


def test_session_routing_streams_fans_out_and_serves_keyless_requests(http: httpx.Client) -> None:
    headers = {"x-session-id": "streamed"}
    home = _complete(http, "sticky", "hello", headers)
    body = {"model": "sticky", "prompt": "a b c", "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        assert _served_by(response) == home
        assert any(line == "data: [DONE]" for line in response.iter_lines())
    # `n` choices share one HTTP request (and so Serve's internal request id), yet each is routed: one to the
    # session's replica, the other there too or, while that one holds max_ongoing_requests (1), to the other.
    body = {"model": "sticky", "prompt": "x", "max_tokens": 1, "n": 2}
    fanned = http.post("/v1/completions", json=body, headers=headers)
    assert home in _served_by(fanned).split(",") and len(fanned.json()["choices"]) == 2
    # Without a session key, Serve's default choice.
    assert _complete(http, "sticky", "no session")


def test_a_session_moves_only_when_its_replica_is_overloaded(http: httpx.Client) -> None:
    headers = {"x-session-id": "mover"}
    home = _complete(http, "sticky", "first", headers)
    assert _complete(http, "sticky", "second", headers) == home
    with _holding(http, "sticky", _words("w", 200), headers) as held:
        assert held == home
        # `home` holds max_ongoing_requests (1): this one goes to the other replica instead of waiting.
        moved = _complete(http, "sticky", "while busy", headers)
        assert moved != home
    # The session now lives where it moved, although its first replica is free again.
    assert _complete(http, "sticky", "after", headers) == moved


def test_embeddings_route_by_session_and_name_their_replica(http: httpx.Client) -> None:
    replicas = set()
    for header in ({"X-Conversation": "c-1"}, {"x-conversation": "c-1"}):
        r = http.post("/v1/embeddings", json={"model": "sticky-embed", "input": "hi"}, headers=header)
        replicas.add(_served_by(r))
        assert len(r.json()["data"][0]["embedding"]) == 16
    assert len(replicas) == 1


# -- prefix ---------------------------------------------------------------------------------------------------


def _document(tag: str) -> str:
    text = _words(tag, 60)  # about 5 blocks
    assert len(text) > 3 * BLOCK
    return text


def test_prompts_sharing_a_long_prefix_land_on_one_replica(http: httpx.Client) -> None:
    placements: dict[str, list[str]] = defaultdict(list)
    for question in range(3):
        for doc in range(16):
            prompt = f"{_document(f'doc{doc}-')} question {question}: what does it say?"
            placements[f"doc{doc}"].append(_complete(http, "prefixed", prompt))
    _assert_affine(placements)


def test_chats_sharing_their_first_messages_land_on_one_replica(http: httpx.Client) -> None:
    placements: dict[str, list[str]] = defaultdict(list)
    for question in range(3):
        for doc in range(16):
            messages = [
                {"role": "system", "content": _document(f"sys{doc}-")},
                {"role": "user", "content": f"question {question}"},
            ]
            body = {"model": "prefixed", "messages": messages, "max_tokens": 1}
            placements[f"sys{doc}"].append(_served_by(http.post("/v1/chat/completions", json=body)))
    _assert_affine(placements)


def test_a_busy_prefix_replica_sends_requests_elsewhere(http: httpx.Client) -> None:
    document = _document("busy-")
    home = _complete(http, "prefixed", f"{document} first")
    with _holding(http, "prefixed", f"{document} {_words('t', 200)}") as held:
        assert held == home
        # `home` holds overload_queue_len (1) requests, below its max_ongoing_requests (2): still, the next
        # request with this prefix goes to the least loaded replica rather than queueing behind it.
        assert _complete(http, "prefixed", f"{document} second") != home


def test_a_burst_on_one_prefix_spreads_over_both_replicas(http: httpx.Client) -> None:
    document = _document("burst-")

    def post(i: int) -> str:
        return _complete(http, "prefixed", f"{document} {_words(f'q{i}-', 20)}", max_tokens=20)

    with ThreadPoolExecutor(max_workers=6) as pool:
        served = list(pool.map(post, range(6)))
    # Each replica holds at most 2 of these 1 s requests at once: a burst of 6 on one prefix cannot all wait for
    # one replica while the other has room.
    assert len(set(served)) == 2, served
