"""PrefixRouter (routing policy `prefix`): requests that share a long prompt prefix go to the replica holding it."""

from __future__ import annotations

from ray.serve.request_router import PendingRequest

from deployments.routing.affinity import AffinityRouter
from deployments.routing.keys import prefix_keys, prompt_text, routed_request

__all__ = ["PrefixRouter"]


class PrefixRouter(AffinityRouter):
    """Sends a prompt to the replica that served its longest known prefix last (its KV cache likely holds it).

    The prompt is hashed in blocks (`block_chars` characters, the first `max_chars` only); see
    `deployments.routing.keys.prefix_keys`.
    """

    _block_chars = 256
    _max_chars = 8192

    def initialize_state(
        self,
        table_size: int = 65536,
        overload_queue_len: int | None = None,
        block_chars: int = 256,
        max_chars: int = 8192,
    ) -> None:
        super().initialize_state(table_size, overload_queue_len)
        self._block_chars = block_chars
        self._max_chars = max_chars

    def affinity_keys(self, pending_request: PendingRequest) -> list[int]:
        text = prompt_text(routed_request(pending_request.args))
        return prefix_keys(text, self._block_chars, self._max_chars) if text else []
