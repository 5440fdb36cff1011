"""Pooled HTTP to the model servers; transport failures become GatewayError.

The client is gateway.http1, not httpx or aiohttp: httpx's pool collapses at 32+ concurrent streams
and aiohttp costs ~4x more CPU per call (`bench/run.py --suite client`).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from gateway.errors import GatewayError, UpstreamError, UpstreamHTTPError, UpstreamTimeout, error_body
from gateway.http1 import ClientError, ConnectError, ConnectTimeout, Pool, Response, Timeout
from gateway.route import RouteArm


@dataclass(frozen=True, slots=True)
class Call:
    """One upstream call: where it goes, what it sends, and whose secrets its errors must not echo."""

    arm: RouteArm
    endpoint: str
    body: bytes
    headers: dict[str, str]
    client_token: str | None
    timeout: Timeout  # the arm's, or less when the request's deadline is nearer
    first_token_s: float

    def failure(self, exc: BaseException) -> GatewayError:
        return failure(exc, self.arm, self.timeout.total)

    def http_error(self, resp: Response, data: bytes) -> UpstreamHTTPError:
        secrets = (self.arm.secret, self.client_token)
        return http_error(resp.status, data, self.arm, secrets, resp.headers.get("retry-after"))


class Upstream:
    """One connection pool shared by every route and arm (keep-alive connections per origin)."""

    def __init__(self, max_connections: int = 1000) -> None:
        self._max_connections = max_connections
        self._pool: Pool | None = None

    async def start(self) -> None:
        self._pool = Pool(limit=self._max_connections)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            raise RuntimeError("Upstream.start() was not awaited")
        return self._pool

    async def open(self, call: Call) -> Response:
        """POST and return once the response headers are in; the caller reads or closes the body."""
        try:
            return await self.pool.request(
                "POST", call.arm.urls[call.endpoint], call.headers, call.body, call.timeout
            )
        except Exception as exc:
            raise call.failure(exc) from exc

    async def probe(self, arm: RouteArm, timeout_s: float) -> int:
        """GET {url}/models; returns the HTTP status (raises GatewayError when unreachable)."""
        timeout = Timeout(total=timeout_s, connect=min(timeout_s, arm.timeouts.connect_s))
        try:
            resp = await self.pool.request("GET", arm.urls["models"], arm.headers, b"", timeout)
            await resp.read()
            return resp.status
        except Exception as exc:
            raise failure(exc, arm) from exc


def failure(exc: BaseException, arm: RouteArm, total_s: float | None = None) -> GatewayError:
    """Map a transport exception to what the client is told (no upstream URL, no secret)."""
    who = f"the {arm.name} upstream"
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, ConnectTimeout):
        return UpstreamTimeout(f"{who} did not accept a connection within {arm.timeouts.connect_s}s")
    if isinstance(exc, asyncio.TimeoutError):
        limit = total_s if total_s is not None else arm.timeouts.total_s
        return UpstreamTimeout(f"{who} did not finish within {limit:g}s (timeouts.total_s / deadline_s)")
    if isinstance(exc, ConnectError):
        return UpstreamError(f"could not connect to {who}: {_reason(exc.os_error)}")
    if isinstance(exc, ClientError | OSError):
        return UpstreamError(
            f"{who} closed the connection or sent a malformed response", code="upstream_protocol_error"
        )
    return UpstreamError(f"{who} failed: {type(exc).__name__}", code="upstream_protocol_error")


def _reason(error: OSError) -> str:
    # The OS's own text names the address; clients get only the kind of failure (the log has the rest).
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return "host name did not resolve"
    return errno.errorcode.get(error.errno or 0, type(error).__name__)


def scrub(data: bytes, secrets: Iterable[str | None]) -> bytes:
    for secret in secrets:
        if secret:
            data = data.replace(secret.encode(), b"[REDACTED]")
    return data


def http_error(
    status: int, body: bytes, arm: RouteArm, secrets: Iterable[str | None], retry_after: str | None
) -> UpstreamHTTPError:
    """An upstream error status: its OpenAI-format body passes on scrubbed; anything else is wrapped."""
    clean = scrub(body, secrets)
    message = f"the {arm.name} upstream answered HTTP {status}"
    try:
        parsed = orjson.loads(clean)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return UpstreamHTTPError(status, clean, message, retry_after)
    detail = _detail(parsed, clean)
    wrapped = error_body(
        f"{message}: {detail}" if detail else message, "upstream_error", f"upstream_http_{status}"
    )
    return UpstreamHTTPError(status, wrapped, message, retry_after)


def _detail(parsed: object, raw: bytes) -> str:
    if isinstance(parsed, dict):
        for key in ("error", "message", "detail"):
            if isinstance(parsed.get(key), str):
                return str(parsed[key])[:300]
    if parsed is None and raw.lstrip()[:1] == b"<":
        return "(an HTML page, not an API response)"
    return raw[:300].decode("utf-8", "replace").strip()
