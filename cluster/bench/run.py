"""One bench run: each baseline, then the target, started, measured with the same `LoadPlan` and stopped in turn
(only one engine runs at any moment), on the core split `modelfleet up` makes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cluster.bench.client import run_load
from cluster.bench.crosscheck import run_vllm_bench
from cluster.bench.load import LoadPlan, level_label
from cluster.bench.options import TARGET, BenchOptions
from cluster.bench.prefix import RoutingCompare, compare_policies
from cluster.bench.stats import token_mismatches
from cluster.bench.systems.in_process import run_in_process
from cluster.bench.systems.modelfleet import modelfleet_cluster
from cluster.bench.systems.process import ALL_CPUS, BenchError, Started, SystemResult
from cluster.bench.systems.vllm_server import vllm_server
from cluster.local import CLUSTER_ENV
from deployments import cpus
from deployments.config import ServingConfig, load_config
from models.spec import ModelSpec

__all__ = ["check_tokens", "run_all", "run_routing_compare"]


@dataclass(frozen=True)
class _Measure:
    """How every HTTP system is measured: our load client at each level, then (optionally) vLLM's."""

    model: str
    plan: LoadPlan
    progress: bool
    log_dir: Path
    vllm_bench_tokenizer: Path | None = None

    def __call__(self, name: str, started: Started) -> SystemResult:
        async def levels() -> dict[str, dict[str, Any]]:
            out = {}
            for level in self.plan.levels:
                kwargs = {**self.plan.request_kwargs(), **self.plan.load_kwargs(level), "progress": self.progress}
                result = await run_load(started.base_url, self.model, label=f"{name} {level_label(level)}", **kwargs)
                out[level_label(level)] = {**result.to_dict(), "label": level_label(level)}
            return out

        result = SystemResult(name, started.time_to_ready_s, started.idle_memory, asyncio.run(levels()), started.info)
        if self.vllm_bench_tokenizer is not None:
            per_level = (self.plan.duration_s or 3600.0) + 2 * self.plan.request_timeout_s
            result.info["vllm_bench"] = run_vllm_bench(
                name,
                started.base_url,
                self.model,
                self.plan,
                tokenizer=self.vllm_bench_tokenizer,
                log_dir=self.log_dir,
                timeout_s=per_level,
            )
        return result


def _tokenizer(spec: ModelSpec | None) -> Path:
    """The model folder whose tokenizer `vllm bench serve` counts with.

    Raises:
        BenchError: no spec (no config), or a model without a source (echo).
    """
    from models.registry import resolve_source

    if spec is None or not spec.source:
        raise BenchError("--vllm-bench needs the model's tokenizer: give a config whose model has a source")
    try:
        return resolve_source(str(spec.source))
    except (ValueError, ImportError, TimeoutError) as exc:
        raise BenchError(f"cannot resolve the source of model '{spec.id}': {exc}") from exc


def check_tokens(systems: list[dict[str, Any]], plan: LoadPlan) -> list[str]:
    """With ignore_eos on, every completed request must have returned exactly `max_tokens` completion tokens:
    one line per system and level where some did not, by our client's count and by `vllm bench serve`'s where
    it ran (empty when all did, or when the check does not apply)."""
    expected = plan.exact_tokens
    if expected is None:
        return []
    lines = []
    for system in systems:
        for label, level in system["levels"].items():
            wrong = token_mismatches(level.get("samples") or [], expected)
            if wrong:
                counts = ", ".join(f"{n} x {tokens}" for tokens, n in wrong.items())
                lines.append(f"{system['name']} {label}: {counts} tokens instead of {expected}")
        for label, crosscheck in ((system.get("info") or {}).get("vllm_bench") or {}).items():
            span = crosscheck.get("output_lens_min_max")
            if span and span != [expected, expected]:
                lines.append(f"{system['name']} {label} (vllm bench serve): {span[0]}-{span[1]} tokens, not {expected}")
    return lines


