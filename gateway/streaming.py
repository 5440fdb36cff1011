"""SSE: the relay (whole events, as they arrive; a failure mid-stream becomes an SSE error event),
event parsing, and delta accumulation into a complete answer for validation."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from gateway.asgi import Reply
from gateway.errors import GatewayError
from gateway.upstream import CutShort
from gateway.validation import describe

if TYPE_CHECKING:
    from gateway.upstream import Response

# An upstream that never ends an event must not make the gateway hold its output without bound.
MAX_PENDING = 1024 * 1024


def event_end(data: bytes) -> int:
    """Index just past the last complete SSE event in data (0 when none is complete)."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


# The stream's end marker, as the last event of what is about to be sent; and a finish_reason that says how
# a choice ended (an upstream that was cut short, e.g. llama.cpp interrupting a generation, gives none).
DONE_EVENTS = (b"data: [DONE]\n\n", b"data:[DONE]\n\n", b"data: [DONE]\r\n\r\n", b"data:[DONE]\r\n\r\n")
FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')


def done_at(ready: bytes) -> int:
    """Where the [DONE] event that ends these whole events starts, or -1 (a look at the tail only: a regex
    anchored at the end still scans the whole buffer, 17 us for a short stream)."""
    for event in DONE_EVENTS:
        if ready.endswith(event):
            at = len(ready) - len(event)
            if at == 0 or ready[at - 1 : at] == b"\n":
                return at
    return -1


def first_data_end(data: bytes) -> int:
    """Index just past the first complete event that carries data (0 until one is in): SSE comments such as
    `: keepalive` and events with empty data are not a first token."""
    start = 0
    while True:
        lf, crlf = data.find(b"\n\n", start), data.find(b"\r\n\r\n", start)
        ends = [i + 2 for i in (lf,) if i >= 0] + [i + 4 for i in (crlf,) if i >= 0]
        if not ends:
            return 0
        end = min(ends)
        for line in data[start:end].splitlines():
            if line.startswith(b"data:") and line[5:].strip():
                return end
        start = end


async def relay(
    resp: Response,
    reply: Reply,
    first: bytes,
    on_failure: Callable[[BaseException], GatewayError],
    observe: Callable[[bytes], object] | None = None,
    finishing: Callable[[], object] | None = None,
) -> GatewayError | None:
    """Send first and every later chunk, cut at event boundaries so an error event never splits one.
    observe, when given, sees every chunk too (to validate what passes through).

    The stream's `data: [DONE]` is held back until the upstream's body has ended cleanly and some choice
    said how it finished: only then is it sent (after finishing(), so a client that hangs up on reading
    it is not a disconnect). Otherwise an error event takes its place: a client never reads a cut-off
    answer as a complete one. Returns that failure (already sent to the client), or None.
    """
    pending = b""
    done = b""  # the [DONE] event, held
    finished = False
    data = first
    try:
        while data:
            if observe is not None:
                observe(data)
            if done:  # something after [DONE]: it was not the end after all
                pending, done = done, b""
            pending = pending + data if pending else data
            cut = event_end(pending)
            if cut == len(pending) or len(pending) > MAX_PENDING:
                ready, pending = pending, b""
            else:
                ready, pending = pending[:cut], pending[cut:]
            if ready:
                at = done_at(ready)
                if at >= 0:
                    ready, done = ready[:at], ready[at:]
                finished = finished or FINISHED.search(ready) is not None
                if ready:
                    await reply.chunk(ready)
            data = await resp.readany()
        if pending:
            finished = finished or FINISHED.search(pending) is not None
            await reply.chunk(pending)
        if not finished:
            raise CutShort
    except (GatewayError, CutShort) as exc:  # the upstream failed mid-stream (Response maps transport errors)
        error = on_failure(exc)
        await reply.error(error)
        return error
    if finishing is not None:
        finishing()
    if done:
        await reply.chunk(done)
    return None


# What EventParser yields for a data event that is not JSON: the accumulator calls its stream malformed.
UNPARSEABLE = object()


class EventParser:
    """Splits an SSE byte stream into the parsed JSON of its data events ([DONE] is dropped; a data event
    that is not JSON comes out as UNPARSEABLE)."""

    def __init__(self) -> None:
        self._pending = b""

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
                events.append(UNPARSEABLE)
        return events


