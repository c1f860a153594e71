"""The HTTP load client and the bench command end to end, against a tiny OpenAI-shaped SSE server (no Ray, no
vLLM); and the in-process baseline on the echo engine."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cluster.bench.cli import main
from cluster.bench.client import check_loopback, request_body, run_load
from cluster.bench.load import LoadPlan
from cluster.bench.systems.in_process import run_in_process
from cluster.local import free_port
from models.spec import ModelSpec

ECHO_CONFIG = Path(__file__).resolve().parents[3] / "deployments" / "configs" / "echo.yaml"

CHUNKS = 5
CHUNK_DELAY_S = 0.005


def _chunk(chat: bool, text: str) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
    return {"object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _app() -> Starlette:
    """OpenAI-shaped streaming endpoints whose behaviour the `model` field picks:
    ok (5 chunks + usage of max_tokens), flaky (every other request is a 500), slow (1 s per chunk), nousage,
    midfail, short (usage one below max_tokens), strict (a 400 without ignore_eos)."""
    counter = itertools.count()

    async def handle(request: Request) -> Response:
        body = await request.json()
        chat = request.url.path.endswith("/chat/completions")
        model = body["model"]
        if model == "flaky" and next(counter) % 2:
            return JSONResponse({"error": {"message": "boom", "type": "internal_error"}}, status_code=500)
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body.get("ignore_eos") in (True, None) and ("messages" in body) == chat
        if model == "strict" and "ignore_eos" not in body:
            return JSONResponse({"error": {"message": "needs ignore_eos", "type": "invalid_request"}}, status_code=400)
        tokens = body["max_tokens"] - (model == "short")  # as a server that honours ignore_eos, or stops early

        async def stream() -> AsyncIterator[bytes]:
            if chat:
                yield _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i in range(CHUNKS):
                await asyncio.sleep(1.0 if model == "slow" else CHUNK_DELAY_S)
                if model == "midfail" and i == 2:
                    yield _event({"error": {"message": "engine died", "type": "internal_error", "code": 500}})
                    break
                yield _event(_chunk(chat, f"tok{i} "))
            if model != "nousage":
                yield _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": tokens}})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def embed(request: Request) -> Response:
        body = await request.json()
        if body["model"] == "flaky" and next(counter) % 2:
            return JSONResponse({"error": {"message": "boom", "type": "internal_error"}}, status_code=503)
        await asyncio.sleep(CHUNK_DELAY_S)
        vectors = [] if body["model"] == "empty" else [[0.5, 0.5] for _ in body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": body["model"]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", handle, methods=["POST"]),
            Route("/v1/completions", handle, methods=["POST"]),
            Route("/v1/embeddings", embed, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        _app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="none", timeout_graceful_shutdown=1
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "the test server did not start in 10 s"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def _load(server: str, model: str, **kwargs: Any) -> dict[str, Any]:
    result = asyncio.run(run_load(server, model, progress=False, **kwargs))
    assert len(result.samples) == result.summary["requests"]
    return result.summary


# -- loopback guard ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://localhost:8000/v1", "http://[::1]:9/", "http://127.0.0.2:80"]
)
def test_loopback_targets_pass(url: str) -> None:
    check_loopback(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8000",
        "https://api.openai.com/v1",
        "http://192.168.1.5",
        "http://[2001:db8::1]:80",
        "http://localhost.example.com",
    ],
)
def test_other_targets_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="only loopback"):
        check_loopback(url)
    with pytest.raises(ValueError, match="only loopback"):
        asyncio.run(run_load(url, "m", num_requests=1, progress=False))


def test_cli_refuses_remote_url(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--url", "http://10.1.2.3:8000", "--model", "m"])
    assert exit_info.value.code == 2 and "only loopback" in capsys.readouterr().err


# -- run_load against a real (tiny) server ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["chat", "completions"])
def test_closed_loop_counts_tokens_and_latency(server: str, mode: str) -> None:
    s = _load(server, "ok", mode=mode, concurrency=3, num_requests=7, warmup=2)
    assert s["requests"] == 7 and s["completed"] == 7 and s["errors"] == {}
    assert s["output_tokens"] == 7 * 64  # from the usage chunk (max_tokens: the default 64)
    assert 0 < s["ttft_s"]["p50"] <= s["e2e_s"]["p50"]
    assert s["tpot_s"]["p50"] > 0 and s["output_tokens_per_s"] > 0 and s["requests_per_s"] > 0


def test_embeddings_are_measured_per_request(server: str) -> None:
    s = _load(server, "ok", mode="embeddings", concurrency=4, num_requests=9, warmup=1)
    assert s["requests"] == 9 and s["completed"] == 9 and s["errors"] == {}
    assert s["requests_per_s"] > 0 and s["e2e_s"]["p50"] >= CHUNK_DELAY_S
    assert s["ttft_s"] is None and s["output_tokens"] == 0
    s = _load(server, "flaky", mode="embeddings", concurrency=1, num_requests=4)
    assert s["completed"] == 2 and s["errors"] == {"503": 2}
    s = _load(server, "empty", mode="embeddings", concurrency=1, num_requests=2)
    assert s["completed"] == 0 and s["errors"] == {"bad_response": 2}


def test_without_usage_chunks_are_counted(server: str) -> None:
    s = _load(server, "nousage", concurrency=2, num_requests=4)
    assert s["completed"] == 4 and s["mean_output_tokens"] == CHUNKS


def test_errors_are_counted_by_status(server: str) -> None:
    s = _load(server, "flaky", concurrency=1, num_requests=6)
    assert s["requests"] == 6 and s["completed"] == 3 and s["errors"] == {"500": 3}
    s = _load(server, "midfail", concurrency=2, num_requests=2)
    assert s["completed"] == 0 and s["errors"] == {"stream:internal_error": 2}


def test_duration_bounds_the_run(server: str) -> None:
    s = _load(server, "slow", concurrency=2, duration_s=0.3, request_timeout_s=1.5)
    # Two requests start at once; each is cut off at 1.5 s (its stream would take 5 s), and by then the
    # 0.3 s for sending are over: no third request.
    assert s["requests"] == 2 and s["completed"] == 0 and s["errors"] == {"timeout": 2}


def test_open_loop_sends_every_request(server: str) -> None:
    s = _load(server, "ok", rate=40.0, num_requests=10, seed=3)
    assert s["requests"] == 10 and s["completed"] == 10


def test_bad_bounds_are_refused(server: str) -> None:
    with pytest.raises(ValueError, match="bound the run"):
        asyncio.run(run_load(server, "ok", progress=False))
    with pytest.raises(ValueError, match="not both"):
        asyncio.run(run_load(server, "ok", concurrency=2, rate=1.0, num_requests=1, progress=False))


def test_main_measures_a_running_server(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["--url", server, "--model", "ok", "--concurrency", "1,2", "--num-requests", "4", "--max-tokens", "8"]
    assert main([*argv, "--no-progress", "--log-dir", str(tmp_path), "--out-json", str(out)]) == 0
    results = json.loads(out.read_text())
    (system,) = results["systems"]
    assert system["name"] == "modelfleet" and set(system["levels"]) == {"c=1", "c=2"}
    assert system["levels"]["c=2"]["summary"]["completed"] == 4
    assert results["command"].startswith("python -m cluster.bench --url") and results["plan"]["max_tokens"] == 8
    assert "| c=2 output tok/s |" in capsys.readouterr().out


def test_main_runs_per_level_counts_and_restores_its_cores(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    before = os.sched_getaffinity(0)
    argv = ["--url", server, "--model", "ok", "--mode", "embeddings", "--concurrency", "1,3", "--num-requests", "2,6"]
    assert main([*argv, "--no-progress", "--log-dir", str(tmp_path), "--out-json", str(out)]) == 0
    results = json.loads(out.read_text())
    levels = results["systems"][0]["levels"]
    assert [levels[label]["summary"]["completed"] for label in ("c=1", "c=3")] == [2, 6]
    assert "| c=3 embeddings/s |" in capsys.readouterr().out
    # The default split (auto) pinned the load generator while it ran, and only then.
    assert os.sched_getaffinity(0) == before
    assert (results["cpus"] is not None) == (len(before) >= 2)
    with pytest.raises(SystemExit):
        main([*argv[:-1], "1,2,3", "--no-progress", "--log-dir", str(tmp_path)])
    assert "one per level" in capsys.readouterr().err


# -- ignore_eos: sent to every system, and checked --------------------------------------------------------


def test_ignore_eos_is_a_request_field() -> None:
    body = request_body("m", "chat", "hi", max_tokens=4, ignore_eos=True, temperature=0.0)
    assert body["ignore_eos"] is True and body["messages"] == [{"role": "user", "content": "hi"}]
    body = request_body("m", "completions", "hi", max_tokens=4, ignore_eos=False, temperature=0.0)
    assert "ignore_eos" not in body and body["prompt"] == "hi"
    assert request_body("m", "embeddings", "hi", max_tokens=4, ignore_eos=True, temperature=0.0) == {
        "model": "m",
        "input": ["hi"],
    }


def test_ignore_eos_reaches_the_server(server: str) -> None:
    assert _load(server, "strict", concurrency=1, num_requests=2)["completed"] == 2
    assert _load(server, "strict", concurrency=1, num_requests=2, ignore_eos=False)["errors"] == {"400": 2}


def test_main_fails_when_a_request_returns_other_than_max_tokens(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["--url", server, "--model", "short", "--num-requests", "3", "--max-tokens", "8", "--no-progress"]
    assert main([*argv, "--log-dir", str(tmp_path), "--out-json", str(out)]) == 1
    assert "modelfleet c=1: 3 x 7 tokens instead of 8" in capsys.readouterr().err
    results = json.loads(out.read_text())  # written all the same, with the mismatch recorded
    assert results["token_check"] == ["modelfleet c=1: 3 x 7 tokens instead of 8"] and results["plan"]["ignore_eos"]
    # Without ignore_eos a request may stop early: nothing to check.
    assert main([*argv, "--no-ignore-eos", "--log-dir", str(tmp_path), "--out-json", str(out)]) == 0
    assert json.loads(out.read_text())["token_check"] == []


def test_in_process_baseline_hands_ignore_eos_to_the_engine(tmp_path: Path) -> None:
    # The echo engine refuses ignore_eos by name (400), so the refusal proves the option reached its
    # SamplingConfig; without it, every request completes.
    spec = ModelSpec(id="echo", task="generate", engine="echo")
    plan = LoadPlan(num_requests=2, warmup=0, max_tokens=3, prompts=("a b c d e",))
    kwargs = {"ready_timeout_s": 120.0, "log_dir": tmp_path, "progress": False}
    refused = run_in_process(spec, plan, **kwargs).levels["c=1"]["summary"]
    assert refused["completed"] == 0 and refused["errors"] == {"400": 2}
    done = run_in_process(spec, replace(plan, ignore_eos=False), **kwargs).levels["c=1"]["summary"]
    assert done["completed"] == 2 and done["output_tokens"] == 6


def test_echo_with_ignore_eos_is_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--start-modelfleet", str(ECHO_CONFIG), "--model", "echo", "--num-requests", "1", "--no-progress"]
    assert main([*argv, "--log-dir", str(tmp_path)]) == 1
    assert "the echo engine refuses ignore_eos (model 'echo'): run with --no-ignore-eos" in capsys.readouterr().err
