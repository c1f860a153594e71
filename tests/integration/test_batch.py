"""Batch jobs through the real CLI: a local head started with `modelfleet up --dashboard` in a fresh HOME, echo models,
`modelfleet batch submit/status/logs/cancel` as subprocesses, and the files the job writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import wait_for
from tests.integration.test_cli import CLI, ROOT, _env

pytestmark = pytest.mark.slow

ECHO_WORDS = "the quick brown fox jumps over the lazy dog again"


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """A fresh HOME (short path: Ray's sockets) with a running local cluster that takes jobs."""
    root = Path(tempfile.mkdtemp(prefix="b", dir="/tmp"))
    for name in ("h", "t", "data"):
        (root / name).mkdir()
    home = root / "h"
    try:
        up = _run(home, "up", "--dashboard", timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        yield home
    finally:
        subprocess.run([*CLI, "down"], env=_env(home), cwd=ROOT, timeout=120, check=False)
        shutil.rmtree(root, ignore_errors=True)


def _run(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=_env(home), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def config(home: Path, tiny_llama: Path) -> Path:
    """The shipped echo config, plus echo models that fail on a marker, are slow, or cannot start, and the tiny
    Llama on the transformers engine."""
    raw = yaml.safe_load((ROOT / "deployments" / "configs" / "echo.yaml").read_text())
    echo = {"task": "generate", "engine": "echo", "resources": {"num_cpus": 0.5}}
    raw["models"] += [
        {"id": "flaky", **echo, "engine_kwargs": {"fail_marker": "BOOM"}},
        {"id": "slow", **echo, "engine_kwargs": {"token_delay_s": 0.2}},
        {"id": "broken", **echo, "engine_kwargs": {"no_such_option": 1}},
        {
            "id": "tiny",
            "task": "generate",
            "engine": "transformers",
            "source": str(tiny_llama),
            "context_length": 256,
            "max_output_tokens": 16,
            "resources": {"num_cpus": 1},
        },
    ]
    path = home.parent / "data" / "batch.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _chat(custom_id: str, text: str) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": text}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _completion(custom_id: str, text: str) -> dict[str, Any]:
    body = {"prompt": text, "max_tokens": 64}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def _failed(line: dict[str, Any]) -> bool:
    return line["error"] is not None or line["response"]["status_code"] != 200


def _job_id(stdout: str) -> str:
    return next(word.rstrip(":") for word in stdout.split() if word.startswith("batch-"))


def _status(home: Path, job_id: str) -> dict[str, Any]:
    shown = _run(home, "batch", "status", job_id, "--json", timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return dict(json.loads(shown.stdout))


def test_200_lines_5_malformed(home: Path, config: Path) -> None:
    """The issue's done-when: 200 lines, 5 of them bad, end SUCCEEDED with 200 output lines and 5 errors."""
    data = home.parent / "data"
    lines: list[Any] = [
        _chat(f"req-{i}", f"chat {i} {ECHO_WORDS}") if i % 2 else _completion(f"req-{i}", f"text {i}")
        for i in range(200)
    ]
    lines[10] = '{"custom_id": "broken", "method": "POST"'  # not JSON
    lines[50] = {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}  # no custom_id
    lines[90] = {**_completion("req-90", "x"), "method": "GET"}
    lines[130] = {**_completion("req-130", "x"), "url": "/v1/embeddings"}  # this model generates
    lines[170] = _completion("req-170", "x") | {"body": {"prompt": "x", "max_tokens": 0}}  # fails validation
    source = _write(data / "in.jsonl", lines)
    out = data / "out.jsonl"

    submitted = _run(
        home, "batch", "submit", "--config", str(config), "--model", "echo",
        "--input", str(source), "--output", str(out), "--wait", "--timeout", "300",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "SUCCEEDED, 200/200 lines (100%), 5 failed" in submitted.stdout
    job_id = _job_id(submitted.stdout)

    results = [json.loads(text) for text in out.read_text().splitlines()]
    assert len(results) == 200
    assert all(set(r) == {"id", "custom_id", "response", "error"} for r in results)
    assert len({r["id"] for r in results}) == 200
    failed = {r["custom_id"]: r for r in results if _failed(r)}
    assert len([r for r in results if _failed(r)]) == 5
    assert set(failed) == {None, "req-90", "req-130", "req-170"}
    assert sorted(r["error"]["code"] for r in results if r["custom_id"] is None) == [
        "invalid_json",
        "missing_custom_id",
    ]
    assert failed["req-90"]["error"]["code"] == "invalid_method"
    assert failed["req-130"]["error"]["code"] == "invalid_url"
    assert failed["req-170"]["response"]["status_code"] == 400
    answered = {r["custom_id"]: r["response"]["body"] for r in results if not _failed(r)}
    assert set(answered) == {f"req-{i}" for i in range(200)} - {"req-10", "req-50", "req-90", "req-130", "req-170"}
    assert answered["req-1"]["choices"][0]["message"]["content"] == f"chat 1 {ECHO_WORDS}"
    assert answered["req-2"]["choices"][0]["text"] == "text 2"
    assert not Path(str(out) + ".partial").exists()

    status = _status(home, job_id)
    assert status["status"] == "SUCCEEDED" and status["model"] == "echo" and status["output"] == str(out)
    assert status["progress"] == {"done": 200, "total": 200, "failed": 5}
    log = _run(home, "batch", "logs", job_id)
    assert log.returncode == 0 and "[modelfleet-batch] wrote 200 lines (5 failed)" in log.stdout


@pytest.mark.parametrize(
    ("model", "lines", "failures"),
    [
        # The engine raises on the marker after its first token: a 500 for that line alone.
        ("flaky", [_completion(f"f{i}", f"one BOOM {i}" if i % 3 == 0 else f"fine {i}") for i in range(10)], 4),
        (
            "echo-embed",
            [
                {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": f"v {i}"}}
                for i in range(6)
            ]
            + [_chat("wrong-url", "hi")],
            1,
        ),
    ],
)
def test_engine_errors_and_embeddings(
    home: Path, config: Path, model: str, lines: list[dict[str, Any]], failures: int
) -> None:
    data = home.parent / "data"
    source = _write(data / f"{model}.jsonl", lines)
    out = data / f"{model}-out.jsonl"
    submitted = _run(
        home, "batch", "submit", "--config", str(config), "--model", model,
        "--input", str(source), "--output", str(out), "--wait", "--batch-size", "4", "--timeout", "300",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(results) == len(lines)
    assert sum(_failed(r) for r in results.values()) == failures
    if model == "flaky":
        assert {r["response"]["status_code"] for cid, r in results.items() if int(cid[1:]) % 3 == 0} == {500}
    else:
        assert len(results["e0"]["response"]["body"]["data"][0]["embedding"]) == 16
        assert results["wrong-url"]["error"]["code"] == "invalid_url"


def test_status_logs_and_cancel(home: Path, config: Path) -> None:
    data = home.parent / "data"
    # The slow model takes 0.2 s a word: 10 words a line, 2 lines a batch, 60 lines: about a minute in all.
    source = _write(data / "slow.jsonl", [_chat(f"s{i}", ECHO_WORDS) for i in range(60)])
    out = data / "slow-out.jsonl"
    submitted = _run(
        home, "batch", "submit", "--config", str(config), "--model", "slow",
        "--input", str(source), "--output", str(out), "--batch-size", "2",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = _job_id(submitted.stdout)
    assert f"modelfleet batch status {job_id}" in submitted.stdout

    def some_done() -> bool:
        status = _status(home, job_id)
        assert status["status"] in ("PENDING", "RUNNING"), status
        return bool(status["progress"] and status["progress"]["done"] >= 2)

    wait_for(some_done, timeout=180, message=f"batch job {job_id} reported no answered lines")
    shown = _run(home, "batch", "status", job_id)
    assert shown.returncode == 0 and f"job {job_id} RUNNING, " in shown.stdout and "/60 lines" in shown.stdout
    assert f"model slow: {source} -> {out}" in shown.stdout
    log = _run(home, "batch", "logs", job_id)
    assert log.returncode == 0 and "[modelfleet-batch] progress 0/60 lines (0 failed)" in log.stdout

    cancelled = _run(home, "batch", "cancel", job_id, timeout=180)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert f"job {job_id} STOPPED" in cancelled.stdout
    assert _status(home, job_id)["status"] == "STOPPED"
    # Only a finished job writes the output; what was answered before the stop is in the partial file.
    assert not out.exists()
    partial = [json.loads(text) for text in Path(str(out) + ".partial").read_text().splitlines()]
    assert 2 <= len(partial) < 60 and all(not _failed(r) for r in partial)

    unknown = _run(home, "batch", "status", "batch-000000000000")
    assert unknown.returncode == 1 and "batch-000000000000" in unknown.stderr


def test_a_real_engine(home: Path, config: Path) -> None:
    """The tiny Llama on transformers: answers are checked for shape only (random weights)."""
    data = home.parent / "data"
    lines: list[Any] = [_chat(f"c{i}", f"hello {i}") for i in range(4)]
    lines += [
        _completion(f"t{i}", f"once upon a time {i}") | {"body": {"prompt": "once", "max_tokens": 8}} for i in range(4)
    ]
    lines.append(_completion("too-long", "x") | {"body": {"prompt": "x", "max_tokens": 17}})  # above the model's 16
    source = _write(data / "tiny.jsonl", lines)
    out = data / "tiny-out.jsonl"
    submitted = _run(
        home, "batch", "submit", "--config", str(config), "--model", "tiny",
        "--input", str(source), "--output", str(out), "--wait", "--batch-size", "4", "--timeout", "600",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(results) == 9
    assert results["too-long"]["response"]["status_code"] == 400
    assert results["too-long"]["response"]["body"]["error"]["param"] == "max_tokens"
    for custom_id in [f"c{i}" for i in range(4)] + [f"t{i}" for i in range(4)]:
        body = results[custom_id]["response"]["body"]
        assert results[custom_id]["response"]["status_code"] == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        assert isinstance(choice["message"]["content"] if custom_id[0] == "c" else choice["text"], str)
        assert 1 <= body["usage"]["completion_tokens"] <= (8 if custom_id[0] == "t" else 16)


def test_an_engine_that_cannot_start_fails_the_job(home: Path, config: Path) -> None:
    data = home.parent / "data"
    source = _write(data / "broken.jsonl", [_chat("x", "hi")])
    out = data / "broken-out.jsonl"
    submitted = _run(
        home, "batch", "submit", "--config", str(config), "--model", "broken",
        "--input", str(source), "--output", str(out), "--wait", "--timeout", "300",
    )  # fmt: skip
    assert submitted.returncode == 1, submitted.stdout + submitted.stderr
    assert " FAILED" in submitted.stdout and "modelfleet batch logs" in submitted.stdout
    log = _run(home, "batch", "logs", _job_id(submitted.stdout))
    assert "unknown engine_kwargs ['no_such_option']" in log.stdout
    assert not out.exists()
