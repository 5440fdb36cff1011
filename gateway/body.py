"""A request body as the client sent it: parsed once for the gateway to read, forwarded as the same bytes.

The gateway changes one field, the top-level `model` (each arm names its own). Re-encoding the parsed body
would change what the client meant: integers past 2**64 become floats, duplicate keys collapse, key order
and number spellings change. So the body is forwarded byte for byte with only the value of each top-level
`model` key replaced, found by walking the top level with the standard library's JSON scanner.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.validation import describe

MAX_DEPTH = 1024  # what orjson parses; deeper is a 400 naming it
_WS = re.compile(r"[ \t\n\r]*")
# The standard library's C scanner (untyped in typeshed): where a value ends, and a string decoded.
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class Body:
    """The client's bytes, what they parse to, and where the top-level "model" values lie in them."""

    __slots__ = ("_spans", "payload", "raw")

    def __init__(self, raw: bytes, payload: dict[str, Any], spans: list[tuple[int, int]]) -> None:
        self.raw = raw
        self.payload = payload
        self._spans = spans  # byte offsets [start, end) of each top-level "model" value, in order

    def with_model(self, model: str) -> bytes:
        """The client's bytes with every top-level "model" value replaced (one is added when there is
        none): a duplicate key cannot smuggle another model past the one this arm names."""
        value = orjson.dumps(model)
        if not self._spans:
            rest = self.raw[self.raw.index(b"{") + 1 :]
            separator = b"," if rest.strip(b" \t\r\n") != b"}" else b""
            return b'{"model":' + value + separator + rest
        parts: list[bytes] = []
        at = 0
        for start, end in self._spans:
            parts += (self.raw[at:start], value)
            at = end
        parts.append(self.raw[at:])
        return b"".join(parts)


def parse(raw: bytes) -> Body:
    """The body parsed, or a 400 saying what is wrong with it."""
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc) or "recursion" in str(exc):
            raise InvalidRequest(
                f"the request body nests JSON deeper than the gateway accepts ({MAX_DEPTH} levels); "
                "flatten it",
                code="invalid_json",
            ) from None
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise InvalidRequest(
            f"the request body must be a JSON object, got {describe(payload)}", code="invalid_json"
        )
    return Body(raw, payload, model_spans(raw))


def model_spans(raw: bytes) -> list[tuple[int, int]]:
    """Byte offsets of each top-level "model" value in a body that is known to be a valid JSON object."""
    text = raw.decode()  # valid UTF-8: orjson has parsed it
    spans: list[tuple[int, int]] = []
    i = _skip(text, text.index("{") + 1)
    if text[i] == "}":
        return spans
    while True:
        key, i = scanstring(text, i + 1)  # decodes escapes: "mod\u0065l" is "model" too
        i = _skip(text, _skip(text, i) + 1)  # past the colon
        start = i
        i = _value_end(text, raw, i)
        if key == "model":
            spans.append((start, i))
        i = _skip(text, i)
        if text[i] == "}":
            break
        i = _skip(text, i + 1)  # past the comma
    if spans and not raw.isascii():  # offsets into the text; the bytes differ where it is not ASCII
        spans = [(len(text[:s].encode()), len(text[:e].encode())) for s, e in spans]
    return spans


def _skip(text: str, i: int) -> int:
    """The index of the first character at or after i that is not JSON whitespace."""
    return _WS.match(text, i).end()  # type: ignore[union-attr]  # "*" matches, if only nothing


def _value_end(text: str, raw: bytes, i: int) -> int:
    try:
        return int(_scan(text, i)[1])
    except RecursionError:  # nested deeper than Python's stack allows: count brackets instead
        depth = 0
        offset = len(text[:i].encode())  # the token walk reads bytes
        for match in _TOKEN.finditer(raw, offset):
            token = match.group()
            if token in (b"[", b"{"):
                depth += 1
            elif token in (b"]", b"}"):
                depth -= 1
                if depth == 0:
                    return i + len(raw[offset : match.end()].decode())
        raise AssertionError("unbalanced JSON after orjson accepted it") from None
