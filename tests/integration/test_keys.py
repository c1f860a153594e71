"""API keys on a real cluster, through the official `openai` client: 401 for a wrong key, 404 for a model the key
may not use (as for an unknown one), per-key RPM and TPM limits that hold across two router replicas (one shared
quota store), their 429s and x-ratelimit headers, usage per key in Ray's metrics, and the store failing closed."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from deployments.auth import key_sha256, store_name
from deployments.auth.limits import QUOTA_NAMESPACE
from deployments.batch.store import FileStore, new_batch_id, new_file_id
from deployments.plan import ROUTER_DEPLOYMENT
from tests.integration.conftest import metric_samples, wait_for

pytestmark = pytest.mark.slow

APP = "keyed"
KEY_A = "sk-mf-only-a-0123456789"  # may use echo-a only, no limits
KEY_BURST = "sk-mf-burst-0123456789"  # echo-a only, 30 requests a minute
KEY_TOKENS = "sk-mf-tokens-0123456789"  # every model, 100 tokens a minute (read from a file by the routers)
RPM = 30
TPM = 100
ECHO = {"task": "generate", "engine": "echo", "resources": {"num_cpus": 0.25}}
# Ray's metrics agent exports every few seconds.
METRICS_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app's files folder (Files and Batches API), on this machine like its router replicas."""
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="module")
def keyed(deploy: Callable[[dict[str, Any]], str], tmp_path_factory: pytest.TempPathFactory, files_dir: Path) -> str:
    key_file = tmp_path_factory.mktemp("keys") / "tokens.key"
    key_file.write_text(KEY_TOKENS + "\n")
    return deploy(
        {
            "name": APP,
            "route_prefix": f"/{APP}",
            "models": [
                {"id": "echo-a", **ECHO},
                {"id": "echo-b", **ECHO},
                {"id": "embed-b", **ECHO, "task": "embed"},
            ],
            "router": {
                "num_replicas": 2,
                "num_cpus": 0.25,
                # Serve's proxy prefers the router replica on its own node (the test cluster has two nodes): a
                # replica holding 2 requests is full, so that a burst of 8 at a time spills over to the other one.
                "max_ongoing_requests": 2,
                "quota_fail_mode": "closed",
                "keys": [
                    {"name": "only-a", "sha256": key_sha256(KEY_A), "models": ["echo-a"]},
                    {"name": "burst", "sha256": key_sha256(KEY_BURST), "models": ["echo-a"], "rpm": RPM},
                    {"name": "tokens", "key_file": str(Path(key_file)), "tpm": TPM},
                ],
            },
            "batches": {"files_dir": str(files_dir)},
        }
    )


def _client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body: dict[str, Any] = exc.response.json()["error"]
    return body


def test_no_key_or_a_wrong_key_is_401(keyed: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        _client(keyed, "sk-mf-wrong").chat.completions.create(
            model="echo-a", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.AuthenticationError):
        _client(keyed, key_sha256(KEY_A)).models.list()  # the hash is no key
    r = httpx.post(f"{keyed}/v1/completions", json={"model": "echo-a", "prompt": "a"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{keyed}/readyz", timeout=30).status_code == 200  # probes stay open


def test_a_key_sees_and_uses_only_its_models(keyed: str) -> None:
    client = _client(keyed, KEY_A)
    assert [m.id for m in client.models.list().data] == ["echo-a"]
    out = client.chat.completions.create(model="echo-a", messages=[{"role": "user", "content": "a b"}])
    assert out.choices[0].message.content == "a b"
    # Another tenant's model is refused exactly as a model that does not exist.
    with pytest.raises(openai.NotFoundError) as hidden:
        client.chat.completions.create(model="echo-b", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "a"}])
    shape = {k: v for k, v in _error(hidden.value).items() if k != "message"}
    assert shape == {k: v for k, v in _error(unknown.value).items() if k != "message"}
    assert _error(hidden.value)["message"] == "The model 'echo-b' does not exist. Served models: echo-a"
    assert _error(unknown.value)["message"] == "The model 'no-such-model' does not exist. Served models: echo-a"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="echo-b", prompt="a")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="embed-b", input="a")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("echo-b")
    headers = {"Authorization": f"Bearer {KEY_A}"}
    for path, body in (
        ("/tokenize", {"model": "echo-b", "prompt": "a"}),
        ("/detokenize", {"model": "echo-b", "tokens": [1]}),
    ):
        r = httpx.post(f"{keyed}{path}", json=body, headers=headers, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (path, r.text)
    # A batch whose lines name another tenant's model is refused when it is created.
    line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "echo-b"}}
    upload = client.files.create(file=("in.jsonl", json.dumps(line).encode() + b"\n"), purpose="batch")
    with pytest.raises(openai.NotFoundError) as batch:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert _error(batch.value)["message"] == _error(hidden.value)["message"]
    # A key of every model sees every model.
    assert [m.id for m in _client(keyed, KEY_TOKENS).models.list().data] == ["echo-a", "echo-b", "embed-b"]


