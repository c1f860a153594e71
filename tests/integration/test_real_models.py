"""The default models (SmolLM2-135M-Instruct and all-MiniLM-L6-v2) served for real through the API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import openai
import pytest

from cluster.cli import DEFAULT_CONFIG
from deployments.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(deploy: Callable[[dict[str, Any]], str]) -> openai.OpenAI:
    from models.registry import resolve_source

    config = load_config(DEFAULT_CONFIG).model_dump(mode="json")
    for spec in config["models"]:
        resolve_source(spec["source"], progress=True)  # convert once, in this process, before replicas start
    config.update(name="real", route_prefix="/real")
    base = deploy(config)
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def test_smollm2_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Paris" in (out.choices[0].message.content or ""), out.choices[0].message.content
    assert out.usage.prompt_tokens > 5


def test_smollm2_streams(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text


def test_minilm_embeddings(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model="minilm", input=["a cat sat", "a kitten sat", "stock markets fell"])
    vectors = np.array([d.embedding for d in out.data])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2
