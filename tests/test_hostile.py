"""Bad input never hurts: a running gateway against hostile schemas, deep JSON, malformed fields."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import httpx

from gateway.body import MAX_DEPTH
from gateway.loader import load_dir
from gateway.validation import MAX_SCHEMA_BYTES
from tests.conftest import GatewayFactory, Sim, policy_yaml
from tests.test_fallback import MESSAGES


def post(url: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, **body}, timeout=60
    )


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def test_a_schema_past_the_size_limit_is_a_400_naming_it(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)})
    properties = {f"field_{i}": {"type": "string", "pattern": "^[a-z]+$"} for i in range(3000)}
    response = post(gw.url, **schema_format({"type": "object", "properties": properties}))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_schema" and f"at most {MAX_SCHEMA_BYTES} bytes" in error["message"]


def test_a_catastrophic_pattern_gives_up_at_once_and_the_gateway_keeps_answering(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, weight=100)})
    schema = {
        "type": "object",
        "properties": {"words": {"type": "array", "items": {"type": "string", "pattern": r"(a*)*\1$"}}},
        "required": ["words"],
    }
    answered: list[httpx.Response] = []
    hostile = threading.Thread(
        target=lambda: answered.extend(post(gw.url, **schema_format(schema)) for _ in range(5))
    )
    hostile.start()
    while hostile.is_alive():  # the health probe answers while the hostile requests are in flight
        assert httpx.get(f"{gw.url}/healthz", timeout=10).status_code == 200
        hostile.join(0.01)
    assert [r.status_code for r in answered] == [200] * 5  # validated (or given up on) and answered


def test_json_nested_deeper_than_the_parser_takes_is_a_400_naming_the_limit(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)})
    # The body object and "metadata" are two levels: MAX_DEPTH - 2 arrays inside them is the most it takes.
    for depth, status in ((300, 200), (MAX_DEPTH - 2, 200), (MAX_DEPTH - 1, 400), (5000, 400)):
        deep = "[" * depth + "]" * depth
        body = (
            '{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "metadata": {"x": '
            + deep
            + "}}"
        )
        response = httpx.post(
            f"{gw.url}/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code == status, response.text
        if status == 400:
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and f"({MAX_DEPTH} levels)" in error["message"]


def test_a_malformed_tool_choice_is_a_400_naming_the_field(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)})
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for choice in (
        {"type": "function", "function": "f"},
        {"type": "function", "function": {"name": 5}},
        {"type": "function"},
    ):
        response = post(gw.url, tools=tools, tool_choice=choice)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "tool_choice"
        assert error["message"] == 'tool_choice.function: expected an object with "name" (a string)'


ALIAS_BOMB = """\
a: &a [x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
route: bomb
arms: {base: {url: "http://127.0.0.1:9/v1", model: m}}
"""


def test_a_yaml_alias_bomb_is_refused_with_file_line_and_reason(tmp_path: Path) -> None:
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)  # 9^9 nodes once its aliases are expanded
    routes, problems = load_dir(tmp_path)
    assert routes == {}
    (problem,) = problems
    assert str(problem).startswith(f"{tmp_path / 'bomb.yaml'}:")
    assert "too many aliases" in problem.message
    shared = (
        "route: ok\narms:\n  base: {url: 'http://127.0.0.1:9/v1', model: m, headers: &h {X-Team: search}}\n"
        "  candidate: {url: 'http://127.0.0.1:9/v1', model: n, headers: *h}\n"
    )
    (tmp_path / "bomb.yaml").write_text(shared)  # aliases in reasonable use still load
    routes, problems = load_dir(tmp_path)
    assert "ok" in routes, problems


def test_check_refuses_a_header_value_no_http_request_can_carry(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "route: r\narms:\n"
        "  base: {url: 'http://127.0.0.1:9/v1', model: m, headers: {X-Team: 'équipe→search'}}\n"
    )
    _, problems = load_dir(tmp_path)
    (problem,) = problems
    assert problem.line == 3 and problem.path == "arms.base.headers"
    assert "cannot carry (only Latin-1)" in problem.message


def test_a_client_that_stops_sending_its_body_gets_a_408_and_the_connection_closes(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)}, client_timeout_s=0.5)
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        slow.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"model": "chat", '  # ... and nothing more
        )
        answer = b""
        while chunk := slow.recv(65536):  # read to the end: the gateway closes the connection
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert httpx.get(f"{gw.url}/healthz").status_code == 200
