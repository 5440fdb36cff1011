"""Output validation: JSON, JSON Schema (Draft 2020-12, jsonschema-rs) and tool calls.

Pure functions over parsed requests and responses. rules_for() derives what one request's answer must
satisfy (None when nothing: such answers are never parsed or buffered); check_*() return the first
Failure found, each with a kind and a message that names the field and what was expected. Every field
they read is type-checked first: an answer of any JSON shape gets a verdict (a shape that is not an
OpenAI answer is "malformed"), never an exception.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
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
    """A schema that does not compile; the message says where it came from and why, param names the
    request field that holds it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


FORMAT_SCHEMA = "response_format.json_schema.schema"


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
# A request's schema (response_format or a tool's parameters), as JSON: a structured-output schema is a few
# KiB; 20,000 properties took 0.7-2 s to compile.
MAX_SCHEMA_BYTES = 64 * 1024
# jsonschema-rs holds the GIL while it compiles and validates, so a thread does not spare the serving loop:
# work that may take long goes to the worker processes (gateway.checks), each check under a time limit.
# A request compiles at most this many bytes of schema on the loop (about 1 ms); the rest in the workers.
ON_LOOP_SCHEMA_BYTES = 16 * 1024
# Schema bytes x answer bytes past which a check leaves the loop: the worst case measured here (an anyOf
# of a thousand branches over a long array) costs about 60 ps per unit, so this is about 1 ms.
ON_LOOP_CHECK = 1 << 24


@dataclass(frozen=True, slots=True, eq=False)
class Schema:
    """A compiled JSON Schema and its text (sorted-key JSON: the cache key, and what a worker compiles)."""

    text: bytes
    validator: jsonschema_rs.Validator | None  # None: compiled and checked in the workers only
    refs: bool  # it has references, so its cost is not bounded by its size (a recursive oneOf doubles
    # the work per level of the answer): always checked in the workers

    def on_loop(self, instance: str) -> bool:
        """Whether checking this answer text against it is cheap enough for the serving loop."""
        return (
            self.validator is not None and not self.refs and len(self.text) * len(instance) <= ON_LOOP_CHECK
        )


def schema_text(schema: Any, where: str) -> bytes:
    if not isinstance(schema, dict | bool):
        raise SchemaError(f"{where} must be a JSON Schema object, got {describe(schema)}", where)
    try:
        # A copy: orjson's buffer is rounded up and never shrunk (a 57 KB schema held 507 KiB), and this
        # text is kept as long as the schema is cached.
        text = bytes(memoryview(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)))
    except TypeError as exc:
        raise SchemaError(f"{where} cannot be read as JSON: {exc}", where) from None
    if len(text) > MAX_SCHEMA_BYTES:
        raise SchemaError(
            f"{where} is {len(text)} bytes as JSON; the gateway validates schemas of at most "
            f"{MAX_SCHEMA_BYTES} bytes",
            where,
        )
    return text


def compile_schema(schema: Any, where: str) -> Schema:
    text = schema_text(schema, where)
    return Schema(text, compile_validator(schema, where), _has_refs(text))


def compile_validator(schema: Any, where: str) -> jsonschema_rs.Validator:
    try:
        return jsonschema_rs.validator_for(schema, retriever=_refuse_remote, pattern_options=PATTERNS)
    except (jsonschema_rs.ValidationError, ValueError) as exc:
        reason = str(exc).split("\n", 1)[0]
        raise SchemaError(f"{where} is not a valid JSON Schema: {reason}", where) from None


def _has_refs(text: bytes) -> bool:
    return b'"$ref"' in text or b'"$dynamicRef"' in text or b'"$recursiveRef"' in text


class Compiling:
    """One request's schemas as they are read: the bytes it may still compile on the loop, and the schemas
    left to the workers to compile (each must compile before the request goes on: a bad one is a 400)."""

    __slots__ = ("budget", "pending")

    def __init__(self) -> None:
        self.budget = ON_LOOP_SCHEMA_BYTES
        self.pending: list[tuple[Schema, str]] = []


