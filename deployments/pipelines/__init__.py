"""Pipelines: virtual models composed of served models, run in the router layer over the Router's calls."""

from deployments.pipelines.spec import PipelinePlan, PipelineSpec, plan_pipelines

__all__ = ["PipelinePlan", "PipelineSpec", "plan_pipelines"]
