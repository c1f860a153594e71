"""OpenAI's batch file format: one request per input line, one result per output line, each line checked alone.

An input line is `{"custom_id", "method": "POST", "url", "body"}`. An output line is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error": {"code", "message"} | null}`.
As in OpenAI's format, a request that was answered (also with an HTTP error: a body that fails validation, an
engine error) has a `response`; a line that is no request at all (not JSON, no custom_id, a wrong method or url)
has `error` and no response. A line succeeded exactly when its `response.status_code` is 200 (`is_failure`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from deployments.api.embeddings import embedding_body
from deployments.api.errors import to_error_response
from deployments.api.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from deployments.errors import InvalidRequestError
from models.spec import ModelSpec

__all__ = [
    "URLS",
    "BatchRequest",
    "LineError",
    "WireRequest",
    "embedding_body",
    "error_line",
    "failure_line",
    "is_failure",
    "parse_line",
    "success_line",
    "validate_body",
]

WireRequest = ChatCompletionRequest | CompletionRequest | EmbeddingRequest
#: The endpoints a batch line may name: url -> (the model task that serves it, the wire model of its body).
URLS: dict[str, tuple[str, type[WireRequest]]] = {
    "/v1/chat/completions": ("generate", ChatCompletionRequest),
    "/v1/completions": ("generate", CompletionRequest),
    "/v1/embeddings": ("embed", EmbeddingRequest),
}
_EXCERPT_CHARS = 80


class LineError(Exception):
    """Raised when an input line is not a batch request at all; it becomes an output line with `error` set."""

    def __init__(self, message: str, *, code: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.custom_id = custom_id


@dataclass(frozen=True)
class BatchRequest:
    """One well-formed input line; its body is checked later, by `validate_body`, so a bad body gets a 400."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


def _line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"  # OpenAI's spelling of an output line's id


def _excerpt(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "..."


def parse_line(raw: bytes, line: int, spec: ModelSpec, *, endpoint: str | None = None) -> BatchRequest:
    """Parse one input line (1-based number `line`) of a batch that runs `spec`.

    Args:
        endpoint: the one url the batch's lines may name (an OpenAI batch has one); None: any url `spec` serves.

    Raises:
        LineError: not JSON, not an object, no custom_id, a method other than POST, a url this model does not
            serve (or not the batch's endpoint), or a body that is not an object.
    """
    try:
        data = json.loads(raw)
    except ValueError as exc:  # also UnicodeDecodeError: not UTF-8
        raise LineError(f"line {line} is not valid JSON ({exc}): {_excerpt(raw)}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise LineError(f"line {line} is not a JSON object: {_excerpt(raw)}", code="invalid_json")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError(f"line {line} has no custom_id (a non-empty string)", code="missing_custom_id")
    method = data.get("method")
    if method != "POST":
        raise LineError(f"line {line}: method must be POST, not {method!r}", code="invalid_method", custom_id=custom_id)
    url = data.get("url")
    served = [u for u, (task, _) in URLS.items() if task == spec.task and endpoint in (None, u)]
    if url not in served:
        model = spec.versioned_id
        what = "is not a batch endpoint" if url not in URLS else f"is not served by model '{model}' ({spec.task})"
        if endpoint is not None and url in URLS and URLS[url][0] == spec.task:
            what = f"is not this batch's endpoint {endpoint!r}"
        raise LineError(
            f"line {line}: url {url!r} {what}; use one of {', '.join(served)}", code="invalid_url", custom_id=custom_id
        )
    body = data.get("body")
    if not isinstance(body, dict):
        raise LineError(f"line {line}: body must be a JSON object", code="invalid_body", custom_id=custom_id)
    return BatchRequest(line=line, custom_id=custom_id, url=url, body=body)


def validate_body(request: BatchRequest, spec: ModelSpec, names: Iterable[str] = ()) -> WireRequest:
    """The body as the HTTP API's wire model, validated exactly as the HTTP endpoint validates it.

    A body without `model` runs on the batch's model; one that names another model is refused.

    Args:
        names: more names of the batch's model than its `id@version` (the bare id of the default version).

    Raises:
        pydantic.ValidationError: the body fails the wire model (the HTTP API answers 400).
        InvalidRequestError: another model, or `stream: true` (a batch line gets one whole response).
    """
    body = dict(request.body)
    model = body.setdefault("model", spec.versioned_id)
    if model != spec.versioned_id and model not in names:
        raise InvalidRequestError(
            f"body.model is {model!r}, but this batch runs model '{spec.versioned_id}'", param="model"
        )
    wire = URLS[request.url][1].model_validate(body)
    if getattr(wire, "stream", False):
        raise InvalidRequestError(
            "stream is not supported in a batch: each line gets one whole response", param="stream"
        )
    return wire


def success_line(request: BatchRequest, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The output line of an answered request."""
    return {
        "id": _line_id(),
        "custom_id": request.custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def failure_line(request: BatchRequest, request_id: str, exc: BaseException) -> dict[str, Any]:
    """The output line of a request that failed: the status and OpenAI error body the HTTP API would answer."""
    status, error = to_error_response(exc, request_id)
    return {
        "id": _line_id(),
        "custom_id": request.custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": error.model_dump()},
        "error": None,
    }


def error_line(exc: LineError) -> dict[str, Any]:
    """The output line of an input line that is no request (see `parse_line`)."""
    return {
        "id": _line_id(),
        "custom_id": exc.custom_id,
        "response": None,
        "error": {"code": exc.code, "message": exc.message},
    }


def is_failure(line: dict[str, Any]) -> bool:
    """Whether an output line reports a failure (no response, or a status other than 200)."""
    response = line.get("response")
    return line.get("error") is not None or not response or response.get("status_code") != 200


def usage_of(lines: Iterable[bytes]) -> tuple[int, int]:
    """Prompt and completion tokens of the answered lines of an output file (lines that do not parse count 0)."""
    prompt = completion = 0
    for raw in lines:
        try:
            usage = json.loads(raw)["response"]["body"].get("usage") or {}
            prompt += int(usage.get("prompt_tokens") or 0)
            completion += int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return prompt, completion
