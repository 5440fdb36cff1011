"""The SSE relay alone, over an in-process stand-in for the upstream response."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.asgi import Reply
from gateway.errors import UpstreamError
from gateway.streaming import MAX_PENDING, event_end, relay


class FakeResponse:
    def __init__(self, chunks: list[bytes | Exception]) -> None:
        self.chunks = chunks

    async def readany(self) -> bytes:
        if not self.chunks:
            return b""
        item = self.chunks.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def run(first: bytes, rest: list[bytes | Exception]) -> tuple[list[bytes], Any]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def go() -> Any:
        reply = Reply(send, "rid")
        reply.started = True
        return await relay(FakeResponse(rest), reply, first, lambda exc: UpstreamError("broke"))  # type: ignore[arg-type]

    error = asyncio.run(go())
    return [m["body"] for m in sent], error


def test_event_end() -> None:
    assert event_end(b"data: a\n\ndata: b") == 9
    assert event_end(b"data: a\r\n\r\n") == 11
    assert event_end(b"data: a") == 0


def test_events_split_across_chunks_are_sent_whole() -> None:
    bodies, error = run(b"data: one\n\ndata: t", [b"wo\n\ndata: three", b"\n\n"])
    assert error is None
    assert bodies == [b"data: one\n\n", b"data: two\n\n", b"data: three\n\n"]


def test_failure_drops_the_partial_event_and_sends_an_error_event() -> None:
    cut = UpstreamError("the candidate upstream's answer broke off", code="upstream_protocol_error")
    bodies, error = run(b"data: one\n\ndata: par", [cut])
    assert isinstance(error, UpstreamError)
    assert bodies[0] == b"data: one\n\n"
    assert bodies[1].startswith(b'data: {"error"')
    assert bodies[-1] == b""  # the stream is ended properly


def test_output_without_event_boundaries_is_not_held_without_bound() -> None:
    block = b"x" * (MAX_PENDING // 2 + 1)
    bodies, _ = run(block, [block, block])
    assert bodies[0] == block * 2  # flushed as soon as the pending bytes pass the bound
    assert b"".join(bodies) == block * 3
