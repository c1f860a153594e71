"""Where work runs on a node's CPUs: engine cores kept apart from the serving processes, engines first.

On a CPU node the engine's compute (vLLM's model worker, the transformers batch thread) is what limits
throughput; everything else (Ray's daemons, Serve's proxy and controller, the router, the replicas' asyncio
loops) is the serving layer. Two levers keep the serving layer out of the engine's way:

- **Engine cores.** A launcher that owns the node (`modelfleet up`/`deploy`, `modelfleet bench`) splits its
  cores; the deployment plan (`deployments.plan`) hands the engine cores to every engine, which moves its
  compute onto them, and once the app answers the launcher moves every other thread of the cluster onto the
  *serving* cores (`pin_process_tree`). Starting runs on all cores (on 2 cores, starting on one made the first answer
  15 s later); replicas started afterwards (autoscaling, redeploys) start on the serving cores. Measured on
  2 cores: the serving layer on the vLLM worker's core cost it 10-20% of its throughput.
- **Priority.** Serving processes whose engine computes in another process (vLLM) and the router lower
  their own priority (`nice`), so the engine's processes win the CPU when it is contended. Raising one's
  niceness needs no privilege; Ray's workers start at `RAY_worker_niceness` (15 unless the launcher sets 0).
  vLLM's engine-core process busy-waits on its model worker, so it goes to the engine cores with the worker
  (`VLLMEngine._pin_engine_core`) rather than starve the serving processes behind it.

Plain `os` calls, Linux semantics; a platform without them gets no placement and no error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

__all__ = [
    "SERVING_NICE",
    "CpuPlan",
    "format_cpu_list",
    "lower_priority",
    "parse_cpu_list",
    "pin_current_thread",
    "pin_process",
    "pin_process_tree",
    "plan_cpus",
    "usable_cpus",
]

logger = logging.getLogger(__name__)

SERVING_NICE = 10


@dataclass(frozen=True)
class CpuPlan:
    """A split of the node's usable cores: `engine` for engine compute, `serving` for everything else."""

    engine: frozenset[int]
    serving: frozenset[int]

    def describe(self) -> str:
        """'engines on 0, serving on 1' (for logs and reports)."""
        return f"engines on cores {format_cpu_list(self.engine)}, serving on cores {format_cpu_list(self.serving)}"


def parse_cpu_list(text: str) -> frozenset[int]:
    """Cores from a Linux CPU list such as '0-3,6'.

    Raises:
        ValueError: not a CPU list, or an empty one.
    """
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"not a CPU list: {text!r} (expected e.g. '0', '0-3' or '0,2-3')")
        first, last = int(low), int(high) if sep else int(low)
        if last < first:
            raise ValueError(f"not a CPU list: {text!r} ({part} runs backwards)")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int] | set[int]) -> str:
    """The shortest Linux CPU list of `cpus`: {0, 1, 2, 5} -> '0-2,5'."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def usable_cpus() -> frozenset[int]:
    """The cores this process may run on (its affinity), or every core where affinity is unknown."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return frozenset(range(os.cpu_count() or 1))


def plan_cpus(setting: str, available: frozenset[int] | None = None) -> CpuPlan | None:
    """Split `available` cores (default: this process's) for `setting`.

    Args:
        setting: 'auto' keeps the highest max(1, n // 8) cores for serving and gives the rest to engines
            (nothing is split with fewer than 2 cores); 'off' splits nothing; a CPU list names the engine
            cores, and the other usable cores serve.

    Returns:
        The split, or None when nothing is split.

    Raises:
        ValueError: a bad CPU list, engine cores this process cannot use, or no core left for serving.
    """
    cpus = usable_cpus() if available is None else available
    if setting == "off":
        return None
    if setting == "auto":
        if len(cpus) < 2:
            return None
        ordered = sorted(cpus)
        keep = max(1, len(ordered) // 8)
        return CpuPlan(engine=frozenset(ordered[:-keep]), serving=frozenset(ordered[-keep:]))
    engine = parse_cpu_list(setting)
    if not engine <= cpus:
        raise ValueError(f"engine cores {setting} are not all usable here (usable: {format_cpu_list(cpus)})")
    serving = cpus - engine
    if not serving:
        raise ValueError(f"engine cores {setting} leave no core for serving (usable: {format_cpu_list(cpus)})")
    return CpuPlan(engine=engine, serving=frozenset(serving))


def pin_current_thread(cpus: frozenset[int]) -> bool:
    """Run the calling thread (and the threads it starts later) on `cpus` only. Returns whether it could."""
    try:
        os.sched_setaffinity(0, cpus)  # pid 0: the calling thread on Linux
    except (AttributeError, OSError) as exc:
        logger.warning("cannot pin a thread to cores %s: %s", format_cpu_list(cpus), exc)
        return False
    return True


def pin_process_tree(root_pid: int, plan: CpuPlan, *, include_root: bool = True) -> int:
    """Move every thread of `root_pid` and its descendants onto the serving cores, except threads an engine
    already pinned within the engine cores (vLLM's model threads, the transformers batch thread).

    Launchers call this once the app answers: starting (imports, weights, Ray's daemons) runs on all cores,
    serving on the serving cores only. Processes started later inherit the serving cores from their parents.

    Returns:
        How many threads were moved.
    """
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)] if include_root else root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    moved = 0
    for proc in procs:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        except OSError:  # gone, or not Linux
            continue
        for tid in tids:
            try:
                current = os.sched_getaffinity(tid)
                if current <= plan.engine or current == plan.serving:
                    continue
                os.sched_setaffinity(tid, plan.serving)
                moved += 1
            except OSError:  # the thread ended meanwhile
                continue
    return moved


def pin_process(pid: int, cores: frozenset[int]) -> int:
    """Move every thread of process `pid` onto `cores` (threads it starts later inherit them).

    Returns:
        How many threads were moved (0 for a process that is gone, or off Linux).
    """
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return 0
    moved = 0
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
            moved += 1
        except OSError:  # the thread ended meanwhile
            continue
    return moved


def lower_priority(nice: int = SERVING_NICE) -> None:
    """Raise every thread of this process to niceness `nice` at least (never lowers it; needs no privilege).

    Linux keeps a niceness per thread, so each thread is set; threads started later inherit it from theirs.
    Processes this one already started keep their own.
    """
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:  # the thread ended meanwhile
            continue
