"""OpenAI's Files and Batches API through the official `openai` SDK: a local head started with `modelfleet up
--dashboard` in a fresh HOME (batches run as Ray jobs, which need the dashboard), an app deployed with
`modelfleet deploy`, and real batch jobs submitted by the ingress replica."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from cluster.local import free_port
from tests.integration.test_cli import CLI, ROOT, _env

pytestmark = pytest.mark.slow

WORDS = "the quick brown fox jumps over the lazy dog again"
MAX_FILE_BYTES = 100_000
TERMINAL = {"completed", "failed", "cancelled", "expired"}


@dataclass(frozen=True)
class Api:
    client: openai.OpenAI
    base: str
    files_dir: Path


def _run(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=_env(home), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def api(tiny_llama: Path) -> Iterator[Api]:
    """A fresh HOME with a job-capable local cluster and an app of echo models and the tiny Llama."""
    root = Path(tempfile.mkdtemp(prefix="f", dir="/tmp"))  # short: Ray's unix sockets live under HOME
    for name in ("h", "t", "data"):
        (root / name).mkdir()
    home = root / "h"
    port = free_port()
    echo = {"task": "generate", "engine": "echo", "resources": {"num_cpus": 0.25}}
    config = {
        "name": "batches",
        "models": [
            {"id": "echo", **echo, "engine_kwargs": {"fail_marker": "BOOM"}},
            {"id": "slow", **echo, "engine_kwargs": {"token_delay_s": 0.2}},
            {"id": "echo-embed", **echo, "task": "embed", "engine_kwargs": {"dimensions": 8}},
            {
                "id": "tiny",
                "task": "generate",
                "engine": "transformers",
                "source": str(tiny_llama),
                "context_length": 256,
                "max_output_tokens": 16,
                "resources": {"num_cpus": 0.5},
            },
        ],
        "router": {"port": port},
        "batches": {"files_dir": str(root / "data" / "files"), "max_file_bytes": MAX_FILE_BYTES},
    }
    path = root / "data" / "batches.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        up = _run(home, "up", "--dashboard", timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        deployed = _run(home, "deploy", str(path), timeout=600)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        base = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
        yield Api(client=client, base=base, files_dir=root / "data" / "files")
    finally:
        subprocess.run([*CLI, "down"], env=_env(home), cwd=ROOT, timeout=120, check=False)
        shutil.rmtree(root, ignore_errors=True)


def _jsonl(lines: list[Any]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def _chat(custom_id: str, text: str, model: str = "echo", **body: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _upload(api: Api, lines: list[Any], name: str = "in.jsonl") -> str:
    created = api.client.files.create(file=(name, _jsonl(lines)), purpose="batch")
    assert created.object == "file" and created.purpose == "batch" and created.filename == name
    return created.id


def _start(api: Api, file_id: str, **extra: Any) -> openai.types.Batch:
    return api.client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", **extra
    )


def _until(api: Api, batch_id: str, statuses: set[str], timeout: float) -> openai.types.Batch:
    """Poll the batch until its status is one of `statuses`; fail at the deadline with the last state seen."""
    deadline = time.monotonic() + timeout
    seen = api.client.batches.retrieve(batch_id)
    while seen.status not in statuses:
        assert seen.status not in TERMINAL, f"batch {batch_id} ended {seen.status}: {seen.errors}"
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s: batch {batch_id} is {seen.status} ({seen.request_counts})")
        time.sleep(1.0)
        seen = api.client.batches.retrieve(batch_id)
    return seen


def _lines(api: Api, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(text) for text in api.client.files.content(file_id).text.splitlines()]


def test_200_lines_5_malformed(api: Api) -> None:
    """The issue's done-when, through the SDK: 195 answers in the output file, 5 errors in the error file."""
    lines: list[Any] = [_chat(f"req-{i}", f"chat {i} {WORDS}") for i in range(200)]
    lines[10] = '{"custom_id": "broken", "method": "POST"'  # not JSON
    lines[50] = {k: v for k, v in _chat("x", "x").items() if k != "custom_id"}  # no custom_id
    lines[90] = {**_chat("req-90", "x"), "method": "GET"}
    lines[130] = {**_chat("req-130", "x"), "url": "/v1/completions"}  # not this batch's endpoint
    lines[170] = _chat("req-170", "x", max_tokens=0)  # fails validation: a 400 response
    file_id = _upload(api, lines)
    assert api.client.files.retrieve(file_id).bytes == len(_jsonl(lines))

    created = _start(api, file_id, metadata={"run": "done-when"})
    assert created.status == "validating" and created.input_file_id == file_id and created.model == "echo"
    assert created.metadata == {"run": "done-when"} and created.output_file_id is None
    assert created.expires_at == created.created_at + 24 * 3600
    done = _until(api, created.id, TERMINAL, timeout=300)
    assert done.status == "completed", done.errors
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (200, 195, 5)
    assert done.in_progress_at and done.completed_at and done.completed_at >= done.in_progress_at
    assert done.output_file_id and done.error_file_id

    answers = _lines(api, done.output_file_id)
    assert len(answers) == 195 and all(a["response"]["status_code"] == 200 and a["error"] is None for a in answers)
    by_id = {a["custom_id"]: a["response"]["body"] for a in answers}
    assert set(by_id) == {f"req-{i}" for i in range(200)} - {"req-10", "req-50", "req-90", "req-130", "req-170"}
    assert by_id["req-1"]["choices"][0]["message"]["content"] == f"chat 1 {WORDS}"
    errors = _lines(api, done.error_file_id)
    assert len(errors) == 5
    codes = sorted(e["error"]["code"] for e in errors if e["error"])
    assert codes == ["invalid_json", "invalid_method", "invalid_url", "missing_custom_id"]
    refused = next(e for e in errors if e["custom_id"] == "req-170")
    assert refused["response"]["status_code"] == 400 and refused["response"]["body"]["error"]["param"] == "max_tokens"

    output = api.client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.bytes > 0
    assert done.id in [b.id for b in api.client.batches.list()]
    assert done.output_file_id in [f.id for f in api.client.files.list(purpose="batch_output")]
    assert api.client.batches.retrieve(done.id).status == "completed"  # read from its record from now on


