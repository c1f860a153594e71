"""Which replica failures the router sends again, and how often (no cluster: Ray's own exception types).
tests/integration/test_faults.py kills real replicas."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from deployments.errors import EngineDeadError, EngineError, InvalidRequestError, OverloadedError
from deployments.failures import ReplicaLostError, map_failure, may_retry


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (ActorDiedError(), "replica_died"),
        (ActorUnavailableError("unreachable", None), "replica_unavailable"),
        (RayTaskError("complete", "", ActorDiedError()), "replica_died"),
        (RayTaskError("complete", "", EngineDeadError("the engine is shutting down")), "engine_dead"),
    ],
)
def test_a_lost_replica_is_retriable_and_still_a_503(failure: RayTaskError | RayActorError, reason: str) -> None:
    mapped = map_failure(failure)
    assert isinstance(mapped, ReplicaLostError) and mapped.reason == reason
    assert isinstance(mapped, EngineDeadError) and mapped.status_code == 503


@pytest.mark.parametrize(
    ("failure", "kind"),
    [
        (RayTaskError("complete", "", InvalidRequestError("bad", param="prompt")), InvalidRequestError),
        (RayTaskError("complete", "", ValueError("engine bug")), EngineError),
        (BackPressureError(num_queued_requests=3, max_queued_requests=2), OverloadedError),
    ],
)
def test_an_answer_or_a_refusal_is_not_retried(failure: RayTaskError, kind: type[Exception]) -> None:
    mapped = map_failure(failure)
    assert type(mapped) is kind and not isinstance(mapped, ReplicaLostError)


def test_retries_stop_after_max_retries_or_when_the_time_is_up() -> None:
    assert [may_retry(attempt, 2, 10.0) for attempt in (1, 2, 3)] == [True, True, False]
    assert not may_retry(1, 0, 10.0)  # max_retries 0: never
    assert not may_retry(1, 5, 0.0)
