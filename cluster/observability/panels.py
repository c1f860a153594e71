"""Panel and variable builders shared by the dashboards (grafana-foundation-sdk), and PromQL selector helpers.

Every panel queries the Prometheus picked by the `datasource` variable and keeps to the Ray cluster picked by the
`cluster` variable (the `ray_io_cluster` label the k8s PodMonitor adds; absent locally, where 'All' matches).
"""

from __future__ import annotations

from collections.abc import Sequence

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableOption, VariableRefresh, VariableSort

from deployments.metrics import MetricDef

__all__ = [
    "DATASOURCE",
    "Panels",
    "base_dashboard",
    "cluster_variable",
    "datasource_variable",
    "model_variable",
    "quantile",
    "quantiles",
    "rate",
    "sel",
]

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
_TAGS = ["modelfleet", "ray-serve"]
_REF_IDS = "ABCDEFGHIJ"


def sel(**matchers: str) -> str:
    """A label selector that keeps to the chosen cluster: `sel(model='=~"$model"')` -> `{ray_io_cluster=~..., ...}`.

    Each keyword is a label and its operator with value (`'="x"'`, `'=~"a|b"'`).
    """
    parts = ['ray_io_cluster=~"$cluster"', *(f"{label}{match}" for label, match in matchers.items())]
    return "{" + ",".join(parts) + "}"


def rate(metric: str, selector: str, by: str = "") -> str:
    """`sum [by (...)] (rate(metric{...}[$__rate_interval]))`."""
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({metric}{selector}[$__rate_interval]))"


def quantile(q: float, histogram: str, selector: str, by: str = "") -> str:
    """The `q` quantile of a histogram (name without `_bucket`) over the rate interval, per `by` labels."""
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({histogram}_bucket{selector}[$__rate_interval])))"


def datasource_variable() -> dashboard.DatasourceVariable:
    """The Prometheus every panel queries."""
    return dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")


def cluster_variable(metric: str = "ray_node_cpu_count") -> dashboard.QueryVariable:
    """The Ray cluster(s) (`ray_io_cluster`, set by the PodMonitor on Kubernetes; 'All' where it is absent)."""
    return (
        dashboard.QueryVariable("cluster")
        .label("Ray cluster")
        .datasource(DATASOURCE)
        .query(f"label_values({metric}, ray_io_cluster)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(selected=True, text="All", value="$__all"))
    )


def model_variable(*, multi: bool) -> dashboard.QueryVariable:
    """The served model(s), from the router's request counter."""
    variable = (
        dashboard.QueryVariable("model")
        .label("Model")
        .datasource(DATASOURCE)
        .query('label_values(ray_modelfleet_requests_total{ray_io_cluster=~"$cluster"}, model)')
        .regex(".+")  # not the empty label of requests that named no served model
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(multi)
        .include_all(multi)
    )
    if multi:
        variable = variable.all_value(".*").current(VariableOption(selected=True, text="All", value="$__all"))
    return variable


class Panels:
    """Builds one dashboard's panels with unique ids, remembering the titles of the panels that need GPUs."""

    def __init__(self) -> None:
        self._next_id = 1
        self.gpu_only: list[str] = []

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def row(self, title: str) -> dashboard.Row:
        """A row header (its panels follow it on the dashboard)."""
        return dashboard.Row(title).id(self._id())

    def series(
        self,
        title: str,
        description: str,
        targets: Sequence[tuple[str, str]],
        *,
        unit: str = "short",
        stack: bool = False,
        width: int = 12,
        height: int = 8,
        gpu: bool = False,
    ) -> timeseries.Panel:
        """A time-series panel of `(PromQL, legend)` targets."""
        panel = (
            timeseries.Panel()
            .id(self._id())
            .title(title)
            .description(description)
            .datasource(DATASOURCE)
            .unit(unit)
            .span(width)
            .height(height)
            .fill_opacity(25 if stack else 10)
            .min(0)
        )
        if stack:
            panel = panel.stacking(common_builders.StackingConfig().mode(StackingMode.NORMAL))
        for ref, (expr, legend) in zip(_REF_IDS, targets, strict=False):
            panel = panel.with_target(_target(ref, expr, legend))
        if gpu:
            self.gpu_only.append(title)
        return panel

    def stat(self, title: str, description: str, expr: str, *, unit: str, width: int = 6) -> stat.Panel:
        """A single-number panel."""
        return (
            stat.Panel()
            .id(self._id())
            .title(title)
            .description(description)
            .datasource(DATASOURCE)
            .unit(unit)
            .span(width)
            .height(4)
            .with_target(_target("A", expr, ""))
        )


def _target(ref: str, expr: str, legend: str) -> prometheus.Dataquery:
    query = prometheus.Dataquery().ref_id(ref).expr(expr).datasource(DATASOURCE).range()
    return query.legend_format(legend) if legend else query


def base_dashboard(uid: str, title: str, description: str) -> dashboard.Dashboard:
    """A dashboard with the shared settings and the data source and cluster variables."""
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(_TAGS)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .with_variable(datasource_variable())
        .with_variable(cluster_variable())
    )


def quantiles(
    p: Panels, title: str, metric: MetricDef, s: str, qs: tuple[float, ...], by: str = "model", width: int = 12
) -> timeseries.Panel:
    """A panel of a histogram's quantiles `qs` (one series per `by` label value)."""
    legend = "{{" + by + "}} " if by else ""
    targets = [(quantile(q, metric.exported, s, by), f"{legend}p{round(q * 100)}") for q in qs]
    names = ", ".join(f"p{round(q * 100)}" for q in qs)
    return p.series(f"{title} ({names})", metric.description, targets, unit="s", width=width)
