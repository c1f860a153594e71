"""The one translation of exceptions into OpenAI-shaped error bodies, for plain responses and SSE streams."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from deployments.api.openai_models import ErrorBody, ErrorResponse
from deployments.errors import ServingError

__all__ = ["to_error_response", "validation_message"]

logger = logging.getLogger(__name__)

_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|literal\[.*|list\[.*|dict\[.*|union\[.*|function-.*|_[A-Za-z]+)$")


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A readable message and the first offending parameter from pydantic/FastAPI error dicts."""
    parts = []
    param = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        # Union members add their type name to the location (`prompt.list[str]`); keep the field path only.
        loc = [p for p in loc if not _TYPE_TAG.match(p)]
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":  # OpenAI's wording for a field it does not know
            msg = f"Unrecognized request argument supplied: {loc[-1] if loc else where}; this server refuses fields "
            msg += "it does not implement rather than ignore them"
        if err.get("type") == "json_invalid":
            return "Request body is not valid JSON: " + str(err.get("ctx", {}).get("error", msg)), None
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request", param


def to_error_response(exc: BaseException, request_id: str) -> tuple[int, ErrorResponse]:
    """Map any exception to (HTTP status, OpenAI error body).

    ServingErrors keep their status and message; validation errors become 400; anything else is a 500
    whose body names only the request id. The traceback of an unexpected error is logged here, once.
    """
    if isinstance(exc, ServingError):
        message = exc.message
        if exc.status_code >= 500:
            logger.error("request %s failed: %s: %s", request_id, type(exc).__name__, exc.message)
            message = f"{message} (request id {request_id})"
        body = ErrorBody(message=message, type=exc.error_type, param=exc.param, code=exc.code)
        return exc.status_code, ErrorResponse(error=body)
    if isinstance(exc, ValidationError):
        message, param = validation_message(exc.errors())
        return 400, ErrorResponse(error=ErrorBody(message=message, type="invalid_request_error", param=param))
    logger.error("request %s failed with an unexpected error", request_id, exc_info=exc)
    body = ErrorBody(
        message=f"Internal server error (request id {request_id})", type="internal_error", code="internal_error"
    )
    return 500, ErrorResponse(error=body)
