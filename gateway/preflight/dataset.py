"""Held-out sets: chat JSONL (messages, tools, tool_choice, response_format, category or tags, cohort,
expected) or the OpenAI evals shape (input, ideal). Every line is checked; a problem names its line and
field."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

MAX_LINE_BYTES = 1024 * 1024
MAX_ITEMS = 100_000
CHAT_FIELDS = frozenset(
    {"id", "messages", "tools", "tool_choice", "response_format", "category", "tags", "cohort", "expected",
     "max_tokens", "temperature", "metadata"}
)  # fmt: skip
EVALS_FIELDS = frozenset({"id", "input", "ideal", "category", "tags", "cohort"})
EXPECTED_FIELDS = frozenset({"tool", "arguments", "json_schema", "contains", "answer"})


class DatasetError(Exception):
    """A held-out set that cannot be read: the file, line and field, and what to fix."""


@dataclass(frozen=True)
class Expected:
    tool: str | None = None
    arguments: dict[str, Any] | None = None
    json_schema: dict[str, Any] | None = None
    contains: tuple[str, ...] = ()
    answer: str | None = None


@dataclass(frozen=True)
class Item:
    id: str
    line: int
    request: dict[str, Any]  # the chat request body, without model
    category: str = "uncategorized"
    tags: tuple[str, ...] = ()
    cohort: str = "all"
    expected: Expected = field(default_factory=Expected)


def load(path: Path, *, limit: int | None = None, shuffle: int | None = None) -> list[Item]:
    """Every item of the file, in order (or shuffled with the seed), at most limit of them."""
    items: list[Item] = []
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read: {exc.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DatasetError(f"{path}:{number}: the line is longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            if len(items) >= MAX_ITEMS:
                raise DatasetError(f"{path}: more than {MAX_ITEMS} items; split the set")
            items.append(_item(path, number, raw))
    if not items:
        raise DatasetError(f"{path}: no items (one JSON object per line)")
    ids = [item.id for item in items]
    twice = sorted({i for i in ids if ids.count(i) > 1})[:5] if len(set(ids)) != len(ids) else []
    if twice:
        raise DatasetError(f"{path}: item ids used twice: {', '.join(twice)}")
    if shuffle is not None:
        random.Random(shuffle).shuffle(items)
    return items[:limit] if limit is not None else items


def _item(path: Path, number: int, raw: bytes) -> Item:
    where = f"{path}:{number}"
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: each line must be a JSON object, got {type(data).__name__}")
    if "input" in data and "messages" not in data:
        return _evals_item(where, number, data)
    unknown = sorted(set(data) - CHAT_FIELDS)
    if unknown:
        raise DatasetError(
            f"{where}: {unknown[0]}: not a field of an item; use {', '.join(sorted(CHAT_FIELDS))}"
        )
    messages = data.get("messages")
    _check_messages(where, "messages", messages)
    request: dict[str, Any] = {"messages": messages}
    for key in ("tools", "tool_choice", "response_format", "max_tokens", "temperature", "metadata"):
        if key in data:
            request[key] = data[key]
    if "tools" in data and not (
        isinstance(data["tools"], list) and all(isinstance(t, dict) for t in data["tools"])
    ):
        raise DatasetError(f"{where}: tools: must be a list of tool objects")
    if "response_format" in data and not isinstance(data["response_format"], dict):
        raise DatasetError(f'{where}: response_format: must be an object, e.g. {{"type": "json_object"}}')
    expected = _expected(where, data.get("expected"))
    if expected.json_schema is not None and "response_format" not in request:
        request["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "expected", "schema": expected.json_schema},
        }
    return Item(_id(where, data, number), number, request, *_labels(where, data), expected)


def _evals_item(where: str, number: int, data: dict[str, Any]) -> Item:
    """The OpenAI evals shape: input is the messages (or a prompt string), ideal the answer."""
    unknown = sorted(set(data) - EVALS_FIELDS)
    if unknown:
        raise DatasetError(
            f"{where}: {unknown[0]}: not a field of an evals item; use {', '.join(sorted(EVALS_FIELDS))}"
        )
    given = data["input"]
    messages = [{"role": "user", "content": given}] if isinstance(given, str) else given
    _check_messages(where, "input", messages)
    ideal = data.get("ideal")
    if isinstance(ideal, list):
        ideal = ideal[0] if ideal and all(isinstance(i, str) for i in ideal) else None
    if ideal is not None and not isinstance(ideal, str):
        raise DatasetError(f"{where}: ideal: must be a string or a list of strings")
    expected = Expected(answer=ideal, contains=(ideal,) if ideal else ())
    return Item(_id(where, data, number), number, {"messages": messages}, *_labels(where, data), expected)


def _check_messages(where: str, name: str, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: {name}: must be a non-empty list of messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DatasetError(f"{where}: {name}[{index}]: a message is an object with a role and content")


def _expected(where: str, raw: Any) -> Expected:
    if raw is None:
        return Expected()
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: expected: must be an object with {', '.join(sorted(EXPECTED_FIELDS))}")
    unknown = sorted(set(raw) - EXPECTED_FIELDS)
    if unknown:
        raise DatasetError(
            f"{where}: expected.{unknown[0]}: not a field; use {', '.join(sorted(EXPECTED_FIELDS))}"
        )
    contains = raw.get("contains", [])
    if isinstance(contains, str):
        contains = [contains]
    if not isinstance(contains, list) or not all(isinstance(c, str) and c for c in contains):
        raise DatasetError(f"{where}: expected.contains: a string or a list of strings")
    for key, kind in (("tool", str), ("answer", str), ("arguments", dict), ("json_schema", dict)):
        if key in raw and not isinstance(raw[key], kind):
            raise DatasetError(
                f"{where}: expected.{key}: must be a {'string' if kind is str else 'JSON object'}"
            )
    if "json_schema" in raw:
        from gateway.validation import SchemaError, compile_schema

        try:
            compile_schema(raw["json_schema"], "expected.json_schema")
        except SchemaError as exc:
            raise DatasetError(f"{where}: {exc}") from None
    return Expected(
        raw.get("tool"), raw.get("arguments"), raw.get("json_schema"), tuple(contains), raw.get("answer")
    )


def _id(where: str, data: dict[str, Any], number: int) -> str:
    value = data.get("id", f"line-{number}")
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise DatasetError(f"{where}: id: a string or a number")
    return str(value)


def _labels(where: str, data: dict[str, Any]) -> tuple[str, tuple[str, ...], str]:
    tags = data.get("tags", [])
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise DatasetError(f"{where}: tags: a list of strings")
    labels = []
    for name, default in (("category", tags[0] if tags else "uncategorized"), ("cohort", "all")):
        value = data.get(name, default)
        if not isinstance(value, str) or not value or len(value) > 64:
            raise DatasetError(f"{where}: {name}: a string of 1-64 characters")
        labels.append(value)
    return labels[0], tuple(tags), labels[1]
