"""Where the seconds go between `modelfleet serve` and the first real answer: run the CLI, time its output and
the first answer, and read the phases off Ray's, Serve's, vLLM's and our own log lines (issue 14).

`python -m cluster.startup_timing CONFIG --model ID [--runs N] [--root DIR ...]` serves that model of CONFIG (all of
them with `--all-models`) on a free port, with a home of its own (its own cluster, never the user's), from each
checkout DIR in turn, and prints one table: seconds from launch per phase and run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Phase", "first_stamp", "log_stamp", "phases", "replica_split"]

# Ray's C++ logs: "[2026-11-30 10:56:11,736 I 12416 12416] ..."; Serve's Python logs: "INFO 2026-11-30 10:56:16,386
# controller ..."; vLLM's: "(EngineCore pid=1) INFO 11-30 11:00:47 [core.py:133] ..." (no year, whole seconds).
_RAY_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")
_VLLM_STAMP = re.compile(r"\b(?:INFO|WARNING|ERROR|DEBUG) (\d\d-\d\d \d\d:\d\d:\d\d) \[")
# The replica's ready line (deployments/replica.py): "model smollm2 ready (vllm engine) in 30.2 s: engine start
# 29.0 s (import 5.1 s, build 23.9 s), warm-up 0.4 s".
_READY_LINE = re.compile(r"model (\S+) ready \((\w+) engine\) in ([\d.]+) s: (.*)")
_SPLIT = re.compile(r"([a-z][a-z -]*?) ([\d.]+) s")


@dataclass(frozen=True)
class Phase:
    """One point of the start-up: its name, seconds after launch, and where it was read."""

    name: str
    at_s: float
    source: str


def log_stamp(line: str, *, year: int | None = None) -> float | None:
    """The epoch time of a Ray, Serve or vLLM log line (local time, as they write it), or None if it has none."""
    match = _RAY_STAMP.search(line)
    if match:
        moment = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
        return moment.timestamp() + int(match.group(2)) / 1000
    match = _VLLM_STAMP.search(line)
    if match:
        moment = dt.datetime.strptime(f"{year or dt.datetime.now().year}-{match.group(1)}", "%Y-%m-%d %H:%M:%S")
        return moment.timestamp()
    return None


def first_stamp(paths: Iterable[Path], *patterns: str) -> tuple[float, str] | None:
    """The earliest time stamp of a line containing every one of `patterns` in any of `paths`, with that line."""
    best: tuple[float, str] | None = None
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if not all(pattern in line for pattern in patterns):
                continue
            stamp = log_stamp(line)
            if stamp is not None:
                if best is None or stamp < best[0]:
                    best = (stamp, line)
                break  # lines are in time order within a file
    return best


def replica_split(line: str) -> dict[str, float]:
    """The durations of the replica's ready line, by name ("total", "engine start", "import", "warm-up", ...)."""
    match = _READY_LINE.search(line)
    if match is None:
        return {}
    split = {"total": float(match.group(3))}
    split.update({name.strip(): float(seconds) for name, seconds in _SPLIT.findall(match.group(4))})
    return split


def phases(logs: Path, launched: float, model: str) -> list[Phase]:
    """The start-up phases read from a Ray session's `logs` folder, in seconds after `launched` (epoch).

    Args:
        logs: `<temp dir>/session_latest/logs` of the cluster.
        launched: the epoch time the CLI was started.
        model: the id of the model whose replica to follow.
    """
    serve = logs / "serve"
    workers = sorted(logs.glob("worker-*.out")) + sorted(logs.glob("worker-*.err"))
    # Once vLLM is imported, a replica's Serve log lines go to its worker's stderr, not to logs/serve (vLLM
    # configures logging on import): look in both, for lines of this model's replica.
    replica_logs = sorted(serve.glob(f"replica_*_replica_{model}_*.log")) + workers
    replica = f"_replica:{model} "
    found: list[Phase] = []

    def add(name: str, paths: Iterable[Path], *patterns: str) -> float | None:
        hit = first_stamp(paths, *patterns)
        if hit is None:
            return None
        found.append(Phase(name, hit[0] - launched, " + ".join(patterns) or "first line"))
        return hit[0]

    add("GCS up", [logs / "gcs_server.out"])
    add("raylet up", [logs / "raylet.out"])
    add("Serve controller up", sorted(serve.glob("controller_*.log")), "Controller starting")
    add("Serve proxy up", sorted(serve.glob("proxy_*.log")), "Proxy starting")
    add("app submitted", sorted(serve.glob("controller_*.log")), "Deploying new version")
    add("router replica ready", sorted(serve.glob("replica_*_router_*.log")), "Finished initializing")
    add("replica constructor entered", replica_logs, replica, "Started initializing")
    add("vLLM engine core process up", workers, "(EngineCore pid=")
    add("vLLM worker process up", workers, "(VllmWorker-0 pid=")
    add("vLLM weights loaded", workers, "Loading weights took")
    add("vLLM engine ready (KV cache, profile)", workers, "init engine (profile")
    ready = first_stamp(replica_logs, replica, f"model {model} ready (")
    if ready is not None:
        split = replica_split(ready[1])
        if "import" in split:
            start = ready[0] - split["total"]  # the engine's start began here
            found.append(Phase("vLLM imported in the replica", start + split["import"] - launched, "ready line"))
        if "warm-up" in split:
            found.append(Phase("engine started", ready[0] - split["warm-up"] - launched, "ready line"))
        found.append(Phase("warm-up answered", ready[0] - launched, "ready line"))
    return sorted(found, key=lambda phase: phase.at_s)


