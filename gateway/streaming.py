"""SSE: the relay (whole events, as they arrive; a failure mid-stream becomes an SSE error event),
event parsing, and delta accumulation into a complete answer for validation."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from gateway.apis import FINISHED as FINISHED_BY_API
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


# The stream's end marker, as the last event of what is about to be sent; and (apis.FINISHED) a finish_reason
# that says how a choice ended (an upstream that was cut short, e.g. llama.cpp interrupting a generation,
# gives none).
DONE_EVENTS = (b"data: [DONE]\n\n", b"data:[DONE]\n\n", b"data: [DONE]\r\n\r\n", b"data:[DONE]\r\n\r\n")
FINISHED = FINISHED_BY_API["chat"]


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
    finished: re.Pattern[bytes] = FINISHED,
) -> GatewayError | None:
    """Send first and every later chunk, cut at event boundaries so an error event never splits one.
    observe, when given, sees every chunk too (to validate what passes through). finished: how the API's
    stream says its answer is complete (apis.FINISHED; chat's finish_reason by default).

    The stream's `data: [DONE]` is held back until the upstream's body has ended cleanly and some choice
    said how it finished: only then is it sent (after finishing(), so a client that hangs up on reading
    it is not a disconnect). Otherwise an error event takes its place: a client never reads a cut-off
    answer as a complete one. Returns that failure (already sent to the client), or None.
    """
    pending = b""
    done = b""  # the [DONE] event, held
    complete = False
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
                complete = complete or finished.search(ready) is not None
                if ready:
                    await reply.chunk(ready)
            data = await resp.readany()
        if pending:
            complete = complete or finished.search(pending) is not None
            await reply.chunk(pending)
        if not complete:
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
    def of(cls, stream: bytes, api: str = "chat") -> Accumulator:
        """A whole buffered stream, rebuilt."""
        accumulator = cls(api)
        observer(None, accumulator)(stream)
        return accumulator

    def __init__(self, api: str = "chat") -> None:
        self._api = api
        self._choices: dict[int, dict[str, Any]] = {}
        self._calls: dict[int, dict[int, dict[str, Any]]] = {}
        self._events = 0
        self.error: Any = None
        self.malformed: str | None = None
        self.overflowed = False  # a relayed stream longer than the route's max_buffer_bytes: not rebuilt

    def _problem(self, where: str, expected: str, got: Any) -> None:
        if self.malformed is None:
            self.malformed = f"stream event {self._events}: {where}: expected {expected}, got {_kind(got)}"

    def add(self, event: Any) -> None:
        """One data event of the stream (any JSON, or UNPARSEABLE): an object goes to _event."""
        self._events += 1
        if not isinstance(event, dict):
            self._problem("data", "a JSON object", event)
            return
        self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        """A chat or completion chunk."""
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

    def body(self) -> dict[str, Any]:
        return self.chat_body() if self._api == "chat" else self.completion_body()

    def completion_body(self) -> dict[str, Any]:
        return {
            "choices": [
                {"index": i, "text": e["text"], "finish_reason": e.get("finish_reason")}
                for i, e in sorted(self._choices.items())
            ]
        }


class ResponsesAccumulator(Accumulator):
    """A Responses API stream, rebuilt as its client's SDK does: output items as they are added, their text
    and arguments deltas appended, each item replaced by its `done` form; the answer is the response
    that response.completed (or .incomplete) carries, with the items rebuilt here when it lists none."""

    def __init__(self, api: str = "responses") -> None:
        super().__init__(api)
        self._items: dict[int, dict[str, Any]] = {}
        self._response: dict[str, Any] = {}
        self._final: dict[str, Any] | None = None

    @property
    def response_id(self) -> str | None:
        found = (self._final or self._response).get("id")
        return found if isinstance(found, str) else None

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("error", "response.failed"):
            response = event.get("response")
            self.error = (response.get("error") if isinstance(response, dict) else None) or event
            return
        if kind in ("response.created", "response.in_progress", "response.completed", "response.incomplete"):
            response = event.get("response")
            if not isinstance(response, dict):
                self._problem(f"{kind}.response", "an object", response)
            elif kind in ("response.completed", "response.incomplete"):
                self._final = response
            else:
                self._response = response
            return
        index = event.get("output_index")
        if not isinstance(kind, str) or not kind.startswith("response.") or index is None:
            return  # reasoning summaries, hosted tools' progress, ...: nothing validated
        if not isinstance(index, int) or isinstance(index, bool):
            self._problem(f"{kind}.output_index", "an integer", index)
            return
        if kind in ("response.output_item.added", "response.output_item.done"):
            item = event.get("item")
            if isinstance(item, dict):
                self._items[index] = dict(item)
            else:
                self._problem(f"{kind}.item", "an object", item)
            return
        item = self._items.setdefault(index, {})
        delta = event.get("delta")
        if kind == "response.function_call_arguments.delta":
            item.setdefault("arguments", None)
            self._append(item, "arguments", delta, f"{kind}.delta")
        elif kind == "response.output_text.delta":
            part = event.get("content_index", 0)
            content = item.setdefault("content", [])
            if not isinstance(content, list) or not isinstance(part, int) or not 0 <= part <= len(content):
                # parts are added in order: an index past the next one is no part this stream has
                self._problem(f"{kind}.content_index", "the index of a part so far or the next", part)
                return
            if part == len(content):
                content.append({"type": "output_text", "text": ""})
            if isinstance(content[part], dict):
                content[part]["text"] = content[part].get("text") or ""
                self._append(content[part], "text", delta, f"{kind}.delta")

    @property
    def finished(self) -> bool:
        return self._final is not None

    def body(self) -> dict[str, Any]:
        answer = dict(self._final or self._response)
        if not answer.get("output") and self._items:
            answer["output"] = [item for _, item in sorted(self._items.items())]
        answer.setdefault("output", [])
        return answer


class MessagesAccumulator(Accumulator):
    """A Messages API stream, rebuilt as Anthropic's SDK does: message_start's message, each content block
    from content_block_start with its text_delta and input_json_delta pieces appended (a tool's input
    parsed at content_block_stop; pieces that do not parse are kept as text, for validation to say so),
    message_delta's stop_reason and usage, finished at message_stop."""

    def __init__(self, api: str = "messages") -> None:
        super().__init__(api)
        self._message: dict[str, Any] = {}
        self._blocks: dict[int, dict[str, Any]] = {}
        self._json: dict[int, str] = {}
        self._usage: dict[str, Any] = {}
        self._stopped = False

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "error":
            self.error = event.get("error") or event
        elif kind == "message_start":
            message = event.get("message")
            if not isinstance(message, dict):
                self._problem("message_start.message", "an object", message)
                return
            self._message = message
            if isinstance(message.get("usage"), dict):
                self._usage.update(message["usage"])
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and "stop_reason" in delta:
                self._message["stop_reason"] = delta["stop_reason"]
            if isinstance(event.get("usage"), dict):
                self._usage.update({k: v for k, v in event["usage"].items() if v is not None})
        elif kind == "message_stop":
            self._stopped = True
        elif kind in ("content_block_start", "content_block_delta", "content_block_stop"):
            self._block(kind, event)

    def _block(self, kind: str, event: dict[str, Any]) -> None:
        index = event.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            self._problem(f"{kind}.index", "an integer", index)
            return
        if kind == "content_block_start":
            block = event.get("content_block")
            if not isinstance(block, dict):
                self._problem(f"{kind}.content_block", "an object", block)
                return
            self._blocks[index] = dict(block)
            return
        block = self._blocks.setdefault(index, {})
        if kind == "content_block_stop":
            if block.get("type") == "tool_use" and index in self._json:
                text = self._json.pop(index)
                try:
                    block["input"] = orjson.loads(text) if text.strip() else {}
                except orjson.JSONDecodeError:
                    block["input"] = text
            return
        delta = event.get("delta")
        if not isinstance(delta, dict):
            self._problem(f"{kind}.delta", "an object", delta)
            return
        if delta.get("type") == "text_delta":
            block["text"] = block.get("text") or ""
            self._append(block, "text", delta.get("text"), f"{kind}.delta.text")
        elif delta.get("type") == "input_json_delta":
            piece = delta.get("partial_json")
            if isinstance(piece, str):
                self._json[index] = self._json.get(index, "") + piece
            else:
                self._problem(f"{kind}.delta.partial_json", "a string", piece)

    @property
    def finished(self) -> bool:
        return self._stopped

    def body(self) -> dict[str, Any]:
        for index, text in self._json.items():  # a tool block never stopped: its pieces as they are
            self._blocks.get(index, {})["input"] = text
        answer = dict(self._message)
        answer["content"] = [block for _, block in sorted(self._blocks.items())]
        if self._usage:
            answer["usage"] = self._usage
        return answer


def accumulator_for(api: str) -> Accumulator:
    """The accumulator of an API's streams."""
    if api == "responses":
        return ResponsesAccumulator()
    if api == "messages":
        return MessagesAccumulator()
    return Accumulator(api)


def accumulate(api: str, stream: bytes) -> Accumulator:
    """A whole buffered stream of an API, rebuilt."""
    accumulator = accumulator_for(api)
    observer(None, accumulator)(stream)
    return accumulator


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


def observer(
    tail: Tail | None, accumulator: Accumulator | None, limit: int | None = None
) -> Callable[[bytes], None]:
    """What a relayed stream's chunks are shown to: the tail (for usage) and, when the whole answer is
    needed, the accumulator; past limit bytes the accumulator stops (overflowed), so a stream that does not
    end is not kept in memory without bound (its first events, a response's id among them, are in)."""
    parser = EventParser()
    seen = 0

    def observe(data: bytes) -> None:
        nonlocal seen
        if tail is not None:
            tail.feed(data)
        if accumulator is not None and not accumulator.overflowed:
            for event in parser.feed(data):
                accumulator.add(event)
            seen += len(data)
            if limit is not None and seen > limit:  # kept: the limit and one chunk at most
                accumulator.overflowed = True

    return observe
