"""API parity: for the same requests, modelfleet answers with the fields vLLM's own OpenAI server returns.

Both serve the same tiny Llama folder with the same context length, greedy, so token counts and texts
must match too. vLLM-only extensions (token ids, KV-transfer params, ...) are listed and left out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.bench_baselines import vllm_server
from deployments.config import ServingConfig
from tests.integration.conftest import main_app_config

# Fields vLLM's server adds beyond OpenAI's API, which modelfleet does not return.
VLLM_ONLY = {
    "prompt_logprobs",
    "prompt_token_ids",
    "prompt_text",
    "kv_transfer_params",
    "ec_transfer_params",
    "metrics",
    "token_ids",
    "routed_experts",
    "reasoning",
    "reasoning_content",
}


@pytest.fixture(scope="module")
def vllm_base(
    main_app: str, tiny_llama: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """vLLM's own server, started from the very spec the shared app serves as `tiny-vllm`."""
    spec = ServingConfig.model_validate(main_app_config(tiny_llama, tiny_bert)).model("tiny-vllm")
    assert spec is not None
    with vllm_server(spec, ready_timeout_s=300, log_dir=tmp_path_factory.mktemp("vllm-server")) as server:
        yield server.base_url


def _post(base: str, path: str, body: dict[str, Any]) -> Any:
    if not body.get("stream"):
        response = httpx.post(f"{base}{path}", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()
    with httpx.stream("POST", f"{base}{path}", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _type(value: Any) -> str:
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__


def _compare(theirs: Any, ours: Any, path: str, problems: list[str]) -> None:
    """Every field vLLM sends (bar its extensions) is in ours, with the same JSON type (null matches any)."""
    if isinstance(theirs, dict):
        if not isinstance(ours, dict):
            problems.append(f"{path}: vLLM has an object, modelfleet {_type(ours)}")
            return
        for key, value in theirs.items():
            if key in VLLM_ONLY:
                continue
            if key not in ours:
                problems.append(f"{path}.{key}: missing (vLLM sends {value!r:.60})")
                continue
            _compare(value, ours[key], f"{path}.{key}", problems)
    elif isinstance(theirs, list):
        if not isinstance(ours, list):
            problems.append(f"{path}: vLLM has a list, modelfleet {_type(ours)}")
            return
        for i, (a, b) in enumerate(zip(theirs, ours, strict=False)):
            _compare(a, b, f"{path}[{i}]", problems)
    elif theirs is not None and ours is not None and _type(theirs) != _type(ours):
        problems.append(f"{path}: vLLM {_type(theirs)} {theirs!r:.40}, modelfleet {_type(ours)} {ours!r:.40}")


CHAT = {"model": "tiny-vllm", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
        "temperature": 0}  # fmt: skip
TEXT = {"model": "tiny-vllm", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
CASES = {
    "chat": ("/v1/chat/completions", CHAT),
    "chat-logprobs": ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 2}),
    "chat-stream": ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
    "completion": ("/v1/completions", TEXT),
    "completion-logprobs": ("/v1/completions", {**TEXT, "logprobs": 2}),
    "completion-stream": ("/v1/completions", {**TEXT, "stream": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_fields_as_vllm_server(case: str, vllm_base: str, main_app: str) -> None:
    path, body = CASES[case]
    theirs, ours = _post(vllm_base, path, body), _post(main_app, path, body)
    problems: list[str] = []
    if isinstance(theirs, list):
        assert len(ours) >= 2 and len(theirs) >= 2
        # Stream shape: compare the first chunk, a content chunk and the last chunk of each.
        for label, a, b in (
            ("first", theirs[0], ours[0]),
            ("middle", theirs[1], ours[1]),
            ("last", theirs[-1], ours[-1]),
        ):
            _compare(a, b, f"{case}[{label}]", problems)
    else:
        _compare(theirs, ours, case, problems)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", ["chat", "completion", "completion-logprobs"])
def test_same_answer_as_vllm_server(case: str, vllm_base: str, main_app: str) -> None:
    path, body = CASES[case]
    theirs, ours = _post(vllm_base, path, body), _post(main_app, path, body)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert ours["usage"][key] == theirs["usage"][key], key
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"], "same chat template and tokenizer"
    a, b = theirs["choices"][0], ours["choices"][0]
    assert b["finish_reason"] == a["finish_reason"]
    assert b.get("text", b.get("message", {}).get("content")) == a.get("text", a.get("message", {}).get("content"))
    if case == "completion-logprobs":
        assert b["logprobs"]["tokens"] == a["logprobs"]["tokens"]
        assert b["logprobs"]["text_offset"] == a["logprobs"]["text_offset"]
        for x, y in zip(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"], strict=True):
            assert abs(x - y) < 1e-3
