"""`modelfleet batch ...`: thin subcommands over cluster.jobs on the local cluster. `cluster.cli` hands every
argument after the word `batch` to `main` (as it does for `bench`); only `main` and the commands print."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict

from cluster import jobs, local
from cluster.cli import DEFAULT_CONFIG, prepare_models
from deployments.config import ConfigError, load_config

__all__ = ["build_parser", "main"]


def _say(line: str) -> None:
    print(line, flush=True)


def _running_cluster() -> local.ClusterState:
    state = local.read_state()
    if state is None:
        raise local.ClusterError(
            "no local cluster is running: start one with `modelfleet up` (its dashboard, on by default, takes jobs)"
        )
    return state


def _line(status: jobs.BatchStatus) -> str:
    progress = f", {status.progress}" if status.progress else ""
    # Ray's message only says something new while the job waits, or after it failed or was stopped.
    message = f": {status.message}" if status.message and status.status not in ("RUNNING", "SUCCEEDED") else ""
    return f"job {status.job_id} {status.status}{progress}{message}"


def _cmd_submit(args: argparse.Namespace) -> int:
    config = load_config(args.config or DEFAULT_CONFIG)
    state = _running_cluster()
    address = jobs.job_address(state)
    spec = jobs.build_spec(
        config,
        args.model,
        args.input,
        args.output,
        engine_cpus=state.engine_cpus,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
    )
    prepare_models(config, only=spec.model.spec.id)  # every version of the id: `only` takes a bare id
    job_id = jobs.submit(spec, address=address)
    _say(f"submitted batch job {job_id}: model {args.model}, {spec.input} -> {spec.output}")
    if not args.wait:
        _say(f"follow it with `modelfleet batch status {job_id}` (or `logs`, `cancel`)")
        return 0
    final = jobs.wait(job_id, address=address, timeout_s=args.timeout, on_progress=lambda s: _say(_line(s)))
    if final.status == "SUCCEEDED":
        _say(f"wrote {spec.output}")
        return 0
    _say(f"see `modelfleet batch logs {job_id}`")
    return 1


def _cmd_status(args: argparse.Namespace) -> int:
    status = jobs.status(args.job_id, address=jobs.job_address(_running_cluster()))
    if args.json:
        _say(json.dumps(asdict(status), indent=2))
        return 0
    _say(_line(status))
    if status.model:
        _say(f"model {status.model}: {status.input} -> {status.output}")
    if status.done and status.status != "SUCCEEDED" and status.output:
        _say(f"lines written before it ended: {status.partial_output}")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    sys.stdout.write(jobs.logs(args.job_id, address=jobs.job_address(_running_cluster())))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    status = jobs.cancel(args.job_id, address=jobs.job_address(_running_cluster()), timeout_s=args.timeout)
    _say(_line(status))
    if status.status == "STOPPED" and status.output:
        _say(f"lines written before it stopped: {status.partial_output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of `modelfleet batch`."""
    field = jobs.BatchJobSpec.model_fields
    parser = argparse.ArgumentParser(
        prog="modelfleet batch",
        description="Batch inference over an OpenAI batch file (one {custom_id, method, url, body} per line), as a "
        "Ray job on the local cluster started with `modelfleet up`. The job reads and writes the files "
        "on this machine; the output has one line per input line, in any order.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="submit a batch job")
    p.add_argument("--config", help=f"serving config YAML (default: {DEFAULT_CONFIG.name})")
    p.add_argument(
        "--model",
        required=True,
        help="the config's model that answers every line: its id (the default version), or id@version",
    )
    p.add_argument("--input", required=True, help="input JSONL file (OpenAI batch format)")
    p.add_argument("--output", required=True, help="output JSONL file, written when the job succeeds")
    for name in ("batch_size", "concurrency"):
        info = field[name]
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"{info.description} Default {info.default}.")
    p.add_argument("--wait", action="store_true", help="wait until the job ends, printing its progress")
    p.add_argument("--timeout", type=float, default=86400.0, help="with --wait: seconds to wait at most")
    p.set_defaults(func=_cmd_submit)
    p = sub.add_parser("status", help="a job's state and progress (lines done / total)")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("logs", help="a job's log so far")
    p.add_argument("job_id")
    p.set_defaults(func=_cmd_logs)
    p = sub.add_parser("cancel", help="stop a job and wait until it has stopped")
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to stop")
    p.set_defaults(func=_cmd_cancel)
    return parser


def main(argv: Sequence[str]) -> int:
    """`modelfleet batch ARGS`: run one subcommand; its exit code (1: a cluster or job error, 2: a bad config)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(list(argv))
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except local.ClusterError as exc:  # BatchError included
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
