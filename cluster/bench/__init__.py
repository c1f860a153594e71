"""`modelfleet bench`: load generation against OpenAI-compatible servers on loopback, and the side-by-side
comparison of modelfleet with vLLM's own server and the engine in-process.

One concept per module, imports only pointing down (tests/unit/cluster/test_bench_package.py checks it):
`stats` (samples, summaries) <- `load` (the load driver, `LoadPlan`) <- `sse` (streaming client) <- `client`
(HTTP requests) <- `options` (the one options model; the flags are generated from it) <- `report` (table, markdown,
plot); `systems/` (the process handling, vLLM's server, the engine in-process, a modelfleet cluster) <-
`crosscheck` (vLLM's own load client) <- `run` (one run over every system) <- `cli` (`modelfleet bench`).
Routing policies side by side (`--routing-compare`): `prefix_workload` (shared-prefix prompts, expected hit rates)
<- `prefix_report` (table, markdown) <- `prefix` (one cluster, each policy on fresh replicas).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run `modelfleet bench` (see `cluster.bench.cli.main`); imported on call, so the package itself stays light."""
    from cluster.bench.cli import main as run

    return run(argv)
