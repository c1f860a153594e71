"""Server-sent events framing for streamed OpenAI responses."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["DONE", "event"]

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    """One `data: {...}` SSE event."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
