"""Run ASGI apps with uvicorn: in the foreground (serve), or in a background thread (demo, tests)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import threading
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from gateway.asgi import ASGIApp

log = logging.getLogger("gateway.server")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers, as nginx's large_client_header_buffers allows
DEFAULT_HEAD_TIMEOUT_S = 30.0
SHUTDOWN_IDLE_S = 1.0  # at shutdown, how long an idle keep-alive connection still takes one more request


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with bounds on the request head that neither has of its own:
    - size: httptools keeps an unfinished header in memory however long it grows, so past MAX_HEAD_BYTES
      (counted per request, pipelined ones included) the client gets a 431;
    - time: uvicorn waits for a head for ever (its keep-alive timer stops at the first byte), so a client
      that sends a head a byte at a time (slowloris), or connects and sends nothing, would hold a
      connection and its memory. The head must arrive within the config's head_timeout_s (the gateway sets
      CANARYGATE_CLIENT_TIMEOUT_S) of the connection or of the request's first byte: then a 408 (or, with
      no request begun, the connection is simply closed, like an idle keep-alive one).
    Errors are in OpenAI's format, and the connection is closed after them.

    At shutdown, an idle keep-alive connection is not closed at once, as uvicorn does: a proxy in front
    may be sending a request on it at that instant, and closing a connection with a request unread resets
    it (nginx answers 502 and never retries a POST). It stays open SHUTDOWN_IDLE_S more; a request that
    arrives meanwhile is answered with Connection: close, and the connection closes after that answer or
    when the time is up."""

    _draining = False
    _in_head = False  # between a request's first byte and the end of its headers
    _in_message = False  # between a request's first byte and its end
    _began = 0  # requests begun during the data being parsed
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        pipelined = self._in_message  # the data may end one request and begin the next
        self._began = 0
        super().data_received(data)
        if not self._in_head:
            self._head_bytes = 0
            return
        if self._began > 1 or (self._began and pipelined):
            self._head_bytes = 0  # how much of this data was the last request's is not known: one read
        else:
            self._head_bytes += len(data)  # at most, so the bound is MAX_HEAD_BYTES and one read
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._in_head = False
            self._refuse(
                b"431 Request Header Fields Too Large",
                "request_header_fields_too_large",
                f"the request line and headers are over {MAX_HEAD_BYTES} bytes",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = self._in_message = True
        self._began += 1
        if self._head_timer is None:
            self._start_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # the last request on this connection

    def shutdown(self) -> None:
        self._draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # closed once this answer is sent
            return
        self.loop.call_later(getattr(self.config, "shutdown_idle_s", SHUTDOWN_IDLE_S), self._close_if_idle)

    def _close_if_idle(self) -> None:
        idle = not self._in_message and (self.cycle is None or self.cycle.response_complete)
        if idle and not self.transport.is_closing():
            self.transport.close()  # otherwise it closes after the answer in progress

    def on_message_complete(self) -> None:
        self._in_message = False
        super().on_message_complete()

    def _start_head_timer(self) -> None:
        timeout = getattr(self.config, "head_timeout_s", DEFAULT_HEAD_TIMEOUT_S)
        self._head_timer = self.loop.call_later(timeout, self._head_timed_out, timeout)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self, timeout: float) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._in_head:
            self.transport.close()  # connected, and no request begun
            return
        self._in_head = False
        self._refuse(
            b"408 Request Timeout",
            "request_timeout",
            f"the request line and headers did not arrive within {timeout:g}s (CANARYGATE_CLIENT_TIMEOUT_S)",
        )

    def _refuse(self, status: bytes, code: str, message: str) -> None:
        body = orjson.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        )
        self.transport.write(
            b"HTTP/1.1 %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
            b"\r\n%b" % (status, len(body), body)
        )
        self.transport.close()


SERVER_OPTIONS: dict[str, Any] = {
    "loop": "uvloop",
    "http": BoundedHttpToolsProtocol,
    # Idle keep-alive connections are closed by the client first: httpx (the openai SDK) drops them after
    # 5 s, nginx's upstream keepalive after 60 s. uvicorn's own 5 s raced httpx's, and a request sent on a
    # connection the server was closing at that instant failed (seen as an APIConnectionError).
    "timeout_keep_alive": 65,
    "access_log": False,
    "lifespan": "on",
}


class PortUnavailable(OSError):
    pass


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: any free port), or PortUnavailable naming the address: uvicorn's
    own error for several workers said only "[Errno 98] Address already in use"."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = address(host, port)
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = (
                ": another process listens there; stop it, or choose another port (--port, CANARYGATE_PORT)"
            )
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = ": no interface of this machine has that address (--host, CANARYGATE_HOST)"
        raise PortUnavailable(f"cannot listen on {where}: {exc.strerror}{hint}") from None
    sock.set_inheritable(True)  # the workers of `serve --workers N` accept on it
    return sock


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ReloadingMultiprocess(Multiprocess):
    """uvicorn's supervisor, except that:
    - SIGHUP is passed to every worker, which reloads its policies in place and keeps its last good ones,
      instead of restarting the workers;
    - at shutdown it closes its own copy of the listening socket before it stops the workers. uvicorn's
      kept it open until it exited, so once the workers had stopped accepting, the kernel still queued
      connections on it that nobody would accept, and reset them when the supervisor exited: a proxy in
      front had sent requests on them (502s; a single-process server refuses new connections instead,
      which a proxy passes on to another replica)."""

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()

    def handle_hup(self) -> None:
        for process in self.processes:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGHUP)


def run(config: uvicorn.Config) -> None:
    """Bound here, before any worker starts, so that a port in use is told once, with its address."""
    sock = listen(config.host, config.port)
    where = address(*sock.getsockname()[:2])
    log.info("listening on http://%s (%d worker%s)", where, config.workers, "s" * (config.workers > 1))
    try:
        if config.workers > 1:
            ReloadingMultiprocess(config, sockets=[sock]).run()
        else:
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """An app served on 127.0.0.1 at an ephemeral (or given) port from a thread with its own loop."""

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S,
        shutdown_idle_s: float = 0.0,
    ) -> None:
        self._sock = listen(host, port)
        self.host = host
        self.port = self._sock.getsockname()[1]
        # log_config None: uvicorn leaves the process's logging as it is (its own would close every handler
        # already attached, the demo's log file among them)
        config = uvicorn.Config(
            app, log_level=log_level, log_config=None, timeout_graceful_shutdown=5, **SERVER_OPTIONS
        )
        config.head_timeout_s = head_timeout_s  # type: ignore[attr-defined]  # read by the protocol
        config.shutdown_idle_s = shutdown_idle_s  # type: ignore[attr-defined]  # tests, demo: stop at once
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"server-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])

    def start(self, timeout: float = 10) -> BackgroundServer:
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} failed to start")
            if waited > timeout:
                raise RuntimeError(f"server on port {self.port} did not start within {timeout}s")
            threading.Event().wait(0.02)
            waited += 0.02
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
