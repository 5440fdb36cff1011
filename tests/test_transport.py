"""The upstream transport (gateway.upstream on aiohttp) against real loopback servers that misbehave on
purpose: raw sockets where a well-behaved server could not produce the bytes."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import trustme
from aiohttp import ClientTimeout
from yarl import URL

from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout
from gateway.policy import Policy
from gateway.route import RouteArm, compile_policy
from gateway.upstream import Call, Response, Upstream, classify, proxy_for
from tests.conftest import Gateway, GatewayFactory, RawUpstream, Sim, policy_yaml
from tests.test_metrics import scrape, value

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.written = 0


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


def answer(body: bytes, head: bytes = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n") -> bytes:
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


@asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[Server, str]]:
    """A server on loopback; yields it and the base URL an arm is configured with."""
    state = Server()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            await handler(reader, writer, state)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
            state.closed.set()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield state, f"{'https' if tls else 'http'}://localhost:{port}/v1"


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
    while await read_request(reader, server) is not None:
        writer.write(OK)
        await writer.drain()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def make_arm(url: str, **fields: Any) -> RouteArm:
    policy = Policy.model_validate({"route": "r", "arms": {"base": {"url": url, "model": "m", **fields}}})
    route, _ = compile_policy(policy, Path("r.yaml"), {})
    return route.base


def call(
    arm: RouteArm, body: bytes = b"{}", *, stream: bool = False, total: float = 5, connect: float = 2
) -> Call:
    timeout = ClientTimeout(total=total, connect=connect)
    return Call(arm, "chat", body, {"Content-Type": "application/json"}, None, timeout, total, stream)


async def post(upstream: Upstream, arm: RouteArm, body: bytes = b"{}", **kwargs: Any) -> tuple[int, bytes]:
    resp = await upstream.open(call(arm, body, **kwargs))
    try:
        return resp.status, await resp.read()
    finally:
        resp.close()


@asynccontextmanager
async def client(environ: dict[str, str] | None = None) -> AsyncIterator[Upstream]:
    upstream = Upstream(environ or {})
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


def test_requests_reuse_one_keep_alive_connection() -> None:
    async def go() -> None:
        async with serve(keep_answering) as (server, url), client() as upstream:
            arm = make_arm(url)
            for _ in range(5):
                assert await post(upstream, arm, b'{"a":1}') == (200, b'{"ok":true}')
            (stats,) = upstream.stats()
            assert stats["in_flight"] == 0 and stats["idle"] == 1
        assert server.connections == 1
        first = server.requests[0]
        assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"Host: localhost:" in first and first.endswith(b'{"a":1}')

    run(go())


def test_chunked_bodies_trailers_and_informational_responses() -> None:
    async def go() -> None:
        async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                b"X-A: 1\r\nx-a: 2\r\n\r\n"
            )
            for piece in (b"data: one\n\n", b"data: two\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\nX-Trailer: leaked\r\n\r\n")  # a trailer: must not reach the next response
            await keep_answering(reader, writer, server)

        async with serve(chunked) as (server, url), client() as upstream:
            arm = make_arm(url)
            resp = await upstream.open(call(arm, stream=True))
            assert resp.headers.getall("x-a") == ["1", "2"]
            pieces = []
            while piece := await resp.readany():
                pieces.append(piece)
            resp.close()
            assert b"".join(pieces) == b"data: one\n\ndata: two\n\n"
            second = await upstream.open(call(arm))
            assert "x-trailer" not in second.headers
            assert await second.read() == b'{"ok":true}'
            second.close()
            assert server.connections == 1  # the connection was reusable after the trailer

    run(go())


def test_two_responses_in_one_write_never_give_one_user_anothers_answer() -> None:
    async def go() -> None:
        async def doubled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            first = True
            while (request := await read_request(reader, server)) is not None:
                body = request.split(b"\r\n\r\n", 1)[1]
                reply = answer(body)
                writer.write(reply + answer(b'{"n":"stray"}') if first else reply)  # two in one write
                first = False
                await writer.drain()

        async with serve(doubled) as (_, url), client() as upstream:
            arm = make_arm(url)
            assert await post(upstream, arm, b'{"n":0}') == (200, b'{"n":0}')
            results = await asyncio.gather(*(post(upstream, arm, b'{"n":%d}' % n) for n in range(1, 9)))
            assert results == [(200, b'{"n":%d}' % n) for n in range(1, 9)]
            (stats,) = upstream.stats()
            assert stats["in_flight"] == 0

    run(go())


def test_a_post_is_never_sent_twice_even_when_the_connection_closes_before_the_answer() -> None:
    async def go() -> None:
        async def drop_second(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
        ) -> None:
            await read_request(reader, server)
            writer.write(OK)  # keep-alive, then the next request is read (processed) and left unanswered
            await writer.drain()
            await read_request(reader, server)

        async with serve(drop_second) as (server, url), client() as upstream:
            arm = make_arm(url)
            assert await post(upstream, arm, b'{"n":1}') == (200, b'{"ok":true}')
            with pytest.raises(UpstreamError, match="closed the connection before its answer ended"):
                await post(upstream, arm, b'{"n":2}')
            bodies = [r.split(b"\r\n\r\n", 1)[1] for r in server.requests]
            assert bodies == [b'{"n":1}', b'{"n":2}']  # sent once, not replayed on a new connection

    run(go())


def test_a_connection_cut_mid_body_fails_the_read() -> None:
    async def go() -> None:
        async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100\r\n\r\npartial"
            )
            await writer.drain()

        async with serve(cut) as (server, url), client() as upstream:
            resp = await upstream.open(call(make_arm(url), stream=True))
            assert await resp.readany() == b"partial"
            with pytest.raises(UpstreamError, match="closed the connection before its answer ended"):
                await resp.readany()
            resp.close()
            assert len(server.requests) == 1

    run(go())


def test_timeouts_garbage_and_refused_connections_say_what_happened() -> None:
    async def go() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            await asyncio.sleep(10)

        async with serve(silent) as (_, url), client() as upstream:
            with pytest.raises(UpstreamTimeout, match=r"did not finish within 0.3s"):
                await post(upstream, make_arm(url), total=0.3, connect=0.2)

        async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            writer.write(head + b"5\r\nfirst\r\n")
            await writer.drain()
            await asyncio.sleep(10)

        async with serve(trickle) as (_, url), client() as upstream:
            resp = await upstream.open(call(make_arm(url), stream=True, total=0.5, connect=0.2))
            assert await resp.readany() == b"first"
            with pytest.raises(UpstreamTimeout):  # the total covers the body too
                await resp.readany()
            resp.close()

        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            writer.write(b"<html>this is not HTTP</html>\r\n\r\n")
            await writer.drain()
            await reader.read(1)

        async with serve(garbage) as (_, url), client() as upstream:
            with pytest.raises(UpstreamError, match="malformed HTTP response") as caught:
                await post(upstream, make_arm(url))
            assert caught.value.code == "upstream_protocol_error"

        listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        listener.close()
        await listener.wait_closed()
        async with client() as upstream:
            with pytest.raises(UpstreamError) as refused:
                await post(upstream, make_arm(f"http://127.0.0.1:{port}/v1"))
            assert refused.value.message == "could not connect to the base upstream: connection refused"

    run(go())


def test_the_bulkhead_queues_then_bounds_the_wait_for_a_connection() -> None:
    async def go() -> None:
        release = asyncio.Event()

        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            while await read_request(reader, server) is not None:
                await release.wait()
                writer.write(OK)
                await writer.drain()

        async with serve(slow) as (server, url), client() as upstream:
            arm = make_arm(url, max_connections=2)
            queued = [asyncio.ensure_future(post(upstream, arm)) for _ in range(6)]
            while len(server.requests) < 2:
                await asyncio.sleep(0.01)
            (stats,) = upstream.stats()
            assert stats["in_flight"] == 6 and server.connections == 2  # four wait for the two
            release.set()
            assert await asyncio.gather(*queued) == [(200, b'{"ok":true}')] * 6
            assert server.connections == 2

            release.clear()
            held = [asyncio.ensure_future(post(upstream, arm)) for _ in range(2)]
            while len(server.requests) < 8:
                await asyncio.sleep(0.01)
            with pytest.raises(UpstreamTimeout, match=r"all 2 connections .* stayed busy"):
                await post(upstream, arm, connect=0.2)  # the wait for a free one counts against connect_s
            release.set()
            await asyncio.gather(*held)

    run(go())


def test_a_cancelled_call_closes_its_connection_and_idle_ones_expire() -> None:
    async def go() -> None:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            await reader.read(1)  # returns when the client closes

        async with serve(hold) as (server, url), client() as upstream:
            task = asyncio.ensure_future(post(upstream, make_arm(url)))
            while not server.requests:
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.wait_for(server.closed.wait(), 5)
            (stats,) = upstream.stats()
            assert stats["in_flight"] == 0

        async with serve(keep_answering) as (server, url), client() as upstream:
            arm = make_arm(url, keepalive_s=0.1)
            await post(upstream, arm)
            await asyncio.wait_for(server.closed.wait(), 5)  # the idle connection was closed by us
            assert await post(upstream, arm) == (200, b'{"ok":true}')
            assert server.connections == 2

    run(go())


def test_a_slow_consumer_holds_the_upstream_back_instead_of_buffering_everything() -> None:
    total = 256 * 1024 * 1024

    async def go() -> None:
        async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % total
            )
            block = b"x" * 65536
            while server.written < total:
                writer.write(block)
                await writer.drain()
                server.written += len(block)

        async with serve(flood) as (server, url), client() as upstream:
            resp = await upstream.open(call(make_arm(url), stream=True, total=60))
            for _ in range(20):  # the server writes as fast as it can; nobody reads
                await asyncio.sleep(0.05)
            assert server.written < total // 8  # held back by the socket, not drained into memory
            resp.close()

    run(go())


def test_response_heads_and_bodies_are_bounded() -> None:
    async def go() -> None:
        async def endless_head(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
        ) -> None:
            await read_request(reader, server)
            writer.write(b"HTTP/1.1 200 OK\r\n")
            for n in range(1_000_000):  # 200+ MiB of headers, if anyone kept reading
                writer.write(b"X-Flood-%d: %s\r\n" % (n, b"y" * 200))
                await writer.drain()

        async with serve(endless_head) as (_, url), client() as upstream:
            with pytest.raises(UpstreamError, match="response head past the limits"):
                await post(upstream, make_arm(url))

        async def long_line(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
        ) -> None:
            await read_request(reader, server)
            writer.write(b"HTTP/1.1 200 OK\r\nX-Long: " + b"z" * 100_000 + b"\r\n\r\n")
            await writer.drain()
            await reader.read(1)

        async with serve(long_line) as (_, url), client() as upstream:
            with pytest.raises(UpstreamError, match="response head past the limits"):
                await post(upstream, make_arm(url))

        async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            chunked = b"chunked" in server.requests[-1]
            framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % (192 * 2**20)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n")
            block = b"x" * 65536
            for _ in range(192 * 16):
                writer.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                await writer.drain()

        async with serve(huge) as (_, url), client() as upstream:
            arm = make_arm(url, max_response_bytes=1024 * 1024)
            for marker in (b"{}", b'{"chunked":1}'):
                with pytest.raises(
                    UpstreamError, match=r"larger than 1048576 bytes \(arms.base.max_resp"
                ) as e:
                    await post(upstream, arm, marker)
                assert e.value.code == "upstream_response_too_large"

    run(go())


@pytest.mark.parametrize(
    ("head", "problem"),
    [
        (b"HTTP/1.1 301 Moved Permanently\r\nLocation: /elsewhere\r\nContent-Type: text/html", "HTTP 301"),
        (b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/\r\nContent-Type: text/html", "HTTP 302"),
        (b"HTTP/1.1 204 No Content", "HTTP 204"),
        (b"HTTP/1.1 999 Whatever", "HTTP 999"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade", "HTTP 101"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/html", "with text/html, not application/json"),
    ],
)
def test_answers_that_are_not_answers_are_protocol_errors(head: bytes, problem: str) -> None:
    async def go() -> None:
        async def odd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            body = b"" if b" 204 " in head or b" 101 " in head else b"<html>moved</html>"
            writer.write(head + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
            await reader.read(1)

        async with serve(odd) as (server, url), client() as upstream:
            with pytest.raises(UpstreamError, match=problem) as caught:
                await post(upstream, make_arm(url))
            assert caught.value.code == "upstream_protocol_error"
            assert len(server.requests) == 1  # no redirect was followed

    run(go())


def test_classify() -> None:
    assert classify(200, "application/json; charset=utf-8", stream=False) is None
    assert classify(200, "application/vnd.api+json", stream=False) is None
    assert classify(200, None, stream=False) is None
    assert classify(200, "text/event-stream", stream=True) is None
    assert classify(503, "text/html", stream=True) is None  # an error status: passed on as one
    assert classify(200, "application/json", stream=True) == (
        "answered a stream request with application/json, not text/event-stream"
    )
    assert classify(103, None, stream=False) is not None


def test_a_compressed_body_is_decoded_before_anyone_reads_it() -> None:
    body = orjson.dumps({"choices": [{"message": {"content": "hi " * 500}}]})

    async def go() -> None:
        async def zipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            await read_request(reader, server)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            writer.write(answer(gzip.compress(body), head))  # sent despite Accept-Encoding: identity
            await writer.drain()
            await reader.read(1)

        async with serve(zipped) as (_, url), client() as upstream:
            assert await post(upstream, make_arm(url)) == (200, body)

    run(go())


def test_proxy_settings_from_the_environment() -> None:
    origin = URL("http://vllm-base:8000")
    assert proxy_for(origin, {}) is None
    assert proxy_for(origin, {"HTTP_PROXY": "http://proxy:3128"}) == URL("http://proxy:3128")
    assert proxy_for(origin, {"http_proxy": "proxy:3128"}) == URL("http://proxy:3128")
    assert proxy_for(URL("https://vllm:443"), {"HTTP_PROXY": "http://proxy:3128"}) is None
    assert proxy_for(URL("https://vllm:443"), {"HTTPS_PROXY": "http://p:1"}) == URL("http://p:1")
    assert proxy_for(origin, {"HTTP_PROXY": "http://p:1", "NO_PROXY": "localhost,vllm-base"}) is None
    assert proxy_for(origin, {"HTTP_PROXY": "http://p:1", "no_proxy": ".example.com"}) == URL("http://p:1")

    async def go() -> None:
        async def forward_proxy(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
        ) -> None:
            await read_request(reader, server)
            writer.write(answer(b'{"via":"proxy"}'))
            await writer.drain()
            await reader.read(1)

        async with serve(forward_proxy) as (proxy, proxy_url):
            proxy_origin = proxy_url.removesuffix("/v1").replace("localhost", "127.0.0.1")
            async with client({"HTTP_PROXY": proxy_origin}) as upstream:
                arm = make_arm("http://vllm-base.internal:8000/v1")
                assert await post(upstream, arm) == (200, b'{"via":"proxy"}')
            assert proxy.requests[0].startswith(b"POST http://vllm-base.internal:8000/v1/chat/completions ")

    run(go())


def _tls_server(ca: trustme.CA, host: str, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(context)
    if require_client_cert:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def test_tls_per_arm_private_ca_mtls_and_clear_failures(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    client_cert = ca.issue_cert("gateway")
    cert_file = tmp_path / "client.pem"
    client_cert.private_key_and_cert_chain_pem.write_to_path(cert_file)

    async def go() -> None:
        async with serve(keep_answering, tls=_tls_server(ca, "localhost")) as (server, url), client() as up:
            assert url.startswith("https://")
            arm = make_arm(url, tls={"ca_file": str(ca_file)})
            assert await post(up, arm) == (200, b'{"ok":true}')
            assert await post(up, arm) == (200, b'{"ok":true}')
            assert server.connections == 1
            with pytest.raises(UpstreamError, match="TLS certificate verify failed for the base upstream"):
                await post(up, make_arm(url))  # the system's roots only: they do not know this CA
            assert await post(up, make_arm(url + "/", tls={"verify": False})) == (200, b'{"ok":true}')

        async with serve(keep_answering, tls=_tls_server(ca, "vllm-tuned")) as (_, url), client() as up:
            with pytest.raises(GatewayError) as caught:
                await post(up, make_arm(url, tls={"ca_file": str(ca_file)}))
            assert caught.value.message == (
                "TLS certificate verify failed for the base upstream: hostname mismatch for localhost"
            )
            assert caught.value.code == "upstream_tls_error"

        mtls = _tls_server(ca, "localhost", require_client_cert=True)
        async with serve(keep_answering, tls=mtls) as (_, url), client() as up:
            with_cert = make_arm(url, tls={"ca_file": str(ca_file), "client_cert_file": str(cert_file)})
            assert await post(up, with_cert) == (200, b'{"ok":true}')

        async def plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: Server) -> None:
            await reader.read(1)  # a TLS hello, answered as a plain HTTP server does
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()

        async with serve(plain_http) as (_, url), client() as up:
            plain = url.replace("http://", "https://")
            with pytest.raises(UpstreamError, match="TLS handshake with the base upstream failed"):
                await post(up, make_arm(plain, tls={"ca_file": str(ca_file)}))
            vanishing = make_arm(plain, tls={"ca_file": str(cert_file)})
            cert_file.unlink()  # loaded with the policy, gone before the arm's first call
            with pytest.raises(
                UpstreamError, match=r"the base arm's tls settings: ca_file: cannot read .*client.pem"
            ):
                await post(up, vanishing)

    run(go())


def test_every_call_gives_its_connection_slot_back() -> None:

    async def go() -> None:
        async def mixed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
            while (request := await read_request(reader, server)) is not None:
                if b"fail" in request:
                    writer.write(answer(b'{"error":{"message":"no"}}', b"HTTP/1.1 500 Oops\r\n"))
                else:
                    writer.write(OK)
                await writer.drain()

        async with serve(mixed) as (_, url), client() as upstream:
            arm = make_arm(url)
            responses: list[Response] = []
            for body in (b"{}", b'{"fail":1}'):
                resp = await upstream.open(call(arm, body))
                responses.append(resp)
            assert [r.status for r in responses] == [200, 500]
            assert upstream.stats()[0]["in_flight"] == 2
            for resp in responses:
                resp.close()
                resp.close()  # twice is harmless
            assert upstream.stats()[0]["in_flight"] == 0

    run(go())


# --- end to end: the gateway as a real server, the openai SDK as the client -------------------------

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "created": 0,
        "model": "tuned-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
)


def _flood_head(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    for n in range(1_000_000):
        conn.sendall(b"X-Flood-%d: %s\r\n" % (n, b"y" * 200))


def _flood_body(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    block = b"x" * 65536
    for _ in range(192 * 16):
        conn.sendall(b"%x\r\n%s\r\n" % (len(block), block))


RAW: dict[str, Callable[[socket.socket], None]] = {
    "redirect": lambda c: c.sendall(
        b"HTTP/1.1 301 Moved\r\nLocation: /x\r\nContent-Type: text/html\r\nContent-Length: 4\r\n\r\n<a/>"
    ),
    "nocontent": lambda c: c.sendall(b"HTTP/1.1 204 No Content\r\n\r\n"),
    "unknown": lambda c: c.sendall(b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n"),
    "upgrade": lambda c: c.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    ),
    "html": lambda c: c.sendall(
        answer(b"<html>login</html>", b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n")
    ),
    "gzip": lambda c: c.sendall(
        answer(
            gzip.compress(COMPLETION),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n",
        )
    ),
    "headflood": _flood_head,
    "bodyflood": _flood_body,
    "proxy": lambda c: c.sendall(answer(COMPLETION)),
}


@pytest.fixture
def raw() -> Iterator[RawUpstream]:
    upstream = RawUpstream(RAW)
    yield upstream
    upstream.close()


def _runtime(gw: Gateway) -> dict[str, Any]:
    response = httpx.get(f"{gw.url}/admin/runtime", headers={"Authorization": "Bearer admin"})
    return response.json()  # type: ignore[no-any-return]


def _pool(gw: Gateway, route: str, arm: str) -> dict[str, Any]:
    return next(p for p in _runtime(gw)["upstream_pools"] if p["route"] == route and p["arm"] == arm)


def test_a_hung_candidate_holds_only_its_own_connections(
    sims: tuple[Sim, Sim], raw: RawUpstream, make_gateway: GatewayFactory
) -> None:
    chat = policy_yaml(
        "chat",
        sims[0].url,
        f"{raw.url}/hang/v1",
        weight=100,
        candidate_extra="max_connections: 4",
        extra="assignment: {allow_override_header: true}\ntimeouts: {connect_s: 0.5, total_s: 60}",
    )
    gw = make_gateway({"chat": chat, "other": policy_yaml("other", sims[0].url)}, admin_token="admin")
    client = gw.client()
    messages: Any = [{"role": "user", "content": "hi"}]
    with ThreadPoolExecutor(4) as pool:
        held = [
            pool.submit(client.chat.completions.with_raw_response.create, model="chat", messages=messages)
            for _ in range(4)
        ]
        for _ in range(4):
            assert raw.hanging.acquire(timeout=30)  # all four of the candidate's connections are taken
        assert _pool(gw, "chat", "candidate")["in_flight"] == 4

        # The base of the same route, another route, and a fallback still answer meanwhile.
        other = client.chat.completions.with_raw_response.create(model="other", messages=messages)
        assert other.headers["x-canarygate-arm"] == "base"
        pinned = client.chat.completions.with_raw_response.create(
            model="chat", messages=messages, extra_headers={"x-canary": "base"}
        )
        assert pinned.headers["x-canarygate-arm"] == "base"
        waited = client.chat.completions.with_raw_response.create(model="chat", messages=messages)
        assert (waited.headers["x-canarygate-arm"], waited.headers["x-canarygate-fallback"]) == (
            "base",
            "timeout",
        )
        assert waited.parse().choices[0].message.content

        raw.release()  # the hung calls now fail and fall back as well
        for future in held:
            assert future.result().headers["x-canarygate-arm"] == "base"
    assert _pool(gw, "chat", "candidate")["in_flight"] == 0


@pytest.mark.parametrize("behaviour", ["redirect", "nocontent", "unknown", "upgrade", "html"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_answers_that_are_not_answers_fall_back_or_fail_clearly(
    behaviour: str, stream: bool, sims: tuple[Sim, Sim], raw: RawUpstream, make_gateway: GatewayFactory
) -> None:
    gw = make_gateway(
        {
            "chat": policy_yaml("chat", sims[0].url, f"{raw.url}/{behaviour}/v1", weight=100),
            "alone": policy_yaml("alone", f"{raw.url}/{behaviour}/v1"),
        }
    )
    client = gw.client()
    messages: Any = [{"role": "user", "content": "hi"}]
    fell_back = client.chat.completions.with_raw_response.create(
        model="chat", messages=messages, stream=stream
    )
    assert fell_back.headers["x-canarygate-arm"] == "base"
    assert fell_back.headers["x-canarygate-fallback"] == "connect_error"
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="alone", messages=messages, stream=stream)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_protocol_error"
    assert "the base upstream answered" in caught.value.message
    assert "Traceback" not in caught.value.response.text
    outcomes = scrape(gw.url)
    assert value(outcomes, "canarygate_requests_total", route="chat", arm="candidate", outcome="ok") == 0
    assert (
        value(outcomes, "canarygate_requests_total", route="chat", arm="candidate", outcome="upstream_error")
        == 1
    )


def test_a_compressed_answer_reaches_the_client_decoded(
    sims: tuple[Sim, Sim], raw: RawUpstream, make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url, f"{raw.url}/gzip/v1", weight=100)})
    response = gw.post(
        "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "x"}]}
    )
    assert response.headers["x-canarygate-arm"] == "candidate"
    assert "content-encoding" not in response.headers
    assert response.json()["choices"][0]["message"]["content"] == "hi"


@pytest.mark.parametrize("behaviour", ["headflood", "bodyflood"])
def test_floods_from_an_upstream_leave_memory_bounded(
    behaviour: str, sims: tuple[Sim, Sim], raw: RawUpstream, make_gateway: GatewayFactory
) -> None:
    chat = policy_yaml(
        "chat",
        sims[0].url,
        f"{raw.url}/{behaviour}/v1",
        weight=100,
        candidate_extra="max_response_bytes: 4194304",
    )
    gw = make_gateway({"chat": chat}, admin_token="admin")
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
    assert gw.post("/v1/chat/completions", json=body).status_code == 200  # warm up
    before = _runtime(gw)["rss_bytes"]
    for _ in range(4):
        response = gw.post("/v1/chat/completions", json=body)
        assert (response.status_code, response.headers["x-canarygate-arm"]) == (200, "base")
    assert _runtime(gw)["rss_bytes"] - before < 64 * 2**20  # 150-576 MiB with the earlier client


def test_tls_and_proxy_failures_say_what_happened(
    sims: tuple[Sim, Sim],
    raw: RawUpstream,
    make_gateway: GatewayFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    server = _tls_server(ca, "vllm-tuned")
    listener = socket.create_server(("127.0.0.1", 0))
    tls_url = f"https://localhost:{listener.getsockname()[1]}/v1"

    def accept() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with (
                contextlib.suppress(OSError, ssl.SSLError),
                server.wrap_socket(conn, server_side=True) as tls,
            ):
                tls.recv(1)

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("HTTP_PROXY", raw.url)  # read when an arm's pool is built: on its first call
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # the test's own clients reach the gateway direct
    gw = make_gateway(
        {
            "tls": policy_yaml("tls", tls_url, base_extra=f"tls: {{ca_file: {ca_file}}}"),
            "proxied": policy_yaml("proxied", "http://vllm-base.internal:8000/v1"),
        }
    )
    client = gw.client()
    messages: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tls", messages=messages)
    listener.close()
    assert caught.value.status_code == 502
    error = caught.value.response.json()["error"]
    assert error["code"] == "upstream_tls_error"
    assert (
        error["message"]
        == "TLS certificate verify failed for the base upstream: hostname mismatch for localhost"
    )
    answer = client.chat.completions.create(model="proxied", messages=messages)
    assert answer.choices[0].message.content == "hi"
    assert raw.requests[-1].startswith(b"POST http://vllm-base.internal:8000/v1/chat/completions HTTP/1.1")


def test_secrets_are_scrubbed_as_sent_and_as_json_escapes_them_never_inside_other_words() -> None:
    from gateway.upstream import scrub

    key = 'k/ey"é-7'
    text = (
        b'{"error": {"message": "bad key k/ey\\"\\u00e9-7 (also k\\/ey\\"\\u00e9-7), '
        + 'raw: k/ey"é-7'.encode()
        + b', keyboard k/ey\\"\\u00e9-77 stays"}}'
    )
    scrubbed = scrub(text, [key, None])
    assert scrubbed.count(b"[REDACTED]") == 3
    assert b"k/ey" not in scrubbed.replace(b'k/ey\\"\\u00e9-77', b"")  # only the longer word is left
    assert b'k/ey\\"\\u00e9-77' in scrubbed  # a longer token that merely contains it is not corrupted
    assert scrub(b"the token tok is not tokenised", ["tok"]) == b"the token [REDACTED] is not tokenised"
