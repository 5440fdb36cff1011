"""Candidate failures of every kind, streamed and not: the client gets a valid base answer and the headers
say why; base failures pass through as documented. All over real loopback servers and the openai SDK."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from gateway.logs import Every
from tests.conftest import (
    BASE_MODEL,
    CANDIDATE_MODEL,
    Gateway,
    GatewayFactory,
    Sim,
    closed_port,
    policy_yaml,
    wait_for,
)
from tests.test_metrics import scrape, value

SCHEMA = {
    "type": "object",
    "properties": {"total": {"type": "number"}, "currency": {"type": "string"}},
    "required": ["total", "currency"],
    "additionalProperties": False,
}
JSON_SCHEMA = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "invoice", "schema": SCHEMA}}
}
JSON_OBJECT = {"response_format": {"type": "json_object"}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
                "additionalProperties": False,
            },
        },
    }
]
WITH_TOOLS = {"tools": TOOLS}
MESSAGES = [{"role": "user", "content": "Where is order 1234?"}]


@dataclass
class Answer:
    headers: httpx.Headers
    content: str | None
    tool_calls: list[tuple[str, str]]
    models: set[str]  # the `model` of every chunk or of the completion: who really answered


def ask(gw: Gateway, stream: bool, **extra: Any) -> Answer:
    client = gw.client()
    if not stream:
        raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, **extra)
        completion = raw.parse()
        message = completion.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        return Answer(raw.headers, message.content, calls, {completion.model})
    with client.chat.completions.with_streaming_response.create(
        model="chat", messages=MESSAGES, stream=True, **extra
    ) as response:
        content, names, arguments, models = "", {}, {}, set()
        for chunk in response.parse():
            models.add(chunk.model)
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for call in choice.delta.tool_calls or []:
                    names[call.index] = names.get(call.index, "") + (call.function.name or "")
                    arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
        return Answer(
            response.headers, content or None, [(names[i], arguments[i]) for i in sorted(names)], models
        )


def canary(
    sims: tuple[Sim, Sim], weight: float = 100, candidate_url: str | None = None, **kwargs: str
) -> dict[str, str]:
    base, candidate = sims
    return {"chat": policy_yaml("chat", base.url, candidate_url or candidate.url, weight=weight, **kwargs)}


def assert_valid_base_answer(answer: Answer, reason: str, request: dict[str, Any]) -> None:
    assert answer.headers["x-canarygate-arm"] == "base"
    assert answer.headers["x-canarygate-fallback"] == reason
    assert answer.models == {BASE_MODEL}  # not one byte of the candidate's answer reached the client
    if "response_format" in request:
        value = json.loads(answer.content or "")
        if request is JSON_SCHEMA:
            assert set(value) == {"total", "currency"}
    if "tools" in request:
        ((name, arguments),) = answer.tool_calls
        assert name == "lookup_order" and "order_id" in json.loads(arguments)


VALIDATION_FAILURES = [
    pytest.param({"invalid_json_rate": 1}, JSON_OBJECT, "json_parse", id="json_parse"),
    pytest.param({"schema_mismatch_rate": 1}, JSON_SCHEMA, "json_schema", id="json_schema"),
    pytest.param({"wrong_tool_rate": 1}, WITH_TOOLS, "tool_unknown", id="tool_unknown"),
    pytest.param({"bad_args_rate": 1}, WITH_TOOLS, "tool_args_parse", id="tool_args_parse"),
    pytest.param({"args_mismatch_rate": 1}, WITH_TOOLS, "tool_args_schema", id="tool_args_schema"),
    pytest.param(
        {"ignore_tool_choice_rate": 1},
        {**WITH_TOOLS, "tool_choice": "required"},
        "tool_choice",
        id="tool_choice_required",
    ),
    pytest.param(
        {"ignore_tool_choice_rate": 1},
        {**WITH_TOOLS, "tool_choice": {"type": "function", "function": {"name": "lookup_order"}}},
        "tool_choice",
        id="tool_choice_named",
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("knobs", "request_extra", "reason"), VALIDATION_FAILURES)
def test_invalid_candidate_output_falls_back(
    sims: tuple[Sim, Sim],
    make_gateway: GatewayFactory,
    stream: bool,
    knobs: dict[str, float],
    request_extra: dict[str, Any],
    reason: str,
) -> None:
    sims[1].set_knobs(**knobs)
    gw = make_gateway(canary(sims))
    answer = ask(gw, stream, **request_extra)
    assert_valid_base_answer(answer, reason, request_extra)
    assert len(sims[1].requests()) == 1  # the candidate was asked once, then base answered


def test_tool_choice_none_violation(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    sims[1].set_knobs(ignore_tool_choice_rate=1)
    answer = ask(make_gateway(canary(sims)), False, tools=TOOLS, tool_choice="none")
    assert answer.headers["x-canarygate-fallback"] == "tool_choice"
    assert answer.tool_calls == [] and answer.content


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("status", "reason"), [(503, "http_5xx"), (500, "http_5xx"), (429, "http_429")])
def test_candidate_http_errors_fall_back(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, stream: bool, status: int, reason: str
) -> None:
    sims[1].set_knobs(error_rate=1, error_status=status)
    answer = ask(make_gateway(canary(sims)), stream)
    assert_valid_base_answer(answer, reason, {})


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_candidate_unreachable_falls_back(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, stream: bool
) -> None:
    gw = make_gateway(canary(sims, candidate_url=f"http://127.0.0.1:{closed_port()}/v1"))
    assert_valid_base_answer(ask(gw, stream), "connect_error", {})


@pytest.mark.parametrize("stream", [False, True], ids=["total_s", "first_token_s"])
def test_candidate_timeouts_fall_back(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, stream: bool
) -> None:
    sims[1].set_knobs(latency_s=3)
    gw = make_gateway(
        canary(sims, candidate_extra="timeouts: {connect_s: 0.4, first_token_s: 0.4, total_s: 0.4}")
    )
    started = time.monotonic()
    assert_valid_base_answer(ask(gw, stream), "timeout", {})
    assert time.monotonic() - started < 2


def test_text_streams_are_not_buffered_on_a_validating_route(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    sims[1].set_knobs(time_per_token_s=0.05, output_tokens=20)
    gw = make_gateway(canary(sims))  # validation.stream: buffer by default
    started = time.monotonic()
    arrivals = [
        time.monotonic() - started
        for _ in gw.client().chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    ]
    assert arrivals[1] < arrivals[-1] - 0.5  # tokens flowed while the candidate generated them


def test_passthrough_streams_release_at_once_and_record(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    sims[1].set_knobs(invalid_json_rate=1)
    gw = make_gateway(canary(sims, extra="validation: {stream: passthrough}"))
    answer = ask(gw, True, **JSON_OBJECT)
    assert answer.headers["x-canarygate-arm"] == "candidate"
    assert "x-canarygate-fallback" not in answer.headers
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer.content or "")
    assert any(
        "output failed validation (json_parse), returned unchanged" in r.getMessage() for r in caplog.records
    )


def test_reasons_not_listed_are_not_fallen_back(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    sims[1].set_knobs(invalid_json_rate=1)
    gw = make_gateway(canary(sims, extra="fallback: {on: [http_5xx, timeout]}"))
    answer = ask(gw, False, **JSON_OBJECT)
    assert answer.headers["x-canarygate-arm"] == "candidate"  # recorded, returned as the policy asks
    sims[1].set_knobs(error_rate=1, error_status=502)
    assert_valid_base_answer(ask(gw, False), "http_5xx", {})
    sims[1].set_knobs(error_rate=1, error_status=429)
    with pytest.raises(openai.RateLimitError):
        ask(gw, False)


def test_base_failures_pass_through(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    gw = make_gateway(canary(sims, weight=0))
    gw.app.services.proxy.logged = Every(10.0, clock=lambda: 0.0)  # however slow the machine: within 10 s
    sims[0].set_knobs(error_rate=1, error_status=503)
    with pytest.raises(openai.InternalServerError) as failed:
        ask(gw, False)
    assert failed.value.status_code == 503
    assert (
        isinstance(failed.value.body, dict) and failed.value.body["message"] == "simulated upstream failure"
    )
    assert "x-canarygate-fallback" not in failed.value.response.headers
    sims[0].set_knobs(error_rate=0, invalid_json_rate=1)
    for stream in (False, True):
        answer = ask(gw, stream, **JSON_OBJECT)  # the gateway is not the judge of the base
        assert answer.headers["x-canarygate-arm"] == "base"
        with pytest.raises(json.JSONDecodeError):
            json.loads(answer.content or "")
    recorded = [
        r for r in caplog.records if "arm=base output failed validation (json_parse)" in r.getMessage()
    ]
    assert len(recorded) == 1  # a line per route, arm and kind every 10 s; the metric counts each one
    samples = scrape(gw.url)
    assert (
        value(samples, "canarygate_validation_failures_total", route="chat", arm="base", kind="json_parse")
        == 2
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_enforce_on_base(sims: tuple[Sim, Sim], make_gateway: GatewayFactory, stream: bool) -> None:
    sims[0].set_knobs(invalid_json_rate=1)
    gw = make_gateway(canary(sims, weight=0, extra="validation: {enforce_on_base: true}"))
    with pytest.raises(openai.APIStatusError) as failed:
        ask(gw, stream, **JSON_OBJECT)
    assert failed.value.status_code == 502
    error = failed.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_output"
    assert "base model's output failed validation (json_parse)" in error["message"]


def test_candidate_and_base_both_invalid(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    sims[0].set_knobs(invalid_json_rate=1)
    sims[1].set_knobs(invalid_json_rate=1)
    answer = ask(make_gateway(canary(sims)), False, **JSON_OBJECT)
    assert answer.headers["x-canarygate-arm"] == "base"  # base's own answer, as it is
    assert answer.headers["x-canarygate-fallback"] == "json_parse"


def test_retry_budget_bounds_fallbacks(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    sims[1].set_knobs(error_rate=1, error_status=503)
    gw = make_gateway(
        canary(
            sims,
            extra="""
        fallback:
          budget: {ratio: 0.01, window_s: 60, min_per_window: 2}
          circuit_breaker: {enabled: false}
    """,
        )
    )
    assert_valid_base_answer(ask(gw, False), "http_5xx", {})
    assert_valid_base_answer(ask(gw, False), "http_5xx", {})
    with pytest.raises(openai.InternalServerError) as denied:
        ask(gw, False)  # the budget is spent: the candidate's own error, said plainly
    assert denied.value.response.headers["x-canarygate-fallback-denied"] == "budget"
    assert denied.value.response.headers["x-canarygate-arm"] == "candidate"


def test_deadline_covers_attempt_and_fallback(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    sims[0].set_knobs(latency_s=0.5)
    sims[1].set_knobs(latency_s=3)
    gw = make_gateway(
        canary(
            sims,
            extra="timeouts: {connect_s: 0.5, first_token_s: 0.5, total_s: 5, deadline_s: 0.8}",
            candidate_extra="timeouts: {total_s: 0.6}",
        )
    )
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as failed:
        ask(gw, False)
    assert failed.value.status_code == 504
    assert time.monotonic() - started < 1.5
    assert (
        failed.value.response.headers["x-canarygate-fallback"] == "timeout"
    )  # base was tried, ran out of time


def test_circuit_opens_under_failures_and_closes_after_recovery(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    candidate = sims[1]
    candidate.set_knobs(error_rate=1, error_status=500)
    gw = make_gateway(
        canary(
            sims,
            extra="""
        fallback:
          budget: {ratio: 1, min_per_window: 100}
          circuit_breaker: {window: 10, min_requests: 4, failure_rate: 0.5, open_s: 1, half_open_requests: 2}
    """,
        )
    )
    reasons = [ask(gw, False).headers["x-canarygate-fallback"] for _ in range(8)]
    assert reasons == ["http_5xx"] * 4 + ["circuit_open"] * 4  # opens at 4 of 4 failed
    assert len(candidate.requests()) == 4  # no candidate call while open
    candidate.set_knobs(error_rate=0)
    time.sleep(1.1)
    probes = [ask(gw, False).headers for _ in range(2)]
    assert [h["x-canarygate-arm"] for h in probes] == ["candidate", "candidate"]  # half-open probes succeed
    after = [ask(gw, False).headers for _ in range(5)]
    assert all(h["x-canarygate-arm"] == "candidate" and "x-canarygate-fallback" not in h for h in after)
    assert gw.app.services.proxy.guards.breaker(gw.app.services.routes.get("chat")).state == "closed"


def test_bad_request_schema_is_a_400(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    gw = make_gateway(canary(sims))
    with pytest.raises(openai.BadRequestError) as bad:
        ask(
            gw,
            False,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": 7}}},
        )
    assert bad.value.code == "invalid_schema"
    assert "response_format.json_schema.schema is not a valid JSON Schema" in bad.value.message
    assert base_and_candidate_untouched(sims)


def base_and_candidate_untouched(sims: tuple[Sim, Sim]) -> bool:
    return sims[0].requests() == [] and sims[1].requests() == []


def test_circuit_state_survives_a_policy_reload(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    sims[1].set_knobs(error_rate=1)
    extra = "fallback: {circuit_breaker: {window: 4, min_requests: 2, open_s: 60}}"
    gw = make_gateway(canary(sims, extra=extra), watch_policies=True)
    for _ in range(2):
        ask(gw, False)
    assert ask(gw, False).headers["x-canarygate-fallback"] == "circuit_open"
    reloaded = extra + "\ndescription: reloaded"
    (gw.policy_dir / "chat.yaml").write_text(
        policy_yaml("chat", sims[0].url, sims[1].url, weight=100, extra=reloaded)
    )
    wait_for(lambda: gw.app.services.routes.get("chat").policy.description == "reloaded", message="reload")
    assert ask(gw, False).headers["x-canarygate-fallback"] == "circuit_open"  # still open after the reload
    assert len(sims[1].requests()) == 2


def test_candidate_model_never_leaks_in_a_fallback_stream(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    sims[1].set_knobs(invalid_json_rate=1, time_per_token_s=0.01)
    gw = make_gateway(canary(sims))
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/chat/completions",
        timeout=10,
        json={"model": "chat", "messages": MESSAGES, "stream": True, **JSON_OBJECT},
    ) as response:
        body = response.read().decode()
    assert CANDIDATE_MODEL not in body and BASE_MODEL in body


def test_fallbacks_are_logged_once_per_reason_every_ten_seconds(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """At INFO, a failing candidate at 10% of a busy route would write a line per request: one a route and
    reason every 10 s, saying how many were left out; the metric counts them all."""
    caplog.set_level(logging.INFO, logger="gateway")
    sims[1].set_knobs(error_rate=1, error_status=500)
    extra = "fallback: {budget: {ratio: 1, min_per_window: 100}, circuit_breaker: {enabled: false}}"
    gw = make_gateway(canary(sims, extra=extra))
    gw.app.services.proxy.logged = Every(10.0, clock=lambda: 0.0)  # however slow the machine: within 10 s
    for _ in range(12):
        assert_valid_base_answer(ask(gw, False), "http_5xx", {})
    lines = [r.getMessage() for r in caplog.records if "fallback to base: http_5xx" in r.getMessage()]
    assert len(lines) == 1, lines
    assert value(scrape(gw.url), "canarygate_fallbacks_total", reason="http_5xx") == 12


def test_a_line_every_ten_seconds_says_how_many_were_left_out() -> None:
    now = [100.0]
    every = Every(10.0, clock=lambda: now[0])
    assert every.due("a") == ""  # the first is written
    assert every.due("a") is None and every.due("a") is None  # then left out, and counted
    assert every.due("b") == ""  # another key has its own
    now[0] += 9.9
    assert every.due("a") is None
    now[0] += 0.2
    assert every.due("a") == " (3 more since the last such line)"
    assert every.due("a") is None
