"""The Grafana dashboards, as code: an overview of every model, a drill-down into one, and the cluster (replicas,
autoscaling, CPU and GPU from Ray's own metrics). `export` writes their JSON; the k8s renderer puts the same JSON in
a ConfigMap; a slow test runs every panel's query against a Prometheus scraping a real cluster.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from cluster.observability.drilldown import model
from cluster.observability.infrastructure import cluster
from cluster.observability.overview import overview
from cluster.observability.panels import Panels

__all__ = ["DASHBOARDS", "Dashboard", "PanelQuery", "build", "export", "panel_queries", "render_json"]


@dataclass(frozen=True)
class Dashboard:
    """A dashboard: its stable uid (its file name too), and its builder."""

    uid: str
    title: str
    build: Callable[[Panels], dashboard.Dashboard]


DASHBOARDS: tuple[Dashboard, ...] = (
    Dashboard("modelfleet-overview", "modelfleet / Overview", overview),
    Dashboard("modelfleet-model", "modelfleet / Model", model),
    Dashboard("modelfleet-cluster", "modelfleet / Cluster", cluster),
)


def build(board: Dashboard) -> tuple[dict[str, Any], list[str]]:
    """The dashboard's JSON model, and the titles of its panels that have data only on GPU nodes."""
    panels = Panels()
    model = json.loads(json.dumps(board.build(panels).build(), cls=JSONEncoder))
    return model, panels.gpu_only


def render_json(model: dict[str, Any]) -> str:
    """The file text of a dashboard's JSON model (stable: sorted keys)."""
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def export(out_dir: Path) -> list[Path]:
    """Write every dashboard as `<uid>.json` into `out_dir` (files of dashboards no longer built are removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {f"{board.uid}.json" for board in DASHBOARDS}
    for stale in out_dir.glob("modelfleet-*.json"):
        if stale.name not in names:
            stale.unlink()
    written = []
    for board in DASHBOARDS:
        path = out_dir / f"{board.uid}.json"
        path.write_text(render_json(build(board)[0]))
        written.append(path)
    return written


@dataclass(frozen=True)
class PanelQuery:
    """One query of one panel."""

    dashboard: str
    panel: str
    expr: str

    def variables(self) -> set[str]:
        """The dashboard variables the query uses (`$model`, `$__rate_interval`, ...)."""
        return set(re.findall(r"\$(\w+)", self.expr))


def panel_queries(model: dict[str, Any]) -> Iterator[PanelQuery]:
    """Every query of every panel of a dashboard's JSON model."""
    for panel in model.get("panels") or []:
        for target in panel.get("targets") or []:
            if target.get("expr"):
                yield PanelQuery(model["uid"], panel["title"], target["expr"])
