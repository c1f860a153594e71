"""The proxy's header check (deployments.api.proxy_middleware), around a stand-in for Serve's proxy app, wrapped the
way Serve wraps its proxy (`http_util._apply_middlewares`, after its own request-id middleware)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from ray.serve._private.http_util import _apply_middlewares, validate_http_proxy_callback_return
from starlette.types import Receive, Scope, Send

from deployments.api.proxy_middleware import (
    CALLBACK_IMPORT_PATH,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    PROXY_ENV,
    HeaderCheckMiddleware,
    proxy_middlewares,
    undecodable_header,
)


async def _proxy_stand_in(scope: Scope, receive: Receive, send: Send) -> None:
    """Decodes the headers as Serve's proxy does (`setup_request_context_and_handle`: every name, and the values of
    its own headers, as UTF-8) and answers them as JSON."""
    own = {"x-request-id", "x-session-id"}
    headers = {
        key.decode(): value.decode("utf-8" if key.decode() in own else "latin-1") for key, value in scope["headers"]
    }
    body = json.dumps(headers).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _get(headers: dict[str, Any]) -> httpx.Response:
    middlewares: list[Any] = validate_http_proxy_callback_return(proxy_middlewares())
    app = _apply_middlewares(_proxy_stand_in, middlewares)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
            return await client.post("/hostile/v1/completions", headers=headers, content=b"{}")

    return asyncio.run(go())


@pytest.mark.parametrize(
    "name",
    ["x-request-id", "X-Request-ID", "x-session-id", "x_session_id", "serve_multiplexed_model_id"],
)
def test_a_header_the_proxy_decodes_that_is_not_utf8_gets_a_400_in_the_openai_body(name: str) -> None:
    response = _get({name: b"\xff\xfe\xc3"})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["param"] == name.lower(), error
    assert "not valid UTF-8" in error["message"], error


def test_valid_headers_and_other_non_utf8_values_pass_untouched() -> None:
    response = _get({"x-request-id": "req-\u00e9".encode(), "x-session-id": b"s1", "x-other": b"\xff\xfe"})
    assert response.status_code == 200, response.text
    seen = response.json()
    # The request id the client sent reaches the proxy as sent (Serve's middleware adds one only when absent).
    assert seen["x-request-id"] == "req-\u00e9" and seen["x-session-id"] == "s1" and seen["x-other"] == "\xff\xfe"


def test_a_request_without_a_request_id_gets_serves_own() -> None:
    response = _get({})
    assert response.status_code == 200, response.text
    assert response.json()["x-request-id"] and response.headers["x-request-id"] == response.json()["x-request-id"]


def test_undecodable_header_names_the_first_offender() -> None:
    assert undecodable_header([(b"x-a", b"\xff"), (b"x-request-id", b"ok")]) is None
    assert undecodable_header([(b"x-a", b"v"), (b"X-Session-Id", b"\xc3")]) == "x-session-id"
    assert undecodable_header([(b"x-\xff", b"v")]) == "x-\xff"


def test_serve_calls_the_callback_the_env_names() -> None:
    from ray.serve._private.utils import call_function_from_import_path

    assert CALLBACK_IMPORT_PATH == PROXY_ENV["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]
    middlewares = validate_http_proxy_callback_return(call_function_from_import_path(CALLBACK_IMPORT_PATH))
    assert [m.cls for m in middlewares] == [HeaderCheckMiddleware]


@pytest.mark.parametrize(
    ("headers", "what"),
    [
        ({f"x-h{i}": "v" for i in range(MAX_HEADERS + 1)}, "headers; at most"),
        ({"x-big": "a" * MAX_HEADER_BYTES}, "bytes; at most"),
    ],
)
def test_too_many_or_too_large_headers_get_a_431_in_the_openai_body(headers: dict[str, str], what: str) -> None:
    response = _get(headers)
    assert response.status_code == 431, response.text
    error = response.json()["error"]
    assert error["code"] == "request_header_fields_too_large" and what in error["message"], error


def test_headers_within_the_bounds_pass() -> None:
    response = _get({"authorization": "Bearer " + "k" * 16_000, **{f"x-h{i}": "v" for i in range(60)}})
    assert response.status_code == 200, response.text
