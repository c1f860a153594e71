"""Per-key rate limits shared by every router replica: token buckets (requests, tokens per minute, tokens per day)
held in one named, detached Ray actor (`QuotaStore`), asked once per request to admit it and told the tokens a
request used once they are known (`charge`, fire and forget)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray.exceptions import RayError

from deployments.auth.keys import Tenant, bind_tenant
from deployments.errors import OverloadedError, QuotaUnavailableError
from deployments.metrics import KEY_TOKENS, instrument

__all__ = [
    "ADMIT_TIMEOUT_S",
    "QUOTA_NAMESPACE",
    "Admission",
    "KeyLimits",
    "QuotaState",
    "QuotaStore",
    "QuotaUnavailableError",
    "Quotas",
    "TokenBucket",
    "bind_request",
    "charge",
    "store_name",
]

logger = logging.getLogger(__name__)

#: Ray namespace of the quota stores (one detached actor per app, `store_name(app)`).
QUOTA_NAMESPACE = "modelfleet"
#: Longest a router replica waits for the store to admit a request before `quota_fail_mode` decides.
ADMIT_TIMEOUT_S = 5.0
_MINUTE_S = 60.0
_DAY_S = 86_400.0
FailMode = Literal["open", "closed"]


# -- the bucket math -------------------------------------------------------------------------------------------------


@dataclass
class TokenBucket:
    """`capacity` units, refilled evenly at `per_s` units a second; the level may go below zero (a debt)."""

    capacity: float
    per_s: float
    level: float
    at: float

    @classmethod
    def full(cls, capacity: float, period_s: float, now: float) -> TokenBucket:
        """A full bucket of `capacity` that refills completely in `period_s`."""
        return cls(capacity=capacity, per_s=capacity / period_s, level=capacity, at=now)

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.per_s)
        self.at = max(self.at, now)

    def resize(self, capacity: float, period_s: float) -> None:
        """A new size (the config changed): the level is kept, but never above the new capacity."""
        if capacity != self.capacity:
            self.capacity, self.per_s = capacity, capacity / period_s
            self.level = min(self.level, capacity)

    def seconds_until(self, level: float) -> float:
        """Seconds until the bucket holds at least `level` (0 if it does)."""
        return max(0.0, (level - self.level) / self.per_s)


@dataclass(frozen=True)
class KeyLimits:
    """A key's limits, sent with each call so the store follows config changes (None: no such limit)."""

    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None

    @classmethod
    def of(cls, tenant: Tenant) -> KeyLimits:
        return cls(rpm=tenant.rpm, tpm=tenant.tpm, tokens_per_day=tenant.tokens_per_day)


@dataclass(frozen=True)
class Admission:
    """The store's answer: admitted or not, which limit refused it and when to retry, and the buckets' state after
    it (OpenAI's x-ratelimit-* headers: limit, remaining and seconds until full, for requests and tokens)."""

    allowed: bool
    refused_by: str = ""
    retry_after_s: float = 0.0
    limit_requests: int | None = None
    remaining_requests: int = 0
    reset_requests_s: float = 0.0
    limit_tokens: int | None = None
    remaining_tokens: int = 0
    reset_tokens_s: float = 0.0

    def error(self, key_name: str) -> OverloadedError:
        """The 429 of a refused request, with its `Retry-After` (whole seconds, at least 1)."""
        wait = max(1, math.ceil(self.retry_after_s))
        exc = OverloadedError(
            f"Rate limit reached for key '{key_name}' on {self.refused_by}; retry in {wait} s",
            code="rate_limit_exceeded",
        )
        exc.retry_after_s = wait
        return exc


@dataclass
class _KeyBuckets:
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    day: TokenBucket | None = None


def _fit(bucket: TokenBucket | None, size: int | None, period_s: float, now: float) -> TokenBucket | None:
    if size is None:
        return None
    if bucket is None:
        return TokenBucket.full(size, period_s, now)
    bucket.resize(size, period_s)
    bucket.refill(now)
    return bucket


