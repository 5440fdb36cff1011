"""SSE: the relay (whole events, as they arrive; a failure mid-stream becomes an SSE error event),
event parsing, and delta accumulation into a complete answer for validation."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from gateway.asgi import Reply
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.upstream import Response

# An upstream that never ends an event must not make the gateway hold its output without bound.
MAX_PENDING = 1024 * 1024


def event_end(data: bytes) -> int:
    """Index just past the last complete SSE event in data (0 when none is complete)."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


async def relay(
    resp: Response,
    reply: Reply,
    first: bytes,
    on_failure: Callable[[BaseException], GatewayError],
    observe: Callable[[bytes], object] | None = None,
) -> GatewayError | None:
    """Send first and every later chunk, cut at event boundaries so an error event never splits one.
    observe, when given, sees every chunk too (to validate what passes through).

    Returns the failure that ended the stream early (already sent to the client), or None.
    """
    pending = b""
    data = first
    try:
        while data:
            if observe is not None:
                observe(data)
            pending = pending + data if pending else data
            cut = event_end(pending)
            if cut == len(pending) or len(pending) > MAX_PENDING:
                await reply.chunk(pending)
                pending = b""
            elif cut:
                await reply.chunk(pending[:cut])
                pending = pending[cut:]
            data = await resp.readany()
    except GatewayError as exc:  # the upstream failed mid-stream (Response maps transport errors)
        error = on_failure(exc)
        await reply.error(error)
        return error
    if pending:
        await reply.chunk(pending)
    return None


class EventParser:
    """Splits an SSE byte stream into the parsed JSON of its data events ([DONE] is dropped)."""

    def __init__(self) -> None:
        self._pending = b""
        self.malformed = 0

    def feed(self, data: bytes) -> list[Any]:
        self._pending += data
        cut = event_end(self._pending)
        if not cut:
            return []
        complete, self._pending = self._pending[:cut], self._pending[cut:]
        events = []
        for block in complete.replace(b"\r\n", b"\n").split(b"\n\n"):
            payload = b"\n".join(
                line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")
            )
            if not payload or payload == b"[DONE]":
                continue
            try:
                events.append(orjson.loads(payload))
            except orjson.JSONDecodeError:
                self.malformed += 1
        return events


class Accumulator:
    """Rebuilds a streamed answer (chat deltas or completion texts) into the shape of a complete one,
    so the same checks apply to streamed and non-streamed answers."""

    @classmethod
    def of(cls, stream: bytes) -> Accumulator:
        """A whole buffered stream, rebuilt."""
        accumulator = cls()
        observer(None, accumulator)(stream)
        return accumulator

    def __init__(self) -> None:
        self._choices: dict[int, dict[str, Any]] = {}
        self._calls: dict[int, dict[int, dict[str, Any]]] = {}
        self.error: Any = None

    def add(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        if "error" in event:
            self.error = event["error"]
        for choice in event.get("choices") or ():
            if isinstance(choice, dict):
                self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0) if isinstance(choice.get("index"), int) else 0
        entry = self._choices.setdefault(index, {"index": index, "content": None, "text": None})
        if isinstance(choice.get("finish_reason"), str):
            entry["finish_reason"] = choice["finish_reason"]
        if isinstance(choice.get("text"), str):
            entry["text"] = (entry["text"] or "") + choice["text"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        if isinstance(delta.get("content"), str):
            entry["content"] = (entry["content"] or "") + delta["content"]
        if isinstance(delta.get("function_call"), dict):
            call = entry.setdefault("function_call", {"name": "", "arguments": ""})
            _merge_function(call, delta["function_call"])
        for piece in delta.get("tool_calls") or ():
            if not isinstance(piece, dict):
                continue
            position = piece.get("index", 0) if isinstance(piece.get("index"), int) else 0
            calls = self._calls.setdefault(index, {})
            call = calls.setdefault(
                position, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            call["id"] = call["id"] or piece.get("id")
            if isinstance(piece.get("function"), dict):
                _merge_function(call["function"], piece["function"])

    def chat_body(self) -> dict[str, Any]:
        choices = []
        for index, entry in sorted(self._choices.items()):
            message: dict[str, Any] = {"role": "assistant", "content": entry["content"]}
            if index in self._calls:
                message["tool_calls"] = [call for _, call in sorted(self._calls[index].items())]
            if "function_call" in entry:
                message["function_call"] = entry["function_call"]
            choices.append({"index": index, "message": message, "finish_reason": entry.get("finish_reason")})
        return {"choices": choices}

    def body(self, endpoint: str) -> dict[str, Any]:
        return self.chat_body() if endpoint == "chat" else self.completion_body()

    def completion_body(self) -> dict[str, Any]:
        return {
            "choices": [
                {"index": i, "text": e["text"], "finish_reason": e.get("finish_reason")}
                for i, e in sorted(self._choices.items())
            ]
        }


def _merge_function(call: dict[str, Any], piece: dict[str, Any]) -> None:
    name = piece.get("name")
    # Servers send the name once; some repeat it whole in every delta. Never double it.
    if isinstance(name, str) and name and name != call["name"]:
        call["name"] += name
    if isinstance(piece.get("arguments"), str):
        call["arguments"] += piece["arguments"]


async def collect(resp: Response, first: bytes, limit: int) -> tuple[bytes, bool]:
    """Read a stream into memory, for validation before release. Returns (bytes, complete): past limit
    bytes it stops early, and the caller relays the rest unvalidated."""
    chunks = [first]
    size = len(first)
    while size <= limit:
        data = await resp.readany()
        if not data:
            return b"".join(chunks), True
        size += len(data)
        chunks.append(data)
    return b"".join(chunks), False


class Tail:
    """The last two chunks of a stream: where an upstream puts its usage report."""

    __slots__ = ("_last", "_previous")

    def __init__(self) -> None:
        self._previous = b""
        self._last = b""

    def feed(self, data: bytes) -> None:
        self._previous, self._last = self._last, data

    def last_event(self) -> dict[str, Any] | None:
        return last_event(self._previous + self._last)


def last_event(data: bytes) -> dict[str, Any] | None:
    """The last data event of an SSE stream: with include_usage, the one that carries the usage."""
    end = len(data)
    while True:
        start = data.rfind(b"data:", 0, end)
        if start < 0:
            return None
        line_end = data.find(b"\n", start)
        payload = data[start + 5 : line_end if line_end >= 0 else len(data)].strip()
        end = start
        if not payload or payload == b"[DONE]":
            continue
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        return event if isinstance(event, dict) else None


def observer(tail: Tail | None, accumulator: Accumulator | None) -> Callable[[bytes], None]:
    """What a relayed stream's chunks are shown to: the tail (for usage) and, with rules, the accumulator."""
    parser = EventParser()

    def observe(data: bytes) -> None:
        if tail is not None:
            tail.feed(data)
        if accumulator is not None:
            for event in parser.feed(data):
                accumulator.add(event)

    return observe
