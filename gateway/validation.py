"""Output validation: JSON, JSON Schema (Draft 2020-12, jsonschema-rs) and tool calls.

Pure functions over parsed requests and responses. rules_for() derives what one request's answer must
satisfy (None when nothing: such answers are never parsed or buffered); check_*() return the first
Failure found, each with a kind and a message that names the field and what was expected. Every field
they read is type-checked first: an answer of any JSON shape gets a verdict (a shape that is not an
OpenAI answer is "malformed"), never an exception.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema_rs
import orjson

from gateway.errors import Kind

JsonMode = Literal["auto", "always", "off"]


@dataclass(frozen=True, slots=True)
class Failure:
    kind: Kind
    message: str


class SchemaError(ValueError):
    """A schema that does not compile; the message says where it came from and why."""


class FieldError(ValueError):
    """A request field the checks read, in a shape the API does not allow (the client's mistake)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _refuse_remote(uri: str) -> Any:
    # Schemas arrive with requests: fetching their remote $refs would let any client make the
    # gateway issue HTTP requests (SSRF). Only local references (#/$defs/...) resolve.
    raise ValueError(f"remote $ref is not allowed ({uri}); inline it under $defs")


# Patterns run on fancy-regex with a bound on backtracking: plain patterns go to its linear-time engine,
# and one with backreferences or lookaround (`(a*)*\1$`) gives up after this many steps (about 0.25 ms)
# instead of taking seconds of the event loop; the answer then fails validation, saying so.
PATTERN_STEPS = 10_000
PATTERNS = jsonschema_rs.FancyRegexOptions(backtrack_limit=PATTERN_STEPS)
# A request's schema (response_format or a tool's parameters), as JSON: compiling is CPU on the serving
# loop, so it is bounded (a structured-output schema is a few KiB; 20,000 properties took 0.7-2 s).
MAX_SCHEMA_BYTES = 64 * 1024


def compile_schema(schema: Any, where: str) -> jsonschema_rs.Validator:
    if not isinstance(schema, dict | bool):
        raise SchemaError(f"{where} must be a JSON Schema object, got {type(schema).__name__}")
    try:
        return jsonschema_rs.validator_for(schema, retriever=_refuse_remote, pattern_options=PATTERNS)
    except (jsonschema_rs.ValidationError, ValueError) as exc:
        reason = str(exc).split("\n", 1)[0]
        raise SchemaError(f"{where} is not a valid JSON Schema: {reason}") from None


class SchemaCache:
    """Validators for schemas that come with requests, compiled once per distinct schema (LRU), bounded by
    entries and by the schemas' size together (a compiled validator takes a multiple of its schema's)."""

    def __init__(self, size: int = 1024, max_bytes: int = 16 * 1024 * 1024) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[bytes, jsonschema_rs.Validator] = OrderedDict()

    def get(self, schema: Any, where: str) -> jsonschema_rs.Validator:
        try:
            key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
        except TypeError as exc:
            raise SchemaError(f"{where} cannot be read as JSON: {exc}") from None
        if len(key) > MAX_SCHEMA_BYTES:
            raise SchemaError(
                f"{where} is {len(key)} bytes as JSON; the gateway validates schemas of at most "
                f"{MAX_SCHEMA_BYTES} bytes"
            )
        validator = self._entries.get(key)
        if validator is None:
            validator = compile_schema(schema, where)
            self._entries[key] = validator
            self._bytes += len(key)
            while len(self._entries) > self._size or self._bytes > self._max_bytes:
                self._bytes -= len(self._entries.popitem(last=False)[0])
        else:
            self._entries.move_to_end(key)
        return validator

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """The route's validation settings, compiled at policy load."""

    json: JsonMode = "auto"
    schema: jsonschema_rs.Validator | None = None
    tool_calls: bool = True


@dataclass(frozen=True, slots=True)
class Rules:
    """What one request's answer must satisfy."""

    json_object: bool
    schemas: tuple[tuple[jsonschema_rs.Validator, str], ...]  # (validator, where it came from)
    tools: Mapping[str, jsonschema_rs.Validator | None] | None  # declared tools; None: not checked
    tool_choice: Literal["auto", "none", "required"] | None
    named_tool: str | None
    legacy: bool  # functions / function_call rather than tools / tool_calls


# An answer with nothing asked of it is still held to the shape of an OpenAI answer.
SHAPE_ONLY = Rules(False, (), None, None, None, False)


def rules_for(request: Mapping[str, Any], policy: RoutePolicy, cache: SchemaCache) -> Rules | None:
    """Raises SchemaError when the request carries a schema that does not compile (the client's fault)."""
    json_object = policy.json == "always"
    schemas: list[tuple[jsonschema_rs.Validator, str]] = []
    fmt = request.get("response_format")
    if policy.json != "off" and isinstance(fmt, dict):
        kind = fmt.get("type")
        if kind in ("json_object", "json_schema"):
            json_object = True
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise SchemaError("response_format.json_schema.schema is required for type json_schema")
            schemas.append(
                (cache.get(spec["schema"], "response_format.json_schema.schema"), "response_format")
            )
    if policy.schema is not None:
        json_object = True
        schemas.append((policy.schema, "the route's validation.schema"))
    tools, choice, named, legacy = (
        _tool_rules(request, cache) if policy.tool_calls else (None, None, None, False)
    )
    if not json_object and tools is None:
        return None
    return Rules(json_object, tuple(schemas), tools, choice, named, legacy)


def _tool_rules(
    request: Mapping[str, Any], cache: SchemaCache
) -> tuple[dict[str, jsonschema_rs.Validator | None] | None, Any, str | None, bool]:
    declared = request.get("tools")
    legacy = False
    field = "tools"
    if not declared and request.get("functions"):
        declared, legacy, field = request["functions"], True, "functions"
    if not declared:
        return None, None, None, False
    if not isinstance(declared, list):
        raise SchemaError(f"{field} must be an array")
    tools: dict[str, jsonschema_rs.Validator | None] = {}
    for index, tool in enumerate(declared):
        function = tool if legacy else (tool.get("function") if isinstance(tool, dict) else None)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue  # not a function tool (hosted tools): nothing to check it against
        parameters = function.get("parameters")
        where = f"{field}[{index}].{'' if legacy else 'function.'}parameters"
        tools[function["name"]] = cache.get(parameters, where) if parameters is not None else None
    field = "function_call" if legacy else "tool_choice"
    raw_choice = request.get(field)
    named = None
    choice: Any = None
    if raw_choice in ("auto", "none", "required"):
        choice = raw_choice
    elif isinstance(raw_choice, dict):
        function = raw_choice if legacy else raw_choice.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            where = field if legacy else f"{field}.function"
            raise FieldError(f'{where}: expected an object with "name" (a string)', param=field)
        named = function["name"]
    return tools, choice, named, legacy


def check_chat(body: Any, rules: Rules) -> Failure | None:
    choices, failure = _choices(body)
    if failure is not None:
        return failure
    for position, choice in enumerate(choices):
        where = f"choices[{position}]"
        message = choice.get("message")
        if not isinstance(message, dict):
            return _malformed(f"{where}.message", "an object", message)
        failure = check_message(message, rules, f"{where}.message")
        if failure is not None:
            return failure
    return None


def check_completion(body: Any, rules: Rules) -> Failure | None:
    choices, failure = _choices(body)
    if failure is not None:
        return failure
    for position, choice in enumerate(choices):
        text = choice.get("text")
        if text is not None and not isinstance(text, str):
            return _malformed(f"choices[{position}].text", "a string", text)
        failure = _check_content(text, rules, f"choices[{position}].text")
        if failure is not None:
            return failure
    return None


def _choices(body: Any) -> tuple[list[dict[str, Any]], Failure | None]:
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        return [], _malformed("choices", "a non-empty array", choices)
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            return [], _malformed(f"choices[{position}]", "an object", choice)
    return choices, None


def _malformed(where: str, expected: str, got: Any) -> Failure:
    return Failure("malformed", f"{where}: expected {expected}, got {describe(got)}")


def describe(value: Any) -> str:
    """What a JSON value is, for a message: "an object", "a string", ... ("nothing" for null)."""
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "an object"
    name = _json_type(value)
    return f"an {name}" if name == "array" else f"a {name}"


def check_message(message: Mapping[str, Any], rules: Rules, where: str = "message") -> Failure | None:
    calls, failure = _calls(message, rules.legacy, where)
    if failure is not None:
        return failure
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        return _malformed(f"{where}.content", "a string", content)
    if rules.tools is not None:
        failure = _check_calls(calls, rules, where)
        if failure is not None:
            return failure
    if calls:
        return None  # the model answered with a tool call: there is no content to hold to JSON
    if rules.json_object:
        return _check_content(content, rules, f"{where}.content")
    return None


def _calls(
    message: Mapping[str, Any], legacy: bool, where: str
) -> tuple[list[tuple[str, str, str]], Failure | None]:
    """(field path, name, arguments) of every call in the message, each checked to be strings."""
    raw: list[tuple[str, Any]] = []
    if legacy:
        call = message.get("function_call")
        if call is not None:
            raw.append(("function_call", call))
    else:
        calls = message.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            return [], _malformed(f"{where}.tool_calls", "an array", calls)
        for index, call in enumerate(calls or ()):
            if not isinstance(call, dict):
                return [], _malformed(f"{where}.tool_calls[{index}]", "an object", call)
            raw.append((f"tool_calls[{index}].function", call.get("function")))
    out = []
    for path, function in raw:
        if not isinstance(function, dict):
            return [], _malformed(f"{where}.{path}", "an object", function)
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str):
            return [], _malformed(f"{where}.{path}.name", "a string", name)
        if not isinstance(arguments, str):
            return [], _malformed(f"{where}.{path}.arguments", "a string of JSON", arguments)
        out.append((path, name, arguments))
    return out, None


