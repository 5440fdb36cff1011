"""Run ASGI apps with uvicorn: in the foreground (serve), or in a background thread (demo, tests)."""

from __future__ import annotations

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

MAX_HEAD_BYTES = 64 * 1024  # request line and headers, as nginx's large_client_header_buffers allows


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a bound on the request head: httptools itself has none, so a
    client could stream headers (or one endless header value) into memory forever. Past the bound the
    client gets a 431 in OpenAI's error format and the connection is closed."""

    _in_head = False
    _head_bytes = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._in_head:
            self._head_bytes = 0
            return
        self._head_bytes += len(data)  # all of it still head (or a pipelined request's start)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._in_head = False
            body = orjson.dumps(
                {
                    "error": {
                        "message": f"the request line and headers are over {MAX_HEAD_BYTES} bytes",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "request_header_fields_too_large",
                    }
                }
            )
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%b" % (len(body), body)
            )
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()


SERVER_OPTIONS: dict[str, Any] = {
    "loop": "uvloop",
    "http": BoundedHttpToolsProtocol,
    "access_log": False,
    "lifespan": "on",
}


class PortUnavailable(OSError):
    pass


class ReloadingMultiprocess(Multiprocess):
    """uvicorn's supervisor, except that SIGHUP is passed to every worker, which reloads its policies in
    place and keeps its last good ones, instead of restarting the workers."""

    def handle_hup(self) -> None:
        for process in self.processes:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGHUP)


def run(config: uvicorn.Config) -> None:
    if config.workers > 1:
        sock = config.bind_socket()
        ReloadingMultiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run()


class BackgroundServer:
    """An app served on 127.0.0.1 at an ephemeral (or given) port from a thread with its own loop."""

    def __init__(
        self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise PortUnavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.host = host
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, **SERVER_OPTIONS)
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
