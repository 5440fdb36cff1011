"""Shadow traffic: sampling, bounds, comparison, and that the primary never notices."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.app import create_app
from gateway.mirror import Mirror, compare
from gateway.route import MirrorSettings
from gateway.server import BackgroundServer
from gateway.settings import Settings
from gateway.tasks import Spawner
from gateway.tracing import Tracing
from gateway.validation import RoutePolicy, SchemaCache, rules_for
from tests.conftest import BASE_MODEL, CANDIDATE_MODEL, GatewayFactory, Sim, policy_yaml, wait_for
from tests.test_metrics import scrape, value

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello there"}], "temperature": 0}
CONST_TOOL = [
    {
        "type": "function",
        "function": {
            "name": "mode",
            "parameters": {
                "type": "object",
                "properties": {"speed": {"const": "fast"}, "level": {"const": 3}},
                "required": ["speed"],
            },
        },
    }
]


def answer(
    content: str | None = None, calls: list[tuple[str, str]] | None = None, finish: str = "stop"
) -> Any:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": "c", "type": "function", "function": {"name": n, "arguments": a}} for n, a in calls
        ]
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}


def test_compare_checks_that_apply() -> None:
    plain = rules_for({"messages": []}, RoutePolicy(), SchemaCache())
    assert compare(answer("a"), answer("b"), plain) == {"finish_reason": True}
    assert compare(answer("a"), answer("b", finish="length"), plain) == {"finish_reason": False}
    json_rules = rules_for({"response_format": {"type": "json_object"}}, RoutePolicy(), SchemaCache())
    assert compare(answer('{"a": 1}'), answer('{"b": 2}'), json_rules)["json_valid"] is True
    broken = compare(answer('{"a": 1}'), answer('{"b": 2'), json_rules, (None, "json_parse"))
    assert broken["json_valid"] is False
    schema = {"type": "object", "required": ["a"]}
    schema_rules = rules_for(
        {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}},
        RoutePolicy(),
        SchemaCache(),
    )
    checks = compare(answer('{"a": 1}'), answer('{"b": 1}'), schema_rules, (None, "json_schema"))
    assert checks["json_valid"] is True and checks["schema_valid"] is False
    same_args = compare(
        answer(calls=[("f", '{"x": 1, "y": 2}')], finish="tool_calls"),
        answer(calls=[("f", '{"y": 2, "x": 1}')], finish="tool_calls"),
        None,
    )
    assert same_args == {"tool_name": True, "tool_args": True, "finish_reason": True}  # key order ignored
    other_tool = compare(answer(calls=[("f", "{}")]), answer(calls=[("g", "{}")]), None)
    assert other_tool["tool_name"] is False and "tool_args" not in other_tool
    assert compare(answer(calls=[("f", "{}")]), answer("words"), None)["tool_name"] is False


def test_mirror_bounds_and_token_budget() -> None:
    async def run() -> None:
        spawner = Spawner()
        clock = [0.0]
        mirror = Mirror(
            "r", MirrorSettings(100, True, "s", 1, 1, 100, 0, False, 0), spawner, lambda: clock[0]
        )
        gate = asyncio.Event()

        async def work() -> None:
            await gate.wait()

        assert mirror.submit(work) and mirror.submit(work)  # one running, one waiting
        assert not mirror.submit(work)  # concurrency and queue are full
        gate.set()
        await asyncio.sleep(0.01)
        assert mirror.pending == 0
        mirror.spend(100)
        assert not mirror.submit(work)  # the last minute's token budget is spent
        clock[0] += 61
        assert mirror.submit(work)
        mirror.spend(1)
        assert len(mirror._spent) == 1  # the minute's log is trimmed as it goes, not only when checked
        unbudgeted = Mirror("r", MirrorSettings(100, True, "s", 1, 1, None, 0, False, 0), spawner)
        for _ in range(1000):
            unbudgeted.spend(100)
        assert len(unbudgeted._spent) == 0  # without a budget nothing is kept: no growth per shadow call
        await spawner.close()

    asyncio.run(run())


def shadows(sim: Sim) -> list[dict[str, Any]]:
    return [r for r in sim.requests() if r["headers"].get("x-canarygate-mirror") == "1"]


def test_mirror_percent_is_sticky_per_unit_and_uses_the_candidate(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNED_KEY", "sk-tuned")
    base, candidate = sims
    gw = make_gateway(
        {
            "chat": policy_yaml(
                "chat",
                base.url,
                candidate.url,
                weight=0,
                candidate_extra="api_key_env: TUNED_KEY",
                extra="mirror: {percent: 30}",
            )
        }
    )
    with httpx.Client(timeout=10) as client:
        for user in range(300):
            response = client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "user": f"u{user}"})
            assert response.headers["x-canarygate-arm"] == "base"
    wait_for(
        lambda: (
            len(candidate.requests()) == len(shadows(candidate)) and sims[1].stats()["active_streams"] == 0
        )
    )
    time.sleep(0.3)
    mirrored = {r["body"]["user"] for r in shadows(candidate)}
    assert 0.22 < len(mirrored) / 300 < 0.38
    first = shadows(candidate)[0]
    assert first["body"]["model"] == CANDIDATE_MODEL
    assert first["headers"]["authorization"] == "Bearer sk-tuned"
    with httpx.Client(timeout=10) as client:  # the same units again: exactly the same ones are shadowed
        for user in range(300):
            client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "user": f"u{user}"})
    wait_for(lambda: len(shadows(candidate)) == 2 * len(mirrored), message="the same cohort shadowed again")
    assert {r["body"]["user"] for r in shadows(candidate)} == mirrored


def test_shadow_calls_carry_the_candidates_forwarded_credentials(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    gw = make_gateway(
        {
            "chat": policy_yaml(
                "chat",
                base.url,
                candidate.url,
                candidate_extra="forward_client_auth: true",
                extra="mirror: {percent: 100, sample_by: request}",
            )
        }
    )
    gw.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer client-key"})
    wait_for(lambda: len(shadows(candidate)) == 1, message="the shadow call")
    assert shadows(candidate)[0]["headers"]["authorization"] == "Bearer client-key"
    assert "authorization" not in base.requests()[0]["headers"]  # the base arm does not forward it


def primary_p50(gw_url: str, model: str) -> float:
    timings = []
    with httpx.Client(timeout=10) as client:
        for _ in range(25):
            started = time.perf_counter()
            assert (
                client.post(f"{gw_url}/v1/chat/completions", json={**CHAT, "model": model}).status_code == 200
            )
            timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def test_a_slow_candidate_does_not_slow_the_primary(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    candidate.set_knobs(latency_s=2)
    gw = make_gateway(
        {
            "shadowed": policy_yaml(
                "shadowed", base.url, candidate.url, extra="mirror: {percent: 100, sample_by: request}"
            ),
            "plain": policy_yaml("plain", base.url, candidate.url),
        }
    )
    off = primary_p50(gw.url, "plain")
    on = primary_p50(gw.url, "shadowed")
    assert on < off + 0.02, (on, off)  # within a few ms of mirror-off while 25 shadow calls hang around
    assert len(shadows(candidate)) == 16  # max_concurrency at once; the rest wait in the queue ...
    wait_for(lambda: len(shadows(candidate)) == 25, timeout=10, message="the queue to drain")  # ... and go


def test_drops_are_counted_when_the_queue_is_full(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    candidate.set_knobs(latency_s=1)
    extra = "mirror: {percent: 100, sample_by: request, max_concurrency: 1, max_queue: 1}"
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, extra=extra)})
    for _ in range(6):
        assert gw.post("/v1/chat/completions", json=CHAT).status_code == 200
    s = scrape(gw.url)
    assert value(s, "canarygate_mirror_total", route="chat", outcome="sent") == 2
    assert value(s, "canarygate_mirror_total", route="chat", outcome="dropped") == 4


def test_agreement_counters(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    base, candidate = sims
    gw = make_gateway(
        {
            "chat": policy_yaml(
                "chat", base.url, candidate.url, extra="mirror: {percent: 100, sample_by: request}"
            )
        }
    )
    for _ in range(3):  # a tool whose arguments are constants: both models call it the same way
        gw.post("/v1/chat/completions", json={**CHAT, "tools": CONST_TOOL})
    candidate.set_knobs(wrong_tool_rate=1)
    gw.post("/v1/chat/completions", json={**CHAT, "tools": CONST_TOOL})
    candidate.set_knobs(wrong_tool_rate=0, invalid_json_rate=1)
    for _ in range(2):
        gw.post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "json_object"}})

    def agreement(check: str, result: str) -> float:
        return value(
            scrape(gw.url), "canarygate_mirror_agreement_total", route="chat", check=check, result=result
        )

    wait_for(lambda: agreement("json_valid", "disagree") == 2, message="all pairs compared")
    assert agreement("tool_name", "agree") == 3 and agreement("tool_name", "disagree") == 1
    assert agreement("tool_args", "agree") == 3 and agreement("tool_args", "disagree") == 0
    assert agreement("json_valid", "agree") == 0
    assert agreement("finish_reason", "agree") == 6  # even the wrong tool ends with tool_calls on both sides
    s = scrape(gw.url)
    mirror = {"route": "chat", "arm": "candidate", "mode": "mirror"}
    assert value(s, "canarygate_requests_total", **mirror, outcome="ok") == 6
    assert value(s, "canarygate_validation_failures_total", **mirror, kind="tool_unknown") == 1
    assert value(s, "canarygate_validation_failures_total", **mirror, kind="json_parse") == 2
    assert (
        value(s, "canarygate_requests_total", route="chat", arm="candidate", mode="primary", outcome="ok")
        == 0
    )
    assert value(s, "canarygate_mirror_latency_ratio_count", route="chat") == 6
    assert value(s, "canarygate_tokens_total", **mirror, type="output") > 0


def test_a_streamed_primary_is_mirrored_as_a_stream(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    gw = make_gateway(
        {
            "chat": policy_yaml(
                "chat", base.url, candidate.url, extra="mirror: {percent: 100, sample_by: request}"
            )
        }
    )
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        body = response.read().decode()
    assert CANDIDATE_MODEL not in body and response.headers["x-canarygate-arm"] == "base"
    wait_for(lambda: candidate.stats()["streams"]["completed"] == 1, message="the shadow stream consumed")
    assert shadows(candidate)[0]["body"]["stream"] is True
    wait_for(
        lambda: (
            value(
                scrape(gw.url),
                "canarygate_mirror_agreement_total",
                route="chat",
                check="finish_reason",
                result="agree",
            )
            == 1
        )
    )
    s = scrape(gw.url)
    assert (
        value(s, "canarygate_time_to_first_token_seconds_count", route="chat", arm="candidate", mode="mirror")
        == 1
    )


def test_mirror_spans_are_their_own_linked_traces(sims: tuple[Sim, Sim], tmp_path) -> None:  # type: ignore[no-untyped-def]
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    (tmp_path / "chat.yaml").write_text(
        policy_yaml("chat", sims[0].url, sims[1].url, extra="mirror: {percent: 100, sample_by: request}")
    )
    app = create_app(Settings(policy_dir=tmp_path, watch_policies=False), tracing=Tracing(provider))
    with BackgroundServer(app) as server:
        httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
        wait_for(lambda: len(exporter.get_finished_spans()) == 3, message="three spans")
    spans = exporter.get_finished_spans()
    (primary,) = [s for s in spans if s.kind == SpanKind.SERVER]
    (shadow,) = [s for s in spans if s.attributes.get("canarygate.mode") == "mirror"]
    assert shadow.name == f"chat {CANDIDATE_MODEL}"
    assert shadow.parent is None and shadow.context.trace_id != primary.context.trace_id
    assert [link.context.span_id for link in shadow.links] == [primary.context.span_id]
    (base_attempt,) = [
        s for s in spans if s.attributes.get("canarygate.mode") == "primary" and s.kind == SpanKind.CLIENT
    ]
    assert base_attempt.attributes["gen_ai.request.model"] == BASE_MODEL


def test_shutdown_cancels_pending_shadow_calls(sims: tuple[Sim, Sim], tmp_path) -> None:  # type: ignore[no-untyped-def]
    base, candidate = sims
    candidate.set_knobs(hang_rate=1)
    (tmp_path / "chat.yaml").write_text(
        policy_yaml("chat", base.url, candidate.url, extra="mirror: {percent: 100, sample_by: request}")
    )
    app = create_app(Settings(policy_dir=tmp_path, watch_policies=False))
    server = BackgroundServer(app).start()
    assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200
    wait_for(lambda: candidate.stats()["hangs"]["started"] == 1, message="the shadow call to hang")
    server.stop()
    wait_for(
        lambda: candidate.stats()["hangs"]["released"] == 1, message="the shadow call abandoned at shutdown"
    )
    assert len(app.services.spawner) == 0  # type: ignore[attr-defined]


def test_a_streamed_pair_compares_whole_answers_not_last_chunks(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    """The shadow side of a streamed tool call is rebuilt from its chunks, like the primary: both call
    the one declared tool, so tool_name agrees (it used to compare the primary's answer with the
    shadow's last chunk, and every streamed tool pair disagreed)."""
    base, candidate = sims
    extra = "mirror: {percent: 100, sample_by: request}\nvalidation: {tool_calls: true, stream: buffer}"
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, extra=extra)})
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {
                    "type": "object",
                    "properties": {"id": {"type": "string"}},
                    "required": ["id"],
                },
            },
        }
    ]
    for stream in (True, False):
        body = {**CHAT, "tools": tools, "tool_choice": "required", "stream": stream}
        assert gw.post("/v1/chat/completions", json=body).status_code == 200

    def agreed() -> float:
        samples = scrape(gw.url)
        return value(
            samples, "canarygate_mirror_agreement_total", route="chat", check="tool_name", result="agree"
        )

    wait_for(lambda: agreed() == 2, message="both pairs compared")
    samples = scrape(gw.url)
    assert (
        value(
            samples, "canarygate_mirror_agreement_total", route="chat", check="tool_name", result="disagree"
        )
        == 0
    )
