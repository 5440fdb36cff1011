"""Streams that end honestly and shadow calls that never touch a user's answer, against the simulator
behaving as llama.cpp does (interrupting a running stream when another request arrives, keep-alive
comments, tool-call ids and names repeated in every delta, [DONE] and the stream's end in separate writes,
UUID-only request ids), with the official openai SDK as the client."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import BASE_MODEL, GatewayFactory, Sim, policy_yaml, wait_for
from tests.test_fallback import JSON_OBJECT, MESSAGES, TOOLS
from tests.test_metrics import scrape, value

ADMIN = {"Authorization": "Bearer admin-secret"}


def raw_stream(url: str, **extra: Any) -> bytes:
    body = {"model": "chat", "messages": MESSAGES, "stream": True, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).content


def test_a_stream_broken_after_done_ends_with_an_error_never_with_done(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, _ = sims
    base.set_knobs(break_after_done_rate=1)
    gw = make_gateway({"chat": policy_yaml("chat", base.url)})
    for _ in range(5):
        content = raw_stream(gw.url)
        assert b"data: [DONE]" not in content  # the SDK would stop there and call the answer complete
        assert b'"upstream_protocol_error"' in content.split(b"\n\n")[-2]  # the error took its place
        with pytest.raises(openai.APIError):
            for _chunk in gw.client().chat.completions.create(model="chat", messages=MESSAGES, stream=True):  # type: ignore[arg-type]
                pass


def test_an_interrupted_stream_is_an_error_for_the_client_not_a_silent_truncation(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, _ = sims
    base.simulator.interrupt = True  # llama-cpp-python's default: a new request stops the running one
    base.set_knobs(time_per_token_s=0.05, output_tokens=40)
    gw = make_gateway({"chat": policy_yaml("chat", base.url)})
    outcome: dict[str, Any] = {}

    def long_answer() -> None:
        try:
            stream = gw.client().chat.completions.create(model="chat", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            outcome["finish"] = [c.choices[0].finish_reason for c in stream if c.choices]
        except openai.APIError as exc:
            outcome["error"] = exc

    first = threading.Thread(target=long_answer)
    first.start()
    wait_for(lambda: base.stats()["active_streams"] == 1, message="the first stream to run")
    assert raw_stream(gw.url)  # the second request interrupts the first at the server
    first.join(timeout=30)
    assert base.stats()["streams"]["interrupted"] == 1
    assert "error" in outcome, outcome  # told, not silently cut short


def test_a_client_closing_right_after_done_is_a_finished_answer_and_everything_is_recorded(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    candidate.set_knobs(done_delay_s=0.3)  # [DONE] and the stream's end in separate writes
    policy = policy_yaml(
        "chat", base.url, candidate.url, weight=100, extra="validation: {stream: passthrough}"
    )
    gw = make_gateway({"chat": policy})
    client = gw.client()
    for _ in range(6):  # the SDK closes the connection as soon as it reads [DONE]
        stream = client.chat.completions.create(model="chat", messages=MESSAGES, stream=True, **JSON_OBJECT)  # type: ignore[call-overload]
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert isinstance(json.loads(text), dict)
    samples = scrape(gw.url)
    labels = {"route": "chat", "arm": "candidate", "mode": "primary"}
    assert value(samples, "canarygate_requests_total", **labels, outcome="ok") == 6
    assert value(samples, "canarygate_requests_total", **labels, outcome="client_closed") == 0


def test_a_keepalive_comment_is_not_a_first_token(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    candidate.set_knobs(keepalive_first=True, latency_s=3)  # a comment at once, then a long silence
    extra = "timeouts: {first_token_s: 0.3, total_s: 30}"
    gw = make_gateway(
        {"chat": policy_yaml("chat", base.url, candidate.url, weight=100, candidate_extra=extra)}
    )
    body = {"model": "chat", "messages": MESSAGES, "stream": True}
    response = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200
    # first_token_s counts from the request, and the comment did not stop it: the base answers
    assert response.headers["x-canarygate-arm"] == "base"
    assert response.headers["x-canarygate-fallback"] == "timeout"
    assert b": keepalive" not in response.content


def test_tool_calls_are_validated_as_the_sdk_assembles_them(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    candidate.set_knobs(repeat_tool_fields=True)  # llama.cpp: id and name repeated in every delta
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, weight=100)})
    client = gw.client()
    for _ in range(3):
        with client.chat.completions.stream(model="chat", messages=MESSAGES, tools=TOOLS) as stream:  # type: ignore[arg-type]
            final = stream.get_final_completion()
        (call,) = final.choices[0].message.tool_calls or []
        assert call.function.name == "lookup_order"  # the base's answer: the candidate's would be doubled
    samples = scrape(gw.url)
    assert value(samples, "canarygate_fallbacks_total", route="chat", reason="tool_unknown") == 3


def test_a_client_request_id_never_reaches_an_upstream_that_wants_uuids(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, _ = sims
    base.simulator.uuid_request_ids = True  # llama-cpp-python refuses any other x-request-id
    gw = make_gateway({"chat": policy_yaml("chat", base.url)})
    raw = gw.client().chat.completions.with_raw_response.create(
        model="chat",
        messages=MESSAGES,
        extra_headers={"x-request-id": "trace-1"},  # type: ignore[arg-type]
    )
    assert raw.parse().model == BASE_MODEL
    assert raw.headers["x-request-id"] != "trace-1"


def test_shadow_calls_yield_to_users_on_a_one_slot_server(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    base.simulator.interrupt = True  # one slot that a second request would take from the first
    base.set_knobs(time_per_token_s=0.01, output_tokens=20)
    policy = policy_yaml(
        "chat",
        base.url,
        candidate.url,
        base_extra="max_concurrency: 1",
        extra="mirror: {noise_floor_percent: 100, sample_by: request}",
    )
    gw = make_gateway({"chat": policy})
    client = gw.client()
    for _ in range(12):  # one user after another: only the gateway's own replays could cut them
        stream = client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        chunks = [c for c in stream if c.choices]
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert sum(len(c.choices[0].delta.content or "") for c in chunks) > 0
    samples = scrape(gw.url)
    yielded = sum(
        value(samples, "canarygate_mirror_total", route="chat", outcome=o) for o in ("deferred", "cancelled")
    )
    assert yielded > 0  # the replays waited for the slot, or made way


def test_shadow_calls_stop_when_the_rollout_is_rolled_back(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    candidate.set_knobs(latency_s=0.5)
    mirror = "mirror: {percent: 100, sample_by: request, max_concurrency: 2, max_queue: 200}"
    gw = make_gateway(
        {"chat": policy_yaml("chat", base.url, candidate.url, weight=0, extra=mirror)},
        admin_token="admin-secret",
    )
    for i in range(40):
        assert (
            httpx.post(
                f"{gw.url}/v1/chat/completions", json={"model": "chat", "messages": MESSAGES, "user": f"u{i}"}
            ).status_code
            == 200
        )
    assert httpx.post(f"{gw.url}/admin/routes/chat/rollback", headers=ADMIN).status_code == 200
    asked = candidate.stats()["requests"]["chat:tuned-model"]
    assert asked < 40  # most were still queued
    time.sleep(1.5)  # three times the candidate's latency: a queue still draining would show
    assert candidate.stats()["requests"]["chat:tuned-model"] == asked
    samples = scrape(gw.url)
    assert value(samples, "canarygate_mirror_total", route="chat", outcome="cancelled") >= 1


@pytest.mark.skipif(
    not os.environ.get("CANARYGATE_TEST_LLAMA_URL"),
    reason="set CANARYGATE_TEST_LLAMA_URL to a llama-cpp-python server's /v1 (model alias in "
    "CANARYGATE_TEST_LLAMA_MODEL, default smol) to run against a real one",
)
def test_against_a_real_llama_cpp_server(make_gateway: GatewayFactory) -> None:
    url = os.environ["CANARYGATE_TEST_LLAMA_URL"]
    model = os.environ.get("CANARYGATE_TEST_LLAMA_MODEL", "smol")
    policy = f"""
route: chat
arms:
  base: {{url: "{url}", model: {model}, max_concurrency: 1}}
  candidate: {{url: "{url}", model: {model}, max_concurrency: 1}}
mirror: {{noise_floor_percent: 100, sample_by: request}}
"""
    gw = make_gateway({"chat": policy})
    client = gw.client(timeout=120)
    for i in range(6):  # sequential users, each replayed once: no user's stream may be cut
        stream = client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=24,
            stream=True,
        )
        finishes = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
        assert finishes in (["stop"], ["length"]), finishes
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, max_tokens=8, extra_headers={"x-request-id": "not-a-uuid"}
    )
    assert raw.parse().choices
