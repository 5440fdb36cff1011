"""Output validation alone: pure functions over requests and answers."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.apis import as_chat
from gateway.errors import KINDS
from gateway.streaming import Accumulator, accumulate
from gateway.validation import (
    ON_LOOP_SCHEMA_BYTES,
    SHAPE_ONLY,
    Compiling,
    RoutePolicy,
    SchemaCache,
    SchemaError,
    check_chat,
    check_completion,
    check_for,
    compile_schema,
    compiled_size,
    rules_for,
    schema_text,
)

SCHEMA = {
    "type": "object",
    "properties": {"total": {"type": "number"}, "items": {"type": "array"}},
    "required": ["total"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]
AUTO = RoutePolicy()


def answer(content: str | None = None, calls: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls is not None:
        message["tool_calls"] = [
            {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(calls)
        ]
    return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}


def rules(request: dict[str, Any], policy: RoutePolicy = AUTO):  # type: ignore[no-untyped-def]
    return rules_for({"messages": [], **request}, policy, SchemaCache())


def kind(request: dict[str, Any], body: dict[str, Any], policy: RoutePolicy = AUTO) -> str | None:
    failure = check_chat(body, rules(request, policy))
    return failure.kind if failure else None


def test_plain_requests_have_no_rules() -> None:
    assert rules({}) is None
    assert rules({"response_format": {"type": "text"}}) is None
    assert rules({"tools": TOOLS}, RoutePolicy(tool_calls=False)) is None
    assert rules({"response_format": {"type": "json_object"}}, RoutePolicy(json="off")) is None


def test_json_object() -> None:
    req = {"response_format": {"type": "json_object"}}
    assert kind(req, answer('{"a": 1}')) is None
    assert kind(req, answer('{"a": 1')) == "json_parse"
    assert kind(req, answer("[1, 2]")) == "json_parse"
    assert kind(req, answer("")) == "json_parse"
    assert kind(req, answer(None)) == "json_parse"


def test_json_schema_message_names_the_field() -> None:
    req = {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}}
    assert kind(req, answer('{"total": 3.5}')) is None
    failure = check_chat(answer('{"total": "3.5"}'), rules(req))
    assert failure is not None and failure.kind == "json_schema"
    assert failure.message.startswith("choices[0].message.content.total: ")
    assert 'not of type "number"' in failure.message
    assert kind(req, answer('{"total": 1, "extra": 2}')) == "json_schema"


def test_policy_always_and_policy_schema() -> None:
    always = RoutePolicy(json="always")
    assert kind({}, answer("plain words"), always) == "json_parse"
    strict = RoutePolicy(schema=compile_schema(SCHEMA, "validation.schema"))
    assert kind({}, answer('{"total": 1}'), strict) is None
    failure = check_chat(answer('{"items": []}'), rules({}, strict))
    assert failure is not None and "the route's validation.schema" in failure.message


def test_every_choice_is_checked() -> None:
    req = {"response_format": {"type": "json_object"}}
    body = answer('{"ok": true}')
    body["choices"].append({"index": 1, "message": {"role": "assistant", "content": "nope"}})
    failure = check_chat(body, rules(req))
    assert failure is not None and failure.message.startswith("choices[1]")
    assert check_chat({"object": "error"}, rules(req)) is not None  # no choices at all


def test_tool_calls() -> None:
    req = {"tools": TOOLS}
    assert kind(req, answer(calls=[("search", '{"query": "shoes"}')])) is None
    assert kind(req, answer(calls=[("now", "{}")])) is None  # a tool without parameters
    assert kind(req, answer("just words")) is None  # auto: no call is fine
    assert kind(req, answer(calls=[("delete_all", "{}")])) == "tool_unknown"
    assert kind(req, answer(calls=[("search", '{"query": ')])) == "tool_args_parse"
    assert kind(req, answer(calls=[("search", '"shoes"')])) == "tool_args_parse"
    assert kind(req, answer(calls=[("search", '{"q": "shoes"}')])) == "tool_args_schema"
    failure = check_chat(answer(calls=[("search", "{}"), ("nope", "{}")]), rules(req))
    assert failure is not None and "tool_calls[0].function.arguments" in failure.message


def test_tool_choice() -> None:
    call = answer(calls=[("search", '{"query": "x"}')])
    assert kind({"tools": TOOLS, "tool_choice": "none"}, call) == "tool_choice"
    assert kind({"tools": TOOLS, "tool_choice": "required"}, answer("words")) == "tool_choice"
    assert kind({"tools": TOOLS, "tool_choice": "required"}, call) is None
    named = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "now"}}}
    assert kind(named, call) == "tool_choice"
    assert kind(named, answer("words")) == "tool_choice"
    assert kind(named, answer(calls=[("now", "{}")])) is None


def test_tool_call_skips_json_content_checks() -> None:
    req = {"tools": TOOLS, "response_format": {"type": "json_object"}}
    assert kind(req, answer(None, calls=[("search", '{"query": "x"}')])) is None


def test_legacy_function_call() -> None:
    req = {"functions": [t["function"] for t in TOOLS], "function_call": {"name": "search"}}
    good = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "function_call": {"name": "search", "arguments": '{"query": "a"}'},
                }
            }
        ]
    }
    assert kind(req, good) is None
    bad = json.loads(json.dumps(good))
    bad["choices"][0]["message"]["function_call"]["arguments"] = '{"query": 5}'
    assert kind(req, bad) == "tool_args_schema"
    assert kind(req, answer("words")) == "tool_choice"


def test_completions_text() -> None:
    policy_rules = rules({}, RoutePolicy(json="always"))
    assert policy_rules is not None
    assert check_completion({"choices": [{"text": '{"a": 1}'}]}, policy_rules) is None
    failure = check_completion({"choices": [{"text": "words"}]}, policy_rules)
    assert failure is not None and failure.message.startswith("choices[0].text")


def test_schemas_compile_once_per_distinct_schema() -> None:
    cache = SchemaCache(size=2)
    compiling = Compiling()
    first = cache.get(SCHEMA, "x", compiling)
    assert cache.get(json.loads(json.dumps(SCHEMA)), "x", compiling) is first  # equal schema, same one
    reordered = dict(reversed(list(SCHEMA.items())))
    assert cache.get(reordered, "x", compiling) is first  # key order does not matter
    cache.get({"type": "string"}, "x", compiling)
    cache.get({"type": "integer"}, "x", compiling)
    assert len(cache) == 2  # bounded
    assert compiling.pending == []


def test_the_cache_is_bounded_by_what_compiled_schemas_take() -> None:
    def schema(n: int) -> dict[str, Any]:
        return {"type": "object", "properties": {f"p{n:02}_{i:03}": {"type": "string"} for i in range(300)}}

    one = compile_schema(schema(0), "x")
    cache = SchemaCache(max_bytes=compiled_size(one) * 5 + 1)
    for n in range(20):
        cache.get(schema(n), "x", Compiling())
    assert len(cache) == 5  # by the compiled size (20 times the text and more), not the text's 15 KB each
    for n in range(15, 20):
        cache.add(compile_schema(schema(n), "x"))  # again: counted once
    cache.get(schema(0), "x", Compiling())
    assert len(cache) == 5


def test_a_cached_schema_text_holds_only_its_bytes() -> None:
    schema = {
        "type": "object",
        "properties": {f"f{i}": {"type": "string", "maxLength": 9} for i in range(1400)},
    }
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        text = schema_text(schema, "x")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2 * len(text)  # orjson's own buffer is rounded up: 507 KiB for these 57 KB


def test_a_request_compiles_only_its_share_of_schema_bytes_on_the_loop() -> None:
    cache = SchemaCache()
    compiling = Compiling()
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(600)}}
    assert len(schema_text(big, "x")) <= ON_LOOP_SCHEMA_BYTES
    assert cache.get(big, "first", compiling).validator is not None  # within the request's share
    other = {**big, "required": ["p1"]}
    left = cache.get(other, "second", compiling)  # past it: compiled by a worker, cached once it has
    assert left.validator is None and compiling.pending == [(left, "second")] and len(cache) == 1


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"type": "nope"}, "not a valid JSON Schema"),
        ({"$ref": "https://attacker.example/schema.json"}, "remote $ref is not allowed"),
        ("a string", "must be a JSON Schema object"),
    ],
)
def test_bad_schemas_are_the_clients_error(schema: Any, fragment: str) -> None:
    req = {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    with pytest.raises(SchemaError, match=fragment.replace("$", r"\$")):
        rules(req)


def test_local_refs_and_metaschema_resolve() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": {"n": {"type": "integer"}},
        "type": "object",
        "properties": {"n": {"$ref": "#/$defs/n"}},
    }
    req = {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    assert kind(req, answer('{"n": 1}')) is None
    assert kind(req, answer('{"n": "1"}')) == "json_schema"


# Any JSON value, and the shapes the validators read, filled with any JSON values: every answer of any
# shape gets a verdict (a Failure or None), never an exception.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)


def _shaped(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return value | JSON_VALUES


FUNCTION = _shaped(st.fixed_dictionaries({}, optional={"name": JSON_VALUES, "arguments": JSON_VALUES}))
TOOL_CALL = _shaped(
    st.fixed_dictionaries({}, optional={"id": JSON_VALUES, "index": JSON_VALUES, "function": FUNCTION})
)
MESSAGE = _shaped(
    st.fixed_dictionaries(
        {},
        optional={
            "content": JSON_VALUES,
            "tool_calls": _shaped(st.lists(TOOL_CALL, max_size=3)),
            "function_call": FUNCTION,
        },
    )
)
CHOICE = _shaped(
    st.fixed_dictionaries(
        {},
        optional={
            "index": JSON_VALUES,
            "message": MESSAGE,
            "delta": MESSAGE,
            "text": JSON_VALUES,
            "finish_reason": JSON_VALUES,
        },
    )
)
ANSWER = _shaped(st.fixed_dictionaries({}, optional={"choices": _shaped(st.lists(CHOICE, max_size=3))}))
EVERY_RULE = [
    rules_for({"response_format": {"type": "json_object"}}, RoutePolicy(), SchemaCache()),
    rules_for(
        {
            "tools": TOOLS,
            "tool_choice": "required",
            "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
        },
        RoutePolicy(),
        SchemaCache(),
    ),
    rules_for({"functions": [{"name": "search", "parameters": SCHEMA}]}, RoutePolicy(), SchemaCache()),
    SHAPE_ONLY,
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=ANSWER, events=st.lists(ANSWER, max_size=4))
def test_answers_of_any_shape_get_a_verdict_never_an_exception(answer: Any, events: list[Any]) -> None:
    for rules in EVERY_RULE:
        assert rules is not None
        for check in (check_chat, check_completion):
            failure = check(answer, rules)
            assert failure is None or failure.kind in KINDS
    # the same shapes as a stream: each event a chunk, rebuilt and checked like a whole answer
    stream = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
    for endpoint in ("chat", "completions"):
        accumulator = Accumulator.of(stream + b"data: {not json\n\ndata: [DONE]\n\n", endpoint)
        assert accumulator.malformed is not None  # the event that is not JSON, at least
        body = accumulator.body()
        for rules in EVERY_RULE:
            assert rules is not None
            check = check_chat if endpoint == "chat" else check_completion
            failure = check(body, rules)
            assert failure is None or failure.kind in KINDS


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"choices": 5}, "choices: expected a non-empty array, got a number"),
        ({"choices": []}, "choices: expected a non-empty array, got an array"),
        ({"choices": ["x"]}, "choices[0]: expected an object, got a string"),
        ({"choices": [{"message": "hi"}]}, "choices[0].message: expected an object, got a string"),
        (
            {"choices": [{"message": {"tool_calls": [{"function": {"name": ["f"], "arguments": "{}"}}]}}]},
            "choices[0].message.tool_calls[0].function.name: expected a string, got an array",
        ),
        (
            {"choices": [{"message": {"tool_calls": 5}}]},
            "choices[0].message.tool_calls: expected an array, got a number",
        ),
    ],
)
def test_malformed_answers_name_the_field_and_what_was_expected(answer: dict[str, Any], message: str) -> None:
    rules = rules_for({"tools": TOOLS}, RoutePolicy(), SchemaCache())
    assert rules is not None
    failure = check_chat(answer, rules)
    assert failure is not None and failure.kind == "malformed" and failure.message == message


def test_a_malformed_stream_event_is_named_and_the_rest_still_counts() -> None:
    events = [
        {"choices": [{"index": 0, "delta": {"content": '{"a": '}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": 5}}]},
        {"choices": [{"index": 0, "delta": {"content": "1}"}}]},
    ]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    accumulator = Accumulator.of(stream)
    assert (
        accumulator.malformed
        == "stream event 2: choices[0].delta.tool_calls: expected an array, got a number"
    )
    assert accumulator.chat_body()["choices"][0]["message"]["content"] == '{"a": 1}'


# The Responses and Messages APIs: answers and stream events of any shape near theirs.
TEXTS = st.text(max_size=12) | st.just('{"query": "x"}') | st.just("{")
ITEM = _shaped(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["message", "function_call", "reasoning"]) | JSON_VALUES,
            "name": st.just("search") | JSON_VALUES,
            "arguments": TEXTS | JSON_VALUES,
            "call_id": JSON_VALUES,
            "content": _shaped(
                st.lists(
                    _shaped(
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "type": st.sampled_from(["output_text", "refusal"]) | JSON_VALUES,
                                "text": TEXTS | JSON_VALUES,
                            },
                        )
                    ),
                    max_size=2,
                )
            ),
        },
    )
)
USAGE = _shaped(
    st.fixed_dictionaries(
        {},
        optional={
            "input_tokens": st.integers(0, 9) | JSON_VALUES,
            "output_tokens": st.integers(0, 9) | JSON_VALUES,
            "cache_read_input_tokens": st.integers(0, 9) | JSON_VALUES,
            "input_tokens_details": JSON_VALUES,
        },
    )
)
RESPONSE = _shaped(
    st.fixed_dictionaries(
        {},
        optional={
            "id": JSON_VALUES,
            "status": st.sampled_from(["completed", "incomplete"]) | JSON_VALUES,
            "output": _shaped(st.lists(ITEM, max_size=3)),
            "usage": USAGE,
        },
    )
)
RESPONSE_EVENT = _shaped(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(
                [
                    "response.created",
                    "response.output_item.added",
                    "response.output_item.done",
                    "response.output_text.delta",
                    "response.function_call_arguments.delta",
                    "response.completed",
                    "response.failed",
                    "error",
                ]
            )
            | JSON_VALUES,
            "output_index": st.integers(0, 2) | JSON_VALUES,
            "content_index": st.integers(0, 2) | JSON_VALUES,
            "delta": TEXTS | JSON_VALUES,
            "item": ITEM,
            "response": RESPONSE,
        },
    )
)
BLOCK = _shaped(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["text", "tool_use", "thinking"]) | JSON_VALUES,
            "name": st.just("search") | JSON_VALUES,
            "input": _shaped(st.just({"query": "x"})) | TEXTS,
            "text": TEXTS | JSON_VALUES,
        },
    )
)
MESSAGE_ANSWER = _shaped(
    st.fixed_dictionaries(
        {},
        optional={
            "content": _shaped(st.lists(BLOCK, max_size=3)),
            "stop_reason": st.sampled_from(["end_turn", "tool_use", "max_tokens"]) | JSON_VALUES,
            "usage": USAGE,
        },
    )
)
MESSAGE_EVENT = _shaped(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(
                [
                    "message_start",
                    "content_block_start",
                    "content_block_delta",
                    "content_block_stop",
                    "message_delta",
                    "message_stop",
                    "error",
                ]
            )
            | JSON_VALUES,
            "index": st.integers(0, 2) | JSON_VALUES,
            "message": MESSAGE_ANSWER,
            "content_block": BLOCK,
            "delta": _shaped(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "type": st.sampled_from(["text_delta", "input_json_delta"]) | JSON_VALUES,
                        "text": TEXTS | JSON_VALUES,
                        "partial_json": TEXTS | JSON_VALUES,
                        "stop_reason": JSON_VALUES,
                    },
                )
            ),
            "usage": USAGE,
        },
    )
)
API_RULES = {
    "responses": [
        rules_for(
            {
                "tools": [{"type": "function", "name": "search", "parameters": SCHEMA}],
                "tool_choice": "required",
                "text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}},
            },
            RoutePolicy(),
            SchemaCache(),
            api="responses",
        ),
        rules_for(
            {"text": {"format": {"type": "json_object"}}}, RoutePolicy(), SchemaCache(), api="responses"
        ),
        SHAPE_ONLY,
    ],
    "messages": [
        rules_for(
            {
                "tools": [{"name": "search", "input_schema": SCHEMA}],
                "tool_choice": {"type": "tool", "name": "search"},
                "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
            },
            RoutePolicy(),
            SchemaCache(),
            api="messages",
        ),
        SHAPE_ONLY,
    ],
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    response=RESPONSE,
    response_events=st.lists(RESPONSE_EVENT, max_size=5),
    message=MESSAGE_ANSWER,
    message_events=st.lists(MESSAGE_EVENT, max_size=6),
)
def test_responses_and_messages_of_any_shape_get_a_verdict_never_an_exception(
    response: Any, response_events: list[Any], message: Any, message_events: list[Any]
) -> None:
    for api, answer, events in (
        ("responses", response, response_events),
        ("messages", message, message_events),
    ):
        stream = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
        rebuilt = accumulate(api, stream + b"data: {not json\n\n")
        assert rebuilt.malformed is not None
        for body in (answer, rebuilt.body()):
            for rules in API_RULES[api]:
                assert rules is not None
                failure = check_for(api)(body, rules)
                assert failure is None or failure.kind in KINDS
            view = as_chat(api, body)  # what pairs, evaluators, traces and spans read
            assert not isinstance(body, dict) or isinstance(view["choices"][0]["message"], dict)


@pytest.mark.parametrize(
    ("api", "answer", "message"),
    [
        ("responses", {"output": 5}, "output: expected an array, got a number"),
        ("responses", {"output": [{"type": "function_call", "name": 5, "arguments": "{}"}]},
         "output[0].name: expected a string, got a number"),
        ("responses", {"output": [{"type": "function_call", "name": "search", "arguments": "{"}]},
         "output[0].arguments of 'search' are not valid JSON"),
        ("responses", {"output": [{"type": "function_call", "name": "lookup", "arguments": "{}"}]},
         "output[0].name: 'lookup' is not a declared tool (declared: search)"),
        ("responses", {"output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}]},
         "the answer: tool_choice is 'required' but the model called no tool"),
        ("messages", {"content": [{"type": "tool_use", "name": "search", "input": {"total": "5"}}]},
         "content[0].input.total: \"5\" is not of type \"number\" (tool 'search')"),
        ("messages", {"content": [{"type": "tool_use", "name": "search", "input": "{"}]},
         "content[0].input of 'search' are not valid JSON"),
        ("messages", {"content": [{"type": "tool_use", "name": "search", "input": 3}]},
         "content[0].input of 'search' must be a JSON object"),
        ("messages", {"content": "hi"}, "content: expected an array, got a string"),
    ],
)  # fmt: skip
def test_each_apis_failures_name_its_own_fields(api: str, answer: Any, message: str) -> None:
    rules = API_RULES[api][0]
    assert rules is not None
    failure = check_for(api)(
        answer, rules if "tool_choice" in message or api == "messages" else API_RULES[api][0]
    )
    assert failure is not None and failure.message.startswith(message), failure