def compiled_size(schema: Schema) -> int:
    """About what a schema takes in memory once compiled: 15-50 times its JSON (measured over schemas of
    300 B to 60 KiB: about 16 KiB, plus 20 bytes per byte of JSON). One compiled in a worker counts the
    same, so the worker and this cache hold about the same schemas."""
    return 16 * 1024 + 20 * len(schema.text)


class SchemaCache:
    """Schemas compiled once per distinct schema (LRU), bounded by entries and by what they take in memory
    together (compiled_size)."""

    def __init__(self, size: int = 1024, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[bytes, Schema] = OrderedDict()

    def get(self, schema: Any, where: str, compiling: Compiling) -> Schema:
        text = schema_text(schema, where)
        found = self.find(text)
        if found is not None:
            return found
        if len(text) > compiling.budget:  # compiled by a worker; cached once it has compiled there
            found = Schema(text, None, _has_refs(text))
            compiling.pending.append((found, where))
            return found
        compiling.budget -= len(text)
        found = Schema(text, compile_validator(schema, where), _has_refs(text))
        self.add(found)
        return found

    def find(self, text: bytes) -> Schema | None:
        found = self._entries.get(text)
        if found is not None:
            self._entries.move_to_end(text)
        return found

    def add(self, schema: Schema) -> None:
        if self.find(schema.text) is not None:
            return  # a request that carries the same schema twice compiles it twice, and counts it once
        self._entries[schema.text] = schema
        self._bytes += compiled_size(schema)
        while len(self._entries) > self._size or self._bytes > self._max_bytes:
            self._bytes -= compiled_size(self._entries.popitem(last=False)[1])

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """The route's validation settings, compiled at policy load."""

    json: JsonMode = "auto"
    schema: Schema | None = None
    tool_calls: bool = True


@dataclass(frozen=True, slots=True)
class Rules:
    """What one request's answer must satisfy."""

    json_object: bool
    schemas: tuple[tuple[Schema, str], ...]  # (schema, where it came from)
    tools: Mapping[str, Schema | None] | None  # declared tools; None: not checked
    tool_choice: Literal["auto", "none", "required"] | None
    named_tool: str | None
    legacy: bool  # functions / function_call rather than tools / tool_calls
    arguments: str = "arguments"  # what the API calls a tool call's arguments (Messages: input)


# An answer with nothing asked of it is still held to the shape of an OpenAI answer.
SHAPE_ONLY = Rules(False, (), None, None, None, False)


def rules_for(
    request: Mapping[str, Any],
    policy: RoutePolicy,
    cache: SchemaCache,
    compiling: Compiling | None = None,
    api: str = "chat",
) -> Rules | None:
    """Raises SchemaError when the request carries a schema that does not compile (the client's fault).
    Schemas past the request's on-loop budget are left in compiling.pending, for the workers to compile.
    api: whose fields name the output format and the tools (chat and completions, responses, messages)."""
    compiling = compiling or Compiling()
    json_object = policy.json == "always"
    schemas: list[tuple[Schema, str]] = []
    asked = _FORMATS.get(api, _chat_format)(request) if policy.json != "off" else None
    if asked is not None:
        json_object = True
        schema, where, source = asked
        if schema is not _NO_SCHEMA:
            schemas.append((cache.get(schema, where, compiling), source))
    if policy.schema is not None:
        json_object = True
        schemas.append((policy.schema, "the route's validation.schema"))
    tools, choice, named, legacy = (
        _TOOLS.get(api, _tool_rules)(request, cache, compiling)
        if policy.tool_calls
        else (None, None, None, False)
    )
    if not json_object and tools is None:
        return None
    return Rules(
        json_object,
        tuple(schemas),
        tools,
        choice,
        named,
        legacy,
        "input" if api == "messages" else "arguments",
    )


_NO_SCHEMA = object()  # JSON asked for, any object


def _chat_format(request: Mapping[str, Any]) -> tuple[Any, str, str] | None:
    fmt = request.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return _NO_SCHEMA, "", ""
    if kind != "json_schema":
        return None
    assert isinstance(fmt, dict)
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise SchemaError(
            "response_format.json_schema.schema is required for type json_schema", FORMAT_SCHEMA
        )
    return spec["schema"], "response_format.json_schema.schema", "response_format"


def _responses_format(request: Mapping[str, Any]) -> tuple[Any, str, str] | None:
    """The Responses API's text.format: {"type": "json_schema", "name", "schema"} or json_object."""
    text = request.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return _NO_SCHEMA, "", ""
    if kind != "json_schema":
        return None
    assert isinstance(fmt, dict)
    if "schema" not in fmt:
        raise SchemaError("text.format.schema is required for type json_schema", "text.format.schema")
    return fmt["schema"], "text.format.schema", "text.format"


def _messages_format(request: Mapping[str, Any]) -> tuple[Any, str, str] | None:
    """The Messages API's structured output: output_config.format {"type": "json_schema", "schema"}."""
    config = request.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    if "schema" not in fmt:
        raise SchemaError(
            "output_config.format.schema is required for type json_schema", "output_config.format.schema"
        )
    return fmt["schema"], "output_config.format.schema", "output_config.format"


_FORMATS = {"responses": _responses_format, "messages": _messages_format}

ToolRules = tuple[dict[str, "Schema | None"] | None, Any, str | None, bool]


def _declared(
    declared: Any,
    field: str,
    cache: SchemaCache,
    compiling: Compiling,
    schema_of: Callable[[Any], tuple[Any, Any, str] | None],
    optional: bool = True,
) -> dict[str, Schema | None]:
    """A request's tools by name, each with its compiled schema (None: it has none, when optional). schema_of:
    a tool's (name, schema, where the schema is under the tool), or None for tools that are not checked
    (hosted or server tools: nothing to check them against)."""
    if not isinstance(declared, list):
        raise SchemaError(f"{field} must be an array, not {describe(declared)}", field)
    tools: dict[str, Schema | None] = {}
    for index, tool in enumerate(declared):
        found = schema_of(tool) if isinstance(tool, dict) else None
        if found is None or not isinstance(found[0], str):
            continue
        name, schema, where = found
        checked = schema is not None or not optional
        tools[name] = cache.get(schema, f"{field}[{index}].{where}", compiling) if checked else None
    return tools


def _tool_rules(request: Mapping[str, Any], cache: SchemaCache, compiling: Compiling) -> ToolRules:
    declared = request.get("tools")
    legacy = False
    field = "tools"
    if not declared and request.get("functions"):
        declared, legacy, field = request["functions"], True, "functions"
    if not declared:
        return None, None, None, False

    def schema_of(tool: dict[str, Any]) -> tuple[Any, Any, str] | None:
        function = tool if legacy else tool.get("function")
        if not isinstance(function, dict):
            return None
        return (
            function.get("name"),
            function.get("parameters"),
            "parameters" if legacy else "function.parameters",
        )

    tools = _declared(declared, field, cache, compiling, schema_of)
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


def _responses_tools(request: Mapping[str, Any], cache: SchemaCache, compiling: Compiling) -> ToolRules:
    """The Responses API's function tools ({"type": "function", "name", "parameters"}; hosted tools are
    not checked) and its tool_choice: a mode, {"type": "function", "name"}, or {"type": "allowed_tools",
    "mode", "tools"} (calls limited to those tools)."""
    declared = request.get("tools")
    if not declared:
        return None, None, None, False
    tools = _declared(
        declared,
        "tools",
        cache,
        compiling,
        lambda tool: (
            (tool.get("name"), tool.get("parameters"), "parameters")
            if tool.get("type") == "function"
            else None
        ),
    )
    raw = request.get("tool_choice")
    choice: Any = None
    named = None
    if raw in ("auto", "none", "required"):
        choice = raw
    elif isinstance(raw, dict) and raw.get("type") == "function":
        if not isinstance(raw.get("name"), str):
            raise FieldError('tool_choice: expected {"type": "function", "name": <a string>}', "tool_choice")
        named = raw["name"]
    elif isinstance(raw, dict) and raw.get("type") == "allowed_tools":
        allowed = raw.get("tools")
        if raw.get("mode") not in ("auto", "required") or not isinstance(allowed, list):
            raise FieldError(
                'tool_choice: allowed_tools needs "mode" (auto or required) and "tools" (an array)',
                "tool_choice",
            )
        choice = raw["mode"]
        names = {t.get("name") for t in allowed if isinstance(t, dict) and t.get("type") == "function"}
        tools = {name: schema for name, schema in tools.items() if name in names}
    return tools, choice, named, False


def _messages_tools(request: Mapping[str, Any], cache: SchemaCache, compiling: Compiling) -> ToolRules:
    """The Messages API's client tools ({"name", "input_schema"}; server tools, which carry a versioned
    "type" and no input_schema, are not checked) and its tool_choice {"type": "auto" | "any" | "tool" |
    "none", "name"}."""
    declared = request.get("tools")
    if not declared:
        return None, None, None, False
    tools = _declared(
        declared,
        "tools",
        cache,
        compiling,
        lambda tool: (
            (tool.get("name"), tool["input_schema"], "input_schema") if "input_schema" in tool else None
        ),
        optional=False,  # the API requires it: null is no schema
    )
    raw = request.get("tool_choice")
    choice: Any = None
    named = None
    if raw is not None:
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind not in ("auto", "any", "tool", "none"):
            raise FieldError(
                'tool_choice: expected {"type": "auto" | "any" | "tool" | "none"}', "tool_choice"
            )
        assert isinstance(raw, dict)
        if kind == "tool":
            if not isinstance(raw.get("name"), str):
                raise FieldError('tool_choice: type "tool" needs "name" (a string)', "tool_choice")
            named = raw["name"]
        else:
            choice = {"auto": "auto", "any": "required", "none": "none"}[kind]
    return tools, choice, named, False


_TOOLS = {"responses": _responses_tools, "messages": _messages_tools}


def check_chat(body: Any, rules: Rules, later: list[Deferred] | None = None) -> Failure | None:
    """The answer's first failure. With later, schema checks too costly for the loop are not run but
    appended to it (the answer passes only if they pass too); without, every check runs here."""
    choices, failure = _choices(body)
    if failure is not None:
        return failure
    for position, choice in enumerate(choices):
        where = f"choices[{position}]"
        message = choice.get("message")
        if not isinstance(message, dict):
            return _malformed(f"{where}.message", "an object", message)
        failure = check_message(message, rules, f"{where}.message", later)
        if failure is not None:
            return failure
    return None


def check_completion(body: Any, rules: Rules, later: list[Deferred] | None = None) -> Failure | None:
    choices, failure = _choices(body)
    if failure is not None:
        return failure
    for position, choice in enumerate(choices):
        text = choice.get("text")
        if text is not None and not isinstance(text, str):
            return _malformed(f"choices[{position}].text", "a string", text)
        if not rules.json_object:
            continue  # text was not asked to be JSON: nothing more to hold it to
        failure = _check_content(text, rules, f"choices[{position}].text", later)
        if failure is not None:
            return failure
    return None


def check_responses(body: Any, rules: Rules, later: list[Deferred] | None = None) -> Failure | None:
    """A Responses API answer: its function_call output items against the declared tools and tool_choice,
    and (when no tool was called) its output text against the JSON format."""
    if isinstance(body, dict) and body.get("status") in ("queued", "in_progress"):
        return None  # a background response, not made yet: its client reads it later, by its id
    output, failure = _objects(body.get("output") if isinstance(body, dict) else None, "output")
    if failure is not None:
        return failure
    calls: list[tuple[str, str, str]] = []
    texts: list[tuple[str, str]] = []
    for where, item in output:
        kind = item.get("type")
        if kind == "function_call":
            name, arguments = item.get("name"), item.get("arguments")
            if not isinstance(name, str):
                return _malformed(f"{where}.name", "a string", name)
            if not isinstance(arguments, str):
                return _malformed(f"{where}.arguments", "a string of JSON", arguments)
            calls.append((where, name, arguments))
        elif kind == "message":
            parts, failure = _objects(item.get("content"), f"{where}.content")
            failure = failure or _texts(parts, "output_text", texts)
            if failure is not None:
                return failure
    return _check_answer(calls, texts, "output", rules, later)


def check_messages(body: Any, rules: Rules, later: list[Deferred] | None = None) -> Failure | None:
    """A Messages API answer: its tool_use blocks (their input) against tools[].input_schema and
    tool_choice, and (when no tool was used) its text against the JSON format."""
    blocks, failure = _objects(body.get("content") if isinstance(body, dict) else None, "content")
    texts: list[tuple[str, str]] = []
    failure = failure or _texts(blocks, "text", texts)
    if failure is not None:
        return failure
    calls: list[tuple[str, str, str]] = []
    for where, block in blocks:
        if block.get("type") != "tool_use":
            continue
        name, given = block.get("name"), block.get("input")
        if not isinstance(name, str):
            return _malformed(f"{where}.name", "a string", name)
        if isinstance(given, dict):
            arguments = orjson.dumps(given).decode()
        elif isinstance(given, str):  # a stream's input_json_delta pieces that did not parse
            arguments = given
        else:
            return Failure("tool_args_parse", f"{where}.input of {name!r} must be a JSON object")
        calls.append((where, name, arguments))
    return _check_answer(calls, texts, "content", rules, later)


def _objects(value: Any, where: str) -> tuple[list[tuple[str, dict[str, Any]]], Failure | None]:
    """(path, object) of each element of an array of objects (output items, content parts or blocks)."""
    if not isinstance(value, list):
        return [], _malformed(where, "an array", value)
    out = []
    for index, element in enumerate(value):
        if not isinstance(element, dict):
            return [], _malformed(f"{where}[{index}]", "an object", element)
        out.append((f"{where}[{index}]", element))
    return out, None


def _texts(parts: list[tuple[str, dict[str, Any]]], kind: str, into: list[tuple[str, str]]) -> Failure | None:
    """Adds (path, text) of each part of this type (output_text, text), each checked to be a string."""
    for where, part in parts:
        if part.get("type") == kind:
            text = part.get("text")
            if not isinstance(text, str):
                return _malformed(f"{where}.text", "a string", text)
            into.append((f"{where}.text", text))
    return None


def _check_answer(
    calls: list[tuple[str, str, str]],
    texts: list[tuple[str, str]],
    where: str,
    rules: Rules,
    later: list[Deferred] | None,
) -> Failure | None:
    """An answer's calls, and (when it called none) its texts, joined, held to JSON: checked as chat's are.
    where: what the failures name when no text is there (otherwise the first text's path)."""
    if rules.tools is not None:
        failure = _check_calls(calls, rules, "the answer", later)
        if failure is not None:
            return failure
    if calls or not rules.json_object:
        return None  # a tool call: there is no text to hold to JSON
    text = "".join(t for _, t in texts) if texts else None
    return _check_content(text, rules, texts[0][0] if texts else where, later)


Check = Callable[[Any, Rules, "list[Deferred] | None"], Failure | None]


def check_for(api: str) -> Check:
    """The answer check of an API (chat completions' for chat, completions' for completions, ...)."""
    return {"chat": check_chat, "responses": check_responses, "messages": check_messages}.get(
        api, check_completion
    )


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


def check_message(
    message: Mapping[str, Any], rules: Rules, where: str = "message", later: list[Deferred] | None = None
) -> Failure | None:
    calls, failure = _calls(message, rules.legacy, where)
    if failure is not None:
        return failure
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        return _malformed(f"{where}.content", "a string", content)
    if rules.tools is not None:
        failure = _check_calls(calls, rules, where, later)
        if failure is not None:
            return failure
    if calls:
        return None  # the model answered with a tool call: there is no content to hold to JSON
    if rules.json_object:
        return _check_content(content, rules, f"{where}.content", later)
    return None


def _calls(
    message: Mapping[str, Any], legacy: bool, where: str
) -> tuple[list[tuple[str, str, str]], Failure | None]:
    """(path of the call, name, arguments) of every call in the message, each checked to be strings."""
    raw: list[tuple[str, Any]] = []
    if legacy:
        call = message.get("function_call")
        if call is not None:
            raw.append((f"{where}.function_call", call))
    else:
        calls = message.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            return [], _malformed(f"{where}.tool_calls", "an array", calls)
        for index, call in enumerate(calls or ()):
            if not isinstance(call, dict):
                return [], _malformed(f"{where}.tool_calls[{index}]", "an object", call)
            raw.append((f"{where}.tool_calls[{index}].function", call.get("function")))
    out = []
    for path, function in raw:
        if not isinstance(function, dict):
            return [], _malformed(path, "an object", function)
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str):
            return [], _malformed(f"{path}.name", "a string", name)
        if not isinstance(arguments, str):
            return [], _malformed(f"{path}.arguments", "a string of JSON", arguments)
        out.append((path, name, arguments))
    return out, None


