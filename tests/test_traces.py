"""Traces: agent runs (many model calls sharing a trace key) kept on one arm, summed per trace across
replicas, ended by an idle timeout, counted in metrics and gates, and taking feedback as a whole."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest

from gateway.agents import PLANS, Run, run_agent
from gateway.policy import Policy
from gateway.routing import trace_key
from gateway.server import BackgroundServer
from gateway.store.shared import Shared
from gateway.store.traces import MIXED, MemoryTraceStore, RedisTraceStore, TraceMeta, trace_id
from tests.conftest import REDIS_URL, GatewayFactory, Sim, policy_yaml, wait_for
from tests.test_metrics import scrape, value

TRACED = """
traces: {idle_timeout_s: 2}  # a run whose client stalls longer is two traces
"""


def runs(
    gateways: list[str], count: int, task: str | None = "refund", model: str = "chat", **kw: Any
) -> list[Run]:
    """count agent runs at once, each step sent to the next gateway in turn (replicas behind a load
    balancer); task None: every task in turn."""
    tasks = [task] if task is not None else list(PLANS)

    async def go() -> list[Run]:
        clients = [
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) for url in gateways
        ]
        rotating = _Rotating(clients)
        try:
            return list(
                await asyncio.gather(
                    *(
                        run_agent(
                            rotating, model, f"conv-{uuid.uuid4().hex[:12]}", tasks[i % len(tasks)], **kw
                        )
                        for i in range(count)
                    )
                )
            )
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(go())


class _Rotating:
    """An openai client whose every call goes to the next of several."""

    def __init__(self, clients: list[openai.AsyncOpenAI]) -> None:
        self._clients = clients
        self._next = 0

    @property
    def chat(self) -> Any:
        client = self._clients[self._next % len(self._clients)]
        self._next += 1
        return client.chat


def test_trace_keys_come_from_headers_body_paths_and_traceparent() -> None:
    sources = (("header", "x-conversation-id"), ("body", "metadata.conversation_id"), ("traceparent", ""))
    assert trace_key(sources, {"x-conversation-id": "c-1"}, {}) == "c-1"
    assert trace_key(sources, {}, {"metadata": {"conversation_id": "c-2"}}) == "c-2"
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_key(sources, {"traceparent": parent}, {}) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_key(sources, {"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"}, {}) is None
    assert trace_key(sources, {"traceparent": "garbage"}, {"metadata": {"conversation_id": 7}}) is None
    long = trace_key(sources, {"x-conversation-id": "x" * 5000}, {})
    assert long is not None and len(long) == 64  # kept as its hash: bounded
    assert len(trace_key(sources, {"x-conversation-id": "a\x1fb"}, {}) or "") == 64


def test_a_bad_trace_source_names_the_field() -> None:
    base = {"route": "r", "arms": {"base": {"url": "http://127.0.0.1:1/v1", "model": "m"}}}
    with pytest.raises(ValueError, match="is not a key source"):
        Policy.model_validate({**base, "assignment": {"trace_keys": ["cookie:sid"]}})
    gates = {"steps": [50, 100], "gates": {"steps_per_trace_ratio": {"max": 1.2}}}
    candidate = {"url": "http://127.0.0.1:1/v1", "model": "c"}
    with pytest.raises(ValueError, match=r"needs assignment\.trace_keys"):
        Policy.model_validate(
            {
                **base,
                "arms": {**base["arms"], "candidate": candidate},
                "assignment": {"trace_keys": []},
                "rollout": gates,
            }
        )


def test_every_step_of_a_run_goes_to_one_arm_across_replicas_with_its_index(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, redis_prefix: str
) -> None:
    policy = policy_yaml("chat", sims[0].url, sims[1].url, weight=50, extra=TRACED)
    shared = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix}
    replicas = [make_gateway({"chat": policy}, **shared), make_gateway({"chat": policy}, **shared)]
    done = runs([g.url for g in replicas], 16)
    assert all(r.answer is not None and r.error is None for r in done), [r.error for r in done]
    assert {len(r.arms) for r in done} == {4}  # three tools, then the answer
    assert all(len(set(r.arms)) == 1 for r in done), [r.arms for r in done]  # sticky by trace
    assert {r.arms[0] for r in done} == {"base", "candidate"}  # and the traces split between the arms

    # The steps were counted in one place, whichever replica answered: every trace ends with 4 steps.
    def finished() -> float:
        return sum(
            value(scrape(g.url), "canarygate_trace_steps_count", route="chat", arm=arm, cohort="all")
            for g in replicas
            for arm in ("base", "candidate")
        )

    wait_for(lambda: finished() == 16, timeout=20, message="the 16 traces to end")
    steps = sum(
        value(scrape(g.url), "canarygate_trace_steps_sum", route="chat", arm=arm, cohort="all")
        for g in replicas
        for arm in ("base", "candidate")
    )
    assert steps == 16 * 4


def test_a_candidate_taking_30_percent_more_steps_per_run_is_rolled_back(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    sims[1].set_knobs(extra_steps=1)  # one more tool call before each answer: (2+4+4)/3 -> (3+5+5)/3
    policy = policy_yaml(
        "chat",
        sims[0].url,
        sims[1].url,
        extra="""
        traces: {idle_timeout_s: 1}
        rollout:
          steps: [50, 100]
          interval_s: 1
          min_samples: 10
          confidence: 0.95
          gates:
            steps_per_trace_ratio: {max: 1.1, min_samples: 20}
        """,
    ).replace("rollout:\n  weight: 0\n", "")
    gw = make_gateway({"chat": policy}, admin_token="admin")
    admin = {"Authorization": "Bearer admin"}

    def phase() -> str:
        return str(httpx.get(f"{gw.url}/admin/routes/chat", headers=admin, timeout=10).json()["phase"])

    for _ in range(40):  # until the controller decides (each round: 30 runs, about a second)
        done = runs([gw.url], 30, None)
        assert all(r.error is None for r in done), [r.error for r in done if r.error]
        if phase() != "progressing":
            break
    state = httpx.get(f"{gw.url}/admin/routes/chat", headers=admin, timeout=10).json()
    assert state["phase"] == "rolled_back", state
    assert "steps_per_trace_ratio" in state["history"][0]["reason"], state["history"][0]
    found = re.search(
        r"steps_per_trace_ratio ([\d.]+) steps vs base ([\d.]+) \(x([\d.]+)\)", state["history"][0]["reason"]
    )
    assert found is not None, state["history"][0]["reason"]
    assert 1.15 < float(found.group(3)) < 1.7  # x1.3, over the same intervals, within its interval


def test_a_run_with_any_failed_step_is_a_failed_trace_and_says_which_step(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    sims[1].set_knobs(bad_args_rate=1.0)  # every candidate tool call has arguments that do not parse
    policy = policy_yaml(
        "chat",
        sims[0].url,
        sims[1].url,
        weight=50,
        extra="traces: {idle_timeout_s: 2}\nfallback: {on: [tool_args_parse], budget: {ratio: 1}}",
    )
    gw = make_gateway({"chat": policy})
    done = runs([gw.url], 12, "status")
    assert all(r.answer is not None for r in done)  # the base answered every failed step
    wait_for(
        lambda: (
            sum(
                value(scrape(gw.url), "canarygate_traces_total", route="chat", arm=a)
                for a in ("base", "candidate")
            )
            == 12
        ),
        timeout=20,
        message="the traces to end",
    )
    samples = scrape(gw.url)
    assert value(samples, "canarygate_traces_total", route="chat", arm="base", result="failed") == 0
    failed = value(samples, "canarygate_traces_total", route="chat", arm="candidate", result="failed")
    assert failed == value(samples, "canarygate_traces_total", route="chat", arm="candidate") > 0
    # The failed step was each run's first (its tool call); the fallback answered it from the base.
    assert (
        value(samples, "canarygate_trace_step_failures_total", route="chat", arm="candidate", step="1")
        == failed
    )


def test_feedback_on_a_trace_counts_once_for_the_arm_that_served_it(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    policy = policy_yaml("chat", sims[0].url, sims[1].url, weight=50, extra=TRACED)
    gw = make_gateway({"chat": policy})
    done = runs([gw.url], 6, "refund")
    arms = {r.conversation: r.arms[-1] for r in done}

    def feedback(**body: object) -> httpx.Response:
        return httpx.post(f"{gw.url}/v1/feedback", json=body, timeout=10)

    conversation = done[0].conversation
    first = feedback(trace_id=conversation, score="down")
    assert first.status_code == 200, first.text
    assert first.json() == {
        "object": "feedback",
        "trace_id": conversation,
        "recorded": True,
        "routes": [{"route": "chat", "arm": arms[conversation], "cohort": "all", "recorded": True}],
    }
    again = feedback(trace_id=conversation, score="down", route="chat").json()
    assert again["recorded"] is False  # a conversation's thumbs-down counts once, however often sent
    samples = scrape(gw.url)
    counted = value(
        samples, "canarygate_feedback_total", route="chat", arm=arms[conversation], value="negative"
    )
    assert counted == 1
    missing = feedback(trace_id="never-seen", score="up")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "trace_not_found"
    both = feedback(trace_id=conversation, request_id="abc", score="up")
    assert both.status_code == 400 and "either request_id" in both.json()["error"]["message"]
    assert feedback(trace_id=conversation, route="other", score="up").status_code == 404


@pytest.fixture(params=["memory", "redis"])
def two_stores(request: pytest.FixtureRequest, redis_prefix: str) -> Any:
    """Runs a test's coroutine with two handles on one trace store (two replicas')."""

    def run(test: Callable[[Any, Any], Awaitable[None]]) -> None:
        async def go() -> None:
            if request.param == "memory":
                store = MemoryTraceStore()
                await test(store, store)
                return
            shared = [Shared(REDIS_URL, redis_prefix), Shared(REDIS_URL, redis_prefix)]
            try:
                await test(RedisTraceStore(shared[0]), RedisTraceStore(shared[1]))
            finally:
                for handle in shared:
                    await handle.close()

        asyncio.run(go())

    return run


def meta(arm: str = "base", trace: str = "t") -> TraceMeta:
    return TraceMeta("chat", trace, "r1", arm, "all", 3, -1, "u")


def test_a_trace_is_summed_across_replicas_and_handed_out_once(two_stores: Any) -> None:
    async def go(one: Any, other: Any) -> None:
        tid = trace_id("chat", "t")
        assert await one.step(tid, meta(), 100.0, 110.0, 1000) == 1
        assert await other.step(tid, meta(), 101.0, 111.0, 1000) == 2
        ended = {"inflight": -1}  # each step's end says it is no longer in flight
        assert await one.add({tid: (112.0, {"output_tokens": 30, "cost": 0.25, **ended})}, 102.0) == 0
        assert await other.add({tid: (112.0, {"output_tokens": 12, "invalid": 1, **ended})}, 102.0) == 0
        assert await one.finished(111.5, 100, 1000) == []  # not idle long enough yet
        ended = await one.finished(112.0, 100, 1000) + await other.finished(112.0, 100, 1000)
        assert len(ended) == 1  # whichever replica asks, once
        trace = ended[0]
        assert trace.meta == meta() and trace.ended == "idle" and trace.started == 100.0
        assert (trace["steps"], trace["output_tokens"], trace["cost"], trace.failed) == (2, 42, 0.25, True)
        assert await other.add({tid: (120.0, {"output_tokens": 1})}, 113.0) == 1  # late: dropped, said
        assert await one.open_count() == 0

    two_stores(go)


def test_a_trace_served_by_both_arms_is_mixed(two_stores: Any) -> None:
    async def go(one: Any, other: Any) -> None:
        tid = trace_id("chat", "w")
        await one.step(tid, meta("base", "w"), 0.0, 10.0, 1000)
        await other.step(tid, meta("candidate", "w"), 1.0, 11.0, 1000)
        await one.add({tid: (11.0, {"inflight": -2})}, 2.0)
        (trace,) = await one.finished(11.0, 100, 1000)
        assert trace.meta.arm == MIXED

    two_stores(go)


def test_open_traces_are_bounded_the_least_recent_ending_early(two_stores: Any) -> None:
    async def go(one: Any, _: Any) -> None:
        for i in range(30):
            await one.step(trace_id("chat", f"t{i}"), meta(trace=f"t{i}"), float(i), 1000.0 + i, 10)
        ended = await one.finished(50.0, 100, 10)  # nothing is idle: the oldest beyond 10 end
        assert len(ended) == 20 and {t.ended for t in ended} == {"evicted"}
        assert {t.meta.trace for t in ended} == {f"t{i}" for i in range(20)}
        assert await one.open_count() == 10

    two_stores(go)


class Collector:
    """An OTLP/HTTP trace receiver of the test's own: what a gateway exports, decoded."""

    def __init__(self) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        self.exports: list[Any] = []

        async def receive(request: Request) -> Response:
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                ExportTraceServiceRequest,
                ExportTraceServiceResponse,
            )

            message = ExportTraceServiceRequest()
            message.ParseFromString(await request.body())
            self.exports.append(message)
            return Response(
                ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf"
            )

        self.server = BackgroundServer(Starlette(routes=[Route("/v1/traces", receive, methods=["POST"])]))

    def spans(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(scope schema URL, span name, attributes) of every span received."""
        out = []
        for export in self.exports:
            for resource in export.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        attributes = {a.key: _any(a.value) for a in span.attributes}
                        attributes["kind"] = span.kind
                        out.append((scope.schema_url, span.name, attributes))
        return out


def _any(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any(v) for v in value.array_value.values]
    return getattr(value, kind)


def test_spans_reach_an_otlp_collector_in_the_genai_conventions(
    sims: tuple[Sim, Sim], serve: Any, tmp_path: Any
) -> None:
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes

    from gateway.tracing import SEMCONV_VERSION

    collector = Collector()
    collector.server.start()
    try:
        for sim in sims:
            sim.set_knobs(cached_prompt_share=0.5, reasoning_tokens=3)
        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / "support.yaml").write_text(policy_yaml("support", sims[0].url, sims[1].url, weight=100))
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.server.url,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "CANARYGATE_API_KEYS": "",
        }
        _, url = serve(policies, env=env)
        (run,) = runs([url], 1, "refund", headers={"baggage": "app.user=alice"}, model="support")
        assert run.answer is not None and run.arms == ["candidate"] * 4
        wait_for(lambda: len(collector.spans()) >= 8, timeout=20, message="8 spans at the collector")
    finally:
        collector.server.stop()
    spans = collector.spans()
    server = [(name, a) for _, name, a in spans if a["kind"] == 2]  # SPAN_KIND_SERVER
    client = [(name, a) for _, name, a in spans if a["kind"] == 3]  # SPAN_KIND_CLIENT
    assert {name for name, _ in server} == {"chat support"}  # {gen_ai.operation.name} {gen_ai.request.model}
    assert {name for name, _ in client} == {"chat tuned-model"}
    assert sorted(a["canarygate.trace.step"] for _, a in server) == [1, 2, 3, 4]
    assert sorted(a["canarygate.trace.step"] for _, a in client) == [1, 2, 3, 4]
    for _, attributes in server + client:
        assert attributes["gen_ai.conversation.id"] == run.conversation
        assert attributes["gen_ai.provider.name"] == "openai"
        assert attributes["gen_ai.operation.name"] == "chat"
    for _, attributes in client:
        assert (
            attributes["gen_ai.usage.cache_read.input_tokens"] == attributes["gen_ai.usage.input_tokens"] // 2
        )
        assert attributes["gen_ai.usage.reasoning.output_tokens"] == 3
    assert {schema for schema, _, _ in spans} == {f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"}
    # Every gen_ai.* name the spans carry is one the conventions' own package defines.
    defined = {v for k, v in vars(gen_ai_attributes).items() if k.startswith("GEN_AI_")}
    used = {key for _, _, a in spans for key in a if key.startswith("gen_ai.")}
    assert used <= defined, used - defined
    # The upstream calls carry the arm and rollout as baggage, beside the client's own.
    sent = sims[1].requests()[-1]["headers"]["baggage"]
    entries = dict(item.split("=", 1) for item in sent.split(","))
    assert entries["app.user"] == "alice" and entries["canarygate.arm"] == "candidate"
    assert entries["canarygate.route"] == "support" and len(entries["canarygate.rollout"]) == 16


def test_the_simulated_agent_follows_tool_results_and_its_knobs_lengthen_runs(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)})
    (plain,) = runs([gw.url], 1, "refund")
    assert plain.tools == list(PLANS["refund"]) and plain.steps == 4 and plain.answer
    sims[0].set_knobs(extra_steps=2)
    (looping,) = runs([gw.url], 1, "refund")
    assert looping.tools == [*PLANS["refund"], "issue_refund", "issue_refund"] and looping.steps == 6
    sims[0].set_knobs(extra_steps=0, wrong_tool_at_step=2)
    (wrong,) = runs([gw.url], 1, "refund")
    # The second call picks another tool; its result names the right one, which the third call takes.
    assert wrong.tools[0] == "lookup_order" and wrong.tools[1] != "check_policy"
    assert wrong.tools[2:] == ["check_policy", "issue_refund"] and wrong.steps == 5


def test_streamed_steps_count_the_usage_of_their_last_chunk(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url, extra=TRACED)})
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for _ in range(2):
        with httpx.stream(
            "POST", f"{gw.url}/v1/chat/completions", json=body, headers={"x-conversation-id": "s1"}
        ) as response:
            response.read()
    wait_for(
        lambda: value(scrape(gw.url), "canarygate_trace_steps_count", route="chat", arm="base") == 1,
        timeout=20,
        message="the trace to end",
    )
    samples = scrape(gw.url)
    assert value(samples, "canarygate_trace_steps_sum", route="chat", arm="base") == 2
    assert value(samples, "canarygate_trace_tokens_sum", route="chat", arm="base", type="output") == 10


def test_two_clients_conversations_of_one_id_are_two_traces_each_taking_its_own_feedback(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway(
        {"chat": policy_yaml("chat", sims[0].url, extra=TRACED)}, api_keys=frozenset({"sk-a", "sk-b"})
    )
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    for key, steps in (("sk-a", 3), ("sk-b", 1)):
        for _ in range(steps):
            response = httpx.post(
                f"{gw.url}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}", "x-conversation-id": "1"},
                timeout=10,
            )
            assert response.status_code == 200, response.text
    wait_for(
        lambda: value(scrape(gw.url), "canarygate_trace_steps_count", route="chat", arm="base") == 2,
        timeout=20,
        message="both traces to end",
    )
    assert value(scrape(gw.url), "canarygate_trace_steps_sum", route="chat", arm="base") == 4  # 3 and 1

    def feedback(key: str) -> httpx.Response:
        return httpx.post(
            f"{gw.url}/v1/feedback",
            json={"trace_id": "1", "score": "down"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )

    assert feedback("sk-a").json()["recorded"] is True
    assert feedback("sk-b").json()["recorded"] is True  # its own conversation "1", not sk-a's again
    assert feedback("sk-a").json()["recorded"] is False


def test_a_step_longer_than_the_idle_timeout_does_not_end_its_trace(two_stores: Any) -> None:
    async def go(one: Any, other: Any) -> None:
        tid = trace_id("chat", "slow")
        assert await one.step(tid, meta(trace="slow"), 0.0, 1.0, 1000) == 1  # idle timeout 1 s
        assert await other.finished(5.0, 100, 1000) == []  # a long generation: still in flight at 5 s
        await one.add({tid: (6.0, {"output_tokens": 900, "inflight": -1})}, 5.0)  # it ends at 5 s
        assert await other.step(tid, meta(trace="slow"), 5.5, 6.5, 1000) == 2  # the run goes on
        await other.add({tid: (7.0, {"inflight": -1})}, 6.0)
        assert await one.finished(6.9, 100, 1000) == []
        (trace,) = await one.finished(7.0, 100, 1000) + await other.finished(7.0, 100, 1000)
        assert (trace["steps"], trace["output_tokens"]) == (2, 900)

    two_stores(go)
