"""Calls to the model servers: aiohttp, one bulkhead (connection pool and limit) per arm, every answer
classified and bounded, every transport failure told as what happened (never an errno name, never an
address the client did not configure, never a secret).

Why aiohttp: its C parser bounds the response head (line, field and count limits) and handles chunked
trailers and 1xx; its pool retries only idempotent methods, so a generation is never sent twice; it
decodes compressed bodies, speaks TLS with SNI, and goes through proxies. The hand-written client it
replaced shared a socket between two users and replayed POSTs a server had already processed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import ClientResponse, ClientTimeout
from yarl import URL

from gateway.errors import GatewayError, UpstreamError, UpstreamHTTPError, UpstreamTimeout, error_body
from gateway.route import Bulkhead, RouteArm

log = logging.getLogger("gateway.upstream")

# The response head: aiohttp's limits per line and per header, and at most this many headers.
MAX_LINE = 8190
MAX_HEADERS = 128
# A 2xx for these has nothing to relay; 1xx, 3xx and codes HTTP does not define are not answers either.
NO_CONTENT = frozenset({204, 205})


class CutShort(Exception):
    """A stream that ended cleanly, but without a finish_reason: its answer was cut short (llama.cpp, for
    one, ends a generation it interrupts that way)."""


@dataclass(frozen=True, slots=True)
class Call:
    """One upstream call: where it goes, what it sends, and whose secrets its errors must not echo."""

    arm: RouteArm
    endpoint: str
    body: bytes
    headers: dict[str, str]
    client_token: str | None
    timeout: ClientTimeout  # the arm's, or less when the request's deadline is nearer
    first_token_s: float
    stream: bool = False

    def failure(self, exc: BaseException) -> GatewayError:
        return failure(exc, self.arm, self.timeout.total)

    def http_error(self, resp: Response, data: bytes) -> UpstreamHTTPError:
        # Only what was sent upstream can come back in its error text: the arm's key, and the client's
        # when the arm forwards it.
        secrets = (self.arm.secret, self.client_token if self.arm.forward_client_auth else None)
        return http_error(resp.status, data, self.arm, secrets, resp.headers.get("retry-after"))


class Pool:
    """One arm's bulkhead: its own connections, limit and wait, so a hung arm holds only its own."""

    __slots__ = ("in_flight", "proxy", "session", "settings")

    def __init__(self, settings: Bulkhead, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.in_flight = 0  # calls holding (or waiting for) one of this arm's connections
        tls: ssl.SSLContext | bool = settings.tls.context() if settings.tls is not None else True
        connector = aiohttp.TCPConnector(
            limit=settings.max_connections,
            limit_per_host=0,
            keepalive_timeout=settings.keepalive_s if settings.keepalive_s > 0 else None,
            force_close=settings.keepalive_s == 0,
            ssl=tls,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # one user's cookies never reach another's request
            auto_decompress=True,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            skip_auto_headers=("User-Agent",),
        )
        self.proxy = proxy_for(URL(settings.origin), environ)

    def stats(self) -> dict[str, object]:
        connector = self.session.connector
        idle = sum(len(conns) for conns in connector._conns.values()) if connector is not None else 0
        return {
            "route": self.settings.route,
            "arm": self.settings.arm,
            "limit": self.settings.max_connections,
            "in_flight": self.in_flight,
            "idle": idle,
        }


class Response:
    """An answer whose head is in: its body read whole (bounded by the arm's max_response_bytes) or piece
    by piece as it arrives (readany, b"" at the end). close() hands the connection back, or drops it when
    the body was not read to its end."""

    __slots__ = ("_arm", "_open", "_pool", "_resp", "_total_s", "headers", "status")

    def __init__(self, resp: ClientResponse, pool: Pool, arm: RouteArm, total_s: float | None) -> None:
        self._resp = resp
        self._pool = pool
        self._arm = arm
        self._total_s = total_s
        self._open = True
        self.status = resp.status
        self.headers = resp.headers

    async def read(self) -> bytes:
        limit = self._arm.max_response_bytes
        length = self._resp.content_length
        if length is not None and length > limit:
            raise self._too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while chunk := await self.readany():
            size += len(chunk)
            if size > limit:
                raise self._too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def readany(self) -> bytes:
        try:
            return await self._resp.content.readany()
        except Exception as exc:
            raise failure(exc, self._arm, self._total_s) from exc

    def close(self) -> None:
        if self._open:
            self._open = False
            self._pool.in_flight -= 1
            if self._resp.content.at_eof():
                self._resp.release()
            else:
                self._resp.close()  # mid-body: the connection cannot carry another exchange

    def _too_large(self, limit: int) -> UpstreamError:
        self.close()
        return UpstreamError(
            f"the {self._arm.name} upstream's answer is larger than {limit} bytes "
            f"(arms.{self._arm.name}.max_response_bytes)",
            code="upstream_response_too_large",
        )


class Upstream:
    """The bulkheads of every arm, built on first use and kept while their settings stay the same."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ if environ is not None else os.environ
        self._pools: dict[Bulkhead, Pool] = {}
        self._closed = False

    async def start(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.session.close()

    async def retire(self, keep: Iterable[Bulkhead]) -> None:
        """Close the pools no route uses any more (after a reload), once their last call has ended."""
        wanted = set(keep)
        for settings, pool in list(self._pools.items()):
            if settings not in wanted and pool.in_flight == 0:
                del self._pools[settings]
                await pool.session.close()

    def stats(self) -> list[dict[str, object]]:
        return [pool.stats() for pool in self._pools.values()]

    def pool(self, arm: RouteArm) -> Pool:
        pool = self._pools.get(arm.bulkhead)
        if pool is None:
            if self._closed:
                raise UpstreamError("the gateway is shutting down", code="upstream_connect_error")
            try:
                pool = Pool(arm.bulkhead, self._environ)
            except ValueError as exc:  # a TLS file that loaded with the policy is gone or changed since
                raise UpstreamError(
                    f"the {arm.name} arm's tls settings: {exc}", code="upstream_tls_error"
                ) from None
            self._pools[arm.bulkhead] = pool
        return pool

    async def open(self, call: Call) -> Response:
        """POST and return once the response head is in; the caller reads or closes the body. Returns 2xx
        answers of the expected type and 4xx/5xx errors; anything else is an UpstreamError."""
        arm = call.arm
        resp = await self.send(arm, "POST", arm.urls[call.endpoint], call.headers, call.body, call.timeout)
        problem = classify(resp.status, resp.headers.get("content-type"), call.stream)
        if problem is not None:
            resp.close()
            raise UpstreamError(f"the {arm.name} upstream {problem}", code="upstream_protocol_error")
        return resp

    async def fetch(
        self, call: Call, on_status: Callable[[int], None] | None = None
    ) -> tuple[Response, bytes, dict[str, Any]]:
        """A non-streamed exchange: the response, its body (bounded by the arm's max_response_bytes) and the
        body as a JSON object. Raises the upstream's error status as UpstreamHTTPError, and a body that is
        not a JSON object as UpstreamError. on_status: told the status as soon as the head is in."""
        resp = await self.open(call)
        if on_status is not None:
            on_status(resp.status)
        try:
            data = await resp.read()
        except Exception as exc:
            raise call.failure(exc) from exc
        finally:
            resp.close()
        if resp.status >= 400:
            raise call.http_error(resp, data)
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise UpstreamError(
                f"the {call.arm.name} upstream answered HTTP {resp.status} with a body that is not a JSON "
                "object",
                code="upstream_protocol_error",
            )
        return resp, data, answer

    async def probe(self, arm: RouteArm, timeout_s: float) -> tuple[int, bytes]:
        """GET {url}/models with the arm's credentials; returns the HTTP status and the body (bounded by the
        arm's max_response_bytes). Raises GatewayError when the upstream cannot be reached."""
        timeout = ClientTimeout(total=timeout_s, connect=min(timeout_s, arm.timeouts.connect_s))
        resp = await self.send(arm, "GET", arm.urls["models"], arm.headers, None, timeout)
        try:
            body = await resp.read()
        finally:
            resp.close()
        return resp.status, body

    async def send(
        self,
        arm: RouteArm,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: ClientTimeout,  # noqa: ASYNC109 - aiohttp's: connect (pool wait included) and total
    ) -> Response:
        """One exchange with an arm's server, at a url built on the arm's own (the proxy's calls, the
        readiness probe, a stored response's GET, DELETE or cancel); returns once the head is in."""
        pool = self.pool(arm)
        saturated = pool.in_flight >= pool.settings.max_connections
        pool.in_flight += 1
        try:
            resp = await pool.session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                proxy=pool.proxy,
            )
        except BaseException as exc:
            pool.in_flight -= 1
            if isinstance(exc, aiohttp.ConnectionTimeoutError) and saturated:
                raise UpstreamTimeout(
                    f"all {pool.settings.max_connections} connections to the {arm.name} upstream "
                    f"(arms.{arm.name}.max_connections) stayed busy for {arm.timeouts.connect_s:g}s"
                ) from exc
            if isinstance(exc, Exception):
                raise failure(exc, arm, timeout.total) from exc
            raise
        return Response(resp, pool, arm, timeout.total)


def classify(status: int, content_type: str | None, stream: bool) -> str | None:
    """What is wrong with this answer's status or type, or None when it is an answer or an HTTP error."""
    if 400 <= status < 600:
        return None  # an error the upstream reports: its body is passed on (call.http_error)
    if not 200 <= status < 300 or status in NO_CONTENT:
        return f"answered HTTP {status}, which is not an answer to a {'stream' if stream else 'request'}"
    if content_type is None:
        return None  # no type said: the body is judged by what it holds
    media = media_type(content_type)
    if stream and media != "text/event-stream":
        return f"answered a stream request with {media or 'no content type'}, not text/event-stream"
    if not stream and not is_json(media):
        return f"answered with {media or 'no content type'}, not application/json"
    return None


def media_type(content_type: str) -> str:
    """The media type of a Content-Type value, without parameters, lower-case."""
    return content_type.partition(";")[0].strip().lower()


def is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def proxy_for(origin: URL, environ: Mapping[str, str]) -> URL | None:
    """HTTP_PROXY / HTTPS_PROXY (either case) for the origin's scheme, unless NO_PROXY names its host."""
    scheme = origin.scheme
    proxy = environ.get(f"{scheme}_proxy") or environ.get(f"{scheme.upper()}_PROXY")
    if not proxy:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    host = f"{origin.host}:{origin.port}" if origin.port else str(origin.host)
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # stdlib, untyped
    if no_proxy and bypass(host, {"no": no_proxy}):
        return None
    return URL(proxy if "://" in proxy else f"http://{proxy}")


def failure(exc: BaseException, arm: RouteArm, total_s: float | None = None) -> GatewayError:
    """Map a transport exception to what the client is told (no upstream URL, no secret)."""
    who = f"the {arm.name} upstream"
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, CutShort):
        return UpstreamError(
            f"{who}'s stream ended without a finish_reason: its answer was cut short",
            code="upstream_protocol_error",
        )
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(f"{who} did not accept a connection within {arm.timeouts.connect_s:g}s")
    if isinstance(exc, asyncio.TimeoutError):
        limit = total_s if total_s is not None else arm.timeouts.total_s
        return UpstreamTimeout(f"{who} did not finish within {limit:g}s (timeouts.total_s / deadline_s)")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return UpstreamError(
            f"TLS certificate verify failed for {who}: {_verify_reason(exc, arm.name)}",
            code="upstream_tls_error",
        )
    if isinstance(exc, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        return UpstreamError(
            f"TLS handshake with {who} failed: {_ssl_reason(exc)}", code="upstream_tls_error"
        )
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return UpstreamError(f"could not connect to the proxy for {who} (HTTP(S)_PROXY): {_os_reason(exc)}")
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return UpstreamError(f"the proxy for {who} refused the tunnel (HTTP {exc.status})")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return UpstreamError(f"could not connect to {who}: its host name did not resolve")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(f"could not connect to {who}: {_os_reason(exc)}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamError(
            f"{who} closed the connection before its answer ended", code="upstream_protocol_error"
        )
    if isinstance(exc, aiohttp.ClientPayloadError):
        if "not enough data" in str(exc).lower():  # the body's declared length or chunking never ended
            return UpstreamError(
                f"{who} closed the connection before its answer ended", code="upstream_protocol_error"
            )
        return UpstreamError(f"{who} sent a malformed body", code="upstream_protocol_error")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamError(f"{who} sent {_head_problem(exc)}", code="upstream_protocol_error")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamError(
            f"{who} closed the connection or sent a malformed response", code="upstream_protocol_error"
        )
    return UpstreamError(f"{who} failed: {type(exc).__name__}", code="upstream_protocol_error")


def _verify_reason(exc: aiohttp.ClientConnectorCertificateError, arm: str) -> str:
    error = exc.certificate_error
    if getattr(error, "verify_code", None) == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
        return f"hostname mismatch for {exc.host}"
    message = getattr(error, "verify_message", None) or getattr(error, "reason", None) or "rejected"
    return f"{str(message).rstrip('.').lower()} (arms.{arm}.tls.ca_file names a CA to trust)"


def _ssl_reason(exc: BaseException) -> str:
    cause = getattr(exc, "os_error", None) or exc.__cause__ or exc
    reason = getattr(cause, "reason", None)
    return str(reason).replace("_", " ").lower() if reason else "the server did not speak TLS"


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    # The OS's own text names the address; clients get only the kind of failure (the log has the rest).
    error = exc.os_error
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if error.errno:
        return os.strerror(error.errno).lower()
    return "the connection failed"


def _head_problem(exc: aiohttp.ClientResponseError) -> str:
    text = str(exc.message).lower()
    if "got more than" in text or "too many headers" in text or "too long" in text:
        return f"a response head past the limits ({MAX_LINE} bytes a line, {MAX_HEADERS} headers)"
    return "a malformed HTTP response"


def scrub(data: bytes, secrets: Iterable[str | None]) -> bytes:
    """Each secret replaced by [REDACTED], as written and as JSON escapes it (a key with a quote, a
    backslash or a slash, or non-ASCII characters), and only where it stands as a whole token: a secret
    that happens to be part of a longer word leaves that word alone."""
    for secret in secrets:
        if not secret:
            continue
        # JSON as orjson writes it, and with \uXXXX for non-ASCII as Python's json does; each also with
        # \/ for a slash, as some encoders write it
        escaped = {orjson.dumps(secret)[1:-1], json.dumps(secret)[1:-1].encode()}
        forms = {secret.encode(), *escaped, *(form.replace(b"/", b"\\/") for form in escaped)}
        alternatives = b"|".join(re.escape(form) for form in sorted(forms, key=len, reverse=True))
        data = re.sub(
            rb"(?<![A-Za-z0-9_\-])(?:" + alternatives + rb")(?![A-Za-z0-9_\-])", b"[REDACTED]", data
        )
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
    said = f"{message}: {detail}" if detail else message
    wrapped = UpstreamHTTPError(
        status, error_body(said, "upstream_error", f"upstream_http_{status}"), said, retry_after
    )
    wrapped.wrapped = True
    return wrapped


def _detail(parsed: object, raw: bytes) -> str:
    if isinstance(parsed, dict):
        for key in ("error", "message", "detail"):
            if isinstance(parsed.get(key), str):
                return str(parsed[key])[:300]
    if parsed is None and raw.lstrip()[:1] == b"<":
        return "(an HTML page, not an API response)"
    return raw[:300].decode("utf-8", "replace").strip()
