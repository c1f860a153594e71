"""API keys and limits without Ray: the key config and key ring, model access, the token-bucket math of the quota
store (on a clock the test sets), the rate-limit headers, the middleware's 401, `keys create` and the open-API
warning."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import ValidationError

from cluster import deploy as deploying
from cluster.cli import main
from cluster.k8s import RenderError, RenderOptions, rayservice
from cluster.local import ClusterState
from deployments.api import ingress
from deployments.api import limits as limits_mod
from deployments.auth import ApiKeyConfig, KeyRing, Tenant, check_model, generate_key, key_entry_yaml, key_sha256
from deployments.auth.keys import bind_tenant, current_tenant, may_use
from deployments.auth.limits import (
    Admission,
    KeyLimits,
    Quotas,
    QuotaState,
    QuotaUnavailableError,
    TokenBucket,
    bind_request,
    store_name,
)
from deployments.config import RouterConfig, ServingConfig
from deployments.errors import ModelNotFoundError
from deployments.plan import compile_plan

ECHO = {"task": "generate", "engine": "echo"}
SHA = key_sha256("sk-mf-alpha")


def _config(keys: list[dict[str, Any]], **router: Any) -> ServingConfig:
    return ServingConfig.model_validate(
        {
            "models": [{"id": "a", **ECHO}, {"id": "b", **ECHO}],
            "pipelines": [{"id": "p", "kind": "fallback", "targets": [{"model": "a"}, {"model": "b"}]}],
            "router": {"keys": keys, **router},
        }
    )


# -- the key config ----------------------------------------------------------------------------------------------


def test_a_key_entry_has_one_secret_source() -> None:
    entry = ApiKeyConfig(name="team-a", sha256=SHA.upper(), models=("a",), rpm=30, tpm=1000, tokens_per_day=10**6)
    assert entry.sha256 == SHA  # stored lower-case, as `keys create` prints it
    for bad, field in (
        ({"name": "x"}, "needs exactly one of"),
        ({"name": "x", "sha256": SHA, "key_env": "K"}, "needs exactly one of"),
        ({"name": "x", "sha256": "abc"}, "64 hex digits"),
        ({"name": "x", "key_file": "relative/key"}, "absolute path"),
        ({"name": "has space", "sha256": SHA}, "1-64 letters"),
        ({"name": "x", "sha256": SHA, "rpm": 0}, "greater than or equal to 1"),
        ({"name": "x", "sha256": SHA, "key": "sk-plain"}, "Extra inputs are not permitted"),
    ):
        with pytest.raises(ValidationError, match=field):
            ApiKeyConfig.model_validate(bad)


def test_the_config_checks_key_names_secrets_and_models() -> None:
    config = _config([{"name": "k", "sha256": SHA, "models": ["a", "p"]}])
    assert config.router.keys[0].models == ("a", "p")  # models and pipelines alike
    with pytest.raises(ValidationError, match="models c are not served"):
        _config([{"name": "k", "sha256": SHA, "models": ["a", "c"]}])
    with pytest.raises(ValidationError, match="key name.* k appear twice"):
        _config([{"name": "k", "sha256": SHA}, {"name": "k", "key_env": "K"}])
    with pytest.raises(ValidationError, match="same `sha256`"):
        _config([{"name": "k1", "sha256": SHA}, {"name": "k2", "sha256": SHA.upper()}])
    with pytest.raises(ValidationError, match="quota_fail_mode"):
        RouterConfig.model_validate({"quota_fail_mode": "maybe"})
    assert RouterConfig().quota_fail_mode == "open"


def test_key_ring_reads_hashes_env_vars_files_and_plain_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MF_TEST_KEY", " sk-mf-from-env\n")
    (tmp_path / "key").write_text("sk-mf-from-file\n")
    router = _config(
        [
            {"name": "alpha", "sha256": SHA, "models": ["a"], "rpm": 5},
            {"name": "env", "key_env": "MF_TEST_KEY", "tpm": 100, "tokens_per_day": 1000},
            {"name": "file", "key_file": str(tmp_path / "key")},
        ],
        api_keys=["sk-plain"],
    ).router
    ring = KeyRing.from_config(router)
    assert ring.enabled
    alpha = ring.resolve(b"sk-mf-alpha")
    assert alpha == Tenant(name="alpha", models=frozenset({"a"}), rpm=5)
    assert alpha is not None and alpha.limited
    assert ring.resolve(b"sk-mf-from-env") == Tenant(name="env", tpm=100, tokens_per_day=1000)
    assert ring.resolve(b"sk-mf-from-file") == Tenant(name="file")
    plain = ring.resolve(b"sk-plain")
    assert plain == Tenant(name="api_keys.0") and not plain.limited
    for wrong in (b"", b"sk-mf-alph", b"sk-mf-alpha ", SHA.encode()):  # not even the hash itself
        assert ring.resolve(wrong) is None
    assert not KeyRing().enabled


def test_key_ring_refuses_a_missing_secret_or_a_key_given_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MF_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="MF_TEST_KEY is unset or empty"):
        KeyRing.from_config(_config([{"name": "env", "key_env": "MF_TEST_KEY"}]).router)
    with pytest.raises(ValueError, match="cannot read key_file"):
        KeyRing.from_config(_config([{"name": "f", "key_file": str(tmp_path / "missing")}]).router)
    monkeypatch.setenv("MF_TEST_KEY", "sk-mf-alpha")
    with pytest.raises(ValueError, match="'alpha' and 'env' are the same key"):
        KeyRing.from_config(
            _config([{"name": "alpha", "sha256": SHA}, {"name": "env", "key_env": "MF_TEST_KEY"}]).router
        )


def test_generated_keys_and_their_entries() -> None:
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    key = keys.pop()
    assert key.startswith("sk-mf-") and len(key) == 6 + 43
    entry = yaml.safe_load(key_entry_yaml("team-a", key))
    assert entry == [{"name": "team-a", "sha256": hashlib.sha256(key.encode()).hexdigest()}]
    config = _config(entry)
    assert KeyRing.from_config(config.router).resolve(key.encode()) == Tenant(name="team-a")


# -- model access ------------------------------------------------------------------------------------------------


def test_a_key_sees_and_uses_only_its_models() -> None:
    async def run() -> None:
        bind_tenant(Tenant(name="t", models=frozenset({"a", "p"})))
        assert current_tenant() is not None
        check_model("a")
        check_model("p")
        check_model("a@v2")  # a key of a bare id may use its every version
        assert [m for m in ("a", "b", "p", "a@v1") if may_use(m)] == ["a", "p", "a@v1"]
        with pytest.raises(ModelNotFoundError) as refused:
            check_model("b")
        # Exactly as an unknown model (the router's message), naming only the key's own models.
        assert refused.value.message == "The model 'b' does not exist. Served models: a, p"
        assert (refused.value.status_code, refused.value.param, refused.value.code) == (404, "model", "model_not_found")
        bind_tenant(Tenant(name="all"))
        check_model("b")
        bind_tenant(None)
        check_model("anything")  # no key: the router says whether it exists
        assert may_use("b")

    asyncio.run(run())


# -- the bucket math ---------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_evenly_up_to_its_capacity_and_may_owe() -> None:
    bucket = TokenBucket.full(60, 60.0, now=0.0)
    assert (bucket.capacity, bucket.per_s, bucket.level) == (60, 1.0, 60)
    bucket.level -= 100  # charged as used: a debt
    assert bucket.seconds_until(1) == pytest.approx(41.0)
    bucket.refill(30.0)
    assert bucket.level == pytest.approx(-10.0)
    bucket.refill(29.0)  # a clock that steps back changes nothing
    assert bucket.level == pytest.approx(-10.0)
    bucket.refill(1000.0)
    assert bucket.level == 60  # never above capacity
    bucket.resize(30, 60.0)
    assert (bucket.level, bucket.per_s) == (30, 0.5)


def test_requests_per_minute_admit_a_burst_of_rpm_then_one_per_interval() -> None:
    clock = Clock()
    state = QuotaState(clock=clock)
    limits = KeyLimits(rpm=30)
    answers = [state.admit("k", limits) for _ in range(90)]
    allowed = [a for a in answers if a.allowed]
    assert len(allowed) == 30  # exactly the configured burst, then nothing until time passes
    assert [a.remaining_requests for a in allowed[:3]] == [29, 28, 27] and allowed[-1].remaining_requests == 0
    refused = answers[30]
    assert refused.refused_by == "requests per minute (30)" and refused.retry_after_s == pytest.approx(2.0)
    assert refused.limit_requests == 30 and refused.limit_tokens is None
    assert refused.reset_requests_s == pytest.approx(60.0)
    clock.now += 1.9
    assert not state.admit("k", limits).allowed
    clock.now += 0.1  # one request's worth refilled (30 a minute: one every 2 s)
    assert state.admit("k", limits).allowed
    assert not state.admit("k", limits).allowed
    clock.now += 60  # a minute later: a full burst again
    assert sum(state.admit("k", limits).allowed for _ in range(40)) == 30
    assert state.admit("other", limits).allowed  # every key its own buckets


def test_tokens_are_charged_as_used_and_a_key_in_debt_waits() -> None:
    clock = Clock()
    state = QuotaState(clock=clock)
    limits = KeyLimits(tpm=120)
    first = state.admit("k", limits)
    assert first.allowed and (first.limit_tokens, first.remaining_tokens) == (120, 120)
    state.charge("k", limits, 100)
    assert state.admit("k", limits).remaining_tokens == 20  # still 20 left: admitted
    state.charge("k", limits, 80)  # now 60 in debt
    refused = state.admit("k", limits)
    assert not refused.allowed and refused.refused_by == "tokens per minute (120)"
    assert refused.remaining_tokens == 0
    assert refused.retry_after_s == pytest.approx(30.5)  # 61 tokens at 2 a second
    assert refused.reset_tokens_s == pytest.approx(90.0)
    assert state.admit("k", limits, tokens=False).allowed  # what spends no tokens (a GET) passes
    clock.now += 30.5
    assert state.admit("k", limits).allowed
    assert refused.error("k").retry_after_s == 31  # whole seconds, rounded up
    assert refused.error("k").status_code == 429 and refused.error("k").code == "rate_limit_exceeded"


def test_the_day_budget_and_every_limit_together() -> None:
    clock = Clock()
    state = QuotaState(clock=clock)
    limits = KeyLimits(rpm=10, tpm=1000, tokens_per_day=1500)
    assert state.admit("k", limits).allowed
    state.charge("k", limits, 1600)
    refused = state.admit("k", limits)
    assert not refused.allowed
    # Both token buckets owe; the longer wait decides (the day's bucket refills 1500 tokens in 24 h).
    assert refused.refused_by == "tokens per day (1500)"
    assert refused.retry_after_s == pytest.approx(101 * 86_400 / 1500)
    clock.now += 120  # the minute's bucket is full again, the day's is not
    assert state.admit("k", limits).refused_by == "tokens per day (1500)"
    assert Admission(allowed=False, refused_by="x", retry_after_s=0.2).error("k").retry_after_s == 1


def test_a_changed_limit_applies_to_the_next_call() -> None:
    clock = Clock()
    state = QuotaState(clock=clock)
    assert sum(state.admit("k", KeyLimits(rpm=10)).allowed for _ in range(5)) == 5
    assert sum(state.admit("k", KeyLimits(rpm=3)).allowed for _ in range(5)) == 3  # 5 left, capped at 3
    assert state.admit("k", KeyLimits()).allowed  # the limit removed: nothing to refuse


def test_an_unreachable_store_fails_open_or_closed_as_configured() -> None:
    lost = ConnectionError("store gone")
    assert Quotas("app", "open")._unreachable(lost) is None  # passes, unmetered
    with pytest.raises(QuotaUnavailableError) as refused:
        Quotas("app", "closed")._unreachable(lost)
    assert (refused.value.status_code, refused.value.code, refused.value.retry_after_s) == (503, "quota_unavailable", 1)
    assert store_name("app") == "quota:app"


# -- the HTTP side -----------------------------------------------------------------------------------------------


def test_rate_limit_headers_as_openai_writes_them() -> None:
    admission = Admission(
        allowed=True,
        limit_requests=30,
        remaining_requests=29,
        reset_requests_s=2.0,
        limit_tokens=150000,
        remaining_tokens=149984,
        reset_tokens_s=360.0,
    )
    headers = dict(limits_mod._ratelimit_headers(admission))
    assert headers == {
        b"x-ratelimit-limit-requests": b"30",
        b"x-ratelimit-remaining-requests": b"29",
        b"x-ratelimit-reset-requests": b"2s",
        b"x-ratelimit-limit-tokens": b"150000",
        b"x-ratelimit-remaining-tokens": b"149984",
        b"x-ratelimit-reset-tokens": b"6m0s",
    }
    assert limits_mod._ratelimit_headers(Admission(allowed=True)) == []
    durations = [0.0171, 1.0, 2.5, 59.9991, 119.2, 3723.0]
    assert [limits_mod._duration(s) for s in durations] == ["18ms", "1s", "2.5s", "59.999s", "2m0s", "1h2m3s"]


async def _named(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Behind the middleware: answers with the tenant bound to the request (as a route would see it)."""
    tenant = current_tenant()
    body = (tenant.name if tenant else "-").encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_middleware_checks_the_key_and_binds_its_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing.from_config(_config([{"name": "alpha", "sha256": SHA, "models": ["a"]}]).router)
    monkeypatch.setattr(limits_mod.limits, "keys", ring)
    monkeypatch.setattr(limits_mod.limits, "quotas", None)
    middleware = limits_mod.LimitsMiddleware(_named)

    async def served(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["app"] = ingress.app
        await middleware(scope, receive, send)

    async def run() -> list[tuple[int, str]]:
        transport = httpx.ASGITransport(app=served)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            answers = [
                await client.get("/v1/models", headers={"Authorization": "Bearer sk-mf-alpha"}),
                await client.get("/v1/models", headers={"Authorization": "bearer  sk-mf-alpha "}),
                await client.get("/v1/models"),
                await client.get("/v1/models", headers={"Authorization": f"Bearer {SHA}"}),
                await client.get("/v1/models", headers={"Authorization": "sk-mf-alpha"}),  # no scheme
                await client.get("/healthz"),  # probes stay open: no tenant
            ]
        return [(r.status_code, r.json()["error"]["type"] if r.status_code != 200 else r.text) for r in answers]

    assert asyncio.run(run()) == [
        (200, "alpha"),
        (200, "alpha"),
        (401, "authentication_error"),
        (401, "authentication_error"),
        (401, "authentication_error"),
        (200, "-"),
    ]
    bind_request(None, None)


# -- the CLI -----------------------------------------------------------------------------------------------------


def test_keys_create_prints_a_key_once_and_its_hash_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "team-a"]) == 0
    out = capsys.readouterr().out
    key = next(word for word in out.split() if word.startswith("sk-mf-"))
    assert out.count(key) == 1
    entry = yaml.safe_load(out[out.index("- name:") :])
    assert entry == [{"name": "team-a", "sha256": key_sha256(key)}]
    assert main(["keys", "create", "no spaces"]) == 2
    assert "1-64 letters" in capsys.readouterr().err


