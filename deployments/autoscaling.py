"""Autoscaling on queue depth and time to first token: the policy Serve's controller calls (`QueuePolicy`), the
signals each model replica reports to it (`LoadSignals`), and the router's view of a model's replicas
(`ReplicaCounts`: scaled to zero, starting, running).

Serve imports `QueuePolicy` by its path in the plan and cloudpickles this module by value into its controller, which
does not have the repo on its path: the policy side imports only the standard library. Serve wraps the policy with
its own `upscale_delay_s` / `downscale_delay_s` timers, min/max bounds and the scale-from-zero fast path
(`ray.serve.autoscaling_policy._apply_autoscaling_config`), so the policy itself only decides a count.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "POLICY_PATH",
    "Load",
    "LoadSignals",
    "PolicySettings",
    "QueuePolicy",
    "ReplicaCounts",
    "decide",
]

#: The import path of the policy, as the plan hands it to Serve.
POLICY_PATH = "deployments.autoscaling:QueuePolicy"
# Keys of the replicas' reports (`ModelReplica.record_autoscaling_stats`).
TTFT_KEY = "ttft_s"
WAITING_KEY = "waiting"
RUNNING_KEY = "running"
# A replica's TTFT report covers the requests whose first output came this recently; older ones no longer say
# anything about the queue now.
_TTFT_WINDOW_S = 10.0
_TTFT_SAMPLES = 256


@dataclass(frozen=True)
class PolicySettings:
    """The policy's knobs (from `ScalingConfig`, as Serve's `policy_kwargs`)."""

    target_ongoing_requests: float
    downscale_threshold: float = 0.5
    upscale_step: int = 2
    target_ttft_s: float | None = None


@dataclass(frozen=True)
class Load:
    """What the policy sees of a deployment at one decision.

    Attributes:
        target: replicas Serve is heading to now (running or starting).
        running: replicas running now.
        depth: requests waiting plus running, summed over the deployment (Serve's `total_num_requests`: queued at the
            routers' handles plus ongoing in the replicas, averaged over the look-back window).
        ttft_s: mean time from a replica receiving a request to its first output, over the replicas that report one
            (None: none does).
        waiting: requests inside the replicas that have no output yet (the engines' queues and prefill).
        min_replicas, max_replicas: the bounds (Serve's capacity-adjusted ones).
    """

    target: int
    running: int
    depth: float
    ttft_s: float | None = None
    waiting: float = 0.0
    min_replicas: int = 0
    max_replicas: int = 1


def decide(load: Load, settings: PolicySettings) -> int:
    """The replica count the deployment should have (before Serve's delays): a pure function.

    - Up on queue depth: ceil(depth / target_ongoing_requests), at most `upscale_step` above the current target.
    - Up on latency: one replica more when the replicas' TTFT is above `target_ttft_s` while requests wait in them,
      and only once the replicas of the previous step are running (a new replica's effect must show first).
    - Down: only to ceil(depth / (target_ongoing_requests x downscale_threshold)), and never while the TTFT is over
      its target. After a step down the load per replica is at most threshold x target, below the scale-up point,
      so a steady load never makes it flap (the hysteresis band is between threshold x target and target).
    """
    target = settings.target_ongoing_requests
    current = load.target
    want_up = math.ceil(load.depth / target - 1e-9) if load.depth > 0 else 0
    slow = (
        settings.target_ttft_s is not None
        and load.ttft_s is not None
        and load.ttft_s > settings.target_ttft_s
        and load.waiting > 0
    )
    if want_up > current:
        desired = min(want_up, current + settings.upscale_step)
    elif slow:
        desired = current + 1 if load.running >= current else current
    else:
        floor = math.ceil(load.depth / (target * settings.downscale_threshold) - 1e-9) if load.depth > 0 else 0
        desired = min(floor, current)
    return max(load.min_replicas, min(desired, load.max_replicas))


def _mean(values: Mapping[Any, float] | None) -> float | None:
    known = [v for v in (values or {}).values() if v > 0]
    return sum(known) / len(known) if known else None


class QueuePolicy:
    """Serve's custom autoscaling policy (a class: Serve makes it once with `policy_kwargs`, then calls it)."""

    def __init__(
        self,
        target_ongoing_requests: float,
        downscale_threshold: float = 0.5,
        upscale_step: int = 2,
        target_ttft_s: float | None = None,
    ) -> None:
        self.settings = PolicySettings(target_ongoing_requests, downscale_threshold, upscale_step, target_ttft_s)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """Decide from Serve's `AutoscalingContext`; returns (replicas, policy state)."""
        metrics = ctx.aggregated_metrics or {}
        load = Load(
            target=ctx.target_num_replicas,
            running=ctx.current_num_replicas,
            depth=float(ctx.total_num_requests),
            ttft_s=_mean(metrics.get(TTFT_KEY)),
            waiting=sum((metrics.get(WAITING_KEY) or {}).values()),
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
        )
        return decide(load, self.settings), ctx.policy_state


# -- the model replica ----------------------------------------------------------------------------------------


class LoadSignals:
    """What one model replica reports to the policy: its recent time to first token (the replica received the
    request -> the engine's first output), next to its waiting and running request counts."""

    def __init__(self, window_s: float = _TTFT_WINDOW_S) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=_TTFT_SAMPLES)  # (first output at, ttft)

    def first_output(self, received_at: float, first_output_at: float) -> None:
        """A request got its first output (wall-clock stamps, seconds)."""
        self._samples.append((first_output_at, max(first_output_at - received_at, 0.0)))

    def report(self, *, waiting: int, running: int, now: float | None = None) -> dict[str, float]:
        """The replica's report (Serve's `record_autoscaling_stats`): ttft_s is 0 with no recent first output."""
        since = (time.time() if now is None else now) - self._window_s
        while self._samples and self._samples[0][0] < since:
            self._samples.popleft()
        ttft = sum(t for _, t in self._samples) / len(self._samples) if self._samples else 0.0
        return {TTFT_KEY: ttft, WAITING_KEY: float(waiting), RUNNING_KEY: float(running)}


# -- the router -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replicas:
    """A model deployment's replicas as Serve's controller counts them."""

    running: int
    total: int

    @property
    def at_zero(self) -> bool:
        """Scaled to zero: no replica at all, not even a starting one."""
        return self.total == 0


class ReplicaCounts:
    """Replica counts of this app's model deployments, read from Serve's controller (`serve.status()`) and cached
    for `ttl_s`, so that however many requests ask, the controller is asked at most once per `ttl_s`."""

    def __init__(self, ttl_s: float = 0.5) -> None:
        self._ttl_s = ttl_s
        self._at = -math.inf
        self._counts: dict[str, Replicas] = {}
        self._lock = asyncio.Lock()

    async def get(self, deployment: str) -> Replicas | None:
        """The replicas of `deployment` in this app (None: Serve does not know it, or the controller is out of
        reach)."""
        async with self._lock:
            if time.monotonic() - self._at >= self._ttl_s:
                self._counts = await asyncio.to_thread(_read_counts)
                self._at = time.monotonic()
        return self._counts.get(deployment)


def _read_counts() -> dict[str, Replicas]:
    from ray import serve
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    try:
        app_name = serve.get_replica_context().app_name
        app = serve.status().applications.get(app_name)
    except (RayServeException, RayError):  # outside a replica, or the controller is restarting
        return {}
    if app is None:
        return {}
    return {
        name: Replicas(
            running=sum(n for state, n in dep.replica_states.items() if state == "RUNNING"),
            total=sum(dep.replica_states.values()),
        )
        for name, dep in app.deployments.items()
    }
