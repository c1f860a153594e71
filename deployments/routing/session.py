"""SessionRouter (routing policy `session`): requests with the same session key go to the same replica."""

from __future__ import annotations

from ray.serve.request_router import PendingRequest

from deployments.routing.affinity import AffinityRouter
from deployments.routing.keys import routed_request, session_key

__all__ = ["SessionRouter"]


class SessionRouter(AffinityRouter):
    """Keeps a session on one replica; it moves only when that replica is gone or overloaded.

    The session key is the request's `routing_key` (set by the API layer from the model's session header, else
    the OpenAI `user` field), else Serve's own handle option `session_id`.
    """

    def affinity_keys(self, pending_request: PendingRequest) -> list[int]:
        key = session_key(routed_request(pending_request.args), pending_request.metadata.session_id)
        return [] if key is None else [key]
