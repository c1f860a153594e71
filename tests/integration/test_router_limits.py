"""Router settings enforced on a real cluster: API keys (401), the request timeout (408) and a full queue (429)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.integration.test_api import assert_error


@pytest.fixture(scope="module")
def strict(deploy: Callable[[dict[str, Any]], str]) -> str:
    return deploy(
        {
            "name": "strict",
            "route_prefix": "/strict",
            "models": [
                {
                    "id": "slow-echo",
                    "task": "generate",
                    "engine": "echo",
                    "resources": {"num_cpus": 0.25},
                    "engine_kwargs": {"token_delay_s": 0.5},
                }
            ],
            "router": {"api_keys": ["sk-test-1", "sk-test-2"], "request_timeout_s": 1.5},
        }
    )


def test_missing_or_wrong_key_is_401(strict: str) -> None:
    body = {"model": "slow-echo", "prompt": "a"}
    assert_error(httpx.post(f"{strict}/v1/completions", json=body), 401)
    r = httpx.post(f"{strict}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert_error(r, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{strict}/v1", api_key="nope", max_retries=0).models.list()


def test_right_key_passes_and_health_stays_open(strict: str) -> None:
    client = openai.OpenAI(base_url=f"{strict}/v1", api_key="sk-test-2", max_retries=0, timeout=30)
    out = client.completions.create(model="slow-echo", prompt="a b", max_tokens=2)
    assert out.choices[0].text == "a b"
    assert httpx.get(f"{strict}/readyz", timeout=30).status_code == 200


def test_slow_request_times_out_with_408(strict: str) -> None:
    headers = {"Authorization": "Bearer sk-test-1"}
    body = {"model": "slow-echo", "prompt": "w " * 10, "max_tokens": 10}
    r = httpx.post(f"{strict}/v1/completions", json=body, headers=headers, timeout=30)
    assert "longer than the router's limit" in assert_error(r, 408)["message"]


@pytest.fixture(scope="module")
def narrow(deploy: Callable[[dict[str, Any]], str]) -> str:
    """One slow replica that holds one request and lets one more wait: the rest of a burst is refused."""
    return deploy(
        {
            "name": "narrow",
            "route_prefix": "/narrow",
            "models": [
                {
                    "id": "slow-echo",
                    "task": "generate",
                    "engine": "echo",
                    "resources": {"num_cpus": 0.25},
                    "scaling": {"max_ongoing_requests": 1, "max_queued_requests": 1},
                    "engine_kwargs": {"token_delay_s": 0.5},
                }
            ],
        }
    )


def test_full_queue_is_429_with_retry_after(narrow: str) -> None:
    body = {"model": "slow-echo", "prompt": "one two three four", "max_tokens": 4}  # about 2 s each

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{narrow}/v1/completions", json=body, timeout=60)

    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(post, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429}, codes  # some served, the overflow refused, nothing else
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert assert_error(r, 429)["type"] == "rate_limit_error"
        else:
            assert r.json()["choices"][0]["text"] == "one two three four"
    # The refusals cost nothing: the model answers the next request.
    client = openai.OpenAI(base_url=f"{narrow}/v1", api_key="x", max_retries=0, timeout=30)
    assert client.completions.create(model="slow-echo", prompt="again", max_tokens=1).choices[0].text == "again"
