"""The deployment plan: a ServingConfig compiled once, by a pure function, into every deployment fact.

`compile_plan` is the one place that knows Serve's option names, the placement bundles of a replica, the exact
`vllm.AsyncEngineArgs` keywords of a vLLM model, the engine cores of the node's CPU split, and the environment
Ray's processes need. `build_app`, `modelfleet deploy` and `status`, and the bench's vLLM-server baseline all
read the plan; nothing derives these facts a second time. The plan is frozen and serialisable (JSON), so it can
be recorded, shown and rendered elsewhere (manifests, batch jobs).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field

from deployments import autoscaling
from deployments.config import RouterConfig, ServingConfig
from deployments.cpus import format_cpu_list, parse_cpu_list
from deployments.pipelines.spec import PipelinePlan, plan_pipelines
from models.spec import FrozenModel, ModelSpec, served_names

__all__ = [
    "HAPROXY_ENV",
    "RAY_ENV",
    "REQUEST_ROUTERS",
    "ROUTER_DEPLOYMENT",
    "DeploymentPlan",
    "EnginePlan",
    "ModelPlan",
    "PlanError",
    "adapter_user_config",
    "compile_plan",
    "ingress_env",
    "plan_engine",
    "plan_model",
]

ROUTER_DEPLOYMENT = "router"
# Environment of every Ray process a modelfleet launcher starts (measured in docs/benchmarks.md): workers at
# niceness 0 instead of Ray's 15, so that engines can outrank the serving processes (deployments.cpus); Serve
# replicas run user code and their handle router on the replica's own event loop (two of Serve's "throughput
# optimized" settings), which saved about 0.25 ms of CPU per streamed token.
RAY_ENV = {
    "RAY_worker_niceness": "0",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
# `router.ingress: haproxy`: Serve's HAProxy ingress in place of its Python proxy (docs/benchmarks.md, "Small
# requests"). Serve then turns on direct ingress: HAProxy forwards HTTP to the router replicas' own ports.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def ingress_env(ingress: str) -> dict[str, str]:
    """The environment Ray's processes need for `router.ingress` ('python' needs nothing: Serve's default)."""
    return dict(HAPROXY_ENV) if ingress == "haproxy" else {}


# engine_kwargs of the vllm engine that modelfleet translates itself; every other key is an AsyncEngineArgs field
# (the engine checks that against the installed vLLM when it starts).
VLLM_OWN_KWARGS = ("cpu_kvcache_space_gb", "cpu_omp_threads_bind")
# AsyncEngineArgs fields that a ModelSpec field decides: one place per decision.
_VLLM_FROM_SPEC = {
    "model": "source",
    "tokenizer": "source",
    "served_model_name": "id",
    "dtype": "dtype",
    "max_model_len": "context_length",
    "tensor_parallel_size": "parallelism.tensor_parallel_size",
    "pipeline_parallel_size": "parallelism.pipeline_parallel_size",
    "enable_lora": "adapters",
    "max_loras": "max_loaded_adapters",
    "max_cpu_loras": "max_loaded_adapters",
    "max_lora_rank": "max_lora_rank",
}
_KV_SIZE_KWARGS = ("kv_cache_memory_bytes", "gpu_memory_utilization", "cpu_kvcache_space_gb")
_DEFAULT_CPU_KV_CACHE_GIB = 1.0
_GIB = 1 << 30
_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of a whole GPU
# A tiny request for Ray's `accelerator_type:<name>` resource pins a bundle to such a node, exactly as the actor
# option `accelerator_type` does.
_ACCELERATOR_SHARE = 0.001


# Seconds of load history each autoscaling decision averages (Serve's default: 30).
AUTOSCALING_LOOK_BACK_S = 15.0
# How often Serve's routers and replicas record and push their counts to the controller (Serve's default: 10 s).
# At 10 s a request to a model at zero replicas waited up to 13 s before Serve even decided to start one (measured:
# 2.3-12.6 s): the push a handle sends when a request queues at zero replicas carries only the counts recorded so
# far, not that request. Serve 2.60 marks the field deprecated in favour of environment variables it does not read
# yet, so it is still the knob (with a DeprecationWarning, hidden by default).
AUTOSCALING_METRICS_INTERVAL_S = 2.0


# The RequestRouter of each routing policy, by import path: Serve imports it in every process that routes to the
# model, and a string keeps the plan JSON-serialisable. 'pow2' is Serve's default router (no option at all).
REQUEST_ROUTERS = {
    "session": "deployments.routing.session.SessionRouter",
    "prefix": "deployments.routing.prefix.PrefixRouter",
}


# Draining: a replica Serve stops (scale-down, a removed or changed model, a rolling router update) first waits this
# long, so that every router learns of the stop and sends new requests elsewhere (Serve then also turns away any
# late one, and the handle re-routes it), then until its requests in flight are done: at most the drain timeout,
# the router's own request timeout plus this margin, after which Serve kills it. So no request in flight is cut.
DRAIN_WAIT_LOOP_S = 2.0
_DRAIN_MARGIN_S = 5.0
_DEFAULT_DRAIN_S = float(RouterConfig.model_fields["request_timeout_s"].default) + _DRAIN_MARGIN_S


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PlanError(ValueError):
    """Raised when a config cannot be turned into deployments (the message names the field and the fix)."""


class EnginePlan(FrozenModel):
    """What one engine is started with, inside its replica."""

    kwargs: dict[str, Any] = Field(
        description=(
            "The engine's arguments. For vllm: the exact `vllm.AsyncEngineArgs` keywords, where `model` and "
            "`tokenizer` hold the spec's source, resolved to a folder on the replica's node. Other engines: "
            "their `engine_kwargs`, checked by the engine."
        )
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment the engine sets in its own process before it starts (vendor settings read "
        "only from the environment, e.g. VLLM_CPU_OMP_THREADS_BIND).",
    )
    cpus: str | None = Field(None, description="Engine cores (a CPU list) the engine computes on; None: anywhere.")


class ModelPlan(FrozenModel):
    """One model's deployment: Serve's options, what one replica needs from Ray, and its engine."""

    spec: ModelSpec
    serve_options: dict[str, Any] = Field(description="Options of the model's Serve deployment.")
    bundles: tuple[dict[str, float], ...] = Field(
        description="What one replica needs: a bundle per tensor/pipeline-parallel worker, or one pseudo-bundle "
        "(the replica actor's own resources) for a single-worker replica."
    )
    strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        description="Placement strategy of `bundles`."
    )
    engine: EnginePlan

    @property
    def deployment_name(self) -> str:
        """The Serve deployment name (stable, derived from the model id and version)."""
        return self.spec.deployment_name

    @property
    def code_version(self) -> str:
        """Serve's code version of the model's deployment: a digest of what its replicas are built from (spec and
        engine), without its replica counts and queue limits, which Serve changes on running replicas, without
        whether it is its id's default version, which only the router reads, and without its LoRA adapter list,
        which replicas take in place (`user_config`, see `adapter_user_config`). Whether LoRA is on at all, and its
        engine limits (`max_loaded_adapters`, `max_lora_rank`), stay in it: vLLM takes them only when it starts.

        Serve restarts a deployment's replicas when its code version changes, and otherwise applies the options in
        place, so a redeploy that leaves the model alone, or changes only its scaling, restarts none of its
        replicas. (Serve's own resource options, actor and placement group, restart them by themselves.)
        """
        unbuilt = {"serve_options": True, "spec": {"scaling", "default", "adapters"}}
        built = self.model_dump(mode="json", exclude=unbuilt)
        return _digest({**built, "lora": bool(self.spec.adapters)})


class DeploymentPlan(FrozenModel):
    """Everything needed to run a ServingConfig: one ModelPlan per model, the router, the CPU split, Ray's env."""

    config: ServingConfig
    models: tuple[ModelPlan, ...]
    router_options: dict[str, Any] = Field(description="Options of the router (ingress) Serve deployment.")
    engine_cpus: str | None = Field(
        None, description="Cores each node keeps for engine compute (a CPU list); the rest run Ray and serving."
    )
    ray_env: dict[str, str] = Field(description="Environment of every Ray process on the cluster's nodes.")
    pipelines: tuple[PipelinePlan, ...] = Field(
        (), description="The pipelines the router runs over the models (virtual models; no deployment of their own)."
    )

    def model(self, model_id: str) -> ModelPlan | None:
        """The plan a request naming `model_id` reaches (`id@version`, or a bare id: its default version), or None."""
        spec = served_names(m.spec for m in self.models).get(model_id)
        return next((m for m in self.models if m.spec is spec), None)

    @property
    def router_version(self) -> str:
        """Serve's code version of the router deployment: a digest of the whole plan, which the router is built from
        (the config and every model's plan). Any change rolls the router replicas over, draining each."""
        return _digest(self.model_dump(mode="json"))


def compile_plan(config: ServingConfig, *, engine_cpus: str | None = None) -> DeploymentPlan:
    """Compile a config into its deployment plan (pure: reads nothing but its arguments).

    Args:
        config: the serving config.
        engine_cpus: the engine cores of the node's CPU split (a CPU list such as '0-5'; see `deployments.cpus`),
            or None when nothing is split.

    Raises:
        PlanError: a model's engine settings contradict each other or the spec.
    """
    if engine_cpus is not None:
        try:
            engine_cpus = format_cpu_list(parse_cpu_list(engine_cpus))
        except ValueError as exc:
            raise PlanError(f"engine cores: {exc}") from None
    router = config.router
    return DeploymentPlan(
        config=config,
        models=tuple(
            plan_model(spec, engine_cpus=engine_cpus, drain_s=router.request_timeout_s + _DRAIN_MARGIN_S)
            for spec in config.models
        ),
        router_options={
            "name": ROUTER_DEPLOYMENT,
            "num_replicas": router.num_replicas,
            "max_ongoing_requests": router.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": router.num_cpus},
            # A router replica rolled over by a redeploy finishes the requests it holds (see DRAIN_WAIT_LOOP_S).
            "graceful_shutdown_wait_loop_s": DRAIN_WAIT_LOOP_S,
            "graceful_shutdown_timeout_s": router.request_timeout_s + _DRAIN_MARGIN_S,
        },
        engine_cpus=engine_cpus,
        ray_env={**RAY_ENV, **ingress_env(router.ingress)},
        pipelines=plan_pipelines(config.models, config.pipelines),
    )


def plan_model(spec: ModelSpec, *, engine_cpus: str | None = None, drain_s: float = _DEFAULT_DRAIN_S) -> ModelPlan:
    """The plan of one model (see `compile_plan`); `drain_s` bounds how long a stopped replica finishes its requests.

    Raises:
        PlanError: the model's engine settings contradict each other or the spec.
    """
    bundles = _worker_bundles(spec)
    if bundles is None:
        demand, strategy = (_replica_demand(spec),), "PACK"
    else:
        demand, strategy = tuple(bundles), spec.parallelism.placement_strategy
    return ModelPlan(
        spec=spec,
        serve_options=_serve_options(spec, bundles, drain_s),
        bundles=demand,
        strategy=strategy,
        engine=plan_engine(spec, engine_cpus=engine_cpus),
    )


def plan_engine(spec: ModelSpec, *, engine_cpus: str | None = None) -> EnginePlan:
    """What the spec's engine starts with (see `EnginePlan`).

    Raises:
        PlanError: the model's engine settings contradict each other or the spec.
    """
    if spec.engine == "vllm":
        return _vllm_plan(spec, engine_cpus)
    on_cpu = spec.resources.num_gpus == 0
    return EnginePlan(kwargs=dict(spec.engine_kwargs), cpus=engine_cpus if on_cpu else None)


# -- Ray and Serve --------------------------------------------------------------------------------------------


def _accelerator(spec: ModelSpec) -> dict[str, float]:
    kind = spec.resources.accelerator_type
    return {f"accelerator_type:{kind}": _ACCELERATOR_SHARE} if kind else {}


def _worker_bundles(spec: ModelSpec) -> list[dict[str, float]] | None:
    """One bundle per tensor/pipeline-parallel worker, or None for a single-worker replica.

    As in Ray Serve LLM, the first bundle also holds the replica actor itself (CPUs only): the engine's
    workers, started by vLLM inside this placement group, take the GPUs. CPU-only specs get CPU bundles.
    """
    world = spec.parallelism.world_size
    if world == 1:
        return None
    r = spec.resources
    if r.num_gpus > 0:
        worker = {"GPU": r.num_gpus, **_accelerator(spec)}
        first = {"CPU": r.num_cpus, **worker}
    else:
        worker = {"CPU": r.num_cpus}
        first = {"CPU": 2 * r.num_cpus}
    return [first] + [dict(worker) for _ in range(world - 1)]


def _replica_demand(spec: ModelSpec) -> dict[str, float]:
    """What a single-worker replica actor takes from its node (the actor options below, as resources)."""
    r = spec.resources
    demand = {"CPU": r.num_cpus}
    if r.num_gpus:
        demand["GPU"] = r.num_gpus
    demand.update(_accelerator(spec))
    if r.memory_gb:
        demand["memory"] = float(int(r.memory_gb * _GIB))
    return demand


def _serve_options(spec: ModelSpec, bundles: list[dict[str, float]] | None, drain_s: float) -> dict[str, Any]:
    r = spec.resources
    actor: dict[str, Any] = {"num_cpus": r.num_cpus}
    if bundles is None:
        # A single worker runs inside the replica: the replica itself holds the GPU (Ray then sets
        # CUDA_VISIBLE_DEVICES for it) and lands on a node of the asked accelerator type.
        actor["num_gpus"] = r.num_gpus
        if r.accelerator_type:
            actor["accelerator_type"] = r.accelerator_type
    if r.memory_gb:
        actor["memory"] = int(r.memory_gb * _GIB)
    scaling = spec.scaling
    options: dict[str, Any] = {
        "name": spec.deployment_name,
        "ray_actor_options": actor,
        "max_ongoing_requests": scaling.max_ongoing_requests,
        # Past this many requests waiting at a router replica, more get a 429 instead of an unbounded wait.
        "max_queued_requests": scaling.max_queued_requests,
        # Serve calls the replica's check_health (engine alive, not wedged: `health.stall_timeout_s`) this often,
        # and fails a check that does not answer in time; a failed check makes Serve replace the replica.
        "health_check_period_s": spec.health.period_s,
        "health_check_timeout_s": spec.health.timeout_s,
        # A stopped replica finishes the requests it holds (see DRAIN_WAIT_LOOP_S).
        "graceful_shutdown_wait_loop_s": DRAIN_WAIT_LOOP_S,
        "graceful_shutdown_timeout_s": drain_s,
        # A replica whose engine cannot start (bad weights path, GPUs on a CPU build) fails the same way
        # every time: report it after 3 tries instead of Serve's default 20.
        "max_constructor_retry_count": 3,
    }
    router = _request_router_config(spec)
    if router is not None:
        options["request_router_config"] = router
    if spec.adapters:
        # Applied by the replicas' `reconfigure`, in place: a changed adapter list restarts none of them.
        options["user_config"] = adapter_user_config(spec)
    if bundles is not None:
        options["placement_group_bundles"] = bundles
        options["placement_group_strategy"] = spec.parallelism.placement_strategy
    if scaling.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "initial_replicas": scaling.initial_replicas
            if scaling.initial_replicas is not None
            else max(scaling.min_replicas, 1),
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": AUTOSCALING_LOOK_BACK_S,
            "metrics_interval_s": AUTOSCALING_METRICS_INTERVAL_S,
        }
        if scaling.policy == "queue":
            options["autoscaling_config"]["policy"] = {
                "policy_function": autoscaling.POLICY_PATH,
                "policy_kwargs": {
                    "target_ongoing_requests": scaling.target_ongoing_requests,
                    "downscale_threshold": scaling.downscale_threshold,
                    "upscale_step": scaling.upscale_step,
                    "target_ttft_s": scaling.target_ttft_s,
                },
            }
    else:
        options["num_replicas"] = scaling.max_replicas
    return options


