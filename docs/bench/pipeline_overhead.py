"""The router's added latency per pipeline step: each pipeline kind against calling its step's model directly.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python docs/bench/pipeline_overhead.py [--requests 300] [--only unary|stream]`.
It starts its own local Ray cluster (loopback, free port, its own temp folder), serves echo models and one pipeline
of each kind, and sends sequential (concurrency 1) requests, interleaved round-robin so that every row sees the same
noise. Prints two markdown tables: non-streamed requests (p50/p99 of the direct call and of the pipeline, and their
difference per step), and streamed chat (time to the first content token and to the end of the stream, both ways).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from typing import Any

import httpx

DOC = "docs/rag"
CASES: list[tuple[str, str, str, int]] = [
    # (row, the pipeline, the direct model it is compared with, steps the pipeline runs)
    ("split", "p-split", "gen-a", 1),
    ("switch", "p-switch", "gen-a", 1),
    ("fallback (primary answers)", "p-fallback", "gen-a", 1),
    ("sequence (retrieve + answer)", "p-sequence", "embed+gen", 2),
    ("ensemble of 2 embedding models", "p-ensemble", "emb-a", 2),
]
# Streamed chat: the generation pipelines (an ensemble does not stream).
STREAM_CASES = [case for case in CASES if case[1] != "p-ensemble"]
# Streamed answers: the echo model repeats the prompt's words, one token per word. The question has 20 words and a
# sequence's filled prompt more, so every answer (direct or not) is cut at the same STREAM_TOKENS tokens.
STREAM_TEXT = (
    "request {i} of the streamed overhead run with nineteen words in its prompt so the answers have all of them"
)
STREAM_TOKENS = 16


def _config(port: int) -> dict[str, Any]:
    echo = {"engine": "echo", "resources": {"num_cpus": 0.25}}
    return {
        "name": "overhead",
        "route_prefix": "/",
        "router": {"port": port},
        "models": [
            {"id": "gen-a", "task": "generate", **echo},
            {"id": "gen-b", "task": "generate", **echo},
            {"id": "emb-a", "task": "embed", **echo},
            {"id": "emb-b", "task": "embed", **echo},
        ],
        "pipelines": [
            {
                "id": "p-split",
                "kind": "split",
                "targets": [{"model": "gen-a", "weight": 1}, {"model": "gen-b", "weight": 1}],
            },
            {"id": "p-switch", "kind": "switch", "rules": [{"regex": "zzz", "model": "gen-b"}], "default": "gen-a"},
            {"id": "p-fallback", "kind": "fallback", "targets": [{"model": "gen-a"}, {"model": "gen-b"}]},
            {
                "id": "p-sequence",
                "kind": "sequence",
                "retrieve": {"model": "emb-a", "documents": DOC, "top_k": 1},
                "template": "{passages} {question}",
                "model": "gen-a",
            },
            {
                "id": "p-ensemble",
                "kind": "ensemble",
                "targets": [{"model": "emb-a"}, {"model": "emb-b"}],
                "merge": "average",
            },
        ],
    }


def _send(http: httpx.Client, model: str, text: str) -> float:
    started = time.perf_counter()
    if model == "embed+gen":  # what a sequence does, as two direct calls by a client
        _ok(http.post("/v1/embeddings", json={"model": "emb-a", "input": text}))
        _ok(http.post("/v1/chat/completions", json=_chat("gen-a", text)))
    elif model.startswith("emb") or model == "p-ensemble":
        _ok(http.post("/v1/embeddings", json={"model": model, "input": text}))
    else:
        _ok(http.post("/v1/chat/completions", json=_chat(model, text)))
    return (time.perf_counter() - started) * 1000


def _chat(model: str, text: str, max_tokens: int = 4) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}


def _stream(http: httpx.Client, model: str, text: str) -> tuple[float, float]:
    """(time to the first content token, time to the end of the stream), in ms, of one streamed chat."""
    started = time.perf_counter()
    if model == "embed+gen":  # the sequence by hand: embed, then the streamed chat
        _ok(http.post("/v1/embeddings", json={"model": "emb-a", "input": text}))
        model = "gen-a"
    first = 0.0
    body = {**_chat(model, text, STREAM_TOKENS), "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{response.status_code}: {response.read().decode()}")
        for line in response.iter_lines():
            if not first and line.startswith("data: {") and _content(json.loads(line[len("data: ") :])):
                first = time.perf_counter()
    if not first:
        raise SystemExit(f"{model}: the stream carried no content")
    return (first - started) * 1000, (time.perf_counter() - started) * 1000


def _content(event: dict[str, Any]) -> bool:
    return any((choice.get("delta") or {}).get("content") for choice in event.get("choices") or ())


def _ok(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise SystemExit(f"{response.status_code}: {response.text}")


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300, help="requests per row and system")
    parser.add_argument("--only", choices=("unary", "stream"), help="run one of the two tables only")
    args = parser.parse_args()
    import ray
    from ray import serve

    from cluster.local import free_port
    from deployments.app import build_app
    from deployments.config import ServingConfig

    temp_dir = tempfile.mkdtemp(prefix="mf-overhead-")
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServingConfig.model_validate(_config(port))), name="overhead", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            for _ in range(20):  # warm-up, also builds the sequence's passage index
                for _, pipeline, direct, _ in CASES:
                    _send(http, pipeline, "warm up the path")
                    _send(http, direct, "warm up the path")
                for _, pipeline, direct, _ in STREAM_CASES:
                    _stream(http, pipeline, "warm up the streamed path")
                    _stream(http, direct, "warm up the streamed path")
            if args.only != "stream":
                _unary_table(http, args.requests)
            if args.only != "unary":
                _stream_table(http, args.requests)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _unary_table(http: httpx.Client, requests: int) -> None:
    times: dict[str, list[float]] = {name: [] for _, p, d, _ in CASES for name in (p, d)}
    for i in range(requests):
        for _, pipeline, direct, _ in CASES:
            text = f"request {i} of the overhead run"
            times[direct].append(_send(http, direct, text))
            times[pipeline].append(_send(http, pipeline, text))
    print("| pipeline | steps | direct p50 / p99 (ms) | pipeline p50 / p99 (ms) | added per step p50 / p99 (ms) |")
    print("|---|---|---|---|---|")
    for row, pipeline, direct, steps in CASES:
        d50, d99 = _pct(times[direct], 50), _pct(times[direct], 99)
        p50, p99 = _pct(times[pipeline], 50), _pct(times[pipeline], 99)
        print(
            f"| {row} | {steps} | {d50:.1f} / {d99:.1f} | {p50:.1f} / {p99:.1f} | "
            f"{(p50 - d50) / steps:.1f} / {(p99 - d99) / steps:.1f} |"
        )


def _stream_table(http: httpx.Client, requests: int) -> None:
    """Streamed chat, pipeline and direct interleaved: time to first token and total, and the difference per step."""
    ttft: dict[str, list[float]] = {name: [] for _, p, d, _ in STREAM_CASES for name in (p, d)}
    total: dict[str, list[float]] = {name: [] for name in ttft}
    for i in range(requests):
        for _, pipeline, direct, _ in STREAM_CASES:
            text = STREAM_TEXT.format(i=i)
            for name in (direct, pipeline):
                first, whole = _stream(http, name, text)
                ttft[name].append(first)
                total[name].append(whole)
    print()
    print(
        "| pipeline, streamed | steps | TTFT direct p50 / p99 (ms) | TTFT pipeline p50 / p99 (ms) | "
        "added TTFT per step p50 / p99 (ms) | total direct p50 / p99 (ms) | total pipeline p50 / p99 (ms) | "
        "added total per step p50 / p99 (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row, pipeline, direct, steps in STREAM_CASES:
        cells = []
        for series in (ttft, total):
            d50, d99 = _pct(series[direct], 50), _pct(series[direct], 99)
            p50, p99 = _pct(series[pipeline], 50), _pct(series[pipeline], 99)
            cells += [
                f"{d50:.1f} / {d99:.1f}",
                f"{p50:.1f} / {p99:.1f}",
                f"{(p50 - d50) / steps:.1f} / {(p99 - d99) / steps:.1f}",
            ]
        print(f"| {row} | {steps} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
