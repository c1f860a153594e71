"""How the router reads Ray's failures of a replica call: mapped to ServingErrors, and the losses it may retry."""

from __future__ import annotations

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from deployments.errors import EngineDeadError, EngineError, OverloadedError, ServingError

__all__ = ["ReplicaLostError", "map_failure", "may_retry"]


class ReplicaLostError(EngineDeadError):
    """Raised (inside the router) when the replica or the engine holding a request was lost before the request
    returned: an idempotent request can be sent again. `reason` labels the retry metric."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, reason: str = "") -> None:
        super().__init__(message, param=param, code=code)
        self.reason = reason or "replica_died"


def _lost(cause: BaseException) -> ReplicaLostError:
    if isinstance(cause, ActorUnavailableError):
        return ReplicaLostError(
            "The replica serving this model is unreachable; retry shortly", reason="replica_unavailable"
        )
    return ReplicaLostError("The replica serving this model died; retry shortly", reason="replica_died")


def map_failure(exc: RayTaskError | RayActorError | serve.exceptions.RayServeException) -> ServingError:
    """The ServingError of a failed replica call. A `ReplicaLostError` (retriable) when the replica or its engine
    was lost while it held the call: Serve itself re-routes only a request whose replica was gone before it took it.
    """
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, EngineDeadError):  # the replica's engine stopped (died, or is shutting down)
            return ReplicaLostError(cause.message, param=cause.param, code=cause.code, reason="engine_dead")
        if isinstance(cause, ServingError):
            return cause
        if isinstance(cause, RayActorError):
            return _lost(cause)
        return EngineError(f"replica failed: {type(cause).__name__}")
    if isinstance(exc, BackPressureError):
        return OverloadedError("The model's queue is full; retry later")
    if isinstance(exc, RayActorError):
        return _lost(exc)
    return EngineError(f"serve error: {type(exc).__name__}")


def may_retry(attempt: int, max_retries: int, left_s: float) -> bool:
    """Whether retry number `attempt` (from 1) of a request whose replica was lost goes out, with `left_s` seconds
    left of its time."""
    return attempt <= max_retries and left_s > 0