def _ended_batch(store: FileStore, owner: str) -> tuple[str, str]:
    """A batch that completed, as its record and output file stand in the files folder once it ended (the test
    cluster runs without the job API that runs batches); returns its id and its output file's id."""
    batch_id, output_id = new_batch_id(), new_file_id()
    store.content_path(output_id).parent.mkdir(parents=True, exist_ok=True)
    store.content_path(output_id).write_text('{"custom_id": "1"}\n')
    store.register(output_id, filename=f"{batch_id}_output.jsonl", purpose="batch_output", owner=owner)
    now = int(time.time())
    store.put_batch(
        batch_id,
        {
            "id": batch_id,
            "endpoint": "/v1/chat/completions",
            "input_file_id": new_file_id(),
            "completion_window": "24h",
            "created_at": now,
            "metadata": None,
            "model": "echo-a",
            "files": {"output_file_id": output_id, "error_file_id": new_file_id()},
            "status": "completed",
            "completed_at": now,
            "output_file_id": output_id,
            "error_file_id": None,
            "final": True,
            "owner": owner,
        },
    )
    return batch_id, output_id


def test_a_key_sees_only_its_own_files_and_batches(keyed: str, files_dir: Path) -> None:
    mine, theirs = _client(keyed, KEY_A), _client(keyed, KEY_TOKENS)
    a = mine.files.create(file=("a.jsonl", b'{"a": 1}\n'), purpose="batch")
    t = theirs.files.create(file=("t.jsonl", b'{"t": 2}\n'), purpose="batch")
    assert a.id in {f.id for f in mine.files.list()} and t.id not in {f.id for f in mine.files.list()}
    assert t.id in {f.id for f in theirs.files.list()} and a.id not in {f.id for f in theirs.files.list()}
    # Another key's file answers exactly as one that does not exist (OpenAI's way): 404, file_not_found.
    missing = new_file_id()
    for file_id in (t.id, missing):
        for call in (mine.files.retrieve, mine.files.content, mine.files.delete):
            with pytest.raises(openai.NotFoundError) as refused:
                call(file_id)
            assert _error(refused.value) == {
                "message": f"No such file: '{file_id}'",
                "type": "not_found_error",
                "param": "file_id",
                "code": "file_not_found",
            }
        with pytest.raises(openai.NotFoundError) as batch:
            mine.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        assert _error(batch.value)["code"] == "file_not_found" and _error(batch.value)["param"] == "input_file_id"
    assert theirs.files.content(t.id).read() == b'{"t": 2}\n'  # untouched by the refused delete
    assert mine.files.retrieve(a.id).filename == "a.jsonl" and "owner" not in mine.files.retrieve(a.id).to_dict()
    # Batches and their result files likewise.
    store = FileStore(files_dir)
    (my_batch, my_output), (their_batch, their_output) = _ended_batch(store, "only-a"), _ended_batch(store, "tokens")
    assert [b.id for b in mine.batches.list()] == [my_batch]
    assert [b.id for b in theirs.batches.list()] == [their_batch]
    assert mine.batches.retrieve(my_batch).output_file_id == my_output
    assert mine.files.content(my_output).read() == b'{"custom_id": "1"}\n'
    with pytest.raises(openai.NotFoundError) as hidden:
        mine.batches.retrieve(their_batch)
    assert _error(hidden.value)["code"] == "batch_not_found"
    with pytest.raises(openai.NotFoundError):
        mine.batches.cancel(their_batch)
    with pytest.raises(openai.NotFoundError):
        mine.files.content(their_output)
    with pytest.raises(openai.BadRequestError):  # its own ended batch: found, and too late to cancel
        mine.batches.cancel(my_batch)
    assert theirs.batches.retrieve(their_batch).status == "completed"


def _router_replicas() -> int:
    from ray import serve

    app = serve.status().applications[APP]
    return app.deployments[ROUTER_DEPLOYMENT].replica_states.get("RUNNING", 0)


def test_requests_per_minute_hold_across_two_router_replicas(keyed: str) -> None:
    assert _router_replicas() == 2
    client = _client(keyed, KEY_BURST)
    sent = 3 * RPM

    def one(i: int) -> tuple[int, dict[str, str]]:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="echo-a", messages=[{"role": "user", "content": f"r{i}"}], max_tokens=1
            )
            return raw.status_code, dict(raw.headers)
        except openai.APIStatusError as exc:
            return exc.status_code, dict(exc.response.headers)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, range(sent)))
    elapsed = time.monotonic() - started
    codes = [code for code, _ in answers]
    allowed = codes.count(200)
    # Tolerance: the burst of RPM, plus what the bucket refills while the requests are sent (RPM/60 a second),
    # nothing more; and no fewer than the burst.
    refill = math.ceil(RPM * elapsed / 60)
    print(f"\nlimiter: allowed {allowed} of {RPM} configured (+{refill} refilled in {elapsed:.1f} s), {sent} sent")
    assert set(codes) <= {200, 429}, codes
    assert RPM <= allowed <= RPM + refill, (allowed, elapsed)
    for code, headers in answers:
        assert headers["x-ratelimit-limit-requests"] == str(RPM)
        assert re.fullmatch(r"\d+(\.\d+)?(ms|s)|\d+m\d+s", headers["x-ratelimit-reset-requests"])
        if code == 429:
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert 1 <= int(headers["retry-after"]) <= 2  # one request's worth: 2 s at 30 a minute
        assert "x-ratelimit-limit-tokens" not in headers  # this key has no token limit