class _Stop(Exception):
    pass


def test_deploy_warns_when_the_api_is_open(monkeypatch: pytest.MonkeyPatch) -> None:
    state = ClusterState(pid=0, gcs_address="in-process", temp_dir="", log_file="", num_cpus=8)

    def stop(config: ServingConfig) -> None:
        raise _Stop  # deploy's first step after the warning: nothing is deployed, only what it said first matters

    monkeypatch.setattr(deploying, "check_local_engines", stop)
    lines: list[str] = []
    with pytest.raises(_Stop):
        deploying.deploy(_config([]), state, on_progress=lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: no API keys are configured (router.keys): the API is open")
    lines.clear()
    for keyed in (_config([{"name": "k", "sha256": SHA}]), _config([], api_keys=["sk-plain"])):
        with pytest.raises(_Stop):
            deploying.deploy(keyed, state, on_progress=lines.append)
    assert lines == []


def test_keys_by_hash_render_into_manifests_and_plain_keys_never() -> None:
    config = _config([{"name": "k", "sha256": SHA, "models": ["a"], "rpm": 5}])
    rendered = yaml.safe_dump(rayservice(compile_plan(config), RenderOptions()))
    assert SHA in rendered
    with pytest.raises(RenderError, match="api_keys"):
        rayservice(compile_plan(_config([], api_keys=["sk-secret"])), RenderOptions())
