"""Bad input never hurts: a running gateway against hostile schemas, deep JSON, malformed fields."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from gateway.body import MAX_DEPTH
from gateway.loader import load_dir
from gateway.validation import MAX_SCHEMA_BYTES
from tests.conftest import GatewayFactory, RawUpstream, Sim, policy_yaml
from tests.test_fallback import MESSAGES
from tests.test_metrics import scrape, value
from tests.test_transport import answer


def post(url: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, **body}, timeout=60
    )


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def test_schemas_past_the_size_limit_are_400s_naming_it_and_cost_no_memory(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)}, admin_token="admin")
    before = _runtime(gw.url)["rss_bytes"]
    for n in range(4):  # 1.2 MB each, all distinct (before the limit: +600 MiB, kept)
        properties = {f"field_{n}_{i}": {"type": "string", "pattern": "^[a-z]+$"} for i in range(20_000)}
        response = post(gw.url, **schema_format({"type": "object", "properties": properties}))
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid_schema" and f"at most {MAX_SCHEMA_BYTES} bytes" in error["message"]
    assert _runtime(gw.url)["rss_bytes"] - before < 64 * 2**20  # what parsing four such bodies takes


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


# A recursive oneOf: each level of the answer doubles the work (14 levels of a 60-byte answer took 1.8 s
# on the serving loop before such checks moved to the workers).
DOUBLING = {
    "$defs": {
        "n": {"oneOf": [{"items": {"$ref": "#/$defs/n"}, "minItems": 2}, {"items": {"$ref": "#/$defs/n"}}]}
    },
    "type": "object",
    "properties": {"x": {"$ref": "#/$defs/n"}},
}


def _reply(content: str) -> Callable[[socket.socket], None]:
    completion = {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
    }
    return lambda conn: conn.sendall(answer(json.dumps(completion).encode()))


def _runtime(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/admin/runtime", headers={"Authorization": "Bearer admin"}).json()  # type: ignore[no-any-return]


def test_a_schema_check_past_its_time_limit_fails_the_answer_and_the_loop_keeps_serving(
    make_gateway: GatewayFactory,
) -> None:
    nested = "[0," * 40 + "0" + "]" * 40  # 2**40 steps: only the time limit ends it
    upstream = RawUpstream({"ok": _reply(json.dumps({"x": json.loads(nested)}))})
    try:
        gw = make_gateway(
            {"chat": policy_yaml("chat", f"{upstream.url}/ok/v1")},
            schema_check_timeout_s=0.5,
            admin_token="admin",
        )
        answered: list[httpx.Response] = []
        hostile = threading.Thread(target=lambda: answered.append(post(gw.url, **schema_format(DOUBLING))))
        hostile.start()
        while hostile.is_alive():  # the health probe answers while the check runs
            assert httpx.get(f"{gw.url}/healthz", timeout=10).status_code == 200
            hostile.join(0.01)
        (response,) = answered
        assert response.status_code == 200  # the base's invalid answer is returned, and counted
        samples = scrape(gw.url)
        assert value(samples, "canarygate_validation_failures_total", route="chat", kind="json_schema") == 1
        assert _runtime(gw.url)["schema_checks"]["timed_out"] == 1
        # The worker that ran out of time was replaced: the next check runs (and passes) there.
        upstream.behaviours["ok"] = _reply(json.dumps({"x": []}))
        assert post(gw.url, **schema_format(DOUBLING)).status_code == 200
        samples = scrape(gw.url)
        assert value(samples, "canarygate_validation_failures_total", route="chat", kind="json_schema") == 1
    finally:
        upstream.close()


def _tool(name: str, extra: dict[str, Any]) -> dict[str, Any]:
    properties = {f"field_{i}": {"type": "string", "maxLength": 20} for i in range(400)}
    return {
        "type": "function",
        "function": {"name": name, "parameters": {"type": "object", "properties": properties, **extra}},
    }


def test_schemas_past_a_request_s_share_of_the_loop_compile_in_the_workers(
    make_gateway: GatewayFactory,
) -> None:
    calls = [{"id": "c", "type": "function", "function": {"name": "second", "arguments": '{"field_1": 5}'}}]
    completion = {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "finish_reason": "tool_calls",
            }
        ],
    }
    upstream = RawUpstream({"ok": lambda conn: conn.sendall(answer(json.dumps(completion).encode()))})
    try:
        gw = make_gateway({"chat": policy_yaml("chat", f"{upstream.url}/ok/v1")}, admin_token="admin")
        # Two 12 KiB schemas: the first compiles on the loop, the second in a worker.
        tools = [_tool("first", {}), _tool("second", {"required": ["field_1"]})]
        response = post(gw.url, tools=tools)
        assert response.status_code == 200
        assert _runtime(gw.url)["schema_checks"]["workers"] >= 1
        samples = scrape(gw.url)  # the worker checked the call's arguments against the second schema
        assert (
            value(samples, "canarygate_validation_failures_total", route="chat", kind="tool_args_schema") == 1
        )
        # A schema that does not compile is the client's mistake, found by the worker all the same.
        bad = [_tool("first", {}), _tool("second", {"required": "field_1"})]
        response = post(gw.url, tools=bad)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_schema" and error["message"].startswith(
            "tools[1].function.parameters is not a valid JSON Schema"
        )
    finally:
        upstream.close()


def _read_to_close(conn: socket.socket) -> bytes:
    answer = b""
    while chunk := conn.recv(65536):  # the gateway closes the connection after its answer
        answer += chunk
    return answer


def test_a_client_that_trickles_its_head_gets_a_408_and_one_that_sends_nothing_is_closed(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)}, client_timeout_s=0.5)
    host, port = gw.url.removeprefix("http://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=30) as slow,
        socket.create_connection((host, int(port)), timeout=30) as idle,
    ):
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        while True:  # a header a byte at a time (slowloris), until the gateway gives up on the head
            try:
                slow.sendall(b"X")
            except OSError:
                break
            if select.select([slow], [], [], 0.05)[0]:
                break
        answer = _read_to_close(slow)
        assert _read_to_close(idle) == b""  # no request begun: closed without a word
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert httpx.get(f"{gw.url}/healthz").status_code == 200


def test_the_head_bound_counts_each_pipelined_request_on_its_own(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)})
    host, port = gw.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "chat", "messages": MESSAGES, "metadata": {"pad": "x" * 100_000}}).encode()
    first = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    first += b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        # A 100 KB request and the first bytes of the next in one write: the next one's head is small.
        conn.sendall(first + b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        conn.sendall(b"Connection: close\r\n\r\n")
        answers = _read_to_close(conn)
    assert answers.startswith(b"HTTP/1.1 200"), answers[:200]
    assert answers.count(b"HTTP/1.1 200") == 2 and b"HTTP/1.1 431" not in answers
