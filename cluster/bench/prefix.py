"""`modelfleet bench --routing-compare`: one local modelfleet cluster serving one vLLM model on several replicas with
prefix caching on, measured under each routing policy in turn with the same shared-prefix workload
(`cluster.bench.prefix_workload`). Each policy gets a fresh replica set (the app is deleted and deployed again), so
none inherits another's cache; vLLM's own prefix-cache counters are read from Ray's metrics before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cluster.bench.client import run_load
from cluster.bench.load import LoadPlan, level_label
from cluster.bench.prefix_workload import (
    PrefixWorkload,
    SeriesValues,
    build_workload,
    counter_delta,
    expected_hit_rate,
    hit_rate,
    kv_bytes_per_token,
)
from cluster.bench.systems.modelfleet import modelfleet_cluster
from cluster.bench.systems.process import ALL_CPUS, BenchError, wait_answer
from deployments import cpus
from deployments.config import ServingConfig
from models.spec import ModelSpec

__all__ = ["HITS", "QUERIES", "RoutingCompare", "compare_policies", "routing_config", "tokenizer_counter"]

# vLLM's `vllm:prefix_cache_queries` / `vllm:prefix_cache_hits` (prompt tokens looked up / found in the cache), as
# Ray's metrics agent exports them from a replica (deployments.metrics.vllm_stat_loggers).
QUERIES, HITS = "ray_vllm_prefix_cache_queries_total", "ray_vllm_prefix_cache_hits_total"
_BLOCK_SIZE = re.compile(r'^ray_vllm_cache_config_info\{[^}]*\bblock_size="(\d+)"', re.MULTILINE)
_GIB = 1 << 30
_SETTLE_POLL_S = 5.0  # Ray's metrics agent exports every few seconds: two equal reads this far apart mean settled
_SETTLE_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class RoutingCompare:
    """What one `--routing-compare` run does besides the load plan."""

    policies: tuple[str, ...]
    replicas: int
    groups: int
    repeats: int
    prefix_tokens: int
    kv_cache_gb: float


def tokenizer_counter(spec: ModelSpec) -> Callable[[str], int]:
    """Token counts by the model's own tokenizer (as vLLM counts a completions prompt: no special tokens added).

    Raises:
        BenchError: the model has no source (echo) or its tokenizer cannot be loaded.
    """
    from models.registry import resolve_source

    if not spec.source:
        raise BenchError(f"model '{spec.id}' has no source: --routing-compare needs a tokenizer")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(resolve_source(str(spec.source))))
    except (ValueError, OSError, ImportError, TimeoutError) as exc:
        raise BenchError(f"cannot load the tokenizer of model '{spec.id}': {exc}") from exc
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def routing_config(config: ServingConfig, model_id: str, policy: str, compare: RoutingCompare) -> ServingConfig:
    """`config` serving only `model_id`, on `compare.replicas` fixed replicas, prefix caching on, a KV cache of
    `compare.kv_cache_gb` per replica, routed by `policy`.

    Raises:
        BenchError: the model is not in the config, is not a vllm model, or the result is invalid.
    """
    spec = config.model(model_id)
    if spec is None:
        raise BenchError(f"model '{model_id}' is not in the config")
    if spec.engine != "vllm":
        raise BenchError(f"--routing-compare reads vLLM's prefix-cache counters: model '{model_id}' is not on vllm")
    raw = spec.model_dump(mode="json", exclude_unset=True)
    n = compare.replicas
    raw["scaling"] = {**raw.get("scaling", {}), "min_replicas": n, "max_replicas": n, "initial_replicas": n}
    raw["routing"] = {"policy": policy}
    raw["engine_kwargs"] = {
        **raw.get("engine_kwargs", {}),
        "enable_prefix_caching": True,
        "cpu_kvcache_space_gb": compare.kv_cache_gb,
    }
    try:
        return config.model_copy(update={"models": (ModelSpec.model_validate(raw),)})
    except ValueError as exc:
        raise BenchError(f"--routing-compare: {exc}") from exc


def kv_capacity(spec: ModelSpec, kv_cache_gb: float) -> dict[str, Any]:
    """The tokens one replica's KV cache holds, from the model's config.json (None where it cannot be read)."""
    from models.registry import resolve_source

    try:
        config = json.loads((Path(resolve_source(str(spec.source))) / "config.json").read_text())
        per_token = kv_bytes_per_token(config, 2 if spec.dtype in ("bfloat16", "float16", "half") else 4)
    except (ValueError, OSError, KeyError, ImportError, TimeoutError):
        return {"bytes_per_token": None, "tokens_per_replica": None}
    return {"bytes_per_token": per_token, "tokens_per_replica": int(kv_cache_gb * _GIB) // per_token}


def read_counters() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The prefix-cache counters of every live node's Ray metrics export, one value per series (label set)."""
    return _scrape()[0]


