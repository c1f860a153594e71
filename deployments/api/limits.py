"""The outermost ASGI layer: request ids, API-key checks and body limits, before any parsing or routing."""

from __future__ import annotations

import asyncio
import functools
import math
import uuid
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import timing
from deployments.api import files
from deployments.api.errors import to_error_response
from deployments.auth import KeyRing, bind_request
from deployments.auth.limits import Admission, Quotas
from deployments.errors import AuthenticationError, RequestTimeoutError, RequestTooLargeError, ServingError
from deployments.metrics import KEY_REQUESTS, instrument

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
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if _body_unread(exc):
        # The rest of the body is still on the connection: close it after this answer, rather than let the client
        # go on sending (a slow client would hold the proxy's connection for as long as it liked).
        headers["Connection"] = "close"
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)


def _body_unread(exc: BaseException) -> bool:
    return isinstance(exc, RequestTooLargeError) or (isinstance(exc, RequestTimeoutError) and exc.code == _BODY_TIMEOUT)


@dataclass
class Limits:
    """Per-process request limits; set from the config when the ingress replica starts."""

    max_body_bytes: int = 1_048_576
    #: The API keys (by hash); empty: the API is open.
    keys: KeyRing = field(default_factory=KeyRing)
    #: The shared rate-limit store's client; None: no key has limits.
    quotas: Quotas | None = None
    body_timeout_s: float = 30.0


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
        failure = await self._check_auth(scope, headers)
        send = _keyed(scope, send)
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
    async def _check_auth(scope: Scope, headers: dict[bytes, bytes]) -> ServingError | None:
        """The key (401), then its rate limits (429, one call to the shared store); binds the key's tenant to the
        request (its models, the charge of its tokens) and notes the limits' state for the response headers."""
        bind_request(None, None)
        if not limits.keys.enabled or request_path(scope) in OPEN_PATHS:
            return None
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        tenant = limits.keys.resolve(token)
        if tenant is None:
            return AuthenticationError("Missing or invalid API key: send `Authorization: Bearer <key>`")
        scope["modelfleet.key"] = tenant.name
        bind_request(tenant, limits.quotas)
        if limits.quotas is None:
            return None
        try:
            # Tokens are what a POST spends: a key whose token bucket is in debt may still read (GET) its batches.
            admission = await limits.quotas.admit(tenant, tokens=scope["method"] == "POST")
        except ServingError as exc:  # the store is unreachable and the fail mode is 'closed'
            return exc
        if admission is None:
            return None
        scope["modelfleet.ratelimit"] = admission
        return None if admission.allowed else admission.error(tenant.name)

    async def _read_body(self, receive: Receive) -> tuple[bytes, ServingError | None]:
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + limits.body_timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                return b"", _body_too_slow(limits.body_timeout_s)
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


_BODY_TIMEOUT = "body_timeout"
# An upload may take longer than `body_timeout_s`, but must keep up this rate after it: a slow-loris client cannot.
_UPLOAD_MIN_BYTES_PER_S = 65_536


def _body_too_slow(allowed_s: float) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"The request body did not arrive within {allowed_s:.0f} s (`router.body_timeout_s`); send it faster",
        code=_BODY_TIMEOUT,
    )


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive`, failing with a 413 once the body has grown past `limit` bytes (a chunked upload has no length), and
    with a 408 once it arrives slower than `body_timeout_s` plus a second per 64 KiB received."""
    size = 0
    started: float | None = None  # on the loop's clock, from the first read
    done = False

    async def bounded() -> Message:
        nonlocal size, started, done
        if done:  # the body is in: what follows is the disconnect, which may come whenever
            return await receive()
        started = asyncio.get_running_loop().time() if started is None else started
        allowed = limits.body_timeout_s + size / _UPLOAD_MIN_BYTES_PER_S
        try:
            async with asyncio.timeout_at(started + allowed):
                message = await receive()
        except TimeoutError:
            raise _body_too_slow(allowed) from None  # inside the route's form parsing: its error handler answers
        if message["type"] == "http.request":
            done = not message.get("more_body", False)
            size += len(message.get("body", b""))
            if size > limit:
                raise _upload_too_large(limit)  # raised inside the route's form parsing: its error handler answers
        return message

    return bounded


# -- API keys: rate-limit headers and per-key counts ------------------------------------------------------------------


def _keyed(scope: Scope, send: Send) -> Send:
    """`send`, adding OpenAI's x-ratelimit-* headers of the request's key to its response (success or 429), and
    counting the request under the key's name; `send` itself for a request without a key."""
    key = scope.get("modelfleet.key")
    if key is None:
        return send
    admission: Admission | None = scope.get("modelfleet.ratelimit")
    extra = _ratelimit_headers(admission) if admission is not None else []

    async def keyed(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
            instrument(KEY_REQUESTS).inc(1, tags={"key": key, "status": str(message["status"])})
        await send(message)

    return keyed


def _ratelimit_headers(a: Admission) -> list[tuple[bytes, bytes]]:
    """OpenAI's headers: limit, remaining, and the time until the bucket is full again ("1s", "6m0s", "20ms")."""
    out: list[tuple[str, str]] = []
    if a.limit_requests is not None:
        out += [
            ("x-ratelimit-limit-requests", str(a.limit_requests)),
            ("x-ratelimit-remaining-requests", str(a.remaining_requests)),
            ("x-ratelimit-reset-requests", _duration(a.reset_requests_s)),
        ]
    if a.limit_tokens is not None:
        out += [
            ("x-ratelimit-limit-tokens", str(a.limit_tokens)),
            ("x-ratelimit-remaining-tokens", str(a.remaining_tokens)),
            ("x-ratelimit-reset-tokens", _duration(a.reset_tokens_s)),
        ]
    return [(k.encode(), v.encode()) for k, v in out]


def _duration(seconds: float) -> str:
    """A duration as OpenAI writes its reset headers: "17ms", "1s", "2.5s", "6m0s", "1h2m3s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    hours, rest = divmod(math.ceil(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"