class Accumulator:
    """Rebuilds a streamed answer (chat deltas or completion texts) into the shape of a complete one,
    so the same checks apply to streamed and non-streamed answers. Never raises: the first event that is
    not shaped like a chunk is kept in `malformed` (what was wrong, and where) and the rest still count."""

    @classmethod
    def of(cls, stream: bytes) -> Accumulator:
        """A whole buffered stream, rebuilt."""
        accumulator = cls()
        observer(None, accumulator)(stream)
        return accumulator

    def __init__(self) -> None:
        self._choices: dict[int, dict[str, Any]] = {}
        self._calls: dict[int, dict[int, dict[str, Any]]] = {}
        self._events = 0
        self.error: Any = None
        self.malformed: str | None = None

    def _problem(self, where: str, expected: str, got: Any) -> None:
        if self.malformed is None:
            self.malformed = f"stream event {self._events}: {where}: expected {expected}, got {_kind(got)}"

    def add(self, event: Any) -> None:
        self._events += 1
        if not isinstance(event, dict):
            self._problem("data", "a JSON object", event)
            return
        if "error" in event:
            self.error = event["error"]
        choices = event.get("choices")
        if choices is None:
            return  # a usage-only or error event
        if not isinstance(choices, list):
            self._problem("choices", "an array", choices)
            return
        for position, choice in enumerate(choices):
            if isinstance(choice, dict):
                self._add_choice(choice, f"choices[{position}]")
            else:
                self._problem(f"choices[{position}]", "an object", choice)

    def _add_choice(self, choice: dict[str, Any], where: str) -> None:
        index = choice.get("index", 0) if isinstance(choice.get("index"), int) else 0
        entry = self._choices.setdefault(index, {"index": index, "content": None, "text": None})
        if isinstance(choice.get("finish_reason"), str):
            entry["finish_reason"] = choice["finish_reason"]
        self._append(entry, "text", choice.get("text"), f"{where}.text")
        delta = choice.get("delta")
        if delta is None:
            return
        if not isinstance(delta, dict):
            self._problem(f"{where}.delta", "an object", delta)
            return
        self._append(entry, "content", delta.get("content"), f"{where}.delta.content")
        function_call = delta.get("function_call")
        if isinstance(function_call, dict):
            call = entry.setdefault("function_call", {"name": None, "arguments": None})
            self._merge(call, function_call, f"{where}.delta.function_call")
        elif function_call is not None:
            self._problem(f"{where}.delta.function_call", "an object", function_call)
        pieces = delta.get("tool_calls")
        if pieces is not None and not isinstance(pieces, list):
            self._problem(f"{where}.delta.tool_calls", "an array", pieces)
            return
        for number, piece in enumerate(pieces or ()):
            path = f"{where}.delta.tool_calls[{number}]"
            if not isinstance(piece, dict):
                self._problem(path, "an object", piece)
                continue
            position = piece.get("index")
            if not isinstance(position, int) or isinstance(position, bool):
                self._problem(f"{path}.index", "an integer", position)  # the OpenAI SDK raises on it
                continue
            calls = self._calls.setdefault(index, {})
            call = calls.setdefault(
                position, {"id": None, "type": "function", "function": {"name": None, "arguments": None}}
            )
            self._append(call, "id", piece.get("id"), f"{path}.id")
            function = piece.get("function")
            if isinstance(function, dict):
                self._merge(call["function"], function, f"{path}.function")
            elif function is not None:
                self._problem(f"{path}.function", "an object", function)

    def _merge(self, call: dict[str, Any], piece: dict[str, Any], where: str) -> None:
        # As the OpenAI SDK assembles it (openai.lib.streaming accumulate_delta): every string is appended
        # to what came before. A server that repeats the name (or id) in every delta thus gives the client
        # "get_weatherget_weather", which is what is validated.
        self._append(call, "name", piece.get("name"), f"{where}.name")
        self._append(call, "arguments", piece.get("arguments"), f"{where}.arguments")

    def _append(self, into: dict[str, Any], key: str, piece: Any, where: str) -> None:
        """A streamed string piece added to what came before (None: nothing came in this event)."""
        if isinstance(piece, str):
            into[key] = (into[key] or "") + piece
        elif piece is not None:
            self._problem(where, "a string", piece)

    @property
    def finished(self) -> bool:
        """Did some choice say how it finished? A stream cut short says nothing."""
        return any("finish_reason" in entry for entry in self._choices.values())

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


def _kind(value: Any) -> str:
    return "text that is not JSON" if value is UNPARSEABLE else describe(value)


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
