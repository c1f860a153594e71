"""Hostile input breaks nothing (issue 13, item 5): a corpus of hand-made hostile requests against every endpoint of a
real app (see `hostile_cases.py`), huge headers, slow-loris clients and clients that go away mid-generation.

Every request gets its right 4xx in the OpenAI error body, or a clean 200, never a 5xx or a traceback. A slow client
is cut off with a 408 after `router.body_timeout_s` and ties up nothing else. A generation whose client went away
stops. Afterwards every replica is the one that was there before (none restarted) and a normal request works.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.integration.conftest import wait_for
from tests.integration.hostile_cases import Case, cases, hostile_config

pytestmark = pytest.mark.slow

APP = "hostile"
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
# echo-slow gives a word every 0.5 s: 80 words take 40 s, far longer than the deadline for them to stop.
SLOW_WORDS = " ".join(f"w{i}" for i in range(80))
STOP_DEADLINE_S = 15.0
SOCKET_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def base(
    deploy: Callable[[dict[str, Any]], str], classifier_dir: Path, cross_encoder_dir: Path, tmp_path_factory: Any
) -> str:
    return deploy(hostile_config(classifier_dir, cross_encoder_dir, tmp_path_factory.mktemp("files")))


@pytest.fixture(scope="module")
def replicas_before(base: str) -> set[str]:
    """The Serve replica actors of the app (router and models) before any hostile request."""
    found = _replica_actors()
    assert any("#router#" in name for name in found) and any("#replica:echo-slow#" in name for name in found), found
    return found


@pytest.fixture(scope="module")
def http(base: str, replicas_before: set[str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=SOCKET_TIMEOUT_S) as client:
        yield client


def _replica_actors() -> set[str]:
    import ray

    return {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{APP}#")
    }


def _problem(case: Case, status: int, text: str) -> str | None:
    """What is wrong with the answer to `case`, or None."""
    if "Traceback" in text or 'File "' in text:
        return f"traceback text in the body: {text[:300]}"
    if status not in case.expect:
        return f"status {status} (want {sorted(case.expect)}): {text[:300]}"
    if status >= 400:
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"status {status} without an OpenAI error body: {text[:300]}"
        if set(error) != {"message", "type", "param", "code"} or not error["message"]:
            return f"status {status} with a malformed error body: {text[:300]}"
        if case.param is not None and error["param"] != case.param:
            return f"status {status} names param {error['param']!r} (want {case.param!r}): {text[:300]}"
    return None


def _send(client: httpx.Client, case: Case) -> httpx.Response:
    content: Any = case.body
    if case.chunked and case.body is not None:
        body = case.body
        content = (body[i : i + 8192] for i in range(0, len(body), 8192))  # no Content-Length: chunked encoding
    # As bytes: some cases send header values that are not UTF-8.
    headers = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in case.headers.items()}
    return client.request(case.method, case.path, content=content, headers=headers)


def test_every_hostile_case_gets_its_4xx_or_a_clean_200(http: httpx.Client) -> None:
    corpus = cases()
    problems = []
    statuses: dict[int, int] = {}
    for case in corpus:
        response = _send(http, case)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        print(f"{response.status_code}  {case.id}")  # the table of cases and statuses, shown with `pytest -s`
        problem = _problem(case, response.status_code, response.text)
        if problem is not None:
            problems.append(f"{case.id}: {problem}")
    print(f"{len(corpus)} cases: " + ", ".join(f"{n} x {status}" for status, n in sorted(statuses.items())))
    assert not problems, f"{len(problems)} of {len(corpus)} cases answered wrongly:\n" + "\n".join(problems)
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0 and statuses.get(413, 0) > 0, statuses


# -- raw HTTP: what httpx will not send ---------------------------------------------------------------------------


def _address(base: str) -> tuple[str, int, str]:
    parts = urlsplit(base)
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path


def _read_answer(sock: socket.socket, data: bytes = b"") -> bytes:
    """Everything the server sends (after `data`, already read) until it closes the connection or a whole response
    with its body is in; b"" if the server closed without answering. Fails after SOCKET_TIMEOUT_S without either."""
    sock.settimeout(SOCKET_TIMEOUT_S)
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
        if sep and lengths and len(rest) >= int(lengths[0].split(b":")[1]):
            return data
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"no answer and no close within {SOCKET_TIMEOUT_S:.0f} s; got so far: {data[:200]!r}")
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _raw_request(path: str, headers: bytes, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n".encode() + headers + b"\r\n" + body


HEADERS = {
    "one 8 MB header": b"X-Big: " + b"a" * 8_000_000 + b"\r\n",
    "100k headers": b"".join(b"X-H%d: v\r\n" % i for i in range(100_000)),
    "1000 headers of 1 KB": b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(1000)),
    "x-request-id of 16 KB": b"X-Request-Id: " + b"r" * 16_000 + b"\r\n",
    "authorization of 64 KB": b"Authorization: Bearer " + b"k" * 64_000 + b"\r\n",
    "header name with a space": b"X Bad: v\r\n",
    "header line without a colon": b"garbage\r\n",
    "second Content-Length": b"Content-Length: 5\r\n",
    "Transfer-Encoding with Content-Length": b"Transfer-Encoding: chunked\r\n",
}


# Past the proxy's bounds (`MAX_HEADERS`, `MAX_HEADER_BYTES`).
TOO_MANY_OR_TOO_LARGE = {"one 8 MB header", "100k headers", "1000 headers of 1 KB", "authorization of 64 KB"}


@pytest.mark.parametrize("name", list(HEADERS))
def test_huge_and_malformed_headers_get_a_clean_answer_or_a_close(base: str, name: str) -> None:
    host, port, prefix = _address(base)
    request = _raw_request(f"{prefix}/v1/chat/completions", HEADERS[name], json.dumps(CHAT).encode())
    with socket.create_connection((host, port), timeout=SOCKET_TIMEOUT_S) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection while the headers were still going out: a clean refusal
        answer = _read_answer(sock)
    if name in TOO_MANY_OR_TOO_LARGE:  # answered, by name, in the OpenAI body
        assert answer and _status(answer) == 431, f"{name}: {answer[:300]!r}"
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_header_fields_too_large", error
    if answer:  # a closed connection is a clean refusal too
        status = _status(answer)
        assert status < 500, f"{name}: {answer[:300]!r}"
        assert b"Traceback" not in answer, answer[:500]


def _drip(host: str, port: int, request: bytes, body_size: int, out: dict[str, bytes], key: str) -> None:
    """A slow-loris client: the headers, then the body one byte a second until the server answers or closes."""
    with socket.create_connection((host, port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(request)
        sock.settimeout(1.0)
        for _ in range(body_size):
            try:
                sock.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                first = sock.recv(65536)
            except TimeoutError:
                continue
            out[key] = _read_answer(sock, first) if first else b""
            # The server must also let go of the connection (the rest of the body is unread): it closes it.
            sock.settimeout(SOCKET_TIMEOUT_S)
            try:
                out[key + ":closed"] = b"yes" if sock.recv(1) == b"" else b"no: more data"
            except TimeoutError:
                out[key + ":closed"] = b"no: still open"
            except ConnectionResetError:
                out[key + ":closed"] = b"yes"
            return
    out[key] = b"<the body went out whole, one byte a second, and was never cut off>"


def test_slow_loris_bodies_are_cut_off_with_408_and_tie_up_nothing(base: str, http: httpx.Client) -> None:
    host, port, prefix = _address(base)
    body_size = 300  # 5 minutes at a byte a second; body_timeout_s is 5 s
    json_head = (
        f"POST {prefix}/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {body_size}\r\n\r\n"
    ).encode()
    # An upload: the form's opening goes out at once, then the file's content a byte a second.
    form = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
    upload_head = (
        f"POST {prefix}/v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(form) + body_size}\r\n\r\n"
    ).encode() + form
    out: dict[str, bytes] = {}
    clients = [
        threading.Thread(target=_drip, args=(host, port, json_head if i < 3 else upload_head, body_size, out, str(i)))
        for i in range(4)
    ]
    for client in clients:
        client.start()
    time.sleep(1.0)
    # While they drip, other clients are served as usual.
    for _ in range(3):
        response = http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200, response.text
    for client in clients:
        client.join(timeout=SOCKET_TIMEOUT_S + body_size)
    for i in range(4):
        answer = out.get(str(i), b"<no answer>")
        assert answer.startswith(b"HTTP/1.1 408 "), f"slow client {i}: {answer[:300]!r}"
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert error["type"] == "timeout_error" and "body_timeout_s" in error["message"], error
        assert out.get(f"{i}:closed") == b"yes", (
            f"slow client {i}: the connection after the 408: {out.get(f'{i}:closed')!r}"
        )


# -- clients that go away ------------------------------------------------------------------------------------------


def _load(model: str) -> dict[str, float]:
    from ray import serve

    from deployments.autoscaling import RUNNING_KEY, WAITING_KEY

    handle = serve.get_deployment_handle(f"replica:{model}", app_name=APP)
    report = handle.record_autoscaling_stats.remote().result(timeout_s=30)
    return {"running": report[RUNNING_KEY], "waiting": report[WAITING_KEY]}


def _idle(model: str) -> bool:
    load = _load(model)
    return load["running"] == 0 and load["waiting"] == 0


SLOW_CHAT = {"model": "echo-slow", "messages": [{"role": "user", "content": SLOW_WORDS}], "max_tokens": 80}


def test_streams_cut_mid_generation_stop_their_generations(base: str) -> None:
    wait_for(lambda: _idle("echo-slow"), timeout=STOP_DEADLINE_S, message="echo-slow idle before the test")
    clients = [httpx.Client(base_url=base, timeout=SOCKET_TIMEOUT_S) for _ in range(4)]
    # Each stream's response and line iterator stay referenced: a dropped iterator would close its stream early.
    held: list[tuple[httpx.Response, Iterator[str]]] = []
    try:
        for client in clients:
            request = client.build_request("POST", "/v1/chat/completions", json={**SLOW_CHAT, "stream": True})
            response = client.send(request, stream=True)
            assert response.status_code == 200
            lines = response.iter_lines()
            chunks = [line for line in itertools.islice(lines, 4) if line.startswith("data:")]
            assert len(chunks) == 2, f"want 2 chunks before the cut, got {chunks}"
            held.append((response, lines))
        assert _load("echo-slow")["running"] == 4, f"want the 4 generations running: {_load('echo-slow')}"
    finally:
        for client in clients:
            client.close()  # the connections go away mid-generation
    wait_for(
        lambda: _idle("echo-slow"),
        timeout=STOP_DEADLINE_S,
        message=f"the generations of the 4 cut streams still run (load {_load('echo-slow')}); they would take 40 s",
    )


def test_a_non_streaming_client_that_gives_up_stops_its_generation(base: str) -> None:
    wait_for(lambda: _idle("echo-slow"), timeout=STOP_DEADLINE_S, message="echo-slow idle before the test")
    outcome: list[BaseException] = []

    def impatient() -> None:
        with httpx.Client(base_url=base, timeout=4.0) as client:
            try:
                client.post("/v1/chat/completions", json=SLOW_CHAT)
            except httpx.ReadTimeout as exc:  # it gives up and closes the connection
                outcome.append(exc)

    thread = threading.Thread(target=impatient)
    thread.start()
    wait_for(lambda: _load("echo-slow")["running"] == 1, timeout=STOP_DEADLINE_S, message="the generation runs")
    thread.join(timeout=SOCKET_TIMEOUT_S)
    assert outcome, "the 40 s request answered before the client's 4 s timeout"
    wait_for(
        lambda: _idle("echo-slow"),
        timeout=STOP_DEADLINE_S,
        message=f"the generation of the abandoned request still runs (load {_load('echo-slow')}); it would take 40 s",
    )


def test_afterwards_every_replica_is_the_same_and_a_normal_request_works(
    http: httpx.Client, replicas_before: set[str]
) -> None:
    assert _replica_actors() == replicas_before, "a replica restarted (or went away) during the hostile cases"
    response = http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "hello there"
    embedded = http.post("/v1/embeddings", json={"model": "echo-embed", "input": "hello"})
    assert embedded.status_code == 200, embedded.text
    ranked = http.post("/rerank", json={"model": "reranker", "query": "a", "documents": ["b", "c"]})
    assert ranked.status_code == 200, ranked.text
