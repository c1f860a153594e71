"""Routing keys: what a request is routed by (its session key, its prompt's prefix blocks) and where a new key goes.

Pure functions over the internal request types, used by the request routers of this package.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from deployments.engines.protocol import EmbedRequest, GenerateRequest

__all__ = ["key_hash", "prefix_keys", "prompt_text", "rendezvous_first", "routed_request", "session_key"]

_KEY_BYTES = 8
# Separators that do not occur in ordinary text: a chat is rendered as role US content RS, per message.
_UNIT, _RECORD = "\x1f", "\x1e"


def key_hash(data: bytes) -> int:
    """A stable 64-bit hash (the same in every process, unlike `hash()`, which Python salts per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=_KEY_BYTES).digest(), "big")


def routed_request(args: Sequence[object]) -> GenerateRequest | EmbedRequest | None:
    """The internal request among a replica call's positional arguments (None for calls such as `ready()`)."""
    return next((a for a in args if isinstance(a, GenerateRequest | EmbedRequest)), None)


def session_key(request: GenerateRequest | EmbedRequest | None, serve_session_id: str = "") -> int | None:
    """The session key of a request: the API layer's `routing_key`, else Serve's own handle `session_id`.

    Returns:
        The key's hash, or None when the request carries no session.
    """
    key = (request.routing_key if request is not None else None) or serve_session_id
    return key_hash(key.encode()) if key else None


def prompt_text(request: GenerateRequest | EmbedRequest | None) -> str | None:
    """The text a prompt's KV cache is built from: the prompt, or the chat rendered approximately.

    A chat is rendered as role and content of each message in order (not with the model's chat template, which
    the router does not have): the template only adds fixed text around each message, so chats that share
    their leading messages share a rendered prefix either way.
    """
    if not isinstance(request, GenerateRequest):
        return None
    if request.prompt is not None:
        return request.prompt
    if request.prompt_token_ids is not None:
        return ",".join(map(str, request.prompt_token_ids))  # token-id prompts share prefixes as their ids do
    return "".join(f"{m.role}{_UNIT}{m.content}{_RECORD}" for m in request.messages or ())


def prefix_keys(text: str, block_chars: int, max_chars: int) -> list[int]:
    """One key per whole block of the text's first `max_chars` characters, longest prefix first.

    Key i hashes blocks 0..i (each block's hash is chained to the one before), so two texts get the same key i
    exactly when their first i+1 blocks are equal: a shared long prefix maps to the same keys whatever follows.
    A text shorter than one block has no keys.
    """
    end = min(len(text), max_chars) // block_chars * block_chars
    keys: list[int] = []
    digest = b""
    for start in range(0, end, block_chars):
        digest = hashlib.blake2b(digest + text[start : start + block_chars].encode(), digest_size=_KEY_BYTES).digest()
        keys.append(int.from_bytes(digest, "big"))
    keys.reverse()
    return keys


def rendezvous_first(key: int, names: Sequence[str]) -> int:
    """Index of the name that a new key goes to: highest random weight (rendezvous) hashing.

    Spreads keys evenly, and every router process (each ingress replica has its own) picks the same replica for
    a new key without sharing any state.

    Raises:
        ValueError: `names` is empty.
    """
    if not names:
        raise ValueError("no replicas to place a key on")
    prefix = key.to_bytes(_KEY_BYTES, "big")
    scores = [key_hash(prefix + name.encode()) for name in names]
    return max(range(len(names)), key=scores.__getitem__)
