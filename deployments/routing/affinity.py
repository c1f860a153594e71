"""AffinityRouter: the Serve RequestRouter shared by the `session` and `prefix` policies.

A request's keys pick its preferred replica: the one that served the key last (remembered in a bounded table), or
for a new key the rendezvous-hash choice. Serve then tries the preferred replica first and the least loaded of the
rest next; when the preferred one is overloaded, a less loaded replica first. Requests without a key are routed as
by Serve's default, the less loaded of two random replicas. A request for a multiplexed model (a LoRA adapter) is
first narrowed, as Serve's default router does, to the replicas that have it loaded; affinity applies among those.
"""

from __future__ import annotations

import abc
import math
import random
from typing import TYPE_CHECKING, Any

from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from deployments.routing.keys import rendezvous_first
from deployments.routing.table import AffinityTable

if TYPE_CHECKING:
    from ray.serve._private.common import RequestMetadata

__all__ = ["AffinityRouter"]


class AffinityRouter(MultiplexMixin, RequestRouter):
    """Routes requests that share a key to the replica that served the key last, unless it is gone or overloaded.

    Configured through `RequestRouterConfig.request_router_kwargs` (see `deployments.plan`): `table_size`,
    `overload_queue_len` and a policy's own settings (its `initialize_state`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._table: AffinityTable[ReplicaID] = AffinityTable(65536)
        self._overload_queue_len: int | None = None

    def initialize_state(self, table_size: int = 65536, overload_queue_len: int | None = None) -> None:
        """Called by Serve with the request router kwargs, once per router (one per model in each process)."""
        self._table = AffinityTable(table_size)
        self._overload_queue_len = overload_queue_len

    @abc.abstractmethod
    def affinity_keys(self, pending_request: PendingRequest) -> list[int]:
        """The request's keys, most specific first; empty when it has none. Called when routing and once routed."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Ranks of replicas: Serve takes the least loaded replica with room in the first rank that has one."""
        if not candidate_replicas or pending_request is None:
            return [candidate_replicas]
        if pending_request.metadata.multiplexed_model_id:
            # Serve's multiplex preference (MultiplexMixin): the replicas holding the model, else (no match, busy,
            # or after Serve's matching timeout) those holding the fewest models, at last all of them.
            preferred_ids = self.apply_multiplex_routing(pending_request)
            candidate_replicas = [r for r in candidate_replicas if r.replica_id in preferred_ids]
            if not candidate_replicas:
                return []  # Serve backs off and asks again
        # Without it Serve retries at once, in a busy loop, when every replica is full.
        pending_request.routing_context.should_backoff = True
        keys = self.affinity_keys(pending_request)
        if not keys:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        preferred = self._remembered(keys)
        if preferred is None or preferred not in candidate_replicas:
            # A new key (or its replica is gone, or lacks the request's multiplexed model): placed by its least
            # specific key, so requests that share only the beginning of a prompt still meet.
            names = [r.replica_id.unique_id for r in candidate_replicas]
            preferred = candidate_replicas[rendezvous_first(keys[-1], names)]
        rest = [r for r in candidate_replicas if r.replica_id != preferred.replica_id]
        if not rest:
            return [[preferred]]
        load = await self._overload(preferred)
        if load is None:
            return [[preferred], rest]
        # Overloaded: the least loaded of those known to hold fewer requests (or not known: Serve asks them),
        # else the least loaded of all, the preferred one first so that it wins a tie.
        cache = self.replica_queue_len_cache
        lighter = [r for r in rest if (n := cache.get(r.replica_id)) is None or n < load]
        return [lighter, [preferred, *rest]] if lighter else [[preferred, *rest]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        """Remember the replica that accepted the request for each of its keys (where the key moves, if it did)."""
        for key in self.affinity_keys(pending_request):
            self._table.put(key, replica_id)

    def _remembered(self, keys: list[int]) -> RunningReplica | None:
        replicas = self.curr_replicas
        for key in keys:
            replica_id = self._table.get(key)
            if replica_id is None:
                continue
            replica = replicas.get(replica_id)
            if replica is not None:
                return replica
            self._table.discard(key)  # its replica is gone
        return None

    async def _overload(self, replica: RunningReplica) -> float | None:
        """The replica's queue length when it is overloaded (infinite when it does not answer), else None."""
        limit = replica.max_ongoing_requests
        if self._overload_queue_len is not None:
            limit = min(limit, self._overload_queue_len)
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        if queue_len is None or queue_len < limit:
            return None
        # The cache counts what this router sent and lowers it when responses finish, so it can lag behind the
        # replica: ask the replica itself before a key moves away (an RPC only on this path).
        ((_, queue_len),) = await self._probe_queue_lens([replica], 0)
        if queue_len is None:
            return math.inf
        return float(queue_len) if queue_len >= limit else None

    def _fulfill_next_pending_request(
        self, replica: RunningReplica, request_metadata: RequestMetadata | None = None
    ) -> None:
        # Serve hands the chosen replica to the pending request it indexed under the request's
        # internal_request_id, which the requests fanned out of one HTTP request (`n` > 1 choices) share, and it
        # indexes only the first of them: without this, a sibling would take this request's replica and this
        # request would be retried forever. Point the index at this routing task's own request (the same
        # metadata object) first. (Serve's FIFOMixin, which replaces this method too, gives the replica to the
        # oldest request instead, which would break affinity.)
        if request_metadata is not None:
            request_id = request_metadata.internal_request_id
            indexed = self._pending_requests_by_id.get(request_id)
            if indexed is None or indexed.metadata is not request_metadata:
                own = next(
                    (
                        pr
                        for pr in self._pending_requests_to_fulfill
                        if pr.metadata is request_metadata and not pr.future.done()
                    ),
                    None,
                )
                if own is not None:
                    self._pending_requests_by_id[request_id] = own
        super()._fulfill_next_pending_request(replica, request_metadata)
