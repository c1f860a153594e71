"""The load generator and the comparison report, against a tiny OpenAI-shaped SSE server (no Ray, no vLLM)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cluster import bench_baselines, bench_report
from cluster.bench import (
    LoadPlan,
    Mode,
    Sample,
    StreamReader,
    arrival_times,
    check_loopback,
    main,
    percentile,
    run_load,
    sse_data,
    summarize,
)
from cluster.local import free_port
from models.spec import ModelSpec

# Recorded from vLLM 0.32's OpenAI server (SmolLM2, max_tokens 4, include_usage); one comment line added.
RECORDED_CHAT = r"""data: {"id":"chatcmpl-be48d8018a715bd5","object":"chat.completion.chunk","created":1795415166,"model":"smollm2","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}

data: {"id":"chatcmpl-be48d8018a715bd5","object":"chat.completion.chunk","created":1795415166,"model":"smollm2","choices":[{"index":0,"delta":{"content":"The"},"logprobs":null,"finish_reason":null,"token_ids":null}]}

: keep-alive comment

data: {"id":"chatcmpl-be48d8018a715bd5","object":"chat.completion.chunk","created":1795415166,"model":"smollm2","choices":[{"index":0,"delta":{"content":" capital"},"logprobs":null,"finish_reason":null,"token_ids":null}]}

data: {"id":"chatcmpl-be48d8018a715bd5","object":"chat.completion.chunk","created":1795415166,"model":"smollm2","choices":[{"index":0,"delta":{"content":" of"},"logprobs":null,"finish_reason":null,"token_ids":null}]}

data: {"id":"chatcmpl-be48d8018a715bd5","object":"chat.completion.chunk","created":1795415166,"model":"smollm2","choices":[{"index":0,"delta":{"content":" France"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}

data: {"id":"chatcmpl-be48d8018a715bd5","object":"chat.completion.chunk","created":1795415166,"model":"smollm2","choices":[],"usage":{"prompt_tokens":37,"total_tokens":41,"completion_tokens":4},"system_fingerprint":"vllm-0.32.0-1f07c554"}

data: [DONE]

"""  # noqa: E501

RECORDED_COMPLETION = r"""data: {"id":"cmpl-93660bb028140aae","object":"text_completion","created":1795415167,"model":"smollm2","choices":[{"index":0,"text":" Paris","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}

data: {"id":"cmpl-93660bb028140aae","object":"text_completion","created":1795415167,"model":"smollm2","choices":[{"index":0,"text":".","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}

data: {"id":"cmpl-93660bb028140aae","object":"text_completion","created":1795415167,"model":"smollm2","choices":[{"index":0,"text":"\n","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}

data: {"id":"cmpl-93660bb028140aae","object":"text_completion","created":1795415167,"model":"smollm2","choices":[{"index":0,"text":"\n","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}

data: {"id":"cmpl-93660bb028140aae","object":"text_completion","created":1795415167,"model":"smollm2","choices":[],"usage":{"prompt_tokens":5,"total_tokens":9,"completion_tokens":4},"system_fingerprint":"vllm-0.32.0-1f07c554"}

data: [DONE]

"""  # noqa: E501

CHUNKS = 5
CHUNK_DELAY_S = 0.005


def _chunk(chat: bool, text: str) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
    return {"object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _app() -> Starlette:
    """OpenAI-shaped streaming endpoints whose behaviour the `model` field picks:
    ok (5 chunks + usage), flaky (every other request is a 500), slow (1 s per chunk), nousage, midfail."""
    counter = itertools.count()

    async def handle(request: Request) -> Response:
        body = await request.json()
        chat = request.url.path.endswith("/chat/completions")
        model = body["model"]
        if model == "flaky" and next(counter) % 2:
            return JSONResponse({"error": {"message": "boom", "type": "internal_error"}}, status_code=500)
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and ("messages" in body) == chat

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
                yield _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2 * CHUNKS}})
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


# -- statistics -------------------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 2.0, 3.0], 0) == 1.0 and percentile([4.0, 1.0, 2.0, 3.0], 100) == 4.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_synthetic_samples() -> None:
    samples = [Sample(start=float(i), e2e=2.0, ttft=0.5, output_tokens=11) for i in range(4)]
    samples.append(Sample(start=1.0, e2e=0.1, error="500"))
    samples.append(Sample(start=2.0, e2e=7.0, error="timeout"))
    s = summarize(samples)
    assert s["requests"] == 6 and s["completed"] == 4
    assert s["errors"] == {"500": 1, "timeout": 1}
    assert s["wall_s"] == pytest.approx(9.0)  # first send at 0, last end at 2 + 7
    assert s["requests_per_s"] == pytest.approx(4 / 9)
    assert s["output_tokens"] == 44 and s["output_tokens_per_s"] == pytest.approx(44 / 9)
    assert s["mean_output_tokens"] == 11
    assert s["ttft_s"]["p50"] == 0.5 and s["e2e_s"]["p99"] == 2.0
    assert s["tpot_s"]["p50"] == pytest.approx((2.0 - 0.5) / 10)


def test_summarize_edge_cases() -> None:
    assert summarize([])["requests_per_s"] == 0.0
    only_errors = summarize([Sample(start=0.0, e2e=1.0, error="503")])
    assert only_errors["ttft_s"] is None and only_errors["errors"] == {"503": 1}
    assert Sample(start=0, e2e=1.0, ttft=0.2, output_tokens=1).tpot is None


def test_poisson_arrivals_are_seeded() -> None:
    first, again, other = arrival_times(4.0, 7), arrival_times(4.0, 7), arrival_times(4.0, 8)
    a = [first() for _ in range(2000)]
    assert a == [again() for _ in range(2000)] and a != [other() for _ in range(2000)]
    assert all(x < y for x, y in itertools.pairwise(a))
    assert a[-1] / len(a) == pytest.approx(1 / 4.0, rel=0.1)  # mean gap is 1/rate


# -- SSE ----------------------------------------------------------------------------------------------------


def _read(text: str, mode: Mode) -> StreamReader:
    reader = StreamReader(mode)
    for n, line in enumerate(text.splitlines()):
        data = sse_data(line)
        if data is not None:
            reader.feed(data, elapsed=float(n))
    return reader


def test_recorded_streams_are_read() -> None:
    chat = _read(RECORDED_CHAT, "chat")
    assert chat.done and chat.error is None
    assert chat.ttft == 2.0  # line 2: the role chunk's empty content is not the first token
    assert chat.chunks == 4 and chat.output_tokens == 4
    completion = _read(RECORDED_COMPLETION, "completions")
    assert completion.done and completion.ttft == 0.0 and completion.chunks == 4 and completion.output_tokens == 4
    no_usage = _read(RECORDED_CHAT.replace('"completion_tokens":4', '"completion_tokens":9'), "chat")
    assert no_usage.output_tokens == 9  # the usage chunk wins over counting content chunks


def test_stream_reader_without_usage_and_with_errors() -> None:
    reader = StreamReader("completions")
    reader.feed(json.dumps({"choices": [{"index": 0, "text": "a"}]}), 0.1)
    reader.feed(json.dumps({"choices": [{"index": 0, "text": ""}]}), 0.2)
    reader.feed(json.dumps({"choices": [{"index": 0, "text": "b"}]}), 0.3)
    assert reader.ttft == 0.1 and reader.output_tokens == 2
    reader.feed(json.dumps({"error": {"message": "x", "type": "internal_error"}}), 0.4)
    assert reader.error == "stream:internal_error"
    assert sse_data("event: ping") is None and sse_data("data:[DONE]") == "[DONE]"
    with pytest.raises(ValueError):
        StreamReader("chat").feed("not json", 0.0)


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
    assert s["output_tokens"] == 7 * 2 * CHUNKS  # from the usage chunk
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


def test_plan_round_trips_for_the_in_process_child() -> None:
    from dataclasses import asdict

    plan = LoadPlan(levels=(("concurrency", 1.0), ("rate", 2.5)), prompts=("a", "b"), max_tokens=8)
    again = LoadPlan.from_dict(json.loads(json.dumps(asdict(plan))))
    assert again == plan
    assert plan.load_kwargs(("concurrency", 4.0))["concurrency"] == 4
    assert plan.load_kwargs(("rate", 2.5))["rate"] == 2.5
    per_level = LoadPlan(levels=(("concurrency", 1.0), ("concurrency", 32.0)), level_requests=(16, 96))
    assert LoadPlan.from_dict(json.loads(json.dumps(asdict(per_level)))) == per_level
    assert [per_level.load_kwargs(level)["num_requests"] for level in per_level.levels] == [16, 96]


# -- baselines: the vLLM server command line, and the report ------------------------------------------------


def test_vllm_server_command_mirrors_the_engine(tmp_path: Path) -> None:
    spec = ModelSpec(
        id="smollm2",
        task="generate",
        engine="vllm",
        source="x",
        context_length=2048,
        engine_kwargs={
            "max_num_seqs": 8,
            "enable_prefix_caching": False,
            "cpu_kvcache_space_gb": 2,
            "cpu_omp_threads_bind": "0",
        },
    )
    cmd, env = bench_baselines.vllm_server_command(spec, tmp_path, 1234)
    text = " ".join(cmd)
    assert "-m vllm.entrypoints.openai.api_server" in text and f"--model {tmp_path}" in text
    for part in (
        "--served-model-name smollm2",
        "--host 127.0.0.1",
        "--port 1234",
        "--dtype float32",
        "--max-model-len 2048",
        "--enforce-eager",
        f"--kv-cache-memory-bytes {2 << 30}",
        "--max-num-seqs 8",
        "--no-enable-prefix-caching",
        "--generation-config vllm",
    ):
        assert part in text
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "0"}
    # Another engine's kwargs mean nothing to vLLM; the KV cache still gets the engine's 1 GiB default.
    other = ModelSpec(id="m", task="generate", engine="transformers", source="x", engine_kwargs={"num_threads": 1})
    cmd, env = bench_baselines.vllm_server_command(other, tmp_path, 1)
    assert "--num-threads" not in cmd and f"--kv-cache-memory-bytes {1 << 30}" in " ".join(cmd) and env == {}
    # The plan's engine cores become vLLM's thread binding, as in a replica.
    assert bench_baselines.vllm_server_command(other, tmp_path, 1, engine_cpus="0")[1] == {
        "VLLM_CPU_OMP_THREADS_BIND": "0"
    }


def test_vllm_server_command_passes_every_engine_argument_of_the_plan(tmp_path: Path) -> None:
    from deployments.plan import plan_engine

    spec = ModelSpec(id="m", task="generate", engine="vllm", source="x", engine_kwargs={"seed": 3})
    cmd, _ = bench_baselines.vllm_server_command(spec, tmp_path, 1)
    for key, value in plan_engine(spec).kwargs.items():
        if key in ("model", "tokenizer"):
            continue
        flag = "--" + key.replace("_", "-")
        assert (flag in cmd) if value is not False else ("--no-" + key.replace("_", "-") in cmd), key


def _system(name: str, tok_s: float, ttft: float, ready: float | None) -> dict[str, Any]:
    summary = summarize([Sample(start=0.0, e2e=1.0, ttft=ttft, output_tokens=int(tok_s))])
    return {
        "name": name,
        "time_to_ready_s": ready,
        "idle_memory": {"rss_gib": 2.0, "pss_gib": 1.5, "processes": 3},
        "levels": {"c=1": {"label": "c=1", "summary": summary, "samples": []}},
        "info": {},
    }


def _results() -> dict[str, Any]:
    systems = [_system("vllm-server", 100.0, 0.2, 40.0), _system("modelfleet", 80.0, 0.3, 20.0)]
    machine = {
        "cores": 2,
        "cpu": "cpu",
        "memory_gib": 24,
        "python": "3.11",
        "os": "linux",
        "packages": {},
        "date": "2030-01-01 00:00 UTC",
    }
    plan = {
        "mode": "chat",
        "max_tokens": 64,
        "temperature": 0.0,
        "ignore_eos": True,
        "num_requests": 1,
        "duration_s": 60.0,
        "warmup": 2,
    }
    return {"model": "m", "spec": None, "systems": systems, "machine": machine, "plan": plan, "command": "python -m x"}


def test_table_has_ratios() -> None:
    table = bench_report.markdown_table(_results()["systems"])
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "modelfleet / vllm-server" in table
    assert "| 100.0 | 80.0 | 0.80x |" in lines["c=1 output tok/s"]
    assert "| 0.200 | 0.300 | 1.50x |" in lines["c=1 TTFT p50 (s)"]
    assert "| 40.0 | 20.0 | 0.50x |" in lines["time to first real answer (s)"]
    assert "1 / 0" in lines["c=1 completed / errors"]


def test_embeddings_table_reports_embeddings_per_second() -> None:
    table = bench_report.markdown_table(_results()["systems"], "embeddings")
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "c=1 embeddings/s" in lines and "c=1 e2e p99 (ms)" in lines
    assert "c=1 output tok/s" not in lines and "c=1 TTFT p50 (s)" not in lines


def test_markdown_section_is_replaced_in_place(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    bench_report.write_markdown_section(doc, "Overhead", _results())
    bench_report.write_markdown_section(doc, "Overhead", _results())
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.count("## Overhead") == 1
    assert "`python -m x`" in text and "modelfleet / vllm-server" in text


def test_png_is_written(tmp_path: Path) -> None:
    out = tmp_path / "bench.png"
    bench_report.write_png(_results(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
