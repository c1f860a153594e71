"""The cluster dashboard: Serve replicas and autoscaling, and the nodes' CPU, memory and GPUs from Ray's own
metrics."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from cluster.observability.panels import Panels, base_dashboard, sel

__all__ = ["cluster"]


def cluster(p: Panels) -> dashboard.Dashboard:
    any_ = sel()
    replica_processes = sel(Component='=~"ray::ServeReplica:.*"')
    used = sel(State='="USED"', Name='=~"CPU|GPU"')
    board = base_dashboard(
        "modelfleet-cluster",
        "modelfleet / Cluster",
        "Serve replicas and autoscaling, and the nodes' CPU, memory and GPUs from Ray's own metrics.",
    )
    board = (
        board.with_row(p.row("Replicas and autoscaling"))
        .with_panel(
            p.series(
                "Healthy replicas by deployment",
                "Serve's controller.",
                [(f"sum by (deployment) (ray_serve_deployment_replica_healthy{any_})", "{{deployment}}")],
                width=8,
            )
        )
        .with_panel(
            p.series(
                "Autoscaling: target and desired replicas",
                "Target: what Serve is scaling to. Desired: what the autoscaling policy asks for (autoscaling "
                "deployments only).",
                [
                    (f"max by (deployment) (ray_serve_autoscaling_target_replicas{any_})", "{{deployment}} target"),
                    (f"max by (deployment) (ray_serve_autoscaling_desired_replicas{any_})", "{{deployment}} desired"),
                ],
                width=8,
            )
        )
        .with_panel(
            p.series(
                "Requests in replicas and waiting for one",
                "What autoscaling reacts to: requests a deployment's replicas are processing, and requests the "
                "handles hold until a replica has a free slot.",
                [
                    (f"sum by (deployment) (ray_serve_replica_processing_queries{any_})", "{{deployment}} in replicas"),
                    (f"sum by (deployment) (ray_serve_deployment_queued_queries{any_})", "{{deployment}} waiting"),
                ],
                width=8,
            )
        )
    )
    return (
        board.with_row(p.row("Nodes"))
        .with_panel(
            p.series(
                "CPU utilization by node",
                "",
                [("avg by (ip) (ray_node_cpu_utilization" + any_ + ")", "{{ip}}")],
                unit="percent",
                width=8,
            )
        )
        .with_panel(
            p.series(
                "CPU of Serve replicas",
                "Per replica process kind (one core = 100).",
                [(f"sum by (Component) (ray_component_cpu_percentage{replica_processes})", "{{Component}}")],
                unit="percent",
                stack=True,
                width=8,
            )
        )
        .with_panel(
            p.series(
                "Memory used by node",
                "",
                [(f"sum by (ip) (ray_node_mem_used{any_}) / sum by (ip) (ray_node_mem_total{any_})", "{{ip}}")],
                unit="percentunit",
                width=8,
            )
        )
        .with_panel(
            p.series(
                "Ray logical resources in use",
                "CPUs and GPUs that actors and tasks hold (Ray's scheduler view, not utilization).",
                [(f"sum by (Name) (ray_resources{used})", "{{Name}}")],
                width=8,
            )
        )
        .with_panel(
            p.series(
                "GPU utilization by node",
                "GPU nodes only.",
                [("avg by (ip, GpuIndex) (ray_node_gpus_utilization" + any_ + ")", "{{ip}} GPU {{GpuIndex}}")],
                unit="percent",
                width=8,
                gpu=True,
            )
        )
        .with_panel(
            p.series(
                "GPU memory used by node",
                "GPU nodes only.",
                [("sum by (ip, GpuIndex) (ray_node_gram_used" + any_ + ")", "{{ip}} GPU {{GpuIndex}}")],
                unit="decmbytes",
                width=8,
                gpu=True,
            )
        )
    )
