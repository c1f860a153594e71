"""The model drill-down dashboard: one model's requests, where its time to first token goes, latency, tokens,
replicas, and vLLM's own engine metrics."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from cluster.observability.panels import (
    Panels,
    base_dashboard,
    model_variable,
    quantile,
    quantiles,
    rate,
    sel,
)
from deployments import metrics as m

__all__ = ["model"]

_REQ = m.REQUESTS.exported


def model(p: Panels) -> dashboard.Dashboard:
    s = sel(model='="$model"')
    deployment = sel(deployment='="replica:$model"')
    vllm = sel(model_name='="$model"')
    board = base_dashboard(
        "modelfleet-model",
        "modelfleet / Model",
        "One model: requests, where its time to first token goes, latency, tokens, replicas, and vLLM's own engine "
        "metrics for vLLM models.",
    ).with_variable(model_variable(multi=False))
    board = (
        board.with_row(p.row("Requests"))
        .with_panel(
            p.series(
                "Requests/s by endpoint and status",
                "",
                [(rate(_REQ, s, "endpoint, status"), "{{endpoint}} {{status}}")],
                unit="reqps",
                stack=True,
            )
        )
        .with_panel(
            p.series(
                "Errors/s",
                "4xx and 5xx answers by status, and streams that failed after their 200 status.",
                [
                    (rate(_REQ, sel(model='="$model"', status='=~"[45].."'), "status"), "{{status}}"),
                    (rate(m.STREAM_ERRORS.exported, s), "failed streams"),
                ],
                unit="reqps",
            )
        )
    )
    part = m.TTFT_PART.exported
    board = (
        board.with_row(p.row("Time to first token"))
        .with_panel(quantiles(p, "Time to first token", m.TTFT, s, (0.5, 0.9, 0.99), by="", width=8))
        .with_panel(
            p.series(
                "Where time to first token goes (mean)",
                "Mean per part, stacked: "
                + "; ".join(f"{name}: {text}" for name, text in m.TTFT_PARTS.items())
                + ". Parts measured across nodes share clocks only as well as NTP keeps them: skew moves time "
                "between router_queue and transport. Ray's metrics agent estimates histogram sums from bucket "
                "midpoints, so the means are approximate.",
                [(f"{rate(part + '_sum', s, 'part')} / {rate(part + '_count', s, 'part')}", "{{part}}")],
                unit="s",
                stack=True,
                width=8,
            )
        )
        .with_panel(quantiles(p, "Time to first token parts", m.TTFT_PART, s, (0.95,), by="part", width=8))
    )
    board = (
        board.with_row(p.row("Latency"))
        .with_panel(quantiles(p, "Time per output token", m.TPOT, s, (0.5, 0.9, 0.99), by="", width=8))
        .with_panel(quantiles(p, "End-to-end latency", m.E2E_LATENCY, s, (0.5, 0.95), by="endpoint", width=8))
        .with_panel(quantiles(p, "Queue time", m.QUEUE_TIME, s, (0.5, 0.95), by="", width=8))
    )
    board = (
        board.with_row(p.row("Tokens and replicas"))
        .with_panel(
            p.series(
                "Tokens/s",
                "",
                [(rate(m.PROMPT_TOKENS.exported, s), "prompt"), (rate(m.GENERATION_TOKENS.exported, s), "output")],
                width=6,
            )
        )
        .with_panel(
            p.series(
                "Running and waiting requests by replica",
                m.WAITING.description,
                [
                    (f"sum by (replica) ({m.RUNNING.exported}{s})", "{{replica}} running"),
                    (f"sum by (replica) ({m.WAITING.exported}{s})", "{{replica}} waiting"),
                    (f"sum (ray_serve_deployment_queued_queries{deployment})", "waiting for a replica (Serve)"),
                ],
                width=10,
            )
        )
        .with_panel(
            p.series(
                "Replicas",
                "Ready (warmed up, ours) and healthy (Serve's controller).",
                [
                    (f"sum ({m.REPLICAS.exported}{s})", "ready"),
                    (f"sum (ray_serve_deployment_replica_healthy{deployment})", "healthy"),
                ],
                width=8,
            )
        )
    )
    return (
        board.with_row(p.row("vLLM engine (vLLM models only)"))
        .with_panel(
            p.series(
                "vLLM running and waiting requests",
                "vLLM's scheduler, summed over the model's replicas.",
                [
                    (f"sum (ray_vllm_num_requests_running{vllm})", "running"),
                    (f"sum (ray_vllm_num_requests_waiting{vllm})", "waiting"),
                ],
                width=8,
            )
        )
        .with_panel(
            p.series(
                "vLLM KV cache usage",
                "Per replica.",
                [("max by (ReplicaId) (ray_vllm_kv_cache_usage_perc" + vllm + ")", "{{ReplicaId}}")],
                unit="percentunit",
                width=8,
            )
        )
        .with_panel(
            p.series(
                "vLLM tokens/s",
                "",
                [
                    (rate("ray_vllm_prompt_tokens_total", vllm), "prompt"),
                    (rate("ray_vllm_generation_tokens_total", vllm), "output"),
                ],
                width=8,
            )
        )
        .with_panel(
            p.series(
                "vLLM time to first token, queue and prefill (p95)",
                "Inside the engine: the engine part of the time to first token, split.",
                [
                    (quantile(0.95, "ray_vllm_time_to_first_token_seconds", vllm), "time to first token"),
                    (quantile(0.95, "ray_vllm_request_queue_time_seconds", vllm), "queue"),
                    (quantile(0.95, "ray_vllm_request_prefill_time_seconds", vllm), "prefill"),
                ],
                unit="s",
            )
        )
        .with_panel(
            p.series(
                "vLLM inter-token latency and decode time (p95)",
                "",
                [
                    (quantile(0.95, "ray_vllm_inter_token_latency_seconds", vllm), "inter-token latency"),
                    (quantile(0.95, "ray_vllm_request_time_per_output_token_seconds", vllm), "per output token"),
                ],
                unit="s",
            )
        )
    )
