"""The base of every request body: unknown fields are refused by name, and text must be valid Unicode."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, field_validator, model_validator

__all__ = ["MAX_DEPTH", "OnlyFalse", "OnlyTrue", "WireRequest", "same_type"]

# A lone UTF-16 surrogate (`"\ud800"` in JSON) decodes to a Python str that cannot be encoded as UTF-8: tokenizers,
# Ray and the response writer would all fail on it later, as a 500.
_SURROGATE = re.compile("[\ud800-\udfff]")
# The deepest nesting of arrays and objects a body may have. The JSON parser takes about a thousand levels, but
# everything after it (these validators, pydantic, Ray's serialiser) recurses too and would fail on it as a 500.
# OpenAI's own structured-output schemas allow 10 levels; tool schemas and messages nest far less than this.
MAX_DEPTH = 64


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, list | tuple):
        return any(_has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return False  # numbers, booleans, None; nested models check their own fields


def _depth(value: Any) -> int:
    """How deeply `value`'s lists and dicts nest (0 for a scalar), counted without recursion: the value is hostile."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list | tuple) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _json_integers(value: Any) -> Any:
    """`value` with each integral float (JSON `1.0`) as an int: JSON Schema's `integer` takes 1.0, strict pydantic
    does not. A number field still takes the int."""
    if type(value) is float:
        return int(value) if value.is_integer() else value
    if isinstance(value, list):
        return [_json_integers(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_integers(v) for k, v in value.items()}
    return value


def same_type(kind: type) -> BeforeValidator:
    """A validator that takes only values of `kind` (not bool for int): a Literal matches by equality, so without
    it `0` would pass as `false` even in strict mode."""

    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise ValueError(f"Input should be a valid {'boolean' if kind is bool else kind.__name__}")
        return value

    return BeforeValidator(check)


# Fields that take one boolean value only (the other asks for a behaviour the server does not have).
OnlyFalse = Annotated[Literal[False], same_type(bool)]
OnlyTrue = Annotated[Literal[True], same_type(bool)]


class WireRequest(BaseModel):
    """Request bodies and their parts. OpenAI's own API refuses unknown fields ("Unrecognized request argument"),
    and so do we: a field that is accepted and ignored is worse than one refused, because the client trusts it.
    Types are strict, as the OpenAPI document states them: `0` is not a boolean and `"1"` is not a number (an
    integer still passes where a number is asked for)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integers_as_json_schema_has_them(cls, data: Any) -> Any:
        if _depth(data) > MAX_DEPTH:
            raise ValueError(f"the body nests arrays and objects more than {MAX_DEPTH} levels deep")
        return _json_integers(data)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if _has_surrogate(value):
            raise ValueError("holds a lone UTF-16 surrogate (such as \\ud800): text must be valid Unicode")
        return value