def adapter_user_config(spec: ModelSpec) -> dict[str, Any]:
    """The user_config of a model with LoRA adapters: what its replicas' `reconfigure` takes (JSON, as Serve wants)."""
    return {"adapters": [{"name": a.name, "path": str(a.path)} for a in spec.adapters]}


def _request_router_config(spec: ModelSpec) -> dict[str, Any] | None:
    """Serve's `request_router_config` of the spec's routing policy, as the dict Serve accepts; None for 'pow2'."""
    routing = spec.routing
    if routing.policy == "pow2":
        return None
    kwargs: dict[str, Any] = {"table_size": routing.table_size, "overload_queue_len": routing.overload_queue_len}
    if routing.policy == "prefix":
        kwargs |= {"block_chars": routing.prefix_block_chars, "max_chars": routing.prefix_max_chars}
    return {"request_router_class": REQUEST_ROUTERS[routing.policy], "request_router_kwargs": kwargs}


# -- vLLM -----------------------------------------------------------------------------------------------------


def _vllm_plan(spec: ModelSpec, engine_cpus: str | None) -> EnginePlan:
    """The AsyncEngineArgs keywords of a vllm spec. A replica without GPUs runs vLLM's CPU build."""
    options = dict(spec.engine_kwargs)
    owned = sorted(set(options) & set(_VLLM_FROM_SPEC))
    if owned:
        raise PlanError(
            f"model '{spec.id}': engine_kwargs {owned} are set by the model spec; set "
            f"{', '.join(sorted({_VLLM_FROM_SPEC[k] for k in owned}))} instead"
        )
    kv_space = options.pop("cpu_kvcache_space_gb", None)
    threads_bind = options.pop("cpu_omp_threads_bind", None)
    on_cpu = spec.resources.num_gpus == 0
    kwargs: dict[str, Any] = {
        "model": spec.source,
        "tokenizer": spec.source,
        # 'auto' means float32 on CPU (vLLM itself would pick bfloat16, poor for small models there);
        # on GPU vLLM picks from the checkpoint and the device.
        "dtype": "float32" if spec.dtype == "auto" and on_cpu else spec.dtype,
        "tensor_parallel_size": spec.parallelism.tensor_parallel_size,
        "pipeline_parallel_size": spec.parallelism.pipeline_parallel_size,
        # The `model_name` label of vLLM's own metrics (ray_vllm_*): `id@version` (the bare id when unversioned),
        # as every modelfleet metric labels `model`. Those metrics stay on (vLLM's default, no
        # `disable_log_stats`); in a replica they go out through Ray's metrics agent (deployments.metrics). The
        # bench's vLLM-server baseline reads these keywords too: it does the same work.
        "served_model_name": spec.versioned_id,
        # Compiling triples the load time on CPU for no measured speed-up.
        "enforce_eager": on_cpu,
    }
    if spec.context_length is not None:
        kwargs["max_model_len"] = spec.context_length
    if spec.adapters:
        # vLLM loads an adapter on its first request and keeps an LRU of them: `max_loras` in a batch, and the
        # same number in memory (`max_cpu_loras`), so a further adapter evicts the least recently used.
        kwargs["enable_lora"] = True
        kwargs["max_loras"] = spec.max_loaded_adapters
        kwargs["max_cpu_loras"] = spec.max_loaded_adapters
        kwargs["max_lora_rank"] = spec.max_lora_rank
    if spec.parallelism.world_size > 1 and not on_cpu:
        # Workers become Ray actors in the replica's placement group, as in Ray Serve LLM.
        kwargs["distributed_executor_backend"] = "ray"
    env: dict[str, str] = {}
    if on_cpu:
        if kv_space is not None:
            if not isinstance(kv_space, int | float) or isinstance(kv_space, bool) or kv_space <= 0:
                raise PlanError(f"model '{spec.id}': engine_kwargs.cpu_kvcache_space_gb must be > 0, got {kv_space!r}")
            kwargs["kv_cache_memory_bytes"] = int(kv_space * _GIB)
        elif not set(_KV_SIZE_KWARGS) & set(options):
            # vLLM's CPU default sizes the cache from one NUMA node's memory and refuses to start on small
            # machines; an explicit size also skips its warm-up pass.
            kwargs["kv_cache_memory_bytes"] = int(_DEFAULT_CPU_KV_CACHE_GIB * _GIB)
        if threads_bind is None and spec.parallelism.world_size == 1 and engine_cpus:
            threads_bind = engine_cpus  # vLLM's model threads compute on the engine cores
        if threads_bind is not None:
            if not isinstance(threads_bind, str) or not threads_bind:
                raise PlanError(f"model '{spec.id}': engine_kwargs.cpu_omp_threads_bind must be a non-empty string")
            # Vendor quirk: the CPU build reads its thread binding only from this variable, in the engine-core
            # process it spawns, which inherits the replica's environment. One engine per replica.
            env["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    elif kv_space is not None or threads_bind is not None:
        raise PlanError(
            f"model '{spec.id}': engine_kwargs cpu_kvcache_space_gb and cpu_omp_threads_bind apply to CPU "
            "replicas only (resources.num_gpus is set)"
        )
    elif 0 < spec.resources.num_gpus < 1 and not set(_KV_SIZE_KWARGS) & set(options):
        # Replicas sharing a GPU: each claims only its share of what vLLM would take by default.
        kwargs["gpu_memory_utilization"] = round(_GPU_MEMORY_UTILIZATION * spec.resources.num_gpus, 3)
    kwargs.update(options)
    return EnginePlan(kwargs=kwargs, env=env, cpus=engine_cpus if on_cpu else None)
