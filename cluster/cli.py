"""The `modelfleet` command: thin subcommands over cluster.local, cluster.deploy and the config schema."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from cluster import admin_cli, k8s_cli, local
from cluster import deploy as deploying
from deployments.config import ConfigError, ServingConfig, load_config
from models.spec import ModelSpec, served_names

__all__ = ["main"]

_QUESTION = "What is the capital of France?"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "deployments" / "configs" / "default.yaml"


def _say(line: str) -> None:
    print(line, flush=True)


def _config(path: str | None, port: int | None = None) -> ServingConfig:
    config = load_config(path or DEFAULT_CONFIG)
    if port is not None:
        config = config.model_copy(update={"router": config.router.model_copy(update={"port": port})})
    return config


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def prepare_models(config: ServingConfig, only: str | None = None, *, download_under: str | None = None) -> None:
    """Materialise every packaged model of the config (or only the model with id `only`) once (conversions show
    progress); with `download_under`, first download from the Hugging Face Hub the models whose sources lie under
    that folder (`models.download`).

    Raises:
        DownloadError: a source under `download_under` does not name a Hub repo.
    """
    from models.download import download, hub_targets
    from models.registry import is_packaged, resolve_source

    if download_under is not None:
        sources = [s.source for s in config.models if s.source and (only is None or s.id == only)]
        for repo_id, folder in hub_targets(sources, download_under):
            fetched = download(repo_id, folder)
            _say(f"{folder}: {'downloaded from ' + repo_id if fetched else 'already complete'}")
    for spec in config.models:
        if only is not None and spec.id != only:
            continue
        if spec.source and is_packaged(spec.source):
            started = time.monotonic()
            path = resolve_source(spec.source, progress=True)
            _say(f"model {spec.id}: {spec.source} -> {path} ({time.monotonic() - started:.1f} s)")


def _table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(nothing deployed)"
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    lines = ["  ".join(k.upper().ljust(widths[k]) for k in keys)]
    lines += ["  ".join(r[k].ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def _example(base: str, config: ServingConfig) -> str:
    chat = next((m.id for m in config.models if m.task == "generate"), None)
    embed = next((m.id for m in config.models if m.task == "embed"), None)
    lines = [f"modelfleet is serving at {base}/v1  (models: {', '.join(m.id for m in config.models)})", ""]
    if chat:
        lines += [
            "Try it:",
            f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\",
            f"    -d '{json.dumps({'model': chat, 'messages': [{'role': 'user', 'content': _QUESTION}]})}'",
        ]
    if embed:
        lines += [
            f"  curl {base}/v1/embeddings -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{embed}", "input": "hello"}}\'',
        ]
    lines += ["", "Press Ctrl-C to stop."]
    return "\n".join(lines)


def _cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _say(f"{args.config}: OK ({len(config.models)} model(s): {', '.join(m.id for m in config.models)})")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    state = local.up(
        num_cpus=args.num_cpus,
        dashboard=args.dashboard,
        engine_cpus=args.engine_cpus,
        metrics_port=args.metrics_port,
        ingress=args.ingress,
    )
    cores = f"; engines compute on cores {state.engine_cpus}" if state.engine_cpus else ""
    _say(f"local Ray cluster running at {state.gcs_address} (pid {state.pid}, {state.num_cpus} logical CPUs{cores})")
    if state.metrics_port:
        _say(f"metrics (Prometheus format): http://127.0.0.1:{state.metrics_port}/metrics")
    return 0


def _stop_cluster() -> bool:
    state = local.read_state()
    if state is None:
        return False
    # Serve first, gracefully: `ray start --block` drains for 30 s on TERM and then kills the replicas
    # outright, which leaves vLLM's shared memory behind.
    deploying.stop_serving(state)
    return local.down()


def _cmd_down(args: argparse.Namespace) -> int:
    _say("stopped the local cluster" if _stop_cluster() else "no local cluster is running")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    config = _config(args.config, args.port)
    state = local.read_state()
    if state is None:
        _say("no local cluster is running: start one with `modelfleet up` (or use `modelfleet serve`)")
        return 1
    prepare_models(config)
    base = deploying.deploy(config, state, timeout_s=args.timeout, on_progress=_say)
    _settle(state)
    _say(f"ready: {base}/v1")
    return 0


def _settle(state: local.ClusterState) -> None:
    """Once the app answers: serving processes onto the cores `up` kept free of engines."""
    if local.settle_cpus(state):
        _say(f"serving processes moved off the engine cores ({state.engine_cpus})")


class _Stop(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM while `serve` runs; unwinds to the clean shutdown."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args.config, args.port)
    started = time.monotonic()
    # A process started in the background begins with SIGINT ignored, and Kubernetes, systemd and CI stop
    # processes with TERM: handle both explicitly, from the start.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    owned = local.read_state() is None
    try:
        prepare_models(config)
        state = local.up(
            num_cpus=args.num_cpus,
            dashboard=args.dashboard,
            engine_cpus=args.engine_cpus,
            metrics_port=args.metrics_port,
            ingress=config.router.ingress,
        )
        # ray.init installs its own TERM handler (it aborts the process): take the signals back after it.
        deploying.connect(state)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _raise_stop)
        _say(f"local Ray cluster at {state.gcs_address}; deploying {config.name} ...")
        base = deploying.deploy(config, state, timeout_s=args.timeout, on_progress=_say)
        _settle(state)
        _say(f"ready in {time.monotonic() - started:.1f} s\n")
        _say(_example(base, config))
        threading.Event().wait()
    except _Stop as stop:
        _say(f"{stop}: stopping ...")
    finally:
        if owned and _stop_cluster():
            _say("stopped the local cluster")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    state = local.read_state()
    if state is None:
        if args.json:
            _say(json.dumps({"cluster": None, "deployments": []}))
        else:
            _say("no local cluster is running")
        return 1
    rows = [asdict(r) for r in deploying.status(state)]
    if args.json:
        _say(json.dumps({"cluster": asdict(state), "deployments": rows}, indent=2))
    else:
        _say(f"cluster {state.gcs_address} (pid {state.pid}, {state.num_cpus} logical CPUs)\n")
        _say(_table(rows))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from models.registry import PACKAGED_MODELS

    rows = [{"name": name, "task": m.task, "description": m.description} for name, m in PACKAGED_MODELS.items()]
    _say(_table(rows))
    return 0


def _model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    """The specs of `models add`: a YAML mapping (one spec) or list, from FILE or --spec."""
    import yaml
    from pydantic import ValidationError

    from deployments.config import format_validation_error

    source = args.file or "--spec"
    try:
        text = Path(args.file).read_text() if args.file else args.spec
        raw = yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(item, dict) for item in items):
        raise ConfigError(
            f"{source} must hold a model spec (a mapping with `id`, `task`, `engine`...) or a list of them"
        )
    try:
        return [ModelSpec.model_validate(item) for item in items]
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source)) from None


def _cmd_models_change(args: argparse.Namespace) -> int:
    from cluster import model_changes

    state = local.read_state()
    if state is None:
        _say("no local cluster is running: start one with `modelfleet up` and deploy a config first")
        return 1
    config = model_changes.running_config(args.app)
    if args.models_command == "add":
        changed = model_changes.add_models(config, _model_specs(args))
    elif args.models_command == "remove":
        changed = model_changes.remove_model(config, args.name)
    else:
        changed = model_changes.set_default(config, args.name)
    prepare_models(changed)
    _say(f"redeploying app '{changed.name}' (replicas of unchanged models keep running) ...")
    base = deploying.deploy(changed, state, timeout_s=args.timeout, on_progress=_say)
    _say(f"ready: {base}/v1  (models: {', '.join(served_names(changed.models))})")
    return 0


def _models_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "models",
        help="without a subcommand: list the packaged models a config can name as `source`; add, remove or "
        "set-default: change the models of the running app and redeploy it",
    )
    p.set_defaults(func=_cmd_models)
    change = p.add_subparsers(dest="models_command")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--app", help="the app to change (default: the only app deployed from this machine)")
        q.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for readiness")
        q.set_defaults(func=_cmd_models_change)

    q = change.add_parser("add", help="serve more models (or a new version of a model): FILE or --spec")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("file", nargs="?", help="YAML file of a model spec (as under `models:`), or a list of them")
    what.add_argument("--spec", help="the model spec as inline YAML, e.g. '{id: m, task: generate, engine: echo}'")
    common(q)
    q = change.add_parser("remove", help="stop serving ID (every version) or ID@VERSION")
    q.add_argument("name", metavar="ID[@VERSION]")
    common(q)
    q = change.add_parser("set-default", help="make ID@VERSION the version that requests for the bare ID reach")
    q.add_argument("name", metavar="ID@VERSION")
    common(q)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from models.download import DownloadError

    try:
        prepare_models(_config(args.config), download_under=args.download_under)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    config = _config(args.config)
    if args.engine_cpus == "local":
        state = local.read_state()
        engine_cpus = state.engine_cpus if state is not None else None
    else:
        engine_cpus = None if args.engine_cpus == "off" else args.engine_cpus
    plan = deploying.plan_for(config, engine_cpus)
    _say(plan.model_dump_json(indent=2))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    _say(json.dumps(ServingConfig.model_json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="modelfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", nargs="?", help=f"serving config YAML (default: {DEFAULT_CONFIG.name})")

    def with_cluster(p: argparse.ArgumentParser) -> None:
        p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs the local head advertises")
        p.add_argument(
            "--dashboard",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="start Ray's dashboard, whose job API runs batch jobs (`modelfleet batch`, the Batches API); "
            "--no-dashboard saves about 0.2 GiB and 11 processes, and batches then answer 503 (default: on)",
        )
        p.add_argument(
            "--engine-cpus",
            default="auto",
            metavar="auto|off|LIST",
            help="cores kept for engine compute, the rest run Ray and serving (default auto: all but the last "
            "max(1, n/8) cores on 2+ cores; a CPU list such as 0-5; off)",
        )
        p.add_argument(
            "--metrics-port",
            type=int,
            default=None,
            help="port on 127.0.0.1 where Ray exports the cluster's metrics for Prometheus (default: a free port)",
        )

    p = sub.add_parser("validate", help="check a config file against the schema")
    p.add_argument("config")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("up", help="start the local Ray head (127.0.0.1)")
    with_cluster(p)
    p.add_argument(
        "--ingress",
        choices=("python", "haproxy"),
        default="python",
        help="what listens on the HTTP port: Serve's Python proxy or its HAProxy ingress; must match the "
        "router.ingress of the configs deployed onto this cluster",
    )
    p.set_defaults(func=_cmd_up)
    p = sub.add_parser("down", help="stop the local cluster that `up` started")
    p.set_defaults(func=_cmd_down)
    for name, func, text in (
        ("deploy", _cmd_deploy, "deploy a config onto the running cluster and wait until it answers"),
        ("serve", _cmd_serve, "up + deploy, then serve in the foreground until Ctrl-C"),
    ):
        p = sub.add_parser(name, help=text)
        with_config(p)
        p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for readiness")
        p.add_argument("--port", type=_port, default=None, help="HTTP port to serve on, instead of router.port")
        if name == "serve":
            with_cluster(p)
        p.set_defaults(func=func)
    p = sub.add_parser("status", help="apps, deployments, replicas and health")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_status)
    _models_parser(sub)
    p = sub.add_parser("prepare", help="convert/build the packaged models a config uses, once")
    with_config(p)
    p.add_argument(
        "--download-under",
        metavar="DIR",
        help="also download from the Hugging Face Hub each model whose source is DIR/<owner>/<name> (that repo), "
        "unless its folder is complete",
    )
    p.set_defaults(func=_cmd_prepare)
    p = sub.add_parser("plan", help="print the deployment plan a config compiles to (Serve options, engine args)")
    with_config(p)
    p.add_argument(
        "--engine-cpus",
        default="local",
        metavar="local|off|LIST",
        help="the node's engine cores: those of the running local cluster (default), none, or a CPU list",
    )
    p.set_defaults(func=_cmd_plan)
    k8s_cli.add_render_parser(sub)
    p = sub.add_parser("schema", help="print the config JSON Schema")
    p.set_defaults(func=_cmd_schema)
    # `batch` keeps its own parser too (cluster.jobs.cli).
    sub.add_parser("batch", help="batch inference over an OpenAI batch file as a Ray job (see `modelfleet batch -h`)")
    admin_cli.add_dashboards_parser(sub)
    admin_cli.add_keys_parser(sub)
    # `bench`: its flags are generated from its options model (cluster.bench.options); `main` hands everything
    # after the word to cluster.bench, which parses them with the same generated parser.
    from cluster.bench.options import add_arguments as add_bench_arguments

    add_bench_arguments(
        sub.add_parser("bench", help="load-test an endpoint and compare with baselines (see `modelfleet bench -h`)")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `modelfleet` console script."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from cluster.bench.cli import main as bench

        return bench(argv[1:])
    if argv[:1] == ["batch"]:
        from cluster.jobs import cli as batch

        return batch.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except local.ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`modelfleet ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
