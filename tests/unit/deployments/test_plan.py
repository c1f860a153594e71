"""The deployment plan: a pure function of the config (and the node's engine cores), no Ray."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from deployments.config import ServingConfig, load_config
from deployments.plan import RAY_ENV, REQUEST_ROUTERS, DeploymentPlan, PlanError, compile_plan, plan_engine
from models.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[3]
GIB = 1 << 30


def _vllm(**overrides: Any) -> ModelSpec:
    fields: dict[str, Any] = {"id": "m", "task": "generate", "engine": "vllm", "source": "/models/m", **overrides}
    return ModelSpec(**fields)


def test_default_config_plan() -> None:
    config = load_config(ROOT / "deployments" / "configs" / "default.yaml")
    plan = compile_plan(config, engine_cpus="0")
    smollm2, minilm = plan.models
    assert smollm2.engine.kwargs == {
        "model": "smollm2-135m-instruct",
        "tokenizer": "smollm2-135m-instruct",
        "dtype": "float32",
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "served_model_name": "smollm2",
        "enforce_eager": True,
        "max_model_len": 2048,
        "kv_cache_memory_bytes": 1 * GIB,
    }
    # vLLM's model threads and the transformers batch thread compute on the node's engine cores.
    assert smollm2.engine.env == {"VLLM_CPU_OMP_THREADS_BIND": "0"}
    assert smollm2.engine.cpus == minilm.engine.cpus == plan.engine_cpus == "0"
    assert minilm.engine.kwargs == {"num_threads": 1} and minilm.engine.env == {}
    assert smollm2.serve_options == {
        "name": "replica:smollm2",
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.0},
        "max_ongoing_requests": 64,
        "max_queued_requests": 256,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 60,
        "graceful_shutdown_wait_loop_s": 2.0,
        "graceful_shutdown_timeout_s": 305.0,  # the router's request timeout, plus a margin: nothing is cut
        "max_constructor_retry_count": 3,
        "num_replicas": 1,
    }
    assert smollm2.bundles == ({"CPU": 1.0},) and smollm2.strategy == "PACK"
    assert plan.router_options == {
        "name": "router",
        "num_replicas": 1,
        "max_ongoing_requests": 1024,
        "ray_actor_options": {"num_cpus": 0.5},
        "graceful_shutdown_wait_loop_s": 2.0,
        "graceful_shutdown_timeout_s": 305.0,
    }
    assert plan.ray_env == RAY_ENV


def test_without_a_cpu_split_engines_compute_anywhere() -> None:
    plan = compile_plan(load_config(ROOT / "deployments" / "configs" / "default.yaml"))
    assert plan.engine_cpus is None
    assert all(m.engine.cpus is None and m.engine.env == {} for m in plan.models)


def test_engine_cores_are_normalised_and_checked() -> None:
    config = ServingConfig(models=(ModelSpec(id="e", task="generate", engine="echo"),))
    assert compile_plan(config, engine_cpus="2,0-1").engine_cpus == "0-2"
    with pytest.raises(PlanError, match="not a CPU list"):
        compile_plan(config, engine_cpus="zero")


def test_plan_round_trips_through_json() -> None:
    config = load_config(ROOT / "deployments" / "configs" / "default.yaml")
    plan = compile_plan(config, engine_cpus="0")
    assert DeploymentPlan.model_validate(json.loads(plan.model_dump_json())) == plan


def test_gpu_tensor_parallel_replica() -> None:
    spec = _vllm(
        dtype="bfloat16",
        resources={"num_cpus": 2, "num_gpus": 1, "accelerator_type": "H100"},
        parallelism={"tensor_parallel_size": 2, "placement_strategy": "STRICT_PACK"},
        scaling={"min_replicas": 1, "max_replicas": 3},
        engine_kwargs={"enable_prefix_caching": True},
    )
    (model,) = compile_plan(ServingConfig(models=(spec,)), engine_cpus="0").models
    gpu = {"GPU": 1.0, "accelerator_type:H100": 0.001}
    assert model.bundles == ({"CPU": 2.0, **gpu}, gpu) and model.strategy == "STRICT_PACK"
    assert model.serve_options["placement_group_bundles"] == list(model.bundles)
    assert model.serve_options["ray_actor_options"] == {"num_cpus": 2.0}  # the workers hold the GPUs
    assert model.serve_options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "initial_replicas": 1,
        "target_ongoing_requests": 4.0,
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 60.0,
        "look_back_period_s": 15.0,
        "metrics_interval_s": 2.0,
        "policy": {
            "policy_function": "deployments.autoscaling:QueuePolicy",
            "policy_kwargs": {
                "target_ongoing_requests": 4.0,
                "downscale_threshold": 0.5,
                "upscale_step": 2,
                "target_ttft_s": None,
            },
        },
    }
    assert "num_replicas" not in model.serve_options
    kwargs = model.engine.kwargs
    assert kwargs["enforce_eager"] is False and kwargs["dtype"] == "bfloat16"
    assert kwargs["distributed_executor_backend"] == "ray" and kwargs["tensor_parallel_size"] == 2
    assert kwargs["enable_prefix_caching"] is True and "kv_cache_memory_bytes" not in kwargs
    # GPU replicas get no CPU split: the engine cores are a CPU node's matter.
    assert model.engine.env == {} and model.engine.cpus is None


def test_single_gpu_replica_holds_its_gpu_and_shares_it() -> None:
    spec = _vllm(resources={"num_gpus": 0.5, "accelerator_type": "A10G", "memory_gb": 2})
    model = compile_plan(ServingConfig(models=(spec,))).models[0]
    assert model.serve_options["ray_actor_options"] == {
        "num_cpus": 1.0,
        "num_gpus": 0.5,
        "accelerator_type": "A10G",
        "memory": 2 * GIB,
    }
    assert model.bundles == ({"CPU": 1.0, "GPU": 0.5, "accelerator_type:A10G": 0.001, "memory": 2.0 * GIB},)
    assert model.engine.kwargs["gpu_memory_utilization"] == 0.45


def test_cpu_engine_kwargs_become_engine_args() -> None:
    engine = plan_engine(_vllm(engine_kwargs={"cpu_kvcache_space_gb": 0.25, "cpu_omp_threads_bind": "nobind"}))
    assert engine.kwargs["kv_cache_memory_bytes"] == GIB // 4
    assert "cpu_kvcache_space_gb" not in engine.kwargs and "cpu_omp_threads_bind" not in engine.kwargs
    assert engine.env == {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    # A size the user gives vLLM directly wins over the 1 GiB default.
    assert plan_engine(_vllm(engine_kwargs={"kv_cache_memory_bytes": 5})).kwargs["kv_cache_memory_bytes"] == 5


def test_vllms_own_metrics_label_the_model_as_every_modelfleet_metric_does() -> None:
    """`model_name` of ray_vllm_* is `id@version`, the `model` label of the router's and the replicas' series."""
    spec = _vllm(version="2")
    assert plan_engine(spec).kwargs["served_model_name"] == spec.versioned_id == "m@2"
    assert plan_engine(_vllm()).kwargs["served_model_name"] == "m"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"engine_kwargs": {"max_model_len": 64}}, "set by the model spec; set context_length"),
        ({"engine_kwargs": {"cpu_kvcache_space_gb": 0}}, "cpu_kvcache_space_gb must be > 0"),
        ({"engine_kwargs": {"cpu_omp_threads_bind": ""}}, "non-empty string"),
        ({"resources": {"num_gpus": 1}, "engine_kwargs": {"cpu_kvcache_space_gb": 1}}, "CPU replicas only"),
    ],
)
def test_contradicting_engine_settings_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        compile_plan(ServingConfig(models=(_vllm(**overrides),)))


def test_queue_bound_is_configurable() -> None:
    spec = ModelSpec(id="e", task="generate", engine="echo", scaling={"max_queued_requests": -1})
    assert compile_plan(ServingConfig(models=(spec,))).models[0].serve_options["max_queued_requests"] == -1
    with pytest.raises(ValueError, match="max_queued_requests"):
        ModelSpec(id="e", task="generate", engine="echo", scaling={"max_queued_requests": 0})


def _echo(**overrides: Any) -> ModelSpec:
    return ModelSpec(**{"id": "e", "task": "generate", "engine": "echo", **overrides})


def test_plan_names_the_request_router_by_import_path() -> None:
    session = _echo(id="s", routing={"policy": "session", "table_size": 100, "overload_queue_len": 4})
    prefix = _echo(id="p", routing={"policy": "prefix", "prefix_block_chars": 64, "prefix_max_chars": 1024})
    plan = compile_plan(ServingConfig(models=(session, prefix)))
    assert plan.models[0].serve_options["request_router_config"] == {
        "request_router_class": "deployments.routing.session.SessionRouter",
        "request_router_kwargs": {"table_size": 100, "overload_queue_len": 4},
    }
    assert plan.models[1].serve_options["request_router_config"] == {
        "request_router_class": "deployments.routing.prefix.PrefixRouter",
        "request_router_kwargs": {
            "table_size": 65536,
            "overload_queue_len": None,
            "block_chars": 64,
            "max_chars": 1024,
        },
    }
    # Plain data: the plan still round-trips through JSON.
    assert DeploymentPlan.model_validate(json.loads(plan.model_dump_json())) == plan


@pytest.mark.parametrize("path", sorted(REQUEST_ROUTERS.values()))
def test_request_router_paths_name_modules_of_this_repo(path: str) -> None:
    module, _, name = path.rpartition(".")
    found = importlib.util.find_spec(module)  # finds the file without importing Ray
    assert found is not None and found.origin is not None
    with open(found.origin) as source:
        assert f"class {name}(" in source.read()
