"""LoRA adapters in the config: validated at load, planned into vLLM's LoRA arguments, named in the OpenAPI document,
and turned into vLLM's LoRARequest by the engine."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.api.ingress import app
from deployments.api.openapi import narrow_openapi
from deployments.config import ServingConfig
from deployments.engines.vllm import VLLMEngine
from deployments.engines.vllm_lora import KindGate, check_adapters
from deployments.errors import EngineStartError, ModelNotFoundError
from deployments.plan import PlanError, plan_engine
from models.spec import AdapterSpec, ModelSpec, adapter_names

pytestmark = pytest.mark.unit

ADAPTERS = [{"name": "sql", "path": "/adapters/sql"}, {"name": "poem", "path": "/adapters/poem"}]


def _base(**overrides: Any) -> dict[str, Any]:
    return {"id": "base", "task": "generate", "engine": "vllm", "source": "/models/base", **overrides}


def test_adapters_plan_vllm_lora_arguments() -> None:
    spec = ModelSpec(**_base(adapters=ADAPTERS, max_loaded_adapters=2, max_lora_rank=8))
    kwargs = plan_engine(spec).kwargs
    assert {k: kwargs[k] for k in ("enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank")} == {
        "enable_lora": True,
        "max_loras": 2,
        "max_cpu_loras": 2,
        "max_lora_rank": 8,
    }
    assert adapter_names([spec]) == {"sql": spec, "poem": spec}


def test_no_adapters_no_lora_arguments() -> None:
    assert "enable_lora" not in plan_engine(ModelSpec(**_base())).kwargs


def test_lora_engine_kwargs_are_refused_for_the_spec_fields() -> None:
    with pytest.raises(PlanError, match="max_loaded_adapters"):
        plan_engine(ModelSpec(**_base(adapters=ADAPTERS, engine_kwargs={"max_loras": 4})))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"engine": "transformers", "adapters": ADAPTERS}, "need engine 'vllm'"),
        ({"adapters": [ADAPTERS[0], ADAPTERS[0]]}, "sql appear twice"),
        ({"adapters": [{"name": "sql", "path": "adapters/sql"}]}, "absolute path"),
        ({"adapters": [{"name": "bad name", "path": "/a"}]}, "adapter `name`"),
        ({"max_loaded_adapters": 3}, "`max_loaded_adapters` applies to a model with `adapters`"),
        ({"adapters": ADAPTERS, "max_lora_rank": 12}, "max_lora_rank"),
    ],
)
def test_bad_adapters_are_refused_by_name(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSpec(**_base(**overrides))


def test_adapter_names_are_unique_across_models_and_ids() -> None:
    other = {"id": "other", "task": "generate", "engine": "vllm", "source": "/models/other"}
    with pytest.raises(ValidationError, match="sql appear twice"):
        ServingConfig(models=[_base(adapters=ADAPTERS), {**other, "adapters": [ADAPTERS[0]]}])
    with pytest.raises(ValidationError, match="other are also model or pipeline ids"):
        ServingConfig(models=[_base(adapters=[{"name": "other", "path": "/a"}]), other])


def test_keys_may_name_adapters() -> None:
    config = ServingConfig.model_validate(
        {
            "models": [_base(adapters=ADAPTERS)],
            "router": {"keys": [{"name": "k", "sha256": "0" * 64, "models": ["sql"]}]},
        }
    )
    assert config.router.keys[0].models == ("sql",)


def test_openapi_model_enums_name_the_adapters() -> None:
    specs = [ModelSpec(**_base(adapters=ADAPTERS)), ModelSpec(id="e", task="embed", engine="echo")]
    schemas = narrow_openapi(app.openapi(), specs)["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["enum"] == ["base", "poem", "sql"]
    assert schemas["EmbeddingRequest"]["properties"]["model"]["enum"] == ["e"]


def test_engine_maps_an_adapter_to_a_lora_request() -> None:
    engine = VLLMEngine(ModelSpec(**_base(adapters=ADAPTERS)))
    assert engine._lora_request(None) is None
    poem = engine._lora_request("poem")
    assert (poem.lora_name, poem.lora_path) == ("poem", "/adapters/poem")
    assert engine._lora_request("poem") is poem  # one id per (name, folder), as vLLM caches by id
    assert engine._lora_request("sql").lora_int_id != poem.lora_int_id
    with pytest.raises(ModelNotFoundError, match="no such adapter"):
        engine._lora_request("prose")


def test_adapter_folders_are_checked_before_vllm_starts(tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / "adapter_config.json").write_text(json.dumps({"r": 32}))

    def spec(*names: str) -> ModelSpec:
        adapters = [{"name": n, "path": str(tmp_path / n)} for n in names]
        return ModelSpec(**_base(adapters=adapters, max_lora_rank=16))

    check_adapters(spec("ok"))
    with pytest.raises(EngineStartError, match="adapter 'missing' has no readable peft adapter_config.json"):
        check_adapters(spec("ok", "missing"))
    # At config load, a folder that is visible here is checked too (one of another node is left to its replica).
    with pytest.raises(ValidationError, match="adapter 'wide' has rank 32, above max_lora_rank 16"):
        spec("wide")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="adapter 'empty' has no readable peft adapter_config.json"):
        spec("empty")
    # The replica checks a new list the same way (reconfigure), against the spec's max_lora_rank.
    with pytest.raises(EngineStartError, match="adapter 'wide' has rank 32"):
        check_adapters(spec("ok"), [AdapterSpec(name="wide", path=tmp_path / "wide")])


def test_base_and_adapter_requests_never_run_together() -> None:
    """The CPU workaround: one kind at a time, and a waiting kind is not starved by new arrivals of the other."""

    async def scenario() -> list[str]:
        gate, order = KindGate(), []

        async def request(name: str, base: bool, hold_s: float) -> None:
            await gate.acquire(base)
            order.append(f"+{name}")
            await asyncio.sleep(hold_s)
            order.append(f"-{name}")
            await gate.release()

        first = asyncio.create_task(request("base1", True, 0.2))
        await asyncio.sleep(0.05)
        adapter = asyncio.create_task(request("lora", False, 0.1))
        await asyncio.sleep(0.05)
        late = asyncio.create_task(request("base2", True, 0.01))  # would overlap base1, but lora waits first
        await asyncio.wait_for(asyncio.gather(first, adapter, late), 5)
        return order

    assert asyncio.run(scenario()) == ["+base1", "-base1", "+lora", "-lora", "+base2", "-base2"]
