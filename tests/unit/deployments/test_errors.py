from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from deployments import errors
from deployments.api.errors import to_error_response
from deployments.api.openai_models import ChatCompletionRequest

ALL = [getattr(errors, name) for name in errors.__all__]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_error_pickles_with_its_fields(cls: type[errors.ServingError]) -> None:
    exc = cls("boom", param="p", code="c")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert (back.message, back.param, back.code, back.status_code) == ("boom", "p", "c", cls.status_code)


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (errors.InvalidRequestError("bad"), 400, "invalid_request_error"),
        (errors.AuthenticationError("no"), 401, "authentication_error"),
        (errors.ModelNotFoundError("who"), 404, "not_found_error"),
        (errors.RequestTimeoutError("slow"), 408, "timeout_error"),
        (errors.RequestTooLargeError("big"), 413, "invalid_request_error"),
        (errors.OverloadedError("busy"), 429, "rate_limit_error"),
        (errors.EngineError("x"), 500, "internal_error"),
        (errors.EngineDeadError("dead"), 503, "service_unavailable"),
    ],
)
def test_serving_errors_keep_status_and_message(exc: errors.ServingError, status: int, kind: str) -> None:
    code, body = to_error_response(exc, "rid")
    assert code == status
    assert body.error.type == kind
    assert body.error.message.startswith(exc.message)
    assert ("rid" in body.error.message) == (status >= 500), "5xx bodies name the request id"


def test_unexpected_error_hides_details() -> None:
    code, body = to_error_response(RuntimeError("secret path /etc/x"), "req-123")
    assert code == 500
    assert "req-123" in body.error.message
    assert "secret" not in body.error.message


def test_validation_error_becomes_400_naming_the_param() -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [], "max_tokens": 0})
    code, body = to_error_response(info.value, "r")
    assert code == 400
    assert body.error.param in {"messages", "max_tokens"}
    assert "messages" in body.error.message and "max_tokens" in body.error.message


def test_model_not_found_defaults() -> None:
    exc = errors.ModelNotFoundError("x")
    assert (exc.param, exc.code) == ("model", "model_not_found")
