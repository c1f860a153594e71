"""LoRA adapters on one base model (vllm engine, two replicas), through the official `openai` client: three tiny
adapters built offline with peft for the tiny Llama, served with `max_loaded_adapters: 2`, so a third evicts the least
recently used. Each adapter answers differently from the base model, deterministically, and the first adapter's answer
matches vLLM's own server running the same adapter. Adapters are Serve multiplexed models: an adapter's requests go to
the replica that loaded it, and adding or removing one is a redeploy that restarts no replica.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster.bench.systems.vllm_server import vllm_server
from deployments.config import ServingConfig
from tests.integration.conftest import metric_samples, wait_for

pytestmark = pytest.mark.slow

APP = "lora"
BASE = "lora-base"
ADAPTERS = ("lora-a", "lora-b", "lora-c")
ADDED = "lora-d"  # added by a redeploy, late in the module
REPLICA = "x-modelfleet-replica"
# Serve's gauge of the multiplexed models each replica holds (labels: model_id, replica).
LOADED_GAUGE = "ray_serve_registered_multiplexed_model_id"
PROMPT = "The quick brown fox"
TIMEOUT_S = 120.0


def _build_adapter(base: Path, out: Path, seed: int) -> Path:
    """A rank-8 LoRA of q_proj and v_proj with random, non-zero weights (peft starts B at zero: a no-op adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    names = (*ADAPTERS, ADDED)
    return {name: _build_adapter(tiny_llama, root / name, seed) for seed, name in enumerate(names, start=1)}


def _config(tiny_llama: Path, adapter_dirs: dict[str, Path], names: tuple[str, ...] = ADAPTERS) -> dict[str, Any]:
    adapters = {name: adapter_dirs[name] for name in names}
    return {
        "name": APP,
        "route_prefix": "/lora",
        "models": [
            {
                "id": BASE,
                "task": "generate",
                "engine": "vllm",
                "source": str(tiny_llama),
                "context_length": 256,
                "max_output_tokens": 32,
                "resources": {"num_cpus": 1},
                # Two replicas: an adapter's requests stay on the one that loaded it. The `session` policy's router
                # (ours) must keep Serve's multiplex preference; requests without a session key spread.
                "scaling": {"min_replicas": 2, "max_replicas": 2},
                "routing": {"policy": "session"},
                "engine_kwargs": {"cpu_kvcache_space_gb": 0.25},
                "adapters": [{"name": name, "path": str(path)} for name, path in adapters.items()],
                "max_loaded_adapters": 2,
                "max_lora_rank": 8,
            }
        ],
    }


@pytest.fixture(scope="module")
def lora_app(deploy: Callable[[dict[str, Any]], str], tiny_llama: Path, adapter_dirs: dict[str, Path]) -> str:
    return deploy(_config(tiny_llama, adapter_dirs))


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def _complete(client: openai.OpenAI, model: str) -> str:
    answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert answer.model == model
    assert answer.choices[0].finish_reason == "length", answer
    return answer.choices[0].text


def test_adapters_listed_with_their_base(lora_app: str) -> None:
    cards = {m.id: m for m in _client(lora_app).models.list().data}
    assert set(cards) == {BASE, *ADAPTERS}
    for name in ADAPTERS:
        card = cards[name].model_dump()
        assert (card["root"], card["parent"]) == (BASE, BASE), card
    assert cards[BASE].model_dump()["parent"] is None
    one = httpx.get(f"{lora_app}/v1/models/{ADAPTERS[0]}", timeout=30)
    assert one.status_code == 200 and one.json()["root"] == BASE, one.text
    enum = httpx.get(f"{lora_app}/openapi.json", timeout=30).json()["components"]["schemas"]["CompletionRequest"]
    assert set(enum["properties"]["model"]["enum"]) == {BASE, *ADAPTERS}


def _served_by(base: str, model: str, n: int = 1) -> list[str]:
    """The replicas that served `n` sequential one-token completions of `model`."""
    replicas = []
    with httpx.Client(base_url=base, timeout=TIMEOUT_S) as http:
        for _ in range(n):
            response = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 1})
            assert response.status_code == 200, response.text
            replicas.append(response.headers[REPLICA])
    return replicas


def _spread(base: str, model: str, timeout: float = 60.0) -> dict[str, int]:
    """Send sequential one-token completions of `model` until two replicas have served it; the count per replica.

    Not a fixed count: Serve's choice between two idle replicas also reads its cached queue lengths, which can
    favour one replica for a few seconds (a fresh clone once saw 16 of 16 base requests on one).
    """
    served: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while len(served) < 2:
        assert time.monotonic() < deadline, f"{model} requests all landed on one replica for {timeout:.0f} s: {served}"
        (replica,) = _served_by(base, model)
        served[replica] = served.get(replica, 0) + 1
    return served


def _holding(adapter: str) -> set[str]:
    """The replicas whose Serve multiplexer reports `adapter` loaded now (as exported by the metrics agent)."""
    return {
        labels["replica"]
        for labels, value in metric_samples(LOADED_GAUGE, APP)
        if labels["model_id"] == adapter and value == 1
    }


def _wait_loaded(adapter: str, replica: str) -> None:
    # Serve's routers learn the loaded set from the controller, which the replica tells within 0.1 s; the metric
    # that this waits on is exported later than that, so once it shows, the routers know too.
    wait_for(
        lambda: any(replica in r for r in _holding(adapter)),
        timeout=60,
        message=f"replica {replica} never reported adapter {adapter} loaded ({LOADED_GAUGE}: {_holding(adapter)})",
    )