def _check_calls(
    calls: list[tuple[str, str, str]], rules: Rules, where: str, later: list[Deferred] | None
) -> Failure | None:
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
                f"{path}.name: {name[:100]!r} is not a declared tool (declared: {declared[:300]})",
            )
        field = f"{path}.{rules.arguments}"
        try:
            parsed = orjson.loads(arguments)
        except orjson.JSONDecodeError as exc:
            return Failure("tool_args_parse", f"{field} of {name!r} are not valid JSON: {exc}")
        if not isinstance(parsed, dict):
            return Failure("tool_args_parse", f"{field} of {name!r} must be a JSON object")
        schema = tools[name]
        if schema is not None:
            check = Deferred(schema, arguments, "tool_args_schema", field, f" (tool {name!r})")
            failure = check.run(parsed, later)
            if failure is not None:
                return failure
    return None


def _check_content(content: Any, rules: Rules, where: str, later: list[Deferred] | None) -> Failure | None:
    if not isinstance(content, str) or not content.strip():
        return Failure("json_parse", f"{where}: expected a JSON object, got no content")
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        return Failure("json_parse", f"{where}: not valid JSON ({exc})")
    if not isinstance(value, dict):
        return Failure("json_parse", f"{where}: expected a JSON object, got a JSON {_json_type(value)}")
    for schema, source in rules.schemas:
        failure = Deferred(schema, content, "json_schema", where, f" (schema from {source})").run(
            value, later
        )
        if failure is not None:
            return failure
    return None


@dataclass(frozen=True, slots=True)
class Deferred:
    """One schema check of one piece of an answer (its JSON text), and how its failure reads."""

    schema: Schema
    instance: str
    kind: Kind
    where: str
    source: str

    def run(self, value: Any, later: list[Deferred] | None) -> Failure | None:
        """Checks the parsed value here, or, when it may be costly and there is a later, leaves it there."""
        if later is not None and not self.schema.on_loop(self.instance):
            later.append(self)
            return None
        validator = self.schema.validator or compile_validator(orjson.loads(self.schema.text), self.where)
        error = first_error(validator, value)
        return None if error is None else self.failed(error)

    def failed(self, error: str) -> Failure:
        return Failure(self.kind, f"{self.where}{error}{self.source}")


def first_error(validator: jsonschema_rs.Validator, value: Any) -> str | None:
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
