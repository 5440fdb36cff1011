"""Bad input against the running gateway: generated bodies and headers (hypothesis) and the classic
hostile cases. Every answer is a success or a well-formed OpenAI error with a 4xx status."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import GatewayFactory, Sim, policy_yaml

APIS = "apis: [chat, completions, embeddings, responses, messages]"
ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"]
EXAMPLES = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "nobody"]) | json_values},
    optional={
        "content": st.text(max_size=50) | json_values,
        "tool_calls": json_values,
        "name": json_values,
        "tool_call_id": json_values,
    },
)
tool = st.fixed_dictionaries(
    {"type": st.just("function") | json_values},
    optional={
        # the Responses API's flat function tools, the Messages API's tools
        "name": st.text(max_size=10) | json_values,
        "parameters": json_values | st.just({"type": "object", "properties": {}}),
        "input_schema": json_values | st.just({"type": "object"}),
        "function": st.fixed_dictionaries(
            {"name": st.text(max_size=10) | json_values},
            optional={"parameters": json_values | st.just({"type": "object", "properties": {}})},
        )
        | json_values,
    },
)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["chat", "missing-route", ""]) | json_values},
    optional={
        "messages": st.lists(message, max_size=3) | json_values,
        "prompt": st.text(max_size=30) | json_values,
        "input": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.just({"include_usage": True}) | json_values,
        "n": st.integers(-2, 4) | json_values,
        "max_tokens": st.integers(-5, 50) | json_values,
        "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
        "tools": st.lists(tool, max_size=2) | json_values,
        "tool_choice": st.sampled_from(
            ["auto", "none", "required", {"type": "any"}, {"type": "tool", "name": "f"}, {"type": "function"}]
        )
        | json_values,
        "text": st.just({"format": {"type": "json_schema", "name": "x", "schema": {}}}) | json_values,
        "output_config": st.just({"format": {"type": "json_schema", "schema": {}}}) | json_values,
        "previous_response_id": st.text(max_size=12) | json_values,
        "conversation": st.text(max_size=12) | json_values,
        "instructions": json_values,
        "system": json_values,
        "response_format": st.sampled_from(
            [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}]
        )
        | json_values,
        "user": json_values,
        "metadata": json_values,
        "x_vendor_extension": json_values,
    },
)
# Names that frame the message are the HTTP client's to set: httpx refuses to send a made-up one.
FRAMING = {"host", "content-length", "transfer-encoding", "connection", "expect", "upgrade", "te", "trailer"}
header_names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20).filter(
    lambda name: name not in FRAMING
)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip)
headers = st.dictionaries(
    header_names
    | st.sampled_from(["x-canary", "x-request-id", "content-type", "x-session-id", "authorization"]),
    header_values,
    max_size=5,
)


def assert_answer(response: httpx.Response) -> None:
    """A success, or an OpenAI error with a 4xx status: never a 5xx, never a stack trace."""
    assert "Traceback" not in response.text
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith(("data: [DONE]", "}")), response.text[-300:]
        else:
            assert isinstance(response.json(), dict)
        return
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    if response.json().get("type") == "error":  # Anthropic's shape, on /v1/messages (an upstream's own, too)
        assert isinstance(error["type"], str)
    else:
        assert {"type", "code", "param"} <= error.keys()


@pytest.fixture
def gateway(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> str:
    extra = "assignment: {allow_override_header: true}\nvalidation: {json: auto, tool_calls: true}"
    return make_gateway(
        {
            "chat": policy_yaml(
                "chat",
                sims[0].url,
                sims[1].url,
                weight=50,
                extra=extra,
                base_extra=APIS,
                candidate_extra=APIS,
            )
        },
        max_body_bytes=64 * 1024,
    ).url


def test_generated_json_bodies_and_headers(gateway: str) -> None:
    with httpx.Client(base_url=gateway, timeout=30) as client:

        @EXAMPLES
        @given(endpoint=st.sampled_from(ENDPOINTS), body=bodies, sent_headers=headers)
        def check(endpoint: str, body: dict[str, Any], sent_headers: dict[str, str]) -> None:
            sent_headers = {k: v for k, v in sent_headers.items() if k != "content-type"}
            response = client.post(endpoint, json=body, headers=sent_headers)
            assert_answer(response)
            if response.status_code == 400 and "x-canarygate-arm" not in response.headers:
                # The gateway's own refusal of a JSON object (no arm answered it) names the field (or
                # header) to fix, present or missing.
                assert response.json()["error"].get("param"), (body, response.text)

        check()


def test_generated_raw_bodies_and_content_types(gateway: str) -> None:
    with httpx.Client(base_url=gateway, timeout=30) as client:

        @EXAMPLES
        @given(
            endpoint=st.sampled_from(ENDPOINTS),
            body=st.binary(max_size=300) | st.text(max_size=100).map(str.encode),
            content_type=st.sampled_from(
                [
                    "application/json",
                    "text/plain",
                    "application/x-www-form-urlencoded",
                    "",
                    "application/json; charset=latin-1",
                ]
            ),
        )
        def check(endpoint: str, body: bytes, content_type: str) -> None:
            assert_answer(client.post(endpoint, content=body, headers={"content-type": content_type}))

        check()


def test_hostile_classics(gateway: str, sims: tuple[Sim, Sim]) -> None:
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gateway, timeout=30) as client:

        def post(**kwargs: Any) -> httpx.Response:
            response = client.post("/v1/chat/completions", **kwargs)
            assert_answer(response)
            return response

        assert post(content=b"[" * 100_000 + b"]" * 100_000).json()["error"]["code"] in (
            "invalid_json",
            "request_too_large",
        )
        deep = "[" * 5_000 + "]" * 5_000
        assert post(content=f'{{"model": "chat", "messages": {deep}}}'.encode()).status_code == 400
        assert (
            post(
                content=b'{"model": "chat", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
            ).status_code
            == 400
        )
        assert post(content=b"x" * 70_000).json()["error"]["code"] == "request_too_large"
        assert post(json=chat, headers={"content-type": "text/html"}).status_code == 415
        assert post(json={"model": "chat"}).json()["error"]["code"] == "missing_field"
        assert post(json={"messages": chat["messages"]}).json()["error"]["code"] == "missing_model"
        big = post(json={**chat, "messages": [{"role": "user", "content": "x" * 60_000}]})
        assert big.status_code == 200  # a large body is not a large head
        many = post(json={**chat, "n": 3})
        assert len(many.json()["choices"]) == 3
        post(json={**chat, "x_vendor_extension": {"keep": [1, 2]}, "seed": 7}, headers={"x-canary": "base"})
        bodies = [r.get("body") or {} for r in sims[0].requests()]
        assert {"keep": [1, 2]} in [
            b.get("x_vendor_extension") for b in bodies
        ]  # unknown fields pass through
        post(json=chat, headers={"x-pad": "v" * 60_000})  # a big header is no problem under the limits


def test_oversized_headers_are_refused_without_taking_the_server_down(gateway: str) -> None:
    """httptools has no bound on the request head: the gateway's protocol answers 431 past 64 KiB,
    in OpenAI's format, and closes; everyone else is served as before."""
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: " + b"a" * 70_000
        sock.sendall(head)  # one endless header value, never finished
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status, _, rest = reply.partition(b"\r\n")
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large", reply[:300]
    error = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_header_fields_too_large" and "65536 bytes" in error["message"]
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    ok = httpx.post(f"{gateway}/v1/chat/completions", json=chat, headers={"x-big-but-fine": "v" * 60_000})
    assert ok.status_code == 200
    assert json.loads(ok.text)["object"] == "chat.completion"
