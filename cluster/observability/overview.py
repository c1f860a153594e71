"""The overview dashboard: traffic, errors, latency, tokens and load of every model."""

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

__all__ = ["overview"]

_REQ = m.REQUESTS.exported


def overview(p: Panels) -> dashboard.Dashboard:
    s = sel(model='=~"$model"')
    errors = sel(model='=~"$model"', status='=~"[45].."')
    out = m.GENERATION_TOKENS.exported
    board = base_dashboard(
        "modelfleet-overview", "modelfleet / Overview", "Traffic, errors, latency and tokens of every model."
    )
    board = board.with_variable(model_variable(multi=True))
    board = (
        board.with_row(p.row("Summary"))
        .with_panel(p.stat("Requests/s", "HTTP requests answered by the routers.", rate(_REQ, s), unit="reqps"))
        .with_panel(
            p.stat(
                "Error ratio",
                "Share of requests answered with a 4xx or 5xx status.",
                f"(({rate(_REQ, errors)}) or vector(0)) / {rate(_REQ, s)}",
                unit="percentunit",
            )
        )
        .with_panel(
            p.stat("Time to first token p95", "Streamed generation.", quantile(0.95, m.TTFT.exported, s), unit="s")
        )
        .with_panel(p.stat("Output tokens/s", "Tokens the engines generated.", rate(out, s), unit="short"))
    )
    board = (
        board.with_row(p.row("Traffic and errors"))
        .with_panel(p.series("Requests/s by model", "", [(rate(_REQ, s, "model"), "{{model}}")], unit="reqps"))
        .with_panel(
            p.series(
                "Requests/s by endpoint and status",
                "All models; 'other' is a path the API does not serve.",
                [(rate(_REQ, s, "endpoint, status"), "{{endpoint}} {{status}}")],
                unit="reqps",
                stack=True,
            )
        )
        .with_panel(
            p.series(
                "Error ratio by model",
                "4xx and 5xx answers over all answers (0 when a model had no errors).",
                [
                    (
                        f"(({rate(_REQ, errors, 'model')}) or 0 * {rate(_REQ, s, 'model')}) / {rate(_REQ, s, 'model')}",
                        "{{model}}",
                    )
                ],
                unit="percentunit",
            )
        )
        .with_panel(
            p.series(
                "Failed streams/s by model",
                "Streams that failed after their 200 status went out (an error event ended them).",
                [(rate(m.STREAM_ERRORS.exported, s, "model"), "{{model}}")],
                unit="reqps",
            )
        )
    )
    board = (
        board.with_row(p.row("Latency"))
        .with_panel(quantiles(p, "Time to first token", m.TTFT, s, (0.5, 0.95)))
        .with_panel(quantiles(p, "Time per output token", m.TPOT, s, (0.5, 0.95)))
        .with_panel(quantiles(p, "End-to-end latency", m.E2E_LATENCY, s, (0.5, 0.95)))
        .with_panel(quantiles(p, "Queue time", m.QUEUE_TIME, s, (0.5, 0.95)))
        .with_panel(
            p.series(
                "Pipeline step latency (p50, p95)",
                "Each step of each pipeline (the `model` variable matches pipeline ids): the call to its answer, or "
                "to a streamed step's first chunk.",
                [
                    (
                        quantile(q, m.PIPELINE_STEP_LATENCY.exported, s, "model, step"),
                        f"{{{{model}}}} / {{{{step}}}} p{round(q * 100)}",
                    )
                    for q in (0.5, 0.95)
                ],
                unit="s",
                width=24,
            )
        )
        .with_panel(
            p.series(
                "Pipeline requests/s by pipeline and status",
                "HTTP requests that named a pipeline (`model` is the pipeline id); each is also counted under the "
                "model that answered it in the panels above.",
                [(rate(m.PIPELINE_REQUESTS.exported, s, "model, status"), "{{model}} {{status}}")],
                unit="reqps",
                width=24,
            )
        )
    )
    return (
        board.with_row(p.row("Tokens and load"))
        .with_panel(p.series("Output tokens/s by model", "", [(rate(out, s, "model"), "{{model}}")]))
        .with_panel(
            p.series("Prompt tokens/s by model", "", [(rate(m.PROMPT_TOKENS.exported, s, "model"), "{{model}}")])
        )
        .with_panel(
            p.series(
                "Running and waiting requests by model",
                "In the model replicas: generating, and not yet started by the engine.",
                [
                    (f"sum by (model) ({m.RUNNING.exported}{s})", "{{model}} running"),
                    (f"sum by (model) ({m.WAITING.exported}{s})", "{{model}} waiting"),
                ],
            )
        )
        .with_panel(
            p.series(
                "Ready replicas by model",
                "Model replicas that finished warm-up.",
                [(f"sum by (model) ({m.REPLICAS.exported}{s})", "{{model}}")],
            )
        )
    )
