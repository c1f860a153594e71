"""Observability: the Grafana dashboards as code (`dashboards`) and their upload to a Grafana (`grafana`)."""

from __future__ import annotations

from cluster.observability.dashboards import DASHBOARDS, Dashboard, PanelQuery, build, export, panel_queries

__all__ = ["DASHBOARDS", "Dashboard", "PanelQuery", "build", "export", "panel_queries"]