def test_cancel(api: Api) -> None:
    # 40 words at 0.2 s each: 8 s a line, 16 lines at a time, 64 lines: about half a minute if nobody stops it.
    text = " ".join([WORDS] * 4)
    created = _start(api, _upload(api, [_chat(f"s{i}", text, model="slow") for i in range(64)]))
    _until(api, created.id, {"in_progress"}, timeout=180)
    cancelling = api.client.batches.cancel(created.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    cancelled = _until(api, created.id, {"cancelled"}, timeout=180)
    assert cancelled.cancelled_at is not None and cancelled.request_counts is not None
    assert cancelled.request_counts.completed < 64
    if cancelled.output_file_id:  # the lines answered before the stop
        assert 0 < len(_lines(api, cancelled.output_file_id)) < 64
    assert api.client.batches.cancel(created.id).status == "cancelled"  # again: nothing to stop


def test_a_real_model(api: Api) -> None:
    """The tiny Llama on transformers (random weights: answers are checked for shape only)."""
    lines = [_chat(f"c{i}", f"hello {i}", model="tiny", max_tokens=8) for i in range(4)]
    created = _start(api, _upload(api, lines))
    done = _until(api, created.id, TERMINAL, timeout=600)
    assert done.status == "completed", done.errors
    assert done.error_file_id is None and done.output_file_id
    answers = _lines(api, done.output_file_id)
    assert sorted(a["custom_id"] for a in answers) == ["c0", "c1", "c2", "c3"]
    for answer in answers:
        body = answer["response"]["body"]
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= body["usage"]["completion_tokens"] <= 8


def _bad_request(call: Any, param: str) -> str:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == param, body
    return str(body["message"])


def test_refusals(api: Api) -> None:
    file_id = _upload(api, [_chat("a", "hi")])
    create = api.client.batches.create
    chat = "/v1/chat/completions"
    message = _bad_request(
        lambda: create(input_file_id=file_id, endpoint=chat, completion_window="24h", extra_body={"priority": 1}),
        "priority",
    )
    assert "Unrecognized request argument" in message
    _bad_request(lambda: create(input_file_id=file_id, endpoint=chat, completion_window="1h"), "completion_window")
    _bad_request(
        lambda: create(input_file_id=file_id, endpoint="/v1/responses", completion_window="24h"),  # type: ignore[arg-type]
        "endpoint",
    )
    _bad_request(lambda: create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h"), "endpoint")
    two_models = _upload(api, [_chat("a", "hi"), _chat("b", "hi", model="slow")])
    assert "2 models" in _bad_request(
        lambda: create(input_file_id=two_models, endpoint=chat, completion_window="24h"), "input_file_id"
    )
    with pytest.raises(openai.NotFoundError) as caught:
        create(input_file_id="file-" + "0" * 32, endpoint=chat, completion_window="24h")
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "input_file_id"
    unknown_model = _upload(api, [_chat("a", "hi", model="nope")])
    with pytest.raises(openai.NotFoundError):
        create(input_file_id=unknown_model, endpoint=chat, completion_window="24h")

    _bad_request(lambda: api.client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune"), "purpose")
    for missing in ("file-" + "0" * 32, "../../etc/passwd"):
        with pytest.raises(openai.NotFoundError):
            api.client.files.retrieve(missing)
        with pytest.raises(openai.NotFoundError):
            api.client.files.content(missing)
    with pytest.raises(openai.NotFoundError):
        api.client.batches.retrieve("batch_" + "0" * 32)
    with pytest.raises(openai.NotFoundError):
        api.client.batches.cancel("batch_" + "0" * 32)

    api.client.files.delete(two_models)
    with pytest.raises(openai.NotFoundError):
        api.client.files.retrieve(two_models)
    assert two_models not in [f.id for f in api.client.files.list()]


def test_size_limit(api: Api) -> None:
    big = b"x" * (MAX_FILE_BYTES + 1)
    with pytest.raises(openai.APIStatusError) as caught:
        api.client.files.create(file=("big.jsonl", big), purpose="batch")
    assert caught.value.status_code == 413
    # Just over the file limit but inside the form's framing allowance: the route itself refuses it.
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "file_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as the body arrives
        boundary = b"--b\r\n"
        yield boundary + b'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for _ in range(4):
            yield b"y" * MAX_FILE_BYTES
        yield b"\r\n--b--\r\n"

    response = httpx.post(
        f"{api.base}/files", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}, timeout=60
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    # Other routes keep the router's own body limit, far below the file limit.
    assert api.client.files.list().object == "list"