def test_adapter_requests_stay_on_the_replica_that_loaded_it(lora_app: str) -> None:
    # Base requests (no session key, no adapter) spread over both replicas.
    _spread(lora_app, BASE)
    # The first request of an adapter loads it on one replica; from then on its requests go there.
    (first_a,) = _served_by(lora_app, "lora-a")
    _wait_loaded("lora-a", first_a)
    assert set(_served_by(lora_app, "lora-a", 8)) == {first_a}
    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(lambda _: _served_by(lora_app, "lora-a")[0], range(6))) == {first_a}
    # A new adapter goes to the replica holding the fewest (Serve's fallback), the other one, and stays there.
    (first_b,) = _served_by(lora_app, "lora-b")
    assert first_b != first_a, "the new adapter went to the replica that already holds one"
    _wait_loaded("lora-b", first_b)
    assert set(_served_by(lora_app, "lora-b", 6)) == {first_b}
    assert set(_served_by(lora_app, "lora-a", 4)) == {first_a}
    _spread(lora_app, BASE)


def test_adapters_differ_from_base_and_evict(lora_app: str) -> None:
    client = _client(lora_app)
    base = _complete(client, BASE)
    a, b = _complete(client, "lora-a"), _complete(client, "lora-b")  # two adapters loaded: the most there may be
    c = _complete(client, "lora-c")  # a third: vLLM evicts the least recently used (lora-a)
    answers = {BASE: base, "lora-a": a, "lora-b": b, "lora-c": c}
    assert len(set(answers.values())) == 4, f"adapters must change the greedy answer: {answers}"
    # After the eviction: lora-a loads again and answers as before; the others and the base are unchanged.
    assert _complete(client, "lora-a") == a
    assert _complete(client, "lora-c") == c
    assert _complete(client, "lora-b") == b
    assert _complete(client, BASE) == base
    # Two adapters (and the base) at once on the one replica, each with its own answer.
    together = ["lora-b", "lora-c", BASE] * 2
    with ThreadPoolExecutor(len(together)) as pool:
        assert list(pool.map(lambda m: _complete(client, m), together)) == [b, c, base] * 2
    chat = client.chat.completions.create(
        model="lora-b", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0
    )
    assert chat.model == "lora-b" and chat.choices[0].message.content
    stream = client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == a


def test_unknown_adapter_is_404(lora_app: str) -> None:
    with pytest.raises(openai.NotFoundError, match="lora-z"):
        _client(lora_app).completions.create(model="lora-z", prompt=PROMPT, max_tokens=4)


def test_adding_and_removing_adapters_restarts_no_replica(
    deploy: Callable[[dict[str, Any]], str], lora_app: str, tiny_llama: Path, adapter_dirs: dict[str, Path]
) -> None:
    """It redeploys the app with lora-c removed and lora-d added: the tests after it use lora-a and the base only."""
    client = _client(lora_app)
    before = set(_served_by(lora_app, BASE, 16))
    assert len(before) == 2, before
    base, a = _complete(client, BASE), _complete(client, "lora-a")
    (holder,) = _served_by(lora_app, "lora-c")
    _wait_loaded("lora-c", holder)

    # The redeploy: same app, same path as `modelfleet deploy`; it returns once /readyz is 200 again.
    assert deploy(_config(tiny_llama, adapter_dirs, ("lora-a", "lora-b", ADDED))) == lora_app

    after = set(_served_by(lora_app, BASE, 16))
    assert after == before, f"the base model's replicas were restarted: {before} before, {after} after"
    # The removed adapter: 404 from the router, and dropped by the replica that held it.
    with pytest.raises(openai.NotFoundError, match="lora-c"):
        client.completions.create(model="lora-c", prompt=PROMPT, max_tokens=4)
    wait_for(
        lambda: not _holding("lora-c"),
        timeout=60,
        message=f"adapter lora-c is still loaded on {_holding('lora-c')} after its removal",
    )
    # The added adapter: listed, and answers in its own way; the others answer as before.
    assert ADDED in {m.id for m in client.models.list().data}
    d = _complete(client, ADDED)
    assert d not in (base, a), f"{ADDED} answers like the base model or lora-a: {d!r}"
    assert _complete(client, "lora-a") == a
    assert _complete(client, BASE) == base
    assert set(_served_by(lora_app, BASE, 8)) <= before


@pytest.fixture(scope="module")
def vllm_lora_base(
    tiny_llama: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """vLLM's own server from the same spec (the plan's LoRA flags), with adapter lora-a loaded at runtime."""
    spec = ServingConfig.model_validate(_config(tiny_llama, adapter_dirs)).model(BASE)
    assert spec is not None
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # the server inherits it: /v1/load_lora_adapter
    try:
        with vllm_server(spec, ready_timeout_s=300, log_dir=tmp_path_factory.mktemp("vllm-lora")) as server:
            loaded = httpx.post(
                f"{server.base_url}/v1/load_lora_adapter",
                json={"lora_name": "lora-a", "lora_path": str(adapter_dirs["lora-a"])},
                timeout=TIMEOUT_S,
            )
            assert loaded.status_code == 200, loaded.text
            yield server.base_url
    finally:
        os.environ.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)


def test_adapter_answer_matches_vllm_server(lora_app: str, vllm_lora_base: str) -> None:
    ours = _complete(_client(lora_app), "lora-a")
    theirs = _complete(_client(vllm_lora_base), "lora-a")
    assert ours == theirs
    assert _complete(_client(lora_app), BASE) == _complete(_client(vllm_lora_base), BASE)
