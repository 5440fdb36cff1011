"""The SSE relay alone, over an in-process stand-in for the upstream response."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.asgi import Reply
from gateway.errors import UpstreamError
from gateway.streaming import MAX_PENDING, event_end, first_data_end, relay


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


def run(
    first: bytes, rest: list[bytes | Exception], finishing: list[int] | None = None
) -> tuple[list[bytes], Any]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    def finished() -> None:
        if finishing is not None:
            finishing.append(len(sent))  # how much had been sent when the answer was declared complete

    async def go() -> Any:
        reply = Reply(send, "rid")
        reply.started = True
        return await relay(
            FakeResponse(rest),  # type: ignore[arg-type]
            reply,
            first,
            lambda exc: exc if isinstance(exc, UpstreamError) else UpstreamError(type(exc).__name__),
            finishing=finished,
        )

    error = asyncio.run(go())
    return [m["body"] for m in sent], error


FINISH = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
DONE = b"data: [DONE]\n\n"


def test_event_end() -> None:
    assert event_end(b"data: a\n\ndata: b") == 9
    assert event_end(b"data: a\r\n\r\n") == 11
    assert event_end(b"data: a") == 0


def test_events_split_across_chunks_are_sent_whole() -> None:
    bodies, error = run(b"data: one\n\ndata: t", [b"wo\n\ndata: three", b"\n\n" + FINISH])
    assert error is None
    assert bodies == [b"data: one\n\n", b"data: two\n\n", b"data: three\n\n" + FINISH]


def test_done_is_held_until_the_upstream_ends_cleanly_and_sent_after_finishing() -> None:
    finishing: list[int] = []
    bodies, error = run(b"data: one\n\n", [FINISH + DONE, b""], finishing)
    assert error is None
    assert bodies == [b"data: one\n\n", FINISH, DONE]
    assert finishing == [
        2
    ]  # declared complete before [DONE] went out: a client closing on it is no disconnect


def test_a_break_after_done_replaces_done_with_an_error_event() -> None:
    cut = UpstreamError("the candidate upstream closed the connection before its answer ended")
    bodies, error = run(b"data: one\n\n", [FINISH + DONE, cut])
    assert error is cut
    assert DONE not in b"".join(bodies)
    assert bodies[-2].startswith(b'data: {"error"') and bodies[-1] == b""


def test_a_clean_end_without_a_finish_reason_is_an_answer_cut_short() -> None:
    bodies, error = run(b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n', [DONE])
    assert isinstance(error, UpstreamError) and error.message == "CutShort"  # handed to the call to word
    assert DONE not in b"".join(bodies)
    assert bodies[-2].startswith(b'data: {"error"')


def test_keepalive_comments_and_empty_events_are_not_a_first_token() -> None:
    assert first_data_end(b": keepalive\n\n") == 0
    assert first_data_end(b": keepalive\n\ndata:\n\ndata: \r\n\r\n") == 0
    assert first_data_end(b": keepalive\n\ndata: {}\n\ndata: x") == len(b": keepalive\n\ndata: {}\n\n")


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
    assert bodies[1] == block
    assert bodies[2].startswith(b'data: {"error"')  # and it never said how it finished
