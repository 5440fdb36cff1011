"""Every error the gateway can answer with, in OpenAI's error format, and what each one means: one place
decides an error's status, type and code, the fallback reason it gives, the outcome it is counted as, whether
the arm that produced it is to blame, and how loudly it is logged.

GatewayError                status type                   code                    reason / outcome
├── InvalidRequest          400    invalid_request_error  invalid_request / ...   - / rejected
├── Unauthorized            401    invalid_request_error  invalid_api_key         - / rejected
├── ModelNotFound           404    invalid_request_error  model_not_found         - / rejected
├── NotFound                404    invalid_request_error  not_found               - / rejected
├── MethodNotAllowed        405    invalid_request_error  method_not_allowed      - / rejected
├── RequestTimeout          408    invalid_request_error  request_timeout         - / rejected
├── PayloadTooLarge         413    invalid_request_error  request_too_large       - / rejected
├── UnsupportedMediaType    415    invalid_request_error  unsupported_media_type  - / rejected
├── Conflict                409    invalid_request_error  conflict                - / rejected
├── Unavailable             503    server_error           state_unavailable       - / rejected
├── UpstreamError           502    upstream_error         upstream_connect_error  connect_error /
│   │                                                     upstream_*_error        upstream_error
│   └── UpstreamTimeout     504    upstream_error         upstream_timeout        timeout / timeout
├── InvalidOutput           502    upstream_error         invalid_output          its kind / invalid_output
├── UpstreamHTTPError       the upstream's (its body too) upstream_http_NNN       http_429, http_5xx /
│                                                                                 upstream_error; http_4xx /
│                                                                                 refused or rejected
└── InternalError           500    server_error           internal_error          - / internal_error

(reason: the fallback reason of a candidate failing this way; outcome: canarygate_requests_total{outcome}.)

Blame by comparison: an arm's failure is its own unless the other arm, asked the same request, fails the
same way (then it is the request's: no breaker verdict, and a 4xx both refuse counts as `rejected`). A 4xx
that no other arm was asked about is the request's (`rejected`); one the base accepted is the arm's
(`refused`, counted with the errors).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal, get_args

import orjson

log = logging.getLogger("gateway.errors")

# Validation failures, each a fallback reason of its own. malformed: the answer is not shaped like an
# OpenAI answer at all (choices not an array, a tool call's name not a string, ...).
Kind = Literal[
    "malformed", "json_parse", "json_schema",
    "tool_unknown", "tool_args_parse", "tool_args_schema", "tool_choice",
]  # fmt: skip
KINDS: tuple[Kind, ...] = get_args(Kind)
# Why base answers a request assigned to the candidate: a candidate failure of one of these kinds.
Reason = Literal["connect_error", "timeout", "http_5xx", "http_429", "http_4xx", Kind]
REASONS: tuple[Reason, ...] = get_args(Reason)
# canarygate_requests_total{outcome}: what became of an attempt. ERROR_OUTCOMES are its arm's failures.
Outcome = Literal[
    "ok", "upstream_error", "timeout", "invalid_output", "refused",
    "rejected", "client_closed", "cancelled", "internal_error",
]  # fmt: skip
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
ERROR_OUTCOMES = frozenset({"upstream_error", "timeout", "refused"})


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False
    # What an upstream attempt that ends in this error means:
    reason: Reason | None = None  # the fallback reason; None: never answered by the other arm instead
    outcome: Outcome = "rejected"  # counted as, when nothing else is known
    blamed: bool = False  # the arm's own failure unless the other arm fails the same way
    log_level: int = logging.INFO

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


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"connection", b"close")]


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
    log_level = logging.WARNING


class UpstreamError(GatewayError):
    """Refused, reset, closed before a complete answer, or an answer that is not HTTP, JSON or SSE."""

    status = 502
    type = "upstream_error"
    default_code = "upstream_connect_error"
    retryable = True
    reason: Reason | None = "connect_error"
    outcome: Outcome = "upstream_error"
    blamed = True
    log_level = logging.WARNING


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"
    reason = "timeout"
    outcome = "timeout"


class UpstreamHTTPError(GatewayError):
    """The upstream answered with an error status; its body is passed on (already scrubbed)."""

    type = "upstream_error"
    default_code = "upstream_http_error"

    def __init__(self, status: int, body: bytes, message: str, retry_after: str | None = None) -> None:
        super().__init__(message, code=f"upstream_http_{status}")
        self.upstream_status = status
        self.upstream_body = body
        self.wrapped = False  # its body is the gateway's own words (the upstream's was not an API error)
        self.retry_after = retry_after
        server = status == 429 or status >= 500
        self.retryable = server  # type: ignore[misc]
        self.reason = "http_429" if status == 429 else "http_5xx" if status >= 500 else "http_4xx"
        # A 4xx alone is the request's; compared with a base that accepted it, the arm's ("refused").
        self.outcome = "upstream_error" if server else "rejected"
        self.blamed = server
        self.log_level = logging.WARNING if server else logging.INFO

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
    outcome = "invalid_output"
    blamed = True
    log_level = logging.INFO

    def __init__(self, kind: Kind, message: str, arm: str) -> None:
        super().__init__(f"the {arm} model's output failed validation ({kind}): {message}")
        self.kind = kind
        self.detail = message
        self.reason = kind


class InternalError(GatewayError):
    """A defect in the gateway: never an arm's failure, always logged with its stack."""

    outcome = "internal_error"
    log_level = logging.ERROR


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    error: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code}
    return orjson.dumps({"error": error})


def log_error(exc: GatewayError, request_id: str, route: str | None = None, arm: str | None = None) -> None:
    """Every error answered is logged exactly once, here, with its request id (and its cause, which
    the client is not told)."""
    status = exc.status_code()
    level = exc.log_level
    cause = f" ({exc.__cause__!r})" if exc.__cause__ else ""
    log.log(
        level,
        "request_id=%s route=%s arm=%s status=%d code=%s %s%s",
        *(request_id, route, arm, status, exc.code, exc.message, cause),
    )


def same_way(error: GatewayError, other: GatewayError | None, other_invalid: bool = False) -> bool:
    """Did the other arm, asked the same request, fail the way this arm did? Then the failure is the
    request's, not the arm's. other_invalid: the other arm's answer failed validation (enforced or not)."""
    if isinstance(error, InvalidOutput):
        return other_invalid or isinstance(other, InvalidOutput)
    return other is not None and other.reason is not None and other.reason == error.reason


def outcome_of(error: GatewayError | None, blamed: bool | None = None) -> Outcome:
    """What an attempt that ended in error counts as. blamed: known by comparison with the other arm
    (None: not compared). A 4xx the other arm accepted is "refused"; any failure both arms share keeps
    its own outcome (it then counts on both arms alike), except a 4xx, which is "rejected"."""
    if error is None:
        return "ok"
    if blamed and isinstance(error, UpstreamHTTPError) and error.reason == "http_4xx":
        return "refused"
    return error.outcome
