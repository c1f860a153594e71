"""Engine cores and serving priority (deployments.cpus): CPU lists, the split, pinning and niceness for real."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from deployments import cpus


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", {0}), ("0-3", {0, 1, 2, 3}), ("0,2-3", {0, 2, 3}), (" 1, 5-6 ", {1, 5, 6}), ("3-3", {3})],
)
def test_cpu_lists_parse(text: str, expected: set[int]) -> None:
    assert cpus.parse_cpu_list(text) == expected


@pytest.mark.parametrize("text", ["", "a", "0-", "3-1", "1,,2", "-1", "0-2-4"])
def test_bad_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="CPU list"):
        cpus.parse_cpu_list(text)


def test_cpu_lists_format_shortest() -> None:
    assert cpus.format_cpu_list({0, 1, 2, 5}) == "0-2,5"
    assert cpus.format_cpu_list(frozenset({7})) == "7"
    assert cpus.format_cpu_list({3, 1}) == "1,3"
    assert cpus.parse_cpu_list(cpus.format_cpu_list({0, 2, 3, 4, 9})) == {0, 2, 3, 4, 9}


def test_auto_keeps_the_last_cores_for_serving() -> None:
    assert cpus.plan_cpus("auto", frozenset({0})) is None
    two = cpus.plan_cpus("auto", frozenset({0, 1}))
    assert two == cpus.CpuPlan(engine=frozenset({0}), serving=frozenset({1}))
    many = cpus.plan_cpus("auto", frozenset(range(16)))
    assert many is not None and many.serving == {14, 15} and many.engine == set(range(14))
    assert "engines on cores 0-13, serving on cores 14-15" in many.describe()
    assert cpus.plan_cpus("off", frozenset(range(16))) is None


def test_explicit_engine_cores() -> None:
    plan = cpus.plan_cpus("1-2", frozenset(range(4)))
    assert plan == cpus.CpuPlan(engine=frozenset({1, 2}), serving=frozenset({0, 3}))
    with pytest.raises(ValueError, match="no core for serving"):
        cpus.plan_cpus("0-3", frozenset(range(4)))
    with pytest.raises(ValueError, match="not all usable"):
        cpus.plan_cpus("0-9", frozenset(range(4)))


def test_pinning_moves_only_the_calling_thread() -> None:
    usable = cpus.usable_cpus()
    target = frozenset({min(usable)})
    seen: list[frozenset[int]] = []

    def pinned() -> None:
        assert cpus.pin_current_thread(target)
        seen.append(frozenset(os.sched_getaffinity(0)))
        child = threading.Thread(target=lambda: seen.append(frozenset(os.sched_getaffinity(0))))
        child.start()
        child.join(timeout=10)

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join(timeout=10)
    assert seen == [target, target]  # the thread, and a thread it started later
    assert cpus.usable_cpus() == usable  # this (main) thread kept its cores


def test_lower_priority_raises_every_thread_and_never_lowers() -> None:
    # In a child process: niceness cannot be undone without privilege.
    script = """
import os, threading
from deployments import cpus
started = threading.Event(); stop = threading.Event()
def idle():
    started.set(); stop.wait(10)
t = threading.Thread(target=idle); t.start(); started.wait(10)
cpus.lower_priority(5)
print(sorted({os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir('/proc/self/task')}))
later = []
t2 = threading.Thread(target=lambda: later.append(os.getpriority(os.PRIO_PROCESS, 0))); t2.start(); t2.join(10)
cpus.lower_priority(2)
print(later, os.getpriority(os.PRIO_PROCESS, 0))
stop.set(); t.join(10)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True, cwd=os.getcwd()
    ).stdout.split("\n")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert out[0] == str([max(5, base)])
    assert out[1] == f"[{max(5, base)}] {max(5, base)}"


def test_pin_process_moves_every_thread_of_another_process() -> None:
    # A child with a second thread: both move, and the child's later threads inherit the cores.
    script = """
import os, sys, threading
stop = threading.Event()
t = threading.Thread(target=stop.wait, args=(30,)); t.start()
print("ready", flush=True); sys.stdin.readline()
later = []
t2 = threading.Thread(target=lambda: later.append(sorted(os.sched_getaffinity(0)))); t2.start(); t2.join(10)
print(later[0], flush=True); stop.set(); t.join(10)
"""
    target = frozenset({min(cpus.usable_cpus())})
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        tids = os.listdir(f"/proc/{child.pid}/task")
        assert cpus.pin_process(child.pid, target) == len(tids) >= 2
        assert {frozenset(os.sched_getaffinity(int(tid))) for tid in tids} == {target}
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == str(sorted(target))
    finally:
        child.kill()
        child.wait(timeout=30)
    assert cpus.pin_process(child.pid, target) == 0  # gone: nothing to move
