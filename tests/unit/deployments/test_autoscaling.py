"""The autoscaling policy (a pure decision, and run inside Serve's own wrapper that adds the delays), the replicas'
report, and the scaling fields of the config and the plan. No Ray cluster."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError
from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from deployments import autoscaling
from deployments.autoscaling import Load, LoadSignals, PolicySettings, QueuePolicy, decide
from deployments.config import ServingConfig
from deployments.errors import ColdStartError
from deployments.plan import compile_plan
from models.spec import ModelSpec, ScalingConfig

SETTINGS = PolicySettings(target_ongoing_requests=4.0, downscale_threshold=0.5, upscale_step=2)


def _load(target: int, depth: float, **fields: Any) -> Load:
    return Load(**{"target": target, "running": target, "depth": depth, "min_replicas": 1, "max_replicas": 8, **fields})


# -- the decision ---------------------------------------------------------------------------------------------


def test_scales_up_on_queue_depth() -> None:
    assert decide(_load(1, depth=4.0), SETTINGS) == 1  # at target: enough
    assert decide(_load(1, depth=5.0), SETTINGS) == 2  # above: ceil(5 / 4)
    assert decide(_load(2, depth=12.0), SETTINGS) == 3


def test_upscale_step_bounds_one_decision() -> None:
    assert decide(_load(1, depth=100.0), SETTINGS) == 3  # wants 25: +2 at most
    one_at_a_time = PolicySettings(target_ongoing_requests=4.0, upscale_step=1)
    assert decide(_load(1, depth=100.0), one_at_a_time) == 2


def test_bounds_clip_the_decision() -> None:
    assert decide(_load(7, depth=100.0), SETTINGS) == 8  # max_replicas
    assert decide(_load(2, depth=0.0), SETTINGS) == 1  # min_replicas
    assert decide(_load(1, depth=0.0, min_replicas=0), SETTINGS) == 0  # scale to zero when idle


def test_hysteresis_holds_inside_the_band_and_scales_down_below_it() -> None:
    # 3 replicas, target 4: scale down to 2 only once the load fits 2 replicas at half the target (<= 4).
    assert decide(_load(3, depth=7.0), SETTINGS) == 3  # 7 fits 2 replicas at target, not at half of it: hold
    assert decide(_load(3, depth=4.0), SETTINGS) == 2
    assert decide(_load(3, depth=1.0), SETTINGS) == 1


def test_a_steady_load_never_flaps() -> None:
    """Whatever the steady load, once the decision settles it stays: every count it reaches decides itself again."""
    for tenths in range(0, 400):
        depth = tenths / 10
        replicas = 1
        seen = []
        for _ in range(12):
            replicas = decide(_load(replicas, depth=depth), SETTINGS)
            seen.append(replicas)
        settled = seen[-1]
        assert seen[-6:] == [settled] * 6, f"depth {depth}: {seen}"
        # ...and from above too: scaling down never lands on a count that wants to scale up again.
        high = decide(_load(8, depth=depth), SETTINGS)
        assert decide(_load(high, depth=depth), SETTINGS) == high, f"depth {depth}: down to {high} then up again"


def test_scales_up_on_time_to_first_token() -> None:
    latency = PolicySettings(target_ongoing_requests=4.0, target_ttft_s=0.5)
    slow = {"ttft_s": 2.0, "waiting": 3.0}
    assert decide(_load(2, depth=6.0, **slow), latency) == 3  # queue alone would hold at 2
    assert decide(_load(2, depth=6.0, **slow), SETTINGS) == 2  # no target_ttft_s: queue depth only
    assert decide(_load(2, depth=6.0, ttft_s=0.2, waiting=3.0), latency) == 2  # fast enough


def test_latency_waits_for_its_last_replica_and_needs_waiting_requests() -> None:
    latency = PolicySettings(target_ongoing_requests=4.0, target_ttft_s=0.5)
    # One replica of the last step is still starting: add none before it shows its effect.
    assert decide(_load(3, depth=6.0, running=2, ttft_s=2.0, waiting=3.0), latency) == 3
    # Slow first tokens with nothing waiting (long prompts): another replica would not help.
    assert decide(_load(2, depth=6.0, ttft_s=2.0, waiting=0.0), latency) == 2
    # Slow: no scale-down, although the queue alone would allow it.
    assert decide(_load(3, depth=1.0, ttft_s=2.0, waiting=1.0, running=2), latency) == 3


# -- inside Serve's own wrapper: delays, bounds, scale from zero ----------------------------------------------------


def _serve_policy(spec: ModelSpec) -> tuple[Any, AutoscalingConfig]:
    """The policy as Serve's controller runs it: built from the plan's options, wrapped with Serve's delays."""
    (model,) = compile_plan(ServingConfig(models=(spec,))).models
    config = AutoscalingConfig(**model.serve_options["autoscaling_config"])
    policy = config.policy.get_policy()(**config.policy.policy_kwargs)
    return _apply_autoscaling_config(policy), config