@dataclass
class QuotaState:
    """Every key's buckets; the logic of `QuotaStore`, free of Ray (the clock is injectable for tests)."""

    clock: Callable[[], float] = time.monotonic
    _keys: dict[str, _KeyBuckets] = field(default_factory=dict)

    def _buckets(self, name: str, limits: KeyLimits, now: float) -> _KeyBuckets:
        b = self._keys.setdefault(name, _KeyBuckets())
        b.requests = _fit(b.requests, limits.rpm, _MINUTE_S, now)
        b.tokens = _fit(b.tokens, limits.tpm, _MINUTE_S, now)
        b.day = _fit(b.day, limits.tokens_per_day, _DAY_S, now)
        return b

    def admit(self, name: str, limits: KeyLimits, *, tokens: bool = True) -> Admission:
        """Admit one request of key `name`: it takes one request from the requests bucket; with `tokens`, the token
        buckets must not be in debt (tokens are charged later, as used).

        Args:
            name: the key's name.
            limits: its limits now.
            tokens: the request may use tokens (it is refused while a token bucket is in debt).
        """
        now = self.clock()
        b = self._buckets(name, limits, now)
        refused: list[tuple[float, str]] = []
        if tokens:
            for bucket, what in ((b.tokens, "tokens per minute"), (b.day, "tokens per day")):
                if bucket is not None and bucket.level <= 0:
                    # Strictly above zero again: a whole token's worth past the debt.
                    refused.append((bucket.seconds_until(min(1.0, bucket.capacity)), f"{what} ({bucket.capacity:g})"))
        if b.requests is not None and b.requests.level < 1:
            refused.append((b.requests.seconds_until(1), f"requests per minute ({b.requests.capacity:g})"))
        if not refused:
            if b.requests is not None:
                b.requests.level -= 1
            return self._snapshot(b, Admission(allowed=True))
        wait, what = max(refused)
        return self._snapshot(b, Admission(allowed=False, refused_by=what, retry_after_s=wait))

    def charge(self, name: str, limits: KeyLimits, tokens: int) -> None:
        """Take `tokens` (prompt plus completion, as used) from the key's token buckets; they may go into debt."""
        now = self.clock()
        b = self._buckets(name, limits, now)
        for bucket in (b.tokens, b.day):
            if bucket is not None:
                bucket.level -= tokens

    @staticmethod
    def _snapshot(b: _KeyBuckets, admission: Admission) -> Admission:
        values: dict[str, Any] = {}
        if b.requests is not None:
            values |= {
                "limit_requests": int(b.requests.capacity),
                "remaining_requests": max(0, math.floor(b.requests.level)),
                "reset_requests_s": b.requests.seconds_until(b.requests.capacity),
            }
        if b.tokens is not None:
            values |= {
                "limit_tokens": int(b.tokens.capacity),
                "remaining_tokens": max(0, math.floor(b.tokens.level)),
                "reset_tokens_s": b.tokens.seconds_until(b.tokens.capacity),
            }
        return Admission(**{**admission.__dict__, **values})


# -- the shared store (a Ray actor) -----------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class QuotaStore:
    """The buckets of every key of one app, shared by its router replicas. A plain (one call at a time) actor: each
    call is atomic."""

    def __init__(self) -> None:
        self._state = QuotaState()

    def admit(self, name: str, limits: KeyLimits, tokens: bool) -> Admission:
        return self._state.admit(name, limits, tokens=tokens)

    def charge(self, name: str, limits: KeyLimits, tokens: int) -> None:
        self._state.charge(name, limits, tokens)


def store_name(app_name: str) -> str:
    """The actor name of an app's quota store (namespace QUOTA_NAMESPACE)."""
    return f"quota:{app_name}"


