"""An ASGI middleware for Serve's HTTP proxy: a 431 for too many or too large request headers, and a 400 for
request headers the proxy cannot decode.

Serve's proxy takes headers of any size and count (an 8 MB header and 100,000 headers were accepted), each parsed
and copied on every hop: the middleware bounds them as web servers do (nginx's default buffers hold 32 KiB).

Serve's proxy decodes the request id (`x-request-id`), the session id (`x-session-id`, or the header named by
`RAY_SERVE_SESSION_ID_HEADER_KEY`) and the multiplexed model id as UTF-8 before any code of ours runs, and answers
a value that is not UTF-8 with a plain-text 500. This middleware, which the proxy puts around itself, answers such
a request first, with a 400 in the OpenAI error body.

Serve calls `proxy_middlewares` (named by `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, which `PROXY_ENV` sets in the
environment of every Ray process a launcher starts) when a proxy (or a replica's direct ingress) starts. It runs in
Serve's proxy actor: it imports nothing heavier than starlette and Ray's constants, which that actor already holds.
"""

from __future__ import annotations

import json

from ray.serve._private.constants import SERVE_HTTP_REQUEST_ID_HEADER, SERVE_MULTIPLEXED_MODEL_ID, SERVE_SESSION_ID
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "CALLBACK_IMPORT_PATH",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "PROXY_ENV",
    "HeaderCheckMiddleware",
    "header_problem",
    "proxy_middlewares",
]

CALLBACK_IMPORT_PATH = "deployments.api.proxy_middleware:proxy_middlewares"
#: The environment a Ray process needs for its Serve proxies to use this middleware.
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK_IMPORT_PATH}


#: Most request headers, and most bytes of names and values together, that a request may carry.
MAX_HEADERS = 128
MAX_HEADER_BYTES = 32 * 1024


def _normal(name: str) -> str:
    # The proxy's own matching: case-insensitive, `-` and `_` alike (proxies such as nginx rewrite one to the other).
    return name.lower().replace("-", "_")


# The headers whose values the proxy decodes as UTF-8.
_DECODED = frozenset(
    _normal(name) for name in (SERVE_HTTP_REQUEST_ID_HEADER, SERVE_SESSION_ID, SERVE_MULTIPLEXED_MODEL_ID)
)


def undecodable_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The first header the proxy would fail to decode (its name is not UTF-8, or it is one of the proxy's own
    headers and its value is not), or None."""
    for raw_name, raw_value in headers:
        try:
            name = raw_name.decode()
        except UnicodeDecodeError:
            return raw_name.decode("latin-1")
        if _normal(name) in _DECODED:
            try:
                raw_value.decode()
            except UnicodeDecodeError:
                return name.lower()
    return None


def header_problem(headers: list[tuple[bytes, bytes]]) -> tuple[int, str, str | None, str] | None:
    """What is wrong with a request's headers, as (status, message, param, code), or None."""
    if len(headers) > MAX_HEADERS:
        message = f"The request has {len(headers)} headers; at most {MAX_HEADERS} are accepted"
        return 431, message, None, "request_header_fields_too_large"
    size = sum(len(name) + len(value) for name, value in headers)
    if size > MAX_HEADER_BYTES:
        message = f"The request headers hold {size} bytes; at most {MAX_HEADER_BYTES} are accepted"
        return 431, message, None, "request_header_fields_too_large"
    header = undecodable_header(headers)
    if header is not None:
        return 400, f"The request header '{header}' is not valid UTF-8", header, None
    return None


def _error_body(message: str, param: str | None, code: str | None) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return json.dumps({"error": error}).encode()


class HeaderCheckMiddleware:
    """Answers an HTTP request whose headers are too many or too large with a 431, or that has a header Serve's
    proxy cannot decode with a 400 (a WebSocket with a policy-violation close), before the proxy sees it; passes
    every other request on untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        problem = header_problem(scope.get("headers", []))
        if problem is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        status, message, param, code = problem
        body = _error_body(message, param, code)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """The middlewares Serve's proxy puts around itself (the `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` callback)."""
    return [Middleware(HeaderCheckMiddleware)]