def _context(
    config: AutoscalingConfig,
    *,
    replicas: int,
    requests: float,
    state: dict[str, Any],
    reports: dict[str, dict[Any, float]] | None = None,
) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID(name="replica:m", app_name="app"),
        deployment_name="replica:m",
        app_name="app",
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=[],
        total_num_requests=requests,
        total_queued_requests=0.0,
        aggregated_metrics=reports or {},
        raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state,
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )


def _spec(**scaling: Any) -> ModelSpec:
    return ModelSpec(id="m", task="generate", engine="echo", scaling={"min_replicas": 1, "max_replicas": 4, **scaling})


def test_serve_holds_a_decision_during_its_delay() -> None:
    waiting, held = _serve_policy(_spec(upscale_delay_s=3600, downscale_delay_s=3600))
    assert waiting(_context(held, replicas=1, requests=20.0, state={}))[0] == 1
    assert waiting(_context(held, replicas=3, requests=0.0, state={}))[0] == 3

    at_once, no_delay = _serve_policy(_spec(upscale_delay_s=0, downscale_delay_s=0))
    assert at_once(_context(no_delay, replicas=1, requests=20.0, state={}))[0] == 3  # +2: upscale_step
    assert at_once(_context(no_delay, replicas=3, requests=0.0, state={}))[0] == 1
    assert at_once(_context(no_delay, replicas=3, requests=7.0, state={}))[0] == 3  # inside the band: hold


def test_serve_starts_a_replica_for_a_request_at_zero() -> None:
    policy, config = _serve_policy(_spec(min_replicas=0, upscale_delay_s=3600))
    replicas, _ = policy(_context(config, replicas=0, requests=1.0, state={}))
    assert replicas == 1  # Serve's scale-from-zero path: no delay


def test_policy_reads_the_replicas_reports() -> None:
    policy = QueuePolicy(target_ongoing_requests=4.0, target_ttft_s=0.5)
    config = AutoscalingConfig(min_replicas=1, max_replicas=4)
    reports = {"ttft_s": {"r1": 2.0, "r2": 0.0}, "waiting": {"r1": 2.0, "r2": 1.0}}
    ctx = _context(config, replicas=2, requests=6.0, state={"kept": 1}, reports=reports)
    assert policy(ctx) == (3, {"kept": 1})  # r2 reported no first output lately: r1's TTFT is the mean


def test_serve_scales_on_ttft_where_queue_depth_alone_holds() -> None:
    """The integration test's case (tests/integration/test_autoscaling.py), as Serve's controller runs the plan's
    policy: 3 requests against a queue target of 8 ask for 1 replica; a TTFT of 1 s over a 0.25 s target asks for one
    more, and the capped count holds at max_replicas."""
    reports = {"ttft_s": {"r1": 1.0}, "waiting": {"r1": 3.0}}
    scaling = {"max_replicas": 2, "target_ongoing_requests": 8, "upscale_delay_s": 0, "downscale_delay_s": 0}
    bound, bound_config = _serve_policy(_spec(target_ttft_s=0.25, **scaling))
    control, control_config = _serve_policy(_spec(**scaling))
    assert bound(_context(bound_config, replicas=1, requests=3.0, state={}, reports=reports))[0] == 2
    assert control(_context(control_config, replicas=1, requests=3.0, state={}, reports=reports))[0] == 1
    assert bound(_context(bound_config, replicas=2, requests=3.0, state={}, reports=reports))[0] == 2
    # No replica reported a first output lately: queue depth only.
    quiet = {"ttft_s": {"r1": 0.0}, "waiting": {"r1": 3.0}}
    assert bound(_context(bound_config, replicas=1, requests=3.0, state={}, reports=quiet))[0] == 1


