"""Every error the gateway can answer with, in OpenAI's error format.

GatewayError                      status  type                    code
├── InvalidRequest                400     invalid_request_error   invalid_request / invalid_json / ...
├── Unauthorized                  401     invalid_request_error   invalid_api_key
├── ModelNotFound                 404     invalid_request_error   model_not_found
├── NotFound                      404     invalid_request_error   not_found
├── MethodNotAllowed              405     invalid_request_error   method_not_allowed
├── PayloadTooLarge               413     invalid_request_error   request_too_large
├── UnsupportedMediaType          415     invalid_request_error   unsupported_media_type
├── Conflict                      409     invalid_request_error   conflict (e.g. resume a route not paused)
├── Unavailable                   503     server_error            state_unavailable (the shared store)
├── UpstreamError (retryable)     502     upstream_error          upstream_connect_error, *_protocol_error
│   └── UpstreamTimeout           504     upstream_error          upstream_timeout
├── InvalidOutput                 502     upstream_error          invalid_output (failed validation)
├── UpstreamHTTPError             (the upstream's status, its OpenAI error passed on, secrets scrubbed)
└── InternalError                 500     server_error            internal_error
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

if TYPE_CHECKING:
    from gateway.validation import Kind

log = logging.getLogger("gateway.errors")


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param

    def status_code(self) -> int:
        return self.status

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> list[tuple[bytes, bytes]]:
        return []


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class Unavailable(GatewayError):
    status = 503
    type = "server_error"
    default_code = "state_unavailable"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_connect_error"
    retryable = True


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"


class UpstreamHTTPError(GatewayError):
    """The upstream answered with an error status; its body is passed on (already scrubbed)."""

    type = "upstream_error"
    default_code = "upstream_http_error"

    def __init__(self, status: int, body: bytes, message: str, retry_after: str | None = None) -> None:
        super().__init__(message, code=f"upstream_http_{status}")
        self.upstream_status = status
        self.upstream_body = body
        self.retry_after = retry_after
        self.retryable = status == 429 or status >= 500  # type: ignore[misc]

    def status_code(self) -> int:
        return self.upstream_status

    def body(self) -> bytes:
        return self.upstream_body

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", self.retry_after.encode("latin-1"))] if self.retry_after else []


class InvalidOutput(GatewayError):
    """The upstream answered, but its output broke the JSON or tool-call contract."""

    status = 502
    type = "upstream_error"
    default_code = "invalid_output"

    def __init__(self, kind: Kind, message: str, arm: str) -> None:
        super().__init__(f"the {arm} model's output failed validation ({kind}): {message}")
        self.kind = kind
        self.detail = message


class InternalError(GatewayError):
    pass


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    error: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code}
    return orjson.dumps({"error": error})


def log_error(exc: GatewayError, request_id: str, route: str | None = None, arm: str | None = None) -> None:
    """Every error answered is logged exactly once, here, with its request id (and its cause, which
    the client is not told)."""
    status = exc.status_code()
    level = logging.WARNING if status >= 500 or status == 429 else logging.INFO
    cause = f" ({exc.__cause__!r})" if exc.__cause__ else ""
    log.log(
        level,
        "request_id=%s route=%s arm=%s status=%d code=%s %s%s",
        *(request_id, route, arm, status, exc.code, exc.message, cause),
    )
