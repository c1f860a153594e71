"""The one exception hierarchy of modelfleet; the API layer maps it to OpenAI error bodies.

ServingError                         base; attrs: status_code, error_type, param, code
├── InvalidRequestError      400     bad parameters, prompt longer than the context
├── AuthenticationError      401     missing or wrong API key
├── ModelNotFoundError       404     unknown model id
├── RequestTimeoutError      408     the request ran past the router's request_timeout_s
├── RequestTooLargeError     413     request body over the router's limit
├── OverloadedError          429     queue full / backpressure
├── ColdStartError           503     a model at zero replicas did not start in time, or too many wait for it
├── QuotaUnavailableError    503     the shared rate-limit store is unreachable and the limits fail closed
└── EngineError              500     the engine failed while serving
    ├── EngineStartError     500     weights or tokenizer could not be loaded
    └── EngineDeadError      503     the engine stopped answering; Serve restarts the replica
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ColdStartError",
    "EngineDeadError",
    "EngineError",
    "EngineStartError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "OverloadedError",
    "QuotaUnavailableError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "ServingError",
]


class ServingError(Exception):
    """Raised for any failure modelfleet reports to a client; the base of all the errors below."""

    status_code: int = 500
    error_type: str = "internal_error"
    #: Seconds a client should wait before it retries (the `Retry-After` header); None: no header.
    retry_after_s: int | None = None

    # Constructors stay simple (message + keyword defaults) so the errors pickle across Ray processes.
    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.message, self.param, self.code))


def _rebuild(cls: type[ServingError], message: str, param: str | None, code: str | None) -> ServingError:
    return cls(message, param=param, code=code)


class InvalidRequestError(ServingError):
    """Raised when a request's parameters are invalid (also what pydantic validation errors become)."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(ServingError):
    """Raised when the router requires an API key and the request has none or a wrong one."""

    status_code = 401
    error_type = "authentication_error"


class ModelNotFoundError(ServingError):
    """Raised when the `model` of a request names no served model."""

    status_code = 404
    error_type = "not_found_error"

    def __init__(self, message: str, *, param: str | None = "model", code: str | None = "model_not_found") -> None:
        super().__init__(message, param=param, code=code)


class RequestTimeoutError(ServingError):
    """Raised when a request runs longer than the router's `request_timeout_s`; it is cancelled."""

    status_code = 408
    error_type = "timeout_error"


class RequestTooLargeError(ServingError):
    """Raised when a request body is larger than the router's `max_body_bytes`."""

    status_code = 413
    error_type = "invalid_request_error"


class OverloadedError(ServingError):
    """Raised when a replica's queue is full and the request is refused instead of waiting forever."""

    status_code = 429
    error_type = "rate_limit_error"
    retry_after_s = 1


class ColdStartError(ServingError):
    """Raised when a model scaled to zero does not start within its cold_start_timeout_s, or when its
    cold_start_queue of held requests is full; `Retry-After` says when a replica may be up."""

    status_code = 503
    error_type = "service_unavailable"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = "model_cold", retry_after_s: int = 5
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_cold, (self.message, self.param, self.code, self.retry_after_s))


def _rebuild_cold(message: str, param: str | None, code: str | None, retry_after_s: int) -> ColdStartError:
    return ColdStartError(message, param=param, code=code, retry_after_s=retry_after_s)


class QuotaUnavailableError(ServingError):
    """Raised when the shared quota store cannot be reached and `router.quota_fail_mode` is 'closed'."""

    status_code = 503
    error_type = "service_unavailable"
    retry_after_s = 1


class EngineError(ServingError):
    """Raised when the engine fails while serving a request."""

    status_code = 500
    error_type = "internal_error"


class EngineStartError(EngineError):
    """Raised when an engine cannot load its weights or tokenizer."""


class EngineDeadError(EngineError):
    """Raised when an engine no longer answers; the replica's health check fails and Serve restarts it."""

    status_code = 503
    error_type = "service_unavailable"