def read_block_size() -> int | None:
    """vLLM's KV-cache block size (tokens), from its `cache_config_info` metric; None when not exported."""
    return _scrape()[1]


def _scrape() -> tuple[dict[str, dict[tuple[tuple[str, str], ...], float]], int | None]:
    import ray

    block_size = None
    pattern = re.compile(rf"^({QUERIES}|{HITS})\{{([^}}]*)\}}\s+([0-9.eE+-]+)$")
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {QUERIES: {}, HITS: {}}
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        try:
            text = httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10, trust_env=False).text
        except httpx.HTTPError:
            continue
        if (size := _BLOCK_SIZE.search(text)) is not None:
            block_size = int(size.group(1))
        for line in text.splitlines():
            match = pattern.match(line)
            if match:
                labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(2))))
                found[match.group(1)][labels] = float(match.group(3))
    return found, block_size


def _settled(base: dict[str, SeriesValues] | None, at_least: float) -> tuple[dict[str, Any], bool]:
    """Read the counters until two reads `_SETTLE_POLL_S` apart agree and (when `base` is given) the queries
    counted since `base` reach `at_least` tokens; gives up after `_SETTLE_TIMEOUT_S` (returned False)."""
    deadline = time.monotonic() + _SETTLE_TIMEOUT_S
    last = read_counters()
    while time.monotonic() < deadline:
        time.sleep(_SETTLE_POLL_S)
        now = read_counters()
        enough = base is None or counter_delta(base[QUERIES], now[QUERIES]) >= at_least
        if now == last and enough:
            return now, True
        last = now
    return last, False


def _wait_replicas(app: str, deployment: str, replicas: int, timeout_s: float) -> None:
    """Wait until the app runs with `replicas` RUNNING replicas of `deployment`.

    Raises:
        BenchError: not within `timeout_s`.
    """
    from ray import serve

    deadline = time.monotonic() + timeout_s
    seen = "no status"
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None:
            states = status.deployments[deployment].replica_states if deployment in status.deployments else {}
            running = sum(n for state, n in states.items() if getattr(state, "value", state) == "RUNNING")
            seen = f"app {status.status}, replicas {dict(states)}"
            if getattr(status.status, "value", status.status) == "RUNNING" and running == replicas:
                return
        time.sleep(1.0)
    raise BenchError(f"{replicas} replicas of {deployment} were not running within {timeout_s:.0f} s ({seen})")


def _redeploy(config: ServingConfig, base_url: str, engine_cpus: str | None, timeout_s: float) -> float:
    """Delete the app and deploy `config` in its place (fresh replicas); seconds until it answered.

    Raises:
        BenchError: the new app failed to deploy or never answered.
    """
    from ray import serve

    from deployments.app import build_app_from_plan
    from deployments.plan import compile_plan

    started = time.perf_counter()
    serve.delete(config.name)
    failure: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(
                build_app_from_plan(compile_plan(config, engine_cpus=engine_cpus)), name=config.name, route_prefix="/"
            )
        except Exception as exc:  # noqa: BLE001 - reported by the waiting loop below
            failure.append(exc)

    threading.Thread(target=deploy, name="bench-serve-redeploy", daemon=True).start()
    spec = config.models[0]
    exited = lambda: f"deploying modelfleet failed: {failure[0]}" if failure else None  # noqa: E731
    wait_answer(base_url, spec.id, timeout_s=timeout_s, exited=exited, task=spec.task)
    return time.perf_counter() - started


def _pin(engine_cpus: str | None) -> None:
    """Keep every process of the cluster but the engines' compute threads off the engine cores (as after start)."""
    engine = cpus.parse_cpu_list(engine_cpus) if engine_cpus else None
    if engine and ALL_CPUS - engine:
        client = cpus.usable_cpus()
        cpus.pin_process_tree(os.getpid(), cpus.CpuPlan(engine=engine, serving=ALL_CPUS - engine), include_root=False)
        cpus.pin_current_thread(client)


def _measure(base_url: str, model: str, plan: LoadPlan, workload: PrefixWorkload, name: str, progress: bool) -> Any:
    """Warm-up requests (short prompts of their own, so no workload prefix is cached before the window), then the
    workload, once, in its order."""
    level = plan.levels[0]
    load = {**plan.load_kwargs(level), "warmup": 0, "progress": progress}
    warm = {**plan.request_kwargs(), "prompt": tuple(f"Warm-up request {i}: say hello." for i in range(8))}
    if plan.warmup:
        asyncio.run(run_load(base_url, model, **{**load, **warm, "num_requests": plan.warmup, "progress": False}))
    kwargs = {**plan.request_kwargs(), "prompt": workload.prompts, **load, "num_requests": len(workload.prompts)}
    return asyncio.run(run_load(base_url, model, label=f"{name} {level_label(level)}", **kwargs))


