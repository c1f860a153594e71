"""Side-by-side measurement: one engine called in-process vs. the same engine behind the HTTP API.

    python -m cluster.overhead [--requests N] [--concurrency C] [--out docs/benchmarks.md]

Measures, in one run on one machine: latency at concurrency 1 and requests/s at concurrency C for a
short completion (max_tokens=1) on the echo engine (pure serving cost) and on SmolLM2 (a real model).
Also the cold start of the whole cluster to its first real answer and the cluster's idle memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from deployments.config import ServingConfig

__all__ = ["main"]

PROMPT = "The quick brown fox jumps over the lazy dog. Tell me a story."


def _models() -> list[dict[str, Any]]:
    return [
        {"id": "echo", "task": "generate", "engine": "echo", "resources": {"num_cpus": 1}},
        {
            "id": "smollm2",
            "task": "generate",
            "engine": "transformers",
            "source": "smollm2-135m-instruct",
            "dtype": "float32",
            "context_length": 2048,
            "resources": {"num_cpus": 1},
            "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
            "engine_kwargs": {"num_threads": 1},
        },
    ]


async def _measure(call: Callable[[], Awaitable[None]], n: int, concurrency: int) -> dict[str, float]:
    for _ in range(3):  # warm-up
        await call()
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - t0)
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n * 2)))
    elapsed = time.perf_counter() - t0
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
        "rps": n * 2 / elapsed,
    }


async def _in_process(spec_raw: dict[str, Any], n: int, concurrency: int) -> dict[str, float]:
    from deployments.engines import resolve
    from deployments.engines.protocol import GenerateRequest, SamplingConfig
    from models.spec import ModelSpec

    spec = ModelSpec.model_validate(spec_raw)
    engine = resolve(spec.engine)(spec)
    await engine.start()
    request = GenerateRequest(request_id="b", prompt=PROMPT, sampling=SamplingConfig(max_tokens=1, temperature=0))

    async def call() -> None:
        async for _ in engine.generate(request):
            pass

    try:
        return await _measure(call, n, concurrency)
    finally:
        await engine.shutdown()


async def _over_http(base: str, model: str, n: int, concurrency: int) -> dict[str, float]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def call() -> None:
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()

        return await _measure(call, n, concurrency)


def _cluster_memory() -> dict[str, float]:
    """RSS and PSS (GiB) of every process the local cluster started (children of this driver)."""
    import psutil

    rss = pss = 0.0
    count = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        count += 1
    return {"rss_gib": rss / 2**30, "pss_gib": pss / 2**30, "processes": count}


def run(n: int, concurrency: int) -> dict[str, Any]:
    """Start a local cluster, measure both paths for each model, and return the numbers."""
    import ray
    from ray import serve

    from cluster.local import free_port
    from deployments.app import build_app
    from models.registry import resolve_source

    resolve_source("smollm2-135m-instruct", progress=True)
    results: dict[str, Any] = {"models": {}}
    for raw in _models():
        results["models"][raw["id"]] = {"in_process": asyncio.run(_in_process(raw, n, concurrency))}

    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="mf-bench-", dir="/tmp")
    t0 = time.perf_counter()
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=temp_dir, _node_ip_address="127.0.0.1", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServingConfig.model_validate({"models": _models(), "router": {"port": port}})
    serve.run(build_app(config), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    answer = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300).json()
    results["cold_start_s"] = time.perf_counter() - t0
    results["first_answer"] = answer["choices"][0]["message"]["content"]
    time.sleep(5)
    results["idle_memory"] = _cluster_memory()
    try:
        for raw in _models():
            results["models"][raw["id"]]["http"] = asyncio.run(_over_http(base, raw["id"], n, concurrency))
    finally:
        serve.shutdown()
        ray.shutdown()
    results.update(n=n, concurrency=concurrency)
    return results


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "## Serving overhead: in-process engine vs. the HTTP API (issue 2)",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- command: `python -m cluster.overhead --requests {results['n']} --concurrency {results['concurrency']}`",
        "- request: a completion with max_tokens=1 (prompt of 13 words), so the serving path dominates",
        "",
        "| model | path | p50 latency c=1 (ms) | req/s at c={c} | overhead per request c=1 (ms) | req/s ratio |".format(
            c=results["concurrency"]
        ),
        "|---|---|---|---|---|---|",
    ]
    for model, paths in results["models"].items():
        inp, http = paths["in_process"], paths["http"]
        lines.append(f"| {model} | engine in-process | {inp['p50_ms']:.1f} | {inp['rps']:.1f} | | |")
        lines.append(
            f"| {model} | HTTP API (Serve) | {http['p50_ms']:.1f} | {http['rps']:.1f} | "
            f"{http['p50_ms'] - inp['p50_ms']:.1f} | {http['rps'] / inp['rps']:.2f}x |"
        )
    mem = results["idle_memory"]
    lines += [
        "",
        f"- cold start, `ray.init` to the first real SmolLM2 answer (echo + SmolLM2 app): "
        f"{results['cold_start_s']:.1f} s (answer: {results['first_answer']!r})",
        f"- idle memory of the cluster after that: RSS {mem['rss_gib']:.2f} GiB, PSS {mem['pss_gib']:.2f} GiB, "
        f"{mem['processes']} processes",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run the measurement, print JSON, and write the markdown section."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args()
    results = run(args.requests, args.concurrency)
    print(json.dumps(results, indent=2))
    text = _markdown(results)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
