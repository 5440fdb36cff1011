"""The body goes upstream as the client sent it: only the top-level model changes, byte for byte."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.body import MAX_DEPTH, model_spans, parse
from gateway.errors import InvalidRequest
from tests.conftest import GatewayFactory, RawUpstream, policy_yaml
from tests.test_transport import COMPLETION, answer

# JSON text written the ways clients write it: any whitespace, escapes, big and odd numbers, repeated keys.
_ws = st.sampled_from(["", " ", "\n  ", "\t", "\r\n"])
_number = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.sampled_from(["0", "-0", "1.0", "1e3", "1E-7", "-2.50", "18446744073709551616"]),
)
_string = st.text(max_size=12).flatmap(
    lambda s: st.sampled_from([json.dumps(s), json.dumps(s, ensure_ascii=False)])
)
_key = st.sampled_from(['"model"', '"mod\\u0065l"', '"messages"', '"a"', '"\\u00e9"', '"Model"']) | _string
_scalar = st.one_of(_number, _string, st.sampled_from(["true", "false", "null"]))


def _object(entries: st.SearchStrategy[list[tuple[str, str]]]) -> st.SearchStrategy[str]:
    return st.tuples(entries, _ws, _ws).map(
        lambda t: "{" + t[1] + ("," + t[2]).join(f"{k}{t[1]}:{t[2]}{v}" for k, v in t[0]) + t[2] + "}"
    )


_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.tuples(st.lists(inner, max_size=4), _ws).map(lambda t: "[" + ("," + t[1]).join(t[0]) + "]"),
        _object(st.lists(st.tuples(_key, inner), max_size=4)),
    ),
    max_leaves=20,
)
# A top-level object with a string "model" somewhere among its keys (and perhaps more of them).
_body = st.tuples(
    st.lists(st.tuples(_key, _value), max_size=5), _string, st.integers(min_value=0, max_value=5), _ws
).map(lambda t: (t[3] + _body_text(t[0], t[1], t[2]) + t[3]).encode())


def _body_text(entries: list[tuple[str, str]], model: str, at: int) -> str:
    entries = list(entries)
    entries.insert(min(at, len(entries)), ('"model"', model))
    return "{" + ", ".join(f"{k}: {v}" for k, v in entries) + "}"


@settings(max_examples=400, deadline=None)
@given(_body)
def test_only_the_top_level_model_changes(raw: bytes) -> None:
    body = parse(raw)
    sent = body.with_model("arm-model")
    assert orjson.loads(sent) == {**body.payload, "model": "arm-model"}  # nested "model" keys untouched
    # Everything around the replaced values is the client's bytes, unchanged.
    spans = model_spans(raw)
    assert spans and orjson.loads(raw[spans[-1][0] : spans[-1][1]]) == body.payload["model"]
    value = b'"arm-model"'
    expected, at = b"", 0
    for start, end in spans:
        expected += raw[at:start] + value
        at = end
    assert sent == expected + raw[at:]


def test_big_integers_key_order_and_duplicate_keys_survive() -> None:
    raw = (
        b'{"messages":[{"role":"user","content":"h\\u00e9 \xc3\xa9"}],  "seed": 18446744073709551616,'
        b'"z":1,"a":2,"z":3, "n": 1.50e0, "metadata": {"model": "keep"}, "model" : "chat"}'
    )
    sent = parse(raw).with_model("tuned")
    assert sent == raw.replace(b'"model" : "chat"', b'"model" : "tuned"')


def test_every_top_level_model_is_replaced_however_it_is_spelled() -> None:
    raw = b'{"model": "chat", "x": [], "mod\\u0065l": "other-model-on-the-server"}'
    assert parse(raw).with_model("m") == b'{"model": "m", "x": [], "mod\\u0065l": "m"}'


@pytest.mark.parametrize(("raw", "sent"), [(b"{}", b'{"model":"m"}'), (b'{ "a":1}', b'{"model":"m", "a":1}')])
def test_a_body_without_a_model_gets_one(raw: bytes, sent: bytes) -> None:
    assert parse(raw).with_model("m") == sent


def test_nesting_deeper_than_the_stack_is_walked_too(low_recursion_limit: None) -> None:
    deep = b"[" * 900 + b"]" * 900
    raw = b'{"a": {"b": ' + deep + b'}, "model": "chat", "\xc3\xa9": ' + deep + b"}"
    body = parse(raw)
    assert body.with_model("m") == raw.replace(b'"chat"', b'"m"')


def test_nesting_past_the_parser_s_limit_is_refused_naming_it() -> None:
    with pytest.raises(InvalidRequest, match=f"deeper than the gateway accepts \\({MAX_DEPTH} levels\\)"):
        parse(b'{"model": "m", "x": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}")


@pytest.fixture
def low_recursion_limit() -> Iterator[None]:
    """The standard library's scanner recurses; a low limit makes the bracket-counting path run."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)
    yield
    sys.setrecursionlimit(limit)


def test_the_upstream_receives_the_client_s_bytes(make_gateway: GatewayFactory) -> None:
    upstream = RawUpstream({"ok": lambda conn: conn.sendall(answer(COMPLETION))})
    try:
        gw = make_gateway({"chat": policy_yaml("chat", f"{upstream.url}/ok/v1")})
        nested: Any = "[" * 1000 + "]" * 1000  # what the parser takes goes through, however deep
        raw = (
            '{"model": "chat", "messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}], '
            f'"seed": 123456789012345678901234567890, "user": "a", "user": "b", "metadata": {nested}}}'
        ).encode()
        response = httpx.post(
            f"{gw.url}/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        (request,) = upstream.requests
        assert request.partition(b"\r\n\r\n")[2] == raw.replace(b'"chat"', b'"base-model"')
    finally:
        upstream.close()
