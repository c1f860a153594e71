"""ScalingConfig: how many replicas a model runs, and how it scales on load (to zero and back)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from models.frozen import FrozenModel

__all__ = ["ScalingConfig"]


class ScalingConfig(FrozenModel):
    """How many replicas run, and when Serve adds or removes them."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running (0 allows scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas the autoscaler may start.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas started at deploy time; defaults to min_replicas (at least 1)."
    )
    target_ongoing_requests: float = Field(
        4.0,
        gt=0,
        description=(
            "Autoscaling target: requests per replica, waiting (at the routers or in the engine's queue) plus "
            "running. Both policies scale on it."
        ),
    )
    policy: Literal["queue", "requests"] = Field(
        "queue",
        description=(
            "How the autoscaler decides. 'queue': replicas = ceil((waiting + running) / target_ongoing_requests), at "
            "most `upscale_step` more per decision, one more while the replicas' time to first token is above "
            "`target_ttft_s`, and fewer only once the load is below `downscale_threshold` of the target "
            "(deployments.autoscaling). 'requests': Serve's own policy on the same target, without those bounds."
        ),
    )
    upscale_delay_s: float = Field(
        5.0,
        ge=0,
        description="Seconds the load must stay above the target before replicas are added (Serve's default: 30).",
    )
    downscale_delay_s: float = Field(
        60.0,
        ge=0,
        description=(
            "Seconds the load must stay low before replicas are removed, to zero too (Serve's default: 600). "
            "About twice a replica's start time: a replica removed and needed again costs a cold start."
        ),
    )
    downscale_threshold: float = Field(
        0.5,
        gt=0,
        lt=1,
        description=(
            "policy 'queue': replicas are removed only down to a count whose load per replica stays at or below "
            "this fraction of target_ongoing_requests (hysteresis: a steady load never scales up and down again)."
        ),
    )
    upscale_step: int = Field(
        2, ge=1, le=100, description="policy 'queue': most replicas added by one scaling decision."
    )
    target_ttft_s: float | None = Field(
        None,
        gt=0,
        description=(
            "policy 'queue': add a replica while the replicas' mean time to first token (request received at the "
            "replica -> first output, last 10 s) is above this many seconds and requests wait in them. Unset: "
            "queue depth only."
        ),
    )
    cold_start_timeout_s: float = Field(
        120.0,
        gt=0,
        description=(
            "min_replicas 0: most seconds a request waits for a replica to start when the model is at zero "
            "replicas; then it gets a 503 with Retry-After."
        ),
    )
    cold_start_queue: int = Field(
        32,
        ge=1,
        description=(
            "min_replicas 0: most requests held at each router replica while the model starts from zero; more "
            "get a 503 with Retry-After at once."
        ),
    )
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="Most requests one replica holds at once; more queue in the router. Keep it above the batch size.",
    )
    max_queued_requests: int = Field(
        256,
        ge=-1,
        description=(
            "Most requests that may wait for this model's replicas at each router replica when every replica "
            "holds max_ongoing_requests; past it requests get a 429 with Retry-After. -1: wait without bound."
        ),
    )

    @model_validator(mode="after")
    def _bounds(self) -> ScalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"`min_replicas` ({self.min_replicas}) is above `max_replicas` ({self.max_replicas}): "
                "raise max_replicas or lower min_replicas"
            )
        if self.max_queued_requests == 0:
            raise ValueError("`max_queued_requests` must be -1 (no bound) or at least 1")
        if self.initial_replicas is not None and not (self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("`initial_replicas` must lie between `min_replicas` and `max_replicas`")
        return self

    @model_validator(mode="after")
    def _fields_of_policy(self) -> ScalingConfig:
        fields = type(self).model_fields
        # Compared with the default, not `model_fields_set`: a dumped config (all fields written) must load again.
        for name in ("downscale_threshold", "upscale_step", "target_ttft_s"):
            if getattr(self, name) != fields[name].default and self.policy != "queue":
                raise ValueError(
                    f"`{name}` applies to policy 'queue', not '{self.policy}': remove it or set policy: queue"
                )
        for name in ("cold_start_timeout_s", "cold_start_queue"):
            if getattr(self, name) != fields[name].default and self.min_replicas > 0:
                raise ValueError(f"`{name}` applies to a model that scales to zero: remove it or set min_replicas: 0")
        if self.min_replicas == 0 and -1 < self.max_queued_requests < self.cold_start_queue:
            raise ValueError(
                f"`cold_start_queue` ({self.cold_start_queue}) is above `max_queued_requests` "
                f"({self.max_queued_requests}): Serve would refuse the held requests with a 429 first; lower "
                "cold_start_queue or raise max_queued_requests"
            )
        return self

    @property
    def autoscaling(self) -> bool:
        """True when Serve should autoscale between min and max replicas."""
        return self.max_replicas > self.min_replicas
