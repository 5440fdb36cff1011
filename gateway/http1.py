"""A lean HTTP/1.1 client for the hot path: keep-alive pools on asyncio protocols, parsed by httptools.

Why not aiohttp: a gateway call is one POST to a handful of fixed origins, and aiohttp's general
machinery (URL objects, multidicts, payload registry, tracing hooks, cookie handling) cost ~75 us of
CPU per call on this machine against ~19 us here (`bench/run.py --suite client` measures both). Mirroring
doubles the upstream calls, so that difference decides how much shadow traffic one worker can carry.
What is kept: pooling with a connection limit, connect and total timeouts, TLS, chunked and
close-delimited bodies, back-pressure on streamed bodies, one replay of a request whose reused
connection turned out to be closed by the server before it answered.

Exceptions (transport failures; an HTTP error status is a Response like any other):

    ClientError
     ├── ConnectError       could not open a connection (os_error says why)
     ├── ConnectTimeout     the connection was not accepted within Timeout.connect
     ├── Disconnected       the server closed the connection before the response ended
     └── ProtocolError      the bytes that came back are not an HTTP/1.x response
    TimeoutError            the exchange did not end within Timeout.total (the builtin)
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024  # stop reading the socket while this much body waits for its consumer
LOW_WATER = 64 * 1024
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


class ClientError(Exception):
    pass


class ConnectError(ClientError):
    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class ConnectTimeout(ClientError):
    pass


class Disconnected(ClientError):
    def __init__(self, received: bool = False) -> None:
        super().__init__("the server closed the connection before the response ended")
        self.received = received  # some of the response had arrived: never replayed


class ProtocolError(ClientError):
    pass


@dataclass(frozen=True, slots=True)
class Timeout:
    total: float
    connect: float


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed URL: the connection key (scheme, host, port) and what the request line needs."""

    url: str
    origin: tuple[str, str, int]
    host_header: str
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        host_header = host if port == default else f"{host}:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(url, (parts.scheme, parts.hostname, port), host_header, path)

    def __str__(self) -> str:
        return self.url

    @property
    def host(self) -> str:
        return self.origin[1]

    @property
    def port(self) -> int:
        return self.origin[2]


class Response:
    """Status and headers once they are in; the body as it arrives (read, readany) or dropped (close)."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_headers",
        "_raw_headers",
        "_size",
        "_waiter",
        "_whole",
        "status",
    )

    def __init__(self, conn: Connection, status: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self._raw_headers = raw_headers
        self._headers: dict[str, str] | None = None
        self._conn: Connection | None = conn  # None once the body has ended or the response was closed
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._whole = False  # read() keeps everything anyway: no back-pressure

    @property
    def headers(self) -> dict[str, str]:
        """Lower-case names; repeated headers joined with ", ". Decoded on first use: most are never read."""
        if self._headers is None:
            headers: dict[str, str] = {}
            for raw_name, raw_value in self._raw_headers:
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self._headers = headers
        return self._headers

    async def read(self) -> bytes:
        """The whole body."""
        self._whole = True
        if self._conn is not None:
            self._conn.resume()
        while not self._done and self._error is None:
            await self._wait()
        if self._error is not None:
            raise self._error
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return data

    async def readany(self) -> bytes:
        """The next piece of the body as it came off the wire; b"" once it has ended."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            await self._wait()
        data = self._chunks.popleft()
        self._size -= len(data)
        conn = self._conn
        if conn is not None and conn.paused and self._size < LOW_WATER:
            conn.resume()
        return data

    def close(self) -> None:
        """Drop the rest of the body: a connection in mid-response cannot be reused, so it is closed."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._done:
            conn.abort()
        if self._error is None and not self._done:
            self._error = Disconnected(received=True)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> bool:
        """Called by the connection with a piece of body; True when the socket should pause."""
        self._chunks.append(data)
        self._size += len(data)
        self._wake()
        return self._size > HIGH_WATER and not self._whole

    def _finish(self) -> None:
        self._done = True
        self._conn = None
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self._done and self._error is None:
            self._error = error
        self._conn = None
        self._wake()


class Connection(asyncio.Protocol):
    """One keep-alive connection: a single exchange at a time, parsed as it arrives."""

    def __init__(self, pool: Pool, origin: tuple[str, str, int]) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.paused = False
        self.reused = False
        self.idle_since = 0.0
        self._busy = False
        self._received = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._until_eof = False
        self._informational = False
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            self.abort()  # bytes nobody asked for: the connection's state is unknown
            return
        self._received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(ProtocolError(f"malformed HTTP response: {exc}"))
            self.abort()

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        response = self._response
        if response is not None and self._until_eof and self._busy:
            self._busy = False
            self._cancel_timer()
            self._response = None
            response._finish()  # a body without length or chunking ends where the connection does
        elif self._busy:
            self._end(Disconnected(received=self._received))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        headers, self._headers = self._headers, []
        if status < 200:
            self._informational = True  # 1xx: a final response follows
            return
        self._until_eof = status not in (204, 304) and not any(_frames(n, v) for n, v in headers)
        response = self._response = Response(self, status, headers)
        head = self._head
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None and response._feed(body) and not self.paused and self.transport:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        response = self._response
        self._response = None
        self._busy = False
        self._cancel_timer()
        if response is not None:
            response._finish()
        if self.parser.should_keep_alive() and not self.closed:
            self.pool.release(self)
        else:
            self.abort()

    # the client's side

    def exchange(self, data: bytes, deadline: float) -> asyncio.Future[Response]:
        """Send a whole request; the future resolves with the response once its headers are in."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._busy = True
        self._received = False
        self._head = head = loop.create_future()
        self._timer = loop.call_at(deadline, self._expire)
        self.transport.write(data)
        return head

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()  # connection_lost follows, which settles any open exchange
        self.closed = True

    def _expire(self) -> None:
        self._timer = None
        self._end(TimeoutError())
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _end(self, error: BaseException) -> None:
        """Settle the exchange in progress with an error, wherever it stands."""
        self._busy = False
        self._cancel_timer()
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        response, self._response = self._response, None
        if response is not None:
            response._fail(error)


