"""Schemathesis hooks for the fuzz test (loaded by the CLI through SCHEMATHESIS_HOOKS).

One check replaces schemathesis' `positive_data_acceptance`: a request the OpenAPI document admits must be served.
The only 400s it lets pass are the cross-field and per-model checks that JSON Schema cannot state, each named here
and listed in docs/api-fields.md ("Semantic checks the OpenAPI schema cannot express"); anything else is a failure.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis

# (param, a piece of the message): the documented semantic refusals.
DOCUMENTED_REFUSALS = (
    ("tool_choice", "which is not in `tools`"),  # a named tool_choice must name one of `tools`
    ("tool_choice", "tool_choice needs tools"),
    ("tokens", "outside this model's vocabulary"),  # token ids are bounded by the model's vocabulary
    ("prompt", "outside this model's vocabulary"),
    ("input", "outside this model's vocabulary"),
    ("logit_bias", "outside this model's vocabulary"),
    ("dimensions", "`dimensions` must be"),  # only the embedding model's own size
    ("max_tokens", "maximum context length"),  # prompt tokens + max_tokens within the context
    ("messages", "maximum context length"),
    ("prompt", "maximum context length"),
    ("input", "has 0 tokens"),  # a text with no tokens (empty, or only spaces without special tokens)
    ("truncate_prompt_tokens", "for this request"),  # room for the special tokens (and a pair's query)
    ("max_tokens_per_query", "context length"),  # per-text cuts below the model's context length
    ("max_tokens_per_doc", "context length"),
    ("queries", "queries for"),  # one query, or one per document (1:1, 1:N or N:N)
    ("data_1", "queries for"),
    ("text_1", "queries for"),
    ("structured_outputs", "vLLM rejected the request: Invalid"),  # a regex or grammar that does not compile
    ("response_format", "vLLM rejected the request: Invalid"),
)
# Statuses a valid request may get without being refused: as schemathesis' own check allows.
SERVED = {401, 403, 404, 409, 429}


def _error(response: Any) -> tuple[str | None, str]:
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return None, ""
    return error.get("param"), str(error.get("message", ""))


@schemathesis.check
def valid_requests_are_served(ctx: Any, response: Any, case: Any) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status < 400 or status >= 500 or status in SERVED:  # 5xx: `not_a_server_error` reports those
        return None
    param, message = _error(response)
    if status == 400 and any(param == p and piece in message for p, piece in DOCUMENTED_REFUSALS):
        return None
    raise AssertionError(f"a request the OpenAPI document admits got {status} (param {param!r}): {message}")
