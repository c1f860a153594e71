"""The outermost ASGI layer: request ids, API-key checks and body limits, before any parsing or routing."""

from __future__ import annotations

import functools
import hmac
import uuid
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import timing
from deployments.api import files
from deployments.api.errors import to_error_response
from deployments.errors import AuthenticationError, RequestTooLargeError, ServingError

__all__ = ["OPEN_PATHS", "Limits", "LimitsMiddleware", "error_response", "limits", "request_path"]

# Probes and the API's own documents answer without a key.
OPEN_PATHS = {"/healthz", "/health", "/readyz", "/openapi.json", "/docs"}


def _route_paths(scope: Scope) -> frozenset[str]:
    """The route templates of the app serving `scope` (Starlette puts the app in the scope before middleware)."""
    return _templates(scope.get("app"))


@functools.lru_cache(maxsize=8)
def _templates(app: object) -> frozenset[str]:
    return frozenset(str(getattr(route, "path", "")) for route in getattr(app, "routes", ()))


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    status, body = to_error_response(exc, request_id)
    # Serve's proxy sets the x-request-id response header (the client's own id, or one it generated).
    retry_after = exc.retry_after_s if isinstance(exc, ServingError) else None
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@dataclass
class Limits:
    """Per-process request limits; set from the config when the ingress replica starts."""

    max_body_bytes: int = 1_048_576
    api_keys: tuple[bytes, ...] = ()


limits = Limits()


class LimitsMiddleware:
    """Outermost ASGI middleware: API-key check (401) and body-size limit (413) before any parsing.

    Pure ASGI rather than BaseHTTPMiddleware so streamed responses pass through untouched. The body is
    read here, bounded, and replayed to the app, so chunked uploads without Content-Length are capped too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The metrics of every HTTP request, refused ones included: this is the outermost layer.
        record = timing.RequestRecord.begin()
        try:
            await self._limit(scope, receive, record.wrap(send))
        finally:
            record.finish(scope, _route_paths(scope))

    async def _limit(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        scope["modelfleet.request_id"] = rid
        failure = self._check_auth(scope, headers)
        upload_limit = (
            files.upload_limit() if request_path(scope) == files.UPLOAD_PATH and scope["method"] == "POST" else None
        )
        if failure is None and upload_limit is not None:
            # A file upload streams on to its route, which spools it to disk: bounded as it arrives, not buffered.
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > upload_limit:
                failure = _upload_too_large(upload_limit)
            else:
                await self.app(scope, _bounded(receive, upload_limit), send)
                return
        body = b""
        if failure is None:
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > limits.max_body_bytes:
                failure = self._too_large()
            else:
                body, failure = await self._read_body(receive)
        if failure is not None:
            await error_response(failure, rid)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect as usual
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    def _check_auth(scope: Scope, headers: dict[bytes, bytes]) -> ServingError | None:
        if not limits.api_keys or request_path(scope) in OPEN_PATHS:
            return None
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if any(hmac.compare_digest(token, key) for key in limits.api_keys):
            return None
        return AuthenticationError("Missing or invalid API key: send `Authorization: Bearer <key>`")

    async def _read_body(self, receive: Receive) -> tuple[bytes, ServingError | None]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.max_body_bytes:
                return b"", self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    @staticmethod
    def _too_large() -> RequestTooLargeError:
        return RequestTooLargeError(
            f"Request body is larger than the limit of {limits.max_body_bytes} bytes", code="request_too_large"
        )


def request_path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):  # the app may live under a route prefix
        path = path[len(root) :]
    return str(path)


def _upload_too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"Upload is larger than the limit of {limit} bytes (`batches.max_file_bytes` and the form's framing)",
        param="file",
        code="file_too_large",
    )


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive`, failing with a 413 once the body has grown past `limit` bytes (a chunked upload has no length)."""
    size = 0

    async def bounded() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise _upload_too_large(limit)  # raised inside the route's form parsing: its error handler answers
        return message

    return bounded
