"""LoRA adapters and the deployment's Serve version: the adapter list travels as user_config (applied in place by the
replicas), while what vLLM takes only at start (LoRA on or off, max_loaded_adapters, max_lora_rank) stays in the
code version, so changing it restarts the replicas."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.plan import adapter_user_config, plan_model
from models.spec import ModelSpec

pytestmark = pytest.mark.unit

SQL = {"name": "sql", "path": "/adapters/sql"}
POEM = {"name": "poem", "path": "/adapters/poem"}


def _spec(**overrides: Any) -> ModelSpec:
    return ModelSpec(
        **{"id": "base", "task": "generate", "engine": "vllm", "source": "/models/base", "adapters": [SQL], **overrides}
    )


def test_adapter_list_is_not_in_the_code_version() -> None:
    one = plan_model(_spec())
    for changed in ([SQL, POEM], [POEM], [{"name": "sql", "path": "/adapters/sql-v2"}]):
        assert plan_model(_spec(adapters=changed)).code_version == one.code_version, changed


@pytest.mark.parametrize(
    "overrides",
    [{"max_loaded_adapters": 2}, {"max_lora_rank": 8}, {"adapters": []}, {"source": "/models/other"}],
)
def test_engine_restart_settings_are_in_the_code_version(overrides: dict[str, Any]) -> None:
    assert plan_model(_spec(**overrides)).code_version != plan_model(_spec()).code_version


def test_user_config_carries_the_adapters() -> None:
    spec = _spec(adapters=[SQL, POEM])
    assert adapter_user_config(spec) == {"adapters": [SQL, POEM]}
    assert plan_model(spec).serve_options["user_config"] == {"adapters": [SQL, POEM]}
    # Without adapters there is no user_config (and no reconfigure call) at all.
    assert "user_config" not in plan_model(_spec(adapters=[])).serve_options


def test_user_config_round_trips_into_adapter_specs() -> None:
    from models.spec import AdapterSpec

    spec = _spec(adapters=[SQL, POEM])
    restored = tuple(AdapterSpec.model_validate(a) for a in adapter_user_config(spec)["adapters"])
    assert restored == spec.adapters


def test_engine_takes_a_new_adapter_list_in_place() -> None:
    from deployments.engines.vllm import VLLMEngine
    from deployments.errors import ModelNotFoundError
    from models.spec import AdapterSpec

    engine = VLLMEngine(_spec(adapters=[SQL, POEM]))
    sql, poem = engine._lora_request("sql"), engine._lora_request("poem")
    moved = AdapterSpec(name="sql", path="/adapters/sql-v2")
    gone = engine.set_adapters([moved, AdapterSpec(name="new", path="/adapters/new")])
    assert sorted(gone) == ["poem", "sql"]  # removed, and repointed
    assert engine.adapter_names == ("sql", "new")
    again = engine._lora_request("sql")
    assert again.lora_path == "/adapters/sql-v2" and again.lora_int_id not in (sql.lora_int_id, poem.lora_int_id)
    with pytest.raises(ModelNotFoundError, match="'poem' does not exist"):
        engine._lora_request("poem")
    assert engine.set_adapters([moved, AdapterSpec(name="new", path="/adapters/new")]) == []  # idempotent
    assert engine._lora_request("sql") is again
