"""The HTTP load client: OpenAI-shaped requests (streamed chat or completions, or embeddings) at a loopback
server, driven by the load driver (`cluster.bench.load`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import httpx

from cluster.bench.load import DEFAULT_PROMPT, LoadResult, Mode, measure_load
from cluster.bench.sse import failure, stream_one
from cluster.bench.stats import Sample

__all__ = ["check_loopback", "request_body", "run_load"]


def check_loopback(base_url: str) -> None:
    """Refuse any target that is not this machine: load tests may only hit loopback addresses.

    Raises:
        ValueError: the URL's host is not localhost or a loopback IP (127.0.0.0/8, ::1).
    """
    host = httpx.URL(base_url).host
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing to send load to {host!r}: only loopback targets (127.0.0.1, localhost, ::1) allowed")


def request_body(
    model: str, mode: Mode, text: str, *, max_tokens: int, ignore_eos: bool, temperature: float
) -> dict[str, Any]:
    """The JSON body of one request: a streamed chat or completion asking for usage, or one embedding."""
    if mode == "embeddings":
        return {"model": model, "input": [text]}
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if mode == "chat":
        return {**body, "messages": [{"role": "user", "content": text}]}
    return {**body, "prompt": text}


async def _embed_one(client: httpx.AsyncClient, body: dict[str, Any], sample: Sample) -> None:
    try:
        response = await client.post("/v1/embeddings", json=body)
    except httpx.HTTPError as exc:
        sample.error = failure(exc)
        return
    if response.status_code != 200:
        sample.error = str(response.status_code)
        return
    try:
        data = response.json()["data"]
    except (ValueError, KeyError, TypeError):
        sample.error = "bad_response"
        return
    if len(data) != len(body["input"]) or not all(item.get("embedding") for item in data):
        sample.error = "bad_response"


async def run_load(
    base_url: str,
    model: str,
    *,
    mode: Mode = "chat",
    concurrency: int | None = None,
    rate: float | None = None,
    num_requests: int | None = None,
    duration_s: float | None = None,
    prompt: str | Sequence[str] = DEFAULT_PROMPT,
    max_tokens: int = 64,
    ignore_eos: bool = True,
    temperature: float = 0.0,
    request_timeout_s: float = 300.0,
    warmup: int = 0,
    seed: int = 0,
    progress: bool = True,
    label: str | None = None,
) -> LoadResult:
    """Stream chat or completion requests (or send embedding requests) at a loopback server and measure each one.

    Closed loop with `concurrency` requests in flight (default 1), or open loop with Poisson arrivals at
    `rate` requests/s. Sending stops after `num_requests` or `duration_s`; each request is cut off after
    `request_timeout_s`. Request i uses `prompt[i % len(prompt)]` for a list. `ignore_eos` is sent as the
    request field of that name (modelfleet's vLLM and transformers engines and vLLM's server honour it);
    output tokens are read from the usage chunk. An `embeddings` request embeds one prompt; it has no TTFT
    or output tokens.

    Returns:
        The samples and their summary (`summarize`).

    Raises:
        ValueError: a non-loopback `base_url`, or bad load bounds (see `measure_load`).
    """
    check_loopback(base_url)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    base = base_url.rstrip("/").removesuffix("/v1")
    path = "/v1/chat/completions" if mode == "chat" else "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=(concurrency or 64) + 8)
    # trust_env=False: a proxy from the environment must never carry loopback load elsewhere.
    async with httpx.AsyncClient(base_url=base, timeout=request_timeout_s, limits=limits, trust_env=False) as client:

        async def call(index: int, sample: Sample, begin: float) -> None:
            text = prompts[index % len(prompts)]
            body = request_body(
                model, mode, text, max_tokens=max_tokens, ignore_eos=ignore_eos, temperature=temperature
            )
            if mode == "embeddings":
                await _embed_one(client, body, sample)
            else:
                await stream_one(client, path, body, mode, sample, begin)

        return await measure_load(
            call,
            concurrency=concurrency,
            rate=rate,
            num_requests=num_requests,
            duration_s=duration_s,
            request_timeout_s=request_timeout_s,
            warmup=warmup,
            seed=seed,
            progress=progress,
            label=label,
        )