def run_all(
    compare: list[str],
    plan: LoadPlan,
    *,
    model: str,
    config_path: str | None,
    url: str | None,
    start_modelfleet: str | None,
    ready_timeout_s: float,
    num_cpus: int,
    log_dir: Path,
    progress: bool,
    engine_cpus: str = "off",
    vllm_bench: bool = False,
    ingress: Literal["python", "haproxy"] | None = None,
) -> dict[str, Any]:
    """Each baseline in `compare` (the model's spec from `config_path`), then the target: `url`, or a cluster
    started from the config file `start_modelfleet`. One at a time: only one engine runs at any moment.

    `engine_cpus` splits the cores as `modelfleet up` does (deployments.cpus): the modelfleet cluster runs on
    the serving cores with its engines on the others; the load generator (this process) runs on the serving
    cores for every system, so it never takes an engine's core; baselines start on all cores, with vLLM's
    model threads bound to the same engine cores. `vllm_bench`: each HTTP system is measured a second time by
    `vllm bench serve` (`cluster.bench.crosscheck`), recorded in its `info`. `ingress` replaces the
    `start_modelfleet` config's `router.ingress`.

    Raises:
        BenchError: a system failed to start, the model is missing from the config, bad `engine_cpus`, or
            ignore_eos asked of an echo model (which refuses it).
        ConfigError: a config file cannot be read or is invalid.
    """
    try:
        split = cpus.plan_cpus(engine_cpus, ALL_CPUS)
    except ValueError as exc:
        raise BenchError(f"--engine-cpus: {exc}") from None
    config = load_config(config_path) if config_path else None
    spec = config.model(model) if config else None
    if config is not None and spec is None:
        raise BenchError(f"model '{model}' is not in {config_path} (models: {', '.join(m.id for m in config.models)})")
    if spec is not None and spec.engine == "echo" and plan.exact_tokens is not None:
        raise BenchError(f"the echo engine refuses ignore_eos (model '{model}'): run with --no-ignore-eos")
    measure = _Measure(model, plan, progress, log_dir, _tokenizer(spec) if vllm_bench else None)
    results: list[SystemResult] = []
    engine_list = cpus.format_cpu_list(split.engine) if split else None
    with _cpu_split(split):
        for name in compare:
            if spec is None:
                raise BenchError("baselines need the model's spec: give a config")
            if name == "vllm-server":
                with vllm_server(
                    spec, ready_timeout_s=ready_timeout_s, log_dir=log_dir, engine_cpus=engine_list
                ) as started:
                    results.append(measure(name, started))
            else:
                results.append(
                    run_in_process(
                        spec,
                        plan,
                        ready_timeout_s=ready_timeout_s,
                        log_dir=log_dir,
                        progress=progress,
                        engine_cpus=engine_list,
                    )
                )
        if url:
            results.append(measure(TARGET, Started(url, info={"url": url})))
        elif start_modelfleet:
            target = with_ingress(
                config if start_modelfleet == config_path and config else load_config(start_modelfleet), ingress
            )
            with modelfleet_cluster(
                target, model, ready_timeout_s=ready_timeout_s, num_cpus=num_cpus, engine_cpus=engine_list
            ) as started:
                results.append(measure(TARGET, started))
    return {
        "model": model,
        "cpus": f"{split.describe()}; the load generator on the serving cores in every run" if split else None,
        "spec": spec.model_dump(mode="json") if spec else None,
        "systems": [asdict(r) for r in results],
    }


def run_routing_compare(options: BenchOptions, plan: LoadPlan) -> dict[str, Any]:
    """`--routing-compare`: the --start-modelfleet config's model measured under each policy in turn, in one
    cluster, on the core split `modelfleet up` makes (`cluster.bench.prefix`).

    Raises:
        BenchError: bad `--engine-cpus`, the model is missing or unfit, or a deploy failed.
        ConfigError: the config cannot be read or is invalid.
    """
    try:
        split = cpus.plan_cpus(options.engine_cpus, ALL_CPUS)
    except ValueError as exc:
        raise BenchError(f"--engine-cpus: {exc}") from None
    config = with_ingress(load_config(str(options.start_modelfleet)), options.ingress)
    compare = RoutingCompare(
        policies=options.routing_compare,
        replicas=options.replicas,
        groups=options.prefix_groups,
        repeats=options.prefix_repeats,
        prefix_tokens=options.prefix_tokens,
        kv_cache_gb=options.kv_cache_gb,
    )
    with _cpu_split(split):
        results = compare_policies(
            config,
            options.model,
            plan,
            compare,
            ready_timeout_s=options.ready_timeout,
            num_cpus=options.num_cpus,
            engine_cpus=cpus.format_cpu_list(split.engine) if split else None,
            progress=options.progress,
        )
    results["cpus"] = f"{split.describe()}; the load generator on the serving cores" if split else None
    return results


def with_ingress(config: ServingConfig, ingress: Literal["python", "haproxy"] | None) -> ServingConfig:
    """`config` with `router.ingress` replaced by `ingress` (`--ingress`; None: as it is)."""
    if ingress is None:
        return config
    return config.model_copy(update={"router": config.router.model_copy(update={"ingress": ingress})})


@contextmanager
def _cpu_split(split: cpus.CpuPlan | None) -> Iterator[None]:
    """Give Ray's processes the environment `modelfleet up` gives them (`CLUSTER_ENV`), and pin this thread, the
    load generator, to the serving cores; undo both when the block ends. `modelfleet_cluster` starts Ray on all
    cores, then moves it."""
    env = dict(CLUSTER_ENV)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    before = cpus.usable_cpus()
    if split is not None:
        cpus.pin_current_thread(split.serving)
    try:
        yield
    finally:
        cpus.pin_current_thread(before)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
