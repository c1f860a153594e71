"""The `modelfleet bench` command (also `python -m cluster.bench`): parse the options, run every system, check
the token counts, print the table and write the outputs. Only this module prints and sets exit codes.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from cluster.bench import prefix_report, report
from cluster.bench.load import LoadPlan
from cluster.bench.options import BenchOptions, build_parser, parse_options
from cluster.bench.run import check_tokens, run_all, run_routing_compare
from cluster.bench.systems.process import BenchError
from deployments.config import ConfigError

__all__ = ["main"]


class _Stop(BaseException):
    """Raised by SIGTERM in the main thread: unwinds through every `finally` that stops a system."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark: baselines first, then the target; print the table and write the outputs.

    Returns 0, 1 when a system failed or (ignore_eos on) a request returned other than max_tokens tokens (the
    outputs are still written), 2 for a bad command line (argparse's exit), 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    options = parse_options(argv, parser)
    try:
        plan = options.load_plan()
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="mf-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # Both, explicitly: a process started in the background begins with SIGINT ignored, and ray.init
    # replaces the TERM handler (modelfleet_cluster puts this one back).
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    uptime_before = _uptime()
    try:
        if options.routing_compare:
            results = run_routing_compare(options, plan)
            return _routing_report(options, argv, plan, results, uptime_before)
        results = run_all(
            list(options.compare),
            plan,
            model=options.model,
            config_path=options.config_path,
            url=options.url,
            start_modelfleet=options.start_modelfleet,
            ready_timeout_s=options.ready_timeout,
            num_cpus=options.num_cpus,
            log_dir=log_dir,
            progress=options.progress,
            engine_cpus=options.engine_cpus,
            vllm_bench=options.vllm_bench,
            ingress=options.ingress,
        )
    except (BenchError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop) as stop:
        print(f"interrupted ({stop}): every system this run started was stopped", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    results["command"] = shlex.join(["python", "-m", "cluster.bench", *argv])
    results["plan"] = {**asdict(replace(plan, prompts=plan.prompts[:3])), "num_prompts": len(plan.prompts)}
    results["machine"] = report.machine_info()
    results["token_check"] = mismatches = check_tokens(results["systems"], plan)
    print(report.markdown_table(results["systems"], plan.mode))
    print(f"\nlogs: {log_dir}")
    if options.out_json:
        options.out_json.write_text(json.dumps(results, indent=2) + "\n")
    if options.out_png:
        report.write_png(results, options.out_png)
    if options.out_md:
        report.write_markdown_section(options.out_md, options.md_title, results)
    return _token_exit(mismatches)


def _uptime() -> str:
    """`uptime`'s line (the load averages), read from /proc."""
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    return f"load average {load}"


def _routing_report(
    options: BenchOptions, argv: list[str], plan: LoadPlan, results: dict[str, Any], uptime_before: str
) -> int:
    """Print and write the `--routing-compare` report; the exit status as `main`'s."""
    results["uptime_before"], results["uptime_after"] = uptime_before, _uptime()
    results["command"] = shlex.join(["python", "-m", "cluster.bench", *argv])
    results["plan"] = asdict(replace(plan, prompts=()))  # the workload's prompts: results["workload"]
    results["machine"] = report.machine_info()
    results["token_check"] = mismatches = check_tokens(results["systems"], plan)
    print(prefix_report.routing_table(results["systems"]))
    if options.out_json:
        options.out_json.write_text(json.dumps(results, indent=2) + "\n")
    if options.out_md:
        title = options.md_title if "md_title" in options.model_fields_set else prefix_report.ROUTING_TITLE
        prefix_report.write_routing_section(options.out_md, title, results)
    return _token_exit(mismatches)


def _token_exit(mismatches: list[str]) -> int:
    if mismatches:
        print(
            "error: ignore_eos is on, yet not every request returned exactly max_tokens tokens:\n  "
            + "\n  ".join(mismatches),
            file=sys.stderr,
        )
        return 1
    return 0
