"""The hot-path HTTP/1.1 client against real loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trustme

from gateway.http1 import (
    HIGH_WATER,
    ConnectError,
    Disconnected,
    Pool,
    ProtocolError,
    Target,
    Timeout,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
TIMEOUT = Timeout(total=5, connect=2)


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()


async def read_request(reader: asyncio.StreamReader, server: Server) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length)
    server.requests.append(head + body)
    return head + body


@asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[Server, str]]:
    state = Server()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            await handler(reader, writer, state)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            state.closed.set()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield state, f"{'https' if tls else 'http'}://localhost:{port}/v1/chat/completions"


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
    while await read_request(reader, server) is not None:
        writer.write(OK)
        await writer.drain()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


async def post(pool: Pool, url: str, body: bytes = b"{}", timeout: Timeout = TIMEOUT) -> tuple[int, bytes]:
    resp = await pool.request("POST", Target.parse(url), {"Content-Type": "application/json"}, body, timeout)
    return resp.status, await resp.read()


def test_requests_reuse_one_keep_alive_connection() -> None:
    async def go() -> None:
        async with serve(keep_answering) as (server, url):
            pool = Pool()
            for _ in range(5):
                assert await post(pool, url, b'{"a":1}') == (200, b'{"ok":true}')
            await pool.close()
        assert server.connections == 1
        first = server.requests[0]
        assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:")
        assert b"Content-Length: 7\r\n" in first and first.endswith(b'{"a":1}')

    run(go())


def test_chunked_and_close_delimited_bodies_and_informational_responses() -> None:
    async def go() -> None:
        async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
            for piece in (b"data: one\n\n", b"data: two\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
            await keep_answering(reader, writer, server)

        async with serve(chunked) as (server, url):
            pool = Pool()
            resp = await pool.request("POST", Target.parse(url), {}, b"{}", TIMEOUT)
            assert resp.headers["x-a"] == "1, 2"
            pieces = []
            while piece := await resp.readany():
                pieces.append(piece)
            assert b"".join(pieces) == b"data: one\n\ndata: two\n\n"
            assert await post(pool, url) == (200, b'{"ok":true}')  # the connection was reusable
            assert server.connections == 1
            await pool.close()

        async def until_eof(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
        ) -> None:
            await read_request(reader, server)
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
            await writer.drain()

        async with serve(until_eof) as (server, url):
            pool = Pool()
            assert await post(pool, url) == (200, b"all of it")
            assert await post(pool, url) == (200, b"all of it")
            assert server.connections == 2  # HTTP/1.0 without keep-alive: a new connection each time
            await pool.close()

    run(go())


def test_a_request_on_a_connection_the_server_just_closed_is_sent_again() -> None:
    async def go() -> None:
        async def one_per_connection(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
        ) -> None:
            await read_request(reader, server)
            writer.write(OK)  # says nothing of closing, then closes without reading the next request
            await writer.drain()
            await reader.read(1)

        async with serve(one_per_connection) as (server, url):
            pool = Pool()
            assert await post(pool, url) == (200, b'{"ok":true}')
            assert await post(pool, url) == (200, b'{"ok":true}')
            assert await post(pool, url) == (200, b'{"ok":true}')
            assert len(server.requests) == 3
            await pool.close()

    run(go())


def test_a_connection_cut_mid_body_fails_the_read_and_is_not_replayed() -> None:
    async def go() -> None:
        async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            await writer.drain()

        async with serve(cut) as (server, url):
            pool = Pool()
            resp = await pool.request("POST", Target.parse(url), {}, b"{}", TIMEOUT)
            assert await resp.readany() == b"partial"
            with pytest.raises(Disconnected) as caught:
                await resp.readany()
            assert caught.value.received
            assert len(server.requests) == 1
            await pool.close()

    run(go())


def test_timeouts_garbage_and_refused_connections_raise_client_errors() -> None:
    async def go() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            await asyncio.sleep(10)

        async with serve(silent) as (_, url):
            pool = Pool()
            with pytest.raises(TimeoutError):
                await post(pool, url, timeout=Timeout(total=0.2, connect=0.2))
            await pool.close()

        async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            await asyncio.sleep(10)

        async with serve(trickle) as (_, url):
            pool = Pool()
            resp = await pool.request("POST", Target.parse(url), {}, b"{}", Timeout(total=0.3, connect=0.2))
            assert await resp.readany() == b"first"
            with pytest.raises(TimeoutError):  # the total covers the body too
                await resp.readany()
            await pool.close()

        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            writer.write(b"<html>this is not HTTP</html>\r\n\r\n")
            await writer.drain()
            await reader.read(1)

        async with serve(garbage) as (_, url):
            pool = Pool()
            with pytest.raises(ProtocolError):
                await post(pool, url)
            await pool.close()

        listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        listener.close()
        await listener.wait_closed()
        pool = Pool()
        with pytest.raises(ConnectError) as refused:
            await post(pool, f"http://127.0.0.1:{port}/v1")
        assert isinstance(refused.value.os_error, ConnectionRefusedError)
        await pool.close()

    run(go())


def test_header_values_cannot_inject_lines_or_framing() -> None:
    async def go() -> None:
        async with serve(keep_answering) as (server, url):
            pool = Pool()
            target = Target.parse(url)
            for headers in (
                {"X-A": "1\r\nX-Injected: 1"},
                {"X-A": "1\nX-Injected: 1"},
                {"X-A\r\nX-B": "1"},
                {"Content-Length": "0"},
                {"transfer-encoding": "chunked"},
            ):
                with pytest.raises(ValueError, match=r"line break|client's to set"):
                    await pool.request("POST", target, headers, b"{}", TIMEOUT)
            assert server.requests == []
            await pool.close()

    run(go())


def test_the_connection_limit_queues_requests_instead_of_opening_more() -> None:
    async def go() -> None:
        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            while await read_request(reader, server) is not None:
                await asyncio.sleep(0.05)
                writer.write(OK)
                await writer.drain()

        async with serve(slow) as (server, url):
            pool = Pool(limit=2)
            results = await asyncio.gather(*(post(pool, url) for _ in range(6)))
            assert all(r == (200, b'{"ok":true}') for r in results)
            assert server.connections == 2
            await pool.close()

    run(go())


def test_a_cancelled_exchange_closes_its_connection_and_idle_ones_expire() -> None:
    async def go() -> None:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            await reader.read(1)  # returns when the client closes

        async with serve(hold) as (server, url):
            pool = Pool()
            task = asyncio.ensure_future(post(pool, url))
            await asyncio.sleep(0.1)
            task.cancel()
            await asyncio.wait_for(server.closed.wait(), 2)
            await pool.close()

        async with serve(keep_answering) as (server, url):
            pool = Pool(keepalive_s=0.1)
            await post(pool, url)
            await asyncio.wait_for(server.closed.wait(), 2)  # the idle connection was swept
            assert await post(pool, url) == (200, b'{"ok":true}')
            assert server.connections == 2
            await pool.close()

    run(go())


def test_a_slow_consumer_pauses_the_socket_instead_of_buffering_everything() -> None:
    total = 8 * HIGH_WATER

    async def go() -> None:
        async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            for _ in range(total // 16384):
                writer.write(b"x" * 16384)
                await writer.drain()

        async with serve(flood) as (_, url):
            pool = Pool()
            resp = await pool.request("POST", Target.parse(url), {}, b"{}", Timeout(total=20, connect=2))
            await asyncio.sleep(0.3)  # the server writes as fast as it can; nobody reads
            buffered = resp._size
            assert HIGH_WATER < buffered < 2 * HIGH_WATER
            received = 0
            while piece := await resp.readany():
                received += len(piece)
            assert received == total  # everything arrived once reading resumed
            await pool.close()

    run(go())


def test_https_with_a_trusted_certificate() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def go() -> None:
        async with serve(keep_answering, tls=server_context) as (server, url):
            assert url.startswith("https://")
            pool = Pool(ssl_context=client_context)
            assert await post(pool, url) == (200, b'{"ok":true}')
            assert await post(pool, url) == (200, b'{"ok":true}')
            assert server.connections == 1
            await pool.close()
            untrusting = Pool()  # the system's roots do not know this CA
            with pytest.raises(ConnectError) as caught:
                await post(untrusting, url)
            assert isinstance(caught.value.os_error, ssl.SSLCertVerificationError)
            await untrusting.close()

    run(go())
