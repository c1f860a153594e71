"""Running a system under test as a process tree: spawning it (offline, on every core), reading its memory,
waiting for its first real answer, and stopping it with everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deployments import cpus

__all__ = [
    "ALL_CPUS",
    "PROJECT_ROOT",
    "SETTLE_S",
    "BenchError",
    "Started",
    "SystemResult",
    "shm_files",
    "spawn",
    "stop",
    "tail",
    "tree_memory",
    "wait_answer",
]

PROJECT_ROOT = Path(__file__).resolve().parents[3]
_GIB = 1 << 30
SETTLE_S = 3.0  # after the first answer, before idle memory is read
_STOP_TIMEOUT_S = 20.0
_POLL_S = 0.25  # readiness polls, every system alike (a 1 s poll added up to a second to a time to ready)
# No hub, no usage reports: the children of a benchmark never leave the machine.
_CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
# Every core this process may use, read before `run_all` pins it: baselines start on all of them, as they would
# be run by hand.
ALL_CPUS = cpus.usable_cpus()


class BenchError(RuntimeError):
    """Raised when a system cannot be started, never answers in time, or fails while it is measured."""


@dataclass
class Started:
    """A running system that answers: where, how long it took to answer first, and its idle memory."""

    base_url: str
    time_to_ready_s: float | None = None
    idle_memory: dict[str, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SystemResult:
    """One system's numbers: time to its first real answer, idle memory, and one summary per load level."""

    name: str
    time_to_ready_s: float | None = None
    idle_memory: dict[str, float] | None = None
    levels: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def tree_memory(pid: int, *, include_root: bool = True) -> dict[str, float]:
    """RSS and PSS (GiB) summed over a process and all its descendants, and how many processes there are."""
    import psutil

    root = psutil.Process(pid)
    procs = ([root] if include_root else []) + root.children(recursive=True)
    rss = pss = 0.0
    count = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        count += 1
    return {"rss_gib": rss / _GIB, "pss_gib": pss / _GIB, "processes": count}


def shm_files(pid: int) -> set[str]:
    """The /dev/shm files a process tree maps (vLLM leaves some behind when it is killed)."""
    import psutil

    paths: set[str] = set()
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return paths
    for proc in procs:
        try:
            paths.update(m.path for m in proc.memory_maps() if m.path.startswith("/dev/shm/"))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return paths


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after a grace period, and reap it all."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # started with start_new_session: its pid is its group id
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
            _, alive = psutil.wait_procs(tree, timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            continue
        if not alive:
            break
    for leftover in psutil.wait_procs(tree, timeout=0)[1]:  # moved to another group: kill by pid
        leftover.kill()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def spawn(
    cmd: list[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    stderr_to_log: bool = True,
    on_cpus: frozenset[int] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `cmd` offline in a session of its own, output appended to `log`, on `on_cpus` (default: every
    core, as a system would be run by hand)."""
    cores = on_cpus or ALL_CPUS

    def pin() -> None:  # one affinity call, no locks: safe between fork and exec
        try:
            os.sched_setaffinity(0, cores)
        except (AttributeError, OSError):
            pass

    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd,
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT if stderr_to_log else None,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **_CHILD_ENV, **(env or {})},
            start_new_session=True,
            preexec_fn=pin,
        )


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_answer(
    base_url: str, model: str, *, timeout_s: float, exited: Callable[[], str | None], task: str = "generate"
) -> None:
    """Poll a real completion (max_tokens=1), or embedding for an `embed` model, until the server answers 200:
    readiness means an answer.

    Raises:
        BenchError: the server exited (`exited()` returns why) or did not answer within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    path, body = "/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    if task == "embed":
        path, body = "/v1/embeddings", {"model": model, "input": "Hello"}
    last = "no answer"
    with httpx.Client(base_url=base_url, timeout=60.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            reason = exited()
            if reason:
                raise BenchError(reason)
            try:
                response = client.post(path, json=body)
                if response.status_code == 200:
                    return
                last = f"{response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(_POLL_S)
    raise BenchError(f"{base_url} gave no real answer in {timeout_s:.0f} s (last: {last})")
