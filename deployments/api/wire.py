"""The base of every request body: unknown fields are refused by name, and text must be valid Unicode."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["WireRequest"]

# A lone UTF-16 surrogate (`"\ud800"` in JSON) decodes to a Python str that cannot be encoded as UTF-8: tokenizers,
# Ray and the response writer would all fail on it later, as a 500.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, list | tuple):
        return any(_has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return False  # numbers, booleans, None; nested models check their own fields


class WireRequest(BaseModel):
    """Request bodies and their parts. OpenAI's own API refuses unknown fields ("Unrecognized request argument"),
    and so do we: a field that is accepted and ignored is worse than one refused, because the client trusts it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if _has_surrogate(value):
            raise ValueError("holds a lone UTF-16 surrogate (such as \\ud800): text must be valid Unicode")
        return value
