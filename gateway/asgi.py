"""Raw ASGI helpers for the hot path: headers, bounded body reading, replies, disconnect watching."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any

from gateway.apis import error_body, error_event, renamed, renamed_events
from gateway.errors import GatewayError, PayloadTooLarge, RequestTimeout

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream"


REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def new_request_id() -> str:
    """The gateway's own id for a request: a UUID (some servers, llama-cpp-python among them, refuse any
    other x-request-id). It is what the client gets back, what goes upstream, and the key for feedback."""
    h = os.urandom(16).hex()  # a version-4 UUID, spelled out: a fifth of what uuid.UUID() costs
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def client_request_id(given: str | None) -> str | None:
    """The client's own x-request-id, when sane (1-128 visible ASCII): kept for logs and spans only,
    never forwarded upstream and never a key (a client must not pick another answer's id)."""
    return given if given and REQUEST_ID.match(given) else None


class ClientGone(Exception):
    """The client disconnected before the response was complete."""


def header_map(scope: Scope) -> dict[str, str]:
    # ASGI servers give lower-cased names; the last value of a repeated header wins.
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def read_body(
    receive: Receive, declared_length: str | None, limit: int, timeout_s: float | None = None
) -> bytes:
    """The whole body, bounded in size (413) and in time (408: a client that trickles its body in, or
    stops sending it, must not hold a connection and its memory for ever)."""
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > limit:
        raise _too_large(limit)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(receive, limit)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g}s (CANARYGATE_CLIENT_TIMEOUT_S)"
        ) from None


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body exceeds the gateway's limit of {limit} bytes; send a smaller request"
    )


class Reply:
    """Writes one response; remembers whether it started so a late error becomes an SSE error event."""

    __slots__ = (
        "api", "arm", "client_request_id", "fallback", "fallback_denied", "finished", "model", "request_id",
        "route", "send", "started", "status",
    )  # fmt: skip

    def __init__(self, send: Send, request_id: str, client_request_id: str | None = None) -> None:
        self.send = send
        self.request_id = request_id
        self.client_request_id = client_request_id
        self.route: str | None = None
        self.arm: str | None = None
        self.fallback: str | None = None  # why base answers instead of the candidate
        self.fallback_denied: str | None = None  # why a fallback that was due did not happen
        self.started = False
        self.finished = False
        self.status = 499  # until a response starts: the client closed the request (nginx's convention)
        self.api: str | None = None  # the API the client speaks, which its errors are told in
        self.model: str | None = None  # answer_model: route: what `model` says in the answer

    def context(self) -> tuple[str, str | None, str | None]:
        """(request id, route, arm): what every log line about this request carries (the request id with
        the client's own after it, when it sent one)."""
        rid = self.request_id
        if self.client_request_id is not None:
            rid = f"{rid} client_request_id={self.client_request_id}"
        return rid, self.route, self.arm

    def headers(
        self, content_type: bytes, extra: list[tuple[bytes, bytes]] | None = None
    ) -> list[tuple[bytes, bytes]]:
        out = [(b"content-type", content_type), (b"x-request-id", self.request_id.encode("latin-1"))]
        if self.route is not None:
            out.append((b"x-canarygate-route", self.route.encode("latin-1")))
        if self.arm is not None:
            out.append((b"x-canarygate-arm", self.arm.encode("latin-1")))
        if self.fallback is not None:
            out.append((b"x-canarygate-fallback", self.fallback.encode("latin-1")))
        if self.fallback_denied is not None:
            out.append((b"x-canarygate-fallback-denied", self.fallback_denied.encode("latin-1")))
        if extra:
            out.extend(extra)
        return out

    async def complete(
        self,
        status: int,
        body: bytes,
        content_type: bytes = JSON,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if self.model is not None and 200 <= status < 300:
            body = renamed(body, self.model)
        headers = self.headers(content_type, extra)
        headers.append((b"content-length", str(len(body)).encode()))
        self.started = True
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        self.finished = True
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def start_stream(self, status: int, content_type: bytes) -> None:
        headers = self.headers(content_type, [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")])
        self.started = True
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def chunk(self, data: bytes) -> None:
        if self.model is not None:
            data = renamed_events(data, self.model)
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end_stream(self) -> None:
        self.finished = True
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def error(self, exc: GatewayError) -> None:
        if self.finished:
            return  # the answer is out; the error is in the log only
        if not self.started:
            await self.complete(exc.status_code(), error_body(self.api, exc), JSON, exc.headers())
            return
        # Headers are gone: tell a streaming client the way its API does, with an error event.
        await self.chunk(error_event(self.api, exc))
        await self.end_stream()


class DisconnectWatch:
    """Cancels the request's task when the client disconnects, so the upstream call is abandoned too."""

    __slots__ = ("_finishing", "_receive", "_task", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._finishing = False
        self.gone = False

    def finishing(self) -> None:
        """Call before the last body message: the server reports a completed response as a disconnect."""
        self._finishing = True

    async def __aenter__(self) -> DisconnectWatch:
        self._task = asyncio.current_task()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if not self._finishing and self._task is not None:
                    self.gone = True
                    self._task.cancel()
                return

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
        if self.gone and exc_type is asyncio.CancelledError and self._task is not None:
            self._task.uncancel()
            raise ClientGone
        return False
