"""The report of `modelfleet bench --routing-compare`: one column per routing policy, ratios to pow2, and
the markdown section of docs/benchmarks.md (written by the bench itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.bench.prefix_workload import ratio
from cluster.bench.report import replace_section

__all__ = ["ROUTING_TITLE", "routing_table", "write_routing_section"]

ROUTING_TITLE = "Prefix-affine routing vs pow2: SmolLM2-135M on 2 vLLM replicas (CPU), shared prefixes"


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def routing_table(systems: list[dict[str, Any]]) -> str:
    """Metrics by policy (columns), and each other policy / pow2 (Serve's default; the last policy without it)."""
    names = [s["name"] for s in systems]
    base = names.index("pow2") if "pow2" in names else len(names) - 1
    others = [i for i in range(len(names)) if i != base]
    head = ["metric", *names, *(f"{names[i]} / {names[base]}" for i in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(title: str, values: list[float | None], fmt: str, ratios: bool = True) -> None:
        cells = [_fmt(v, fmt) for v in values]
        rs = [_fmt(ratio(values[i], values[base]), ".2f") + "x" if ratios else "" for i in others]
        lines.append("| " + " | ".join([title, *cells, *[r if r != "-x" else "-" for r in rs]]) + " |")

    summaries = [next(iter(s["levels"].values()))["summary"] for s in systems]
    cache = [(s.get("info") or {}).get("prefix_cache") or {} for s in systems]

    def dist(key: str, stat: str) -> list[float | None]:
        return [x[key][stat] if x.get(key) else None for x in summaries]

    row("TTFT p50 (s)", dist("ttft_s", "p50"), ".3f")
    row("TTFT p90 (s)", dist("ttft_s", "p90"), ".3f")
    row("output tok/s", [x.get("output_tokens_per_s") for x in summaries], ".1f")
    row("requests/s", [x.get("requests_per_s") for x in summaries], ".2f")
    row("e2e p50 (s)", dist("e2e_s", "p50"), ".2f")
    row("prefix-cache hit rate (vLLM's counters)", [c.get("hit_rate") for c in cache], ".3f")
    row("expected hit rate (model of the policy)", [c.get("expected_hit_rate") for c in cache], ".3f", False)
    row("prompt tokens hit (summed over replicas)", [c.get("hits") for c in cache], ".0f", False)
    row("prompt tokens queried (summed over replicas)", [c.get("queries") for c in cache], ".0f", False)
    row("replicas whose counters moved", [c.get("replicas_counted") for c in cache], ".0f", False)
    done = [f"{x['completed']} / {x['requests'] - x['completed']}" for x in summaries]
    lines.append("| " + " | ".join(["completed / errors", *done, *([""] * len(others))]) + " |")
    load = [(s.get("info") or {}).get("load_average") or {} for s in systems]
    cells = [f"{a.get('start', 0):.1f} / {a.get('mean', 0):.1f} / {a.get('max', 0):.1f}" for a in load]
    lines.append("| " + " | ".join(["load average start / mean / max", *cells, *([""] * len(others))]) + " |")
    return "\n".join(lines)


def write_routing_section(path: Path, title: str, results: dict[str, Any]) -> None:
    """Write (or replace) the section: machine, command, workload, cache sizing, uptime, the table and notes."""
    m, plan, spec, w = results["machine"], results["plan"], results.get("spec") or {}, results["workload"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    names = [s["name"] for s in results["systems"]]
    kv = (
        f"{w['kv_cache_gb']:g} GiB per replica ({w['bytes_per_token']} bytes a token: {w['tokens_per_replica']} "
        f"tokens), for {w['distinct_prefix_tokens']} tokens of distinct prefixes in all"
        if w.get("tokens_per_replica")
        else f"{w['kv_cache_gb']:g} GiB per replica"
    )
    check = results.get("token_check")
    eos = "every completed request returned exactly max_tokens" if not check else "MISMATCH: " + "; ".join(check)
    lines = [
        f"- machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}, {m['os']}; "
        + f"{packages}; {m['date']}",
        f"- command: `{results['command']}`",
        f"- model: `{results['model']}` (engine {spec.get('engine', '?')}, source {spec.get('source', '?')}, "
        f"context {spec.get('context_length')}), {w['replicas']} replicas, prefix caching on; KV cache {kv}",
        f"- workload: {w['groups']} groups x {w['repeats']} requests = {w['groups'] * w['repeats']} streaming "
        f"{plan['mode']} requests; each group a distinct document of {w['prefix_tokens'][0]}-{w['prefix_tokens'][1]} "
        f"tokens (SmolLM2's tokenizer) plus a question of its own ({w['prompt_tokens'][0]}-{w['prompt_tokens'][1]} "
        f"prompt tokens); sent in {w['repeats']} rounds, each with every group once in its own shuffled order; "
        f"{_level(plan)}, max_tokens {plan['max_tokens']}, ignore_eos ({eos}); {plan['warmup']} short warm-up "
        "requests per policy",
        f"- order: {', '.join(names)}, each on fresh replicas (the app deleted and deployed again); the counters "
        "are read before and after the measured window, once Ray's metrics export has settled",
        *([f"- cores: {results['cpus']}"] if results.get("cpus") else []),
        f"- uptime before: `{results.get('uptime_before', '?')}`; after: `{results.get('uptime_after', '?')}`",
        "",
        routing_table(results["systems"]),
        "",
        "Hit rate: vLLM's `vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` (prompt tokens found in / looked up "
        "in the replica's prefix cache), the growth over the measured window summed over the replicas. Expected: "
        "'prefix' misses once per group; 'pow2' once per group and replica it reaches, "
        "R(1-(1-1/R)^K) replicas on average for K requests over R replicas; a hit covers the prefix's whole "
        f"KV blocks ({_block(results['systems'])} tokens each, vLLM's `cache_config_info`).",
    ]
    replace_section(path, title, lines)


def _level(plan: dict[str, Any]) -> str:
    kind, value = plan["levels"][0]
    return f"concurrency {value:g}" if kind == "concurrency" else f"open loop at {value:g} requests/s"


def _block(systems: list[dict[str, Any]]) -> str:
    sizes = {((s.get("info") or {}).get("prefix_cache") or {}).get("block_size") for s in systems}
    return ", ".join(sorted(str(v) for v in sizes if v)) or "?"