@dataclass
class _Run:
    launched: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    answered: float | None = None


def _serve_once(
    config: Path,
    model: str,
    *,
    timeout_s: float,
    root: Path,
    keep_logs: Path | None = None,
    all_models: bool = False,
) -> tuple[list[Phase], str]:
    """Run `modelfleet serve` on a copy of `config` (holding only `model` unless `all_models`) on a free port, until
    its first real answer from `model`; stop it."""
    import httpx
    import yaml

    from cluster.local import free_port
    from models.settings import get_settings

    home = Path(tempfile.mkdtemp(prefix="mfst-", dir="/tmp"))
    raw = yaml.safe_load(config.read_text())
    port = free_port()
    if not all_models:
        raw["models"] = [m for m in raw["models"] if m["id"] == model]
    raw.setdefault("router", {}).update({"host": "127.0.0.1", "port": port})
    config_file = home / "config.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    token = get_settings().home / "auth_token"
    if token.exists():  # the user's cluster token, so that no new one is generated per run (cluster.auth_token)
        shutil.copy(token, home / "auth_token")
    env = {**os.environ, "MODELFLEET_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    # `python -m` from `root`: that checkout's code runs (and is the cluster's working_dir), whichever is installed.
    cli = [sys.executable, "-m", "cluster.cli", "serve", str(config_file)]
    run = _Run(launched=time.time())
    proc = subprocess.Popen(
        cli, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )

    def read() -> None:
        assert proc.stdout is not None
        for raw_line in proc.stdout:
            run.lines.append((time.time(), raw_line.decode(errors="replace").rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    deadline = time.monotonic() + timeout_s
    try:
        with httpx.Client(timeout=60.0, trust_env=False) as client:
            while run.answered is None and time.monotonic() < deadline and proc.poll() is None:
                try:
                    if client.post(f"http://127.0.0.1:{port}/v1/completions", json=body).status_code == 200:
                        run.answered = time.time()
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        # The CLI says "ready in" once /readyz answers: wait for that line too (bounded), to time it.
        said = time.monotonic() + 30.0
        while run.answered is not None and time.monotonic() < said and proc.poll() is None:
            if any(line.startswith("ready in") for _, line in run.lines):
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=180)
        reader.join(timeout=10)
        _stop_leftover(home)
    if run.answered is None:
        raise RuntimeError("no answer: " + "\n".join(line for _, line in run.lines[-20:]))
    found = phases(home / "ray" / "session_latest" / "logs", run.launched, model)
    for stamp, line in run.lines:
        for prefix, name in (
            ("model ", "CLI: models prepared"),
            ("local Ray cluster at", "CLI: cluster up, driver connected"),
            ("deployments running", "CLI: serve.run returned"),
            ("ready in", "CLI: /readyz answered"),
        ):
            if line.startswith(prefix) and not any(p.name == name for p in found):
                found.append(Phase(name, stamp - run.launched, "CLI output"))
    found.append(Phase("first real answer (HTTP)", run.answered - run.launched, "poll"))
    found.sort(key=lambda phase: phase.at_s)
    log = "\n".join(line for _, line in run.lines)
    if keep_logs is not None:
        shutil.copytree(home / "ray" / "session_latest" / "logs", keep_logs, dirs_exist_ok=True)
        (keep_logs / "cli.log").write_text(
            "\n".join(f"{stamp - run.launched:7.2f} {line}" for stamp, line in run.lines)
        )
    shutil.rmtree(home, ignore_errors=True)
    return found, log


def _stop_leftover(home: Path) -> None:
    """Stop the cluster of `home` if the CLI left it running (it stops it itself on SIGTERM, normally)."""
    from cluster.local import ClusterState

    try:
        state = ClusterState(**json.loads((home / "cluster.json").read_text()))
    except (OSError, ValueError, TypeError):
        return
    if state.alive:
        print(f"the CLI left its cluster running (pid {state.pid}); stopping it", file=sys.stderr)
        os.killpg(state.pid, signal.SIGTERM)  # `ray start --block` leads its own process group (cluster.local)
        deadline = time.monotonic() + 60
        while state.alive and time.monotonic() < deadline:
            time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(state.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    """Serve the model `--runs` times and print each run's phases (seconds after launch) side by side."""
    parser = argparse.ArgumentParser(prog="python -m cluster.startup_timing", description=__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--all-models", action="store_true", help="serve every model of CONFIG, not only --model")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--root",
        type=Path,
        action="append",
        help="serve from this checkout (repeat to interleave runs of several; default: this one)",
    )
    parser.add_argument("--keep-logs", type=Path, help="copy each run's Ray logs and CLI output to DIR/run-N")
    args = parser.parse_args(argv)
    roots = args.root or [Path(__file__).resolve().parent.parent]
    runs = []
    for i in range(args.runs):
        for r, root in enumerate(roots):  # interleaved, so that the machine's load falls on each alike
            load = os.getloadavg()[0]
            name = f"run {i + 1}" + (f" {root.name}" if len(roots) > 1 else "")
            keep = args.keep_logs / f"run-{i + 1}-{r + 1}" if args.keep_logs else None
            found, _log = _serve_once(
                args.config, args.model, timeout_s=args.timeout, root=root, keep_logs=keep, all_models=args.all_models
            )
            runs.append((f"{name} (load {load:.1f})", {phase.name: phase.at_s for phase in found}))
    names = list(dict.fromkeys(name for _, run in runs for name in sorted(run, key=run.get)))
    print("| phase (s after launch) | " + " | ".join(head for head, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for name in names:
        cells = [f"{run[name]:.1f}" if name in run else "-" for _, run in runs]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