class Quotas:
    """A router replica's side of the quota store: one call to admit a request, one fire-and-forget call to charge
    its tokens. The store is created by whichever replica comes first (detached, so it outlives any one replica, and
    restarted by Ray if its process dies; its buckets then start full again)."""

    def __init__(self, app_name: str, fail_mode: FailMode, *, timeout_s: float = ADMIT_TIMEOUT_S) -> None:
        self.app_name = app_name
        self.fail_mode = fail_mode
        self.timeout_s = timeout_s
        self._handle: Any = None
        self._warned = 0.0

    def _connect(self) -> Any:
        if self._handle is None:
            self._handle = QuotaStore.options(  # type: ignore[attr-defined]
                name=store_name(self.app_name),
                namespace=QUOTA_NAMESPACE,
                get_if_exists=True,
                lifetime="detached",
                max_restarts=-1,
                max_task_retries=0,
            ).remote()
        return self._handle

    def connect(self) -> None:
        """Find or create the store now (blocking: call it where blocking is fine, e.g. a replica's constructor)."""
        try:
            self._connect()
        except (RayError, ValueError) as exc:
            logger.warning("quota store %s not reachable yet (%s); retried on the next request", self.app_name, exc)

    async def admit(self, tenant: Tenant, *, tokens: bool = True) -> Admission | None:
        """Ask the store to admit a request of `tenant` (None: the key has no limits, or the store is unreachable
        and the fail mode is 'open'). With `tokens`, a token bucket in debt refuses it too.

        Raises:
            QuotaUnavailableError: the store is unreachable and the fail mode is 'closed'.
        """
        if not tenant.limited:
            return None
        try:
            handle = self._handle if self._handle is not None else await asyncio.to_thread(self._connect)
            ref = handle.admit.remote(tenant.name, KeyLimits.of(tenant), tokens)
            admission: Admission = await asyncio.wait_for(ref, self.timeout_s)
            return admission
        except (RayError, TimeoutError, ValueError) as exc:
            self._handle = None  # found again (or created again) on the next request
            self._unreachable(exc)
            return None

    def _unreachable(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned > 10:  # once in a while, not per request
            self._warned = now
            verb = "passing requests unmetered" if self.fail_mode == "open" else "refusing requests (503)"
            logger.warning("quota store of %s unreachable (%s): %s", self.app_name, type(exc).__name__, verb)
        if self.fail_mode == "closed":
            raise QuotaUnavailableError(
                "Rate limits cannot be checked right now (the quota store is unreachable); retry shortly",
                code="quota_unavailable",
            )

    def charge(self, tenant: Tenant, tokens: int) -> None:
        """Charge `tokens` to `tenant`'s buckets without waiting (lost only while the store is unreachable)."""
        if tokens <= 0 or tenant.tpm is None and tenant.tokens_per_day is None or self._handle is None:
            return
        try:
            self._handle.charge.remote(tenant.name, KeyLimits.of(tenant), tokens)
        except RayError:
            self._handle = None


# The quota client of the request served in this context (with its tenant): set by the middleware.
_quotas: contextvars.ContextVar[tuple[Tenant, Quotas | None] | None] = contextvars.ContextVar(
    "modelfleet_quotas", default=None
)


def bind_request(tenant: Tenant | None, quotas: Quotas | None) -> None:
    """The request served in this context is `tenant`'s (model access: `check_model`), and its tokens are charged
    through `quotas` (None: no key, or the key has no token limits)."""
    bind_tenant(tenant)
    _quotas.set((tenant, quotas) if tenant is not None else None)


def charge(prompt_tokens: int, completion_tokens: int = 0) -> None:
    """The current request used these tokens: count them under its key and charge them to its token buckets.

    A no-op outside a request with a key (keys off, or a batch job), so it is safe wherever usage is computed.
    """
    bound = _quotas.get()
    if bound is None:
        return
    tenant, quotas = bound
    counter = instrument(KEY_TOKENS)
    if prompt_tokens > 0:
        counter.inc(prompt_tokens, tags={"key": tenant.name, "kind": "prompt"})
    if completion_tokens > 0:
        counter.inc(completion_tokens, tags={"key": tenant.name, "kind": "completion"})
    if quotas is not None:
        quotas.charge(tenant, prompt_tokens + completion_tokens)