class Pool:
    """Keep-alive connections per origin, at most `limit` open in all; idle ones close after keepalive_s."""

    def __init__(
        self, limit: int = 1000, keepalive_s: float = 15.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.limit = limit
        self.keepalive_s = keepalive_s
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._open: set[Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(
        self,
        method: str,
        target: Target,
        headers: Mapping[str, str],
        body: bytes,
        timeout: Timeout,  # noqa: ASYNC109 - a deadline for the whole exchange, body reads included
    ) -> Response:
        """Send one request; returns once the response headers are in (the body is read from it)."""
        data = _encode(method, target, headers, body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout.total
        for replay in (False, True):
            conn = await self._acquire(target.origin, timeout.connect, deadline)
            try:
                return await conn.exchange(data, deadline)
            except Disconnected as exc:
                # A server may close an idle connection just as a request goes out on it: that request
                # never reached it, so it is sent once more on a new connection.
                if replay or not conn.reused or exc.received:
                    raise
            except BaseException:
                conn.abort()  # cancelled or failed mid-exchange: the connection's state is unknown
                raise
        raise AssertionError("unreachable")

    def stats(self) -> dict[str, int]:
        idle = sum(len(conns) for conns in self._idle.values())
        return {
            "open": len(self._open),
            "idle": idle,
            "busy": len(self._open) - idle,
            "waiting": len(self._waiters),
        }

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost

    def release(self, conn: Connection) -> None:
        """An exchange ended cleanly: the connection waits for the next request to its origin."""
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        conn.reused = True
        self._idle.setdefault(conn.origin, []).append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.keepalive_s, self._sweep)
        self._wake_one()

    def forget(self, conn: Connection) -> None:
        """A connection closed: it leaves the pool and makes room for another."""
        if conn in self._open:
            self._open.discard(conn)
            idle = self._idle.get(conn.origin)
            if idle is not None and conn in idle:
                idle.remove(conn)
            self._wake_one()

    async def _acquire(self, origin: tuple[str, str, int], connect_s: float, deadline: float) -> Connection:
        loop = asyncio.get_running_loop()
        while True:
            idle = self._idle.get(origin)
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    return conn
            if len(self._open) < self.limit or self._close_an_idle_connection():
                return await self._connect(origin, min(connect_s, deadline - loop.time()))
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self, origin: tuple[str, str, int], timeout_s: float) -> Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        conn = Connection(self, origin)
        self._open.add(conn)  # counts against the limit while it connects
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            tls = self._ssl_context = self._ssl_context or ssl.create_default_context()
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await loop.create_connection(lambda: conn, host, port, ssl=tls)
        except TimeoutError:
            self.forget(conn)
            raise ConnectTimeout(f"no connection within {timeout_s:g}s") from None
        except OSError as exc:
            self.forget(conn)
            raise ConnectError(exc) from exc
        except BaseException:
            self.forget(conn)
            conn.abort()
            raise
        return conn

    def _close_an_idle_connection(self) -> bool:
        for idle in self._idle.values():
            if idle:
                idle.pop(0).abort()
                return True
        return False

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        expired = loop.time() - self.keepalive_s
        for idle in self._idle.values():
            for conn in [c for c in idle if c.idle_since <= expired]:
                conn.abort()
        self._sweeper = loop.call_later(self.keepalive_s, self._sweep) if self._open else None


def _frames(name: bytes, value: bytes) -> bool:
    """Does this header delimit the body? Without one, the body ends where the connection does."""
    name = name.lower()
    return name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower())


def _encode(method: str, target: Target, headers: Mapping[str, str], body: bytes) -> bytes:
    lines = [f"{method} {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"]
    for name, value in headers.items():
        if name.lower() in FRAMING_HEADERS:
            raise ValueError(f"header {name!r} is the client's to set")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    head = "".join(lines)
    # One count instead of a scan per header: a CR or LF inside any name or value adds to it.
    if head.count("\n") != len(headers) + 4 or head.count("\r") != len(headers) + 4:
        raise ValueError("a request header contains a line break")
    return head.encode("latin-1") + body