def test_tokens_per_minute_refuse_once_spent(keyed: str) -> None:
    client = _client(keyed, KEY_TOKENS)
    first = client.chat.completions.with_raw_response.create(
        model="echo-b", messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )
    assert first.headers["x-ratelimit-limit-tokens"] == str(TPM)
    assert "x-ratelimit-limit-requests" not in first.headers  # no request limit on this key
    # A stream spends the rest (charged when it ends): 60 words in, 60 out.
    words = " ".join(f"w{i}" for i in range(60))
    stream = client.completions.create(
        model="echo-b", prompt=words, max_tokens=60, stream=True, stream_options={"include_usage": True}
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage and usage[0].total_tokens > TPM
    # The charge is sent without waiting: the next requests see it as soon as the store has it.
    refused: list[openai.RateLimitError] = []

    def is_refused() -> bool:
        try:
            client.embeddings.create(model="embed-b", input="x")
        except openai.RateLimitError as exc:
            refused.append(exc)
            return True
        return False

    wait_for(is_refused, timeout=30, message="a key whose tokens per minute are spent was still admitted")
    exc = refused[0]
    assert _error(exc)["type"] == "rate_limit_error" and _error(exc)["code"] == "rate_limit_exceeded"
    assert "tokens per minute (100)" in _error(exc)["message"]
    headers = exc.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-tokens"] == str(TPM) and headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-ratelimit-reset-tokens"].endswith("s")
    # Reading spends no tokens: a key in debt still lists its models.
    assert len(client.models.list().data) == 3


def _key_series(metric: str) -> list[dict[str, str]]:
    """Label sets (with the value as `_value`) of a key metric of this app, from every node's metrics port."""
    return [{**labels, "_value": repr(value)} for labels, value in metric_samples(metric, APP)]


def test_usage_per_key_is_exported(keyed: str) -> None:
    def exported() -> bool:
        requests = _key_series("ray_modelfleet_key_requests_total")
        tokens = _key_series("ray_modelfleet_key_tokens_total")
        burst: dict[str, float] = {}
        for s in requests:
            if s["key"] == "burst":  # summed over the router replicas
                burst[s["status"]] = burst.get(s["status"], 0.0) + float(s["_value"])
        kinds = {s["kind"] for s in tokens if s["key"] == "tokens"}
        return burst.get("200", 0) >= RPM and burst.get("429", 0) > 0 and kinds == {"prompt", "completion"}

    wait_for(exported, timeout=METRICS_TIMEOUT_S, message="per-key request and token counters were not exported")
    per_replica: dict[str, float] = {}

    def both_replicas() -> bool:
        per_replica.clear()
        for s in _key_series("ray_modelfleet_key_requests_total"):
            if s["key"] == "burst":
                per_replica[s["replica"]] = per_replica.get(s["replica"], 0.0) + float(s["_value"])
        return len(per_replica) == 2

    # Both router replicas counted requests of the burst key: the limit above was shared, not per replica.
    wait_for(both_replicas, timeout=METRICS_TIMEOUT_S, message="the burst was not served by both router replicas")
    print(f"\nburst key requests by router replica: {per_replica}")
    series = _key_series("ray_modelfleet_key_requests_total")
    for s in series + _key_series("ray_modelfleet_key_tokens_total"):
        assert s["key"] in {"only-a", "burst", "tokens"}  # names only, never a key
    assert not any(KEY_A in str(s) or KEY_TOKENS in str(s) for s in series)


def test_a_lost_quota_store_fails_closed_then_is_recreated(keyed: str) -> None:
    import ray

    store = ray.get_actor(store_name(APP), namespace=QUOTA_NAMESPACE)
    ray.kill(store, no_restart=True)
    body = {"model": "echo-a", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {KEY_BURST}"}
    r = httpx.post(f"{keyed}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "quota_unavailable" and r.headers["retry-after"] == "1"
    # A key without limits never asks the store.
    assert _client(keyed, KEY_A).models.list().data[0].id == "echo-a"

    def served() -> bool:
        return httpx.post(f"{keyed}/v1/chat/completions", json=body, headers=headers, timeout=30).status_code == 200

    wait_for(served, timeout=60, message="the routers did not create the quota store again", interval=1.0)