def test_the_controller_loads_the_policy_without_the_repo() -> None:
    """Serve pickles the policy module by value: its controller has no `deployments` package to import."""
    blob = AutoscalingPolicy(policy_function=autoscaling.POLICY_PATH).get_serialized_policy_def()
    script = (
        "import sys, cloudpickle\n"
        "cls = cloudpickle.loads(sys.stdin.buffer.read())\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('deployments', 'models')]\n"
        "print(cls(target_ongoing_requests=2.0).settings.target_ongoing_requests)\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script], input=blob, capture_output=True, cwd="/", timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "2.0"


# -- the replica's report --------------------------------------------------------------------------------------


def test_replica_reports_its_recent_time_to_first_token() -> None:
    signals = LoadSignals(window_s=10.0)
    assert signals.report(waiting=0, running=0, now=100.0) == {"ttft_s": 0.0, "waiting": 0.0, "running": 0.0}
    signals.first_output(received_at=100.0, first_output_at=101.0)
    signals.first_output(received_at=104.0, first_output_at=107.0)
    assert signals.report(waiting=2, running=1, now=108.0) == {"ttft_s": 2.0, "waiting": 2.0, "running": 1.0}
    assert signals.report(waiting=0, running=0, now=115.0)["ttft_s"] == 3.0  # the first one left the window
    assert signals.report(waiting=0, running=0, now=200.0)["ttft_s"] == 0.0


def test_cold_start_error_keeps_its_retry_after_across_processes() -> None:
    exc = pickle.loads(pickle.dumps(ColdStartError("cold", retry_after_s=30)))
    assert (exc.status_code, exc.error_type, exc.retry_after_s, exc.code) == (
        503,
        "service_unavailable",
        30,
        "model_cold",
    )


# -- config and plan --------------------------------------------------------------------------------------------


def test_plan_hands_serve_the_policy_and_the_delays() -> None:
    spec = _spec(target_ongoing_requests=2, upscale_delay_s=3, downscale_delay_s=20, target_ttft_s=1.5, upscale_step=1)
    (model,) = compile_plan(ServingConfig(models=(spec,))).models
    options = model.serve_options["autoscaling_config"]
    assert options["upscale_delay_s"] == 3 and options["downscale_delay_s"] == 20
    assert options["policy"] == {
        "policy_function": "deployments.autoscaling:QueuePolicy",
        "policy_kwargs": {
            "target_ongoing_requests": 2.0,
            "downscale_threshold": 0.5,
            "upscale_step": 1,
            "target_ttft_s": 1.5,
        },
    }
    serve_default = compile_plan(ServingConfig(models=(_spec(policy="requests"),))).models[0]
    assert "policy" not in serve_default.serve_options["autoscaling_config"]
    assert serve_default.serve_options["autoscaling_config"]["upscale_delay_s"] == 5.0  # our default, not Serve's 30


def test_scale_to_zero_starts_with_one_replica_unless_told() -> None:
    def initial(**scaling: Any) -> int:
        model = compile_plan(ServingConfig(models=(_spec(min_replicas=0, **scaling),))).models[0]
        return int(model.serve_options["autoscaling_config"]["initial_replicas"])

    assert initial() == 1  # the deploy proves that the weights load and answer
    assert initial(initial_replicas=0) == 0


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ({"policy": "requests", "target_ttft_s": 1.0}, "`target_ttft_s` applies to policy 'queue'"),
        ({"policy": "requests", "upscale_step": 3}, "`upscale_step` applies to policy 'queue'"),
        ({"policy": "requests", "downscale_threshold": 0.8}, "`downscale_threshold` applies to policy 'queue'"),
        ({"cold_start_timeout_s": 30}, "`cold_start_timeout_s` applies to a model that scales to zero"),
        ({"cold_start_queue": 4}, "`cold_start_queue` applies to a model that scales to zero"),
        ({"min_replicas": 0, "cold_start_queue": 64, "max_queued_requests": 16}, "lower cold_start_queue"),
        ({"policy": "latency"}, "scaling.policy"),
        ({"downscale_threshold": 1.0}, "scaling.downscale_threshold"),
        ({"upscale_delay_s": -1}, "scaling.upscale_delay_s"),
    ],
)
def test_scaling_fields_are_checked_by_name(scaling: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        _spec(**scaling)


def test_a_dumped_scaling_config_loads_again() -> None:
    scaling = ScalingConfig(min_replicas=0, max_replicas=2, policy="requests", cold_start_queue=4)
    assert ScalingConfig.model_validate(scaling.model_dump()) == scaling
