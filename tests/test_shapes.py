"""Every request shape the OpenAI API describes, and the ways clients get each field wrong, against a
running gateway whose upstream always answers well-formed output: whatever the gateway says is its own
doing, so it must be a success or a 4xx naming the field, never a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import GatewayFactory, policy_yaml
from tests.test_fuzz import assert_answer, json_values
from tests.wellformed import well_formed


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with well_formed() as url:
        yield url


SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)


def mostly(good: st.SearchStrategy[Any], odds: int = 4) -> st.SearchStrategy[Any]:
    """A field in a shape the API allows, or (one time in odds + 1) any JSON at all."""
    # (one_of(good, good, ..., bad) would not do: hypothesis does not weigh repeated branches)
    return st.tuples(st.integers(0, odds), good, json_values).map(lambda t: t[2] if t[0] == 0 else t[1])


# The fields the gateway reads, each mostly in a shape the API allows, sometimes as any JSON at all.
schemas = (
    st.sampled_from(
        [
            {},
            True,
            {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]},
            {"type": "object", "properties": {"answer": {"type": "integer"}}},  # the answer fails it
            {
                "$defs": {"n": {"type": "string"}},
                "type": "object",
                "properties": {"answer": {"$ref": "#/$defs/n"}},
            },
            {"type": "object", "properties": {"answer": {"type": "string", "pattern": "(a*)*\\1$"}}},
            {"type": "nope"},  # does not compile
            {"$ref": "https://example.com/schema.json"},  # remote: refused
            {
                "type": "object",
                "properties": {f"p{i}": {"type": "string"} for i in range(900)},
            },  # compiled by a worker
        ]
    )
    | json_values
)
function = st.fixed_dictionaries(
    {"name": mostly(st.sampled_from(["search", "lookup"]))},
    optional={
        "description": mostly(st.text(max_size=10)),
        "parameters": schemas,
        "strict": json_values,
    },
)
tool = st.fixed_dictionaries({"type": mostly(st.just("function")), "function": mostly(function)})
tool_choice = st.one_of(
    st.sampled_from(["auto", "none", "required"]),
    st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": st.sampled_from(["search", "nope"])}),
        }
    ),
    st.fixed_dictionaries({"type": st.just("function") | json_values}, optional={"function": json_values}),
    json_values,
)
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10) | json_values}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": mostly(st.fixed_dictionaries({"url": st.just("data:,")})),
        }
    ),
    json_values,
)
message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))},
    optional={
        "content": mostly(st.text(max_size=20) | st.lists(part, max_size=2) | st.none()),
        "name": mostly(st.text(max_size=5)),
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {
                    "id": st.just("c"),
                    "type": st.just("function"),
                    "function": st.fixed_dictionaries(
                        {"name": st.just("search"), "arguments": st.just("{}") | json_values}
                    ),
                }
            ),
            max_size=1,
        )
        | json_values,
        "tool_call_id": mostly(st.text(max_size=5)),
    },
)
response_format = st.one_of(
    st.just({"type": "text"}),
    st.just({"type": "json_object"}),
    st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries(
                {"name": st.just("x"), "schema": schemas}, optional={"strict": st.booleans()}
            )
            | json_values,
        }
    ),
    json_values,
)
common = {
    "stream": mostly(st.booleans(), odds=9),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans() | json_values})),
    "n": mostly(st.integers(-1, 3)),
    "max_tokens": mostly(st.integers(-1, 50)),
    "temperature": mostly(st.floats(0, 2, allow_nan=False)),
    "user": mostly(st.sampled_from(["alice", "bob"])),
    "metadata": json_values,
    "seed": mostly(st.integers()),
}
models = mostly(st.sampled_from(["chat"] * 5 + ["no-such-route"]), odds=9)
chat = st.fixed_dictionaries(
    {"model": models, "messages": mostly(st.lists(message, min_size=1, max_size=3), odds=9)},
    optional={
        **common,
        "tools": mostly(st.lists(tool, max_size=2)),
        "tool_choice": tool_choice,
        "parallel_tool_calls": mostly(st.booleans()),
        "functions": mostly(st.lists(function, max_size=2)),
        "function_call": st.sampled_from(["auto", "none"])
        | st.fixed_dictionaries({"name": st.just("search")})
        | json_values,
        "response_format": response_format,
    },
)
completions = st.fixed_dictionaries(
    {
        "model": models,
        "prompt": mostly(st.text(max_size=20) | st.lists(st.text(max_size=5), max_size=2)),
    },
    optional={**common, "echo": st.booleans() | json_values, "suffix": st.text(max_size=5) | json_values},
)
embeddings = st.fixed_dictionaries(
    {
        "model": models,
        "input": mostly(st.text(max_size=20) | st.lists(st.text(max_size=5), max_size=2)),
    },
    optional={
        "encoding_format": mostly(st.sampled_from(["float", "base64"])),
        "dimensions": json_values,
        "user": json_values,
        "stream": st.booleans(),
    },
)
_chat = st.tuples(st.just("/v1/chat/completions"), chat)
requests = st.integers(0, 3).flatmap(  # chat, the richest shape, half the time
    lambda i: (
        _chat,
        _chat,
        st.tuples(st.just("/v1/completions"), completions),
        st.tuples(st.just("/v1/embeddings"), embeddings),
    )[i]
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "x-canary": st.sampled_from(["base", "candidate", "nonsense", ""]),
        "x-session-id": st.sampled_from(["s1", "s2", ""]),
        "x-tenant": st.sampled_from(["acme", "globex", "other"]),
        "x-request-id": st.sampled_from(["client-id-1", "", "x" * 200]),
    },
)

POLICY = """\
assignment: {sticky_keys: [header:x-session-id, body:user], allow_override_header: true}
cohorts: {source: "header:x-tenant", values: [acme, globex]}
mirror: {percent: 50, sample_by: request}
validation: {json: auto, tool_calls: true}
"""


def test_no_request_shape_gets_a_5xx_from_the_gateway(upstream: str, make_gateway: GatewayFactory) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", upstream, upstream, weight=50, extra=POLICY)})
    with httpx.Client(base_url=gw.url, timeout=30) as client:

        @SETTINGS
        @given(request=requests, sent_headers=headers)
        def check(request: tuple[str, dict[str, Any]], sent_headers: dict[str, str]) -> None:
            path, body = request
            response = client.post(path, json=body, headers=sent_headers)
            assert_answer(response)
            if response.status_code >= 400:  # the error names what to fix
                assert response.json()["error"]["type"] in ("invalid_request_error", "not_found_error"), (
                    response.text
                )

        check()