def _check_calls(calls: list[tuple[str, str, str]], rules: Rules, where: str) -> Failure | None:
    tools = rules.tools or {}
    if rules.tool_choice == "none" and calls:
        return Failure("tool_choice", f"{where}: tool_choice is 'none' but the model called {calls[0][1]!r}")
    if rules.tool_choice == "required" and not calls:
        return Failure("tool_choice", f"{where}: tool_choice is 'required' but the model called no tool")
    if rules.named_tool is not None:
        if not calls:
            return Failure(
                "tool_choice", f"{where}: tool_choice names {rules.named_tool!r} but no tool was called"
            )
        wrong = next((name for _, name, _ in calls if name != rules.named_tool), None)
        if wrong is not None:
            return Failure(
                "tool_choice", f"{where}: tool_choice names {rules.named_tool!r}, the model called {wrong!r}"
            )
    for path, name, arguments in calls:
        if name not in tools:
            declared = ", ".join(sorted(tools)) or "none"
            return Failure(
                "tool_unknown",
                f"{where}.{path}.name: {name[:100]!r} is not a declared tool (declared: {declared[:300]})",
            )
        try:
            parsed = orjson.loads(arguments)
        except orjson.JSONDecodeError as exc:
            return Failure(
                "tool_args_parse", f"{where}.{path}.arguments of {name!r} are not valid JSON: {exc}"
            )
        if not isinstance(parsed, dict):
            return Failure("tool_args_parse", f"{where}.{path}.arguments of {name!r} must be a JSON object")
        validator = tools[name]
        if validator is not None:
            error = _first_error(validator, parsed)
            if error is not None:
                return Failure("tool_args_schema", f"{where}.{path}.arguments{error} (tool {name!r})")
    return None


def _check_content(content: Any, rules: Rules, where: str) -> Failure | None:
    if not isinstance(content, str) or not content.strip():
        return Failure("json_parse", f"{where}: expected a JSON object, got no content")
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        return Failure("json_parse", f"{where}: not valid JSON ({exc})")
    if not isinstance(value, dict):
        return Failure("json_parse", f"{where}: expected a JSON object, got a JSON {_json_type(value)}")
    for validator, source in rules.schemas:
        error = _first_error(validator, value)
        if error is not None:
            return Failure("json_schema", f"{where}{error} (schema from {source})")
    return None


def _first_error(validator: jsonschema_rs.Validator, value: Any) -> str | None:
    """One pass: validate() stops at the first error and raises it (a valid answer collects nothing)."""
    try:
        validator.validate(value)
    except jsonschema_rs.ValidationError as error:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.instance_path)
        if "backtracking" in error.message:
            return (
                f"{path}: checking the schema's pattern took too long (past {PATTERN_STEPS} backtracking "
                "steps), so the answer is treated as not matching it"
            )
        return f"{path}: {error.message}"
    return None


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null"
    )