def compare_policies(
    config: ServingConfig,
    model: str,
    plan: LoadPlan,
    compare: RoutingCompare,
    *,
    ready_timeout_s: float,
    num_cpus: int,
    engine_cpus: str | None,
    progress: bool,
) -> dict[str, Any]:
    """Start one cluster, and for each policy in turn: deploy fresh replicas routed by it, warm up, measure the
    workload, read vLLM's prefix-cache counters (the delta over the window, summed over the replicas).

    Raises:
        BenchError: a deploy failed, or the model is unfit (see `routing_config`).
    """
    first = routing_config(config, model, compare.policies[0], compare)
    spec = first.models[0]
    workload = build_workload(compare.groups, compare.repeats, compare.prefix_tokens, tokenizer_counter(spec))
    systems: list[dict[str, Any]] = []
    with modelfleet_cluster(
        first, model, ready_timeout_s=ready_timeout_s, num_cpus=num_cpus, engine_cpus=engine_cpus
    ) as started:
        for i, policy in enumerate(compare.policies):
            target = routing_config(config, model, policy, compare)
            target = target.model_copy(update={"router": first.router.model_copy(update={"port": _port(started)})})
            ready_s = started.time_to_ready_s or 0.0
            if i:
                ready_s = _redeploy(target, started.base_url, engine_cpus, ready_timeout_s)
            _wait_replicas(target.name, spec.deployment_name, compare.replicas, ready_timeout_s)
            _pin(engine_cpus)
            systems.append(
                _one_policy(started.base_url, model, plan, workload, policy, compare.replicas, ready_s, progress)
            )
    return {
        "model": model,
        "spec": spec.model_dump(mode="json"),
        "systems": systems,
        "workload": {
            "groups": compare.groups,
            "repeats": compare.repeats,
            "replicas": compare.replicas,
            "prefix_tokens": [min(workload.prefix_tokens), max(workload.prefix_tokens)],
            "prompt_tokens": [min(workload.prompt_tokens), max(workload.prompt_tokens)],
            "queried_tokens": sum(workload.prompt_tokens),
            "kv_cache_gb": compare.kv_cache_gb,
            **kv_capacity(spec, compare.kv_cache_gb),
            "distinct_prefix_tokens": sum(workload.prefix_tokens),
            "first_prompt": workload.prompts[0][:160],
        },
    }


def _port(started: Any) -> int:
    return int(started.base_url.rsplit(":", 1)[1])


def _one_policy(
    base_url: str,
    model: str,
    plan: LoadPlan,
    workload: PrefixWorkload,
    policy: str,
    replicas: int,
    ready_s: float,
    progress: bool,
) -> dict[str, Any]:
    with _load_average() as load_avg:
        before, settled_before = _settled(None, 0)
        result = _measure(base_url, model, plan, workload, f"routing {policy}", progress)
        after, settled_after = _settled(before, sum(workload.prompt_tokens))
    block = read_block_size()
    hits, queries = counter_delta(before[HITS], after[HITS]), counter_delta(before[QUERIES], after[QUERIES])
    label = level_label(plan.levels[0])
    return {
        "name": policy,
        "time_to_ready_s": ready_s,
        "idle_memory": None,
        "levels": {label: {**result.to_dict(), "label": label}},
        "info": {
            "prefix_cache": {
                "hits": hits,
                "queries": queries,
                "hit_rate": hit_rate(hits, queries),
                "expected_hit_rate": expected_hit_rate(workload, replicas, policy, block or 1),
                "block_size": block,
                "replicas_counted": sum(1 for k, v in after[QUERIES].items() if v > before[QUERIES].get(k, 0.0)),
                "settled": settled_before and settled_after,
            },
            "load_average": load_avg,
        },
    }


@contextmanager
def _load_average() -> Iterator[dict[str, Any]]:
    """The 1-minute load average at the start and end of the block, and the highest seen (sampled every 5 s)."""
    seen: dict[str, Any] = {"start": os.getloadavg()[0]}
    samples = [seen["start"]]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(5.0):
            samples.append(os.getloadavg()[0])

    thread = threading.Thread(target=sample, name="bench-loadavg", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=10)
        seen.update(end=os.getloadavg()[0], max=max(samples), mean=sum(samples) / len(samples))
