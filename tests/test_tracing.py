"""Spans with an in-memory exporter: names, parent/child structure, GenAI attributes, propagation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.app import create_app
from gateway.server import BackgroundServer
from gateway.settings import Settings
from gateway.tracing import Tracing, _exporter
from tests.conftest import BASE_MODEL, CANDIDATE_MODEL, Sim, policy_yaml

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "secret prompt text"}], "max_tokens": 5}


@pytest.fixture
def traced(sims: tuple[Sim, Sim], tmp_path) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    started = []

    def start(record_content: bool = False, weight: int = 100) -> tuple[str, InMemorySpanExporter]:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        directory = tmp_path / f"p{len(started)}"
        directory.mkdir()
        (directory / "chat.yaml").write_text(policy_yaml("chat", sims[0].url, sims[1].url, weight=weight))
        app = create_app(
            Settings(policy_dir=directory, watch_policies=False),
            tracing=Tracing(provider, record_content=record_content),
        )
        server = BackgroundServer(app).start()
        started.append(server)
        return server.url, exporter

    yield start
    for server in started:
        server.stop()


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.kind == kind), key=lambda s: s.start_time or 0)


def test_fallback_trace_structure_and_propagation(traced, sims: tuple[Sim, Sim]) -> None:  # type: ignore[no-untyped-def]
    import httpx

    sims[1].set_knobs(error_rate=1, error_status=503)
    url, exporter = traced()
    response = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT})
    assert response.headers["x-canarygate-fallback"] == "http_5xx"
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    failed, answered = by_kind(spans, SpanKind.CLIENT)

    # The client's trace is continued; both attempts are siblings under the request's span.
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == CLIENT_SPAN
    assert failed.parent is not None and failed.parent.span_id == server.context.span_id
    assert answered.parent is not None and answered.parent.span_id == server.context.span_id

    assert server.name == "chat chat"
    assert server.attributes["gen_ai.operation.name"] == "chat"
    assert server.attributes["gen_ai.request.model"] == "chat"
    assert server.attributes["gen_ai.request.max_tokens"] == 5
    assert server.attributes["canarygate.route"] == "chat"
    assert server.attributes["canarygate.arm"] == "base"
    assert server.attributes["canarygate.fallback.reason"] == "http_5xx"
    assert server.attributes["http.response.status_code"] == 200

    assert failed.name == f"chat {CANDIDATE_MODEL}"
    assert failed.attributes["canarygate.arm"] == "candidate"
    assert failed.attributes["error.type"] == "upstream_http_503"
    assert failed.status.status_code == StatusCode.ERROR

    assert answered.name == f"chat {BASE_MODEL}"
    attrs = answered.attributes
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == BASE_MODEL
    assert attrs["gen_ai.response.model"] == BASE_MODEL
    assert attrs["gen_ai.usage.input_tokens"] == 3 and attrs["gen_ai.usage.output_tokens"] == 5
    assert attrs["gen_ai.response.finish_reasons"] == ("length",)
    assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] == int(
        sims[0].url.split(":")[2][:-3]
    )
    assert attrs["canarygate.mode"] == "primary"
    assert attrs["canarygate.validation.result"] == "skipped"

    # Each upstream received the traceparent of its own attempt's span, and its arm as baggage.
    for sim, span, arm in ((sims[1], failed, "candidate"), (sims[0], answered, "base")):
        headers = sim.requests()[-1]["headers"]
        assert headers["traceparent"] == f"00-{TRACE_ID}-{format(span.context.span_id, '016x')}-01"
        entries = dict(item.split("=", 1) for item in headers["baggage"].split(","))
        assert entries["canarygate.arm"] == arm and entries["canarygate.route"] == "chat"

    # Prompts and answers are not recorded unless the operator opts in.
    assert not any(key.startswith(("gen_ai.input", "gen_ai.output")) for s in spans for key in s.attributes)


def test_validation_result_and_streamed_usage(traced, sims: tuple[Sim, Sim]) -> None:  # type: ignore[no-untyped-def]
    import httpx

    url, exporter = traced()
    body = {
        **CHAT,
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "json_object"},
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.read()
    (attempt,) = by_kind(exporter.get_finished_spans(), SpanKind.CLIENT)
    assert attempt.attributes["canarygate.validation.result"] == "ok"
    assert attempt.attributes["gen_ai.usage.input_tokens"] == 3
    assert attempt.attributes["gen_ai.response.model"] == CANDIDATE_MODEL


def test_content_is_recorded_only_on_opt_in(traced) -> None:  # type: ignore[no-untyped-def]
    import httpx

    url, exporter = traced(record_content=True)
    httpx.post(f"{url}/v1/chat/completions", json=CHAT)
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    (attempt,) = by_kind(spans, SpanKind.CLIENT)
    assert "secret prompt text" in str(server.attributes["gen_ai.input.messages"])
    assert "assistant" in str(attempt.attributes["gen_ai.output.messages"])


def test_rejected_requests_get_a_server_span(traced) -> None:  # type: ignore[no-untyped-def]
    import httpx

    url, exporter = traced()
    assert httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
    (server,) = exporter.get_finished_spans()
    assert server.name == "chat"
    assert server.attributes["http.response.status_code"] == 404
    assert server.attributes["error.type"] == "model_not_found"


def test_without_tracing_the_clients_traceparent_passes_through(sims: tuple[Sim, Sim], make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)})
    gw.post("/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT, "tracestate": "k=v"})
    received = sims[0].requests()[-1]["headers"]
    assert received["traceparent"] == TRACEPARENT and received["tracestate"] == "k=v"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, HttpExporter),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            GrpcExporter,
        ),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, HttpExporter),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"}, None),
    ],
)
def test_exporter_from_standard_variables(env: dict[str, str], expected: type | None) -> None:
    exporter = _exporter(env)
    assert (exporter is None) if expected is None else isinstance(exporter, expected)
    assert Tracing.from_env({}).enabled is False


def test_a_rollout_transition_is_a_span_with_an_event(sims: tuple[Sim, Sim], tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from gateway.loader import load_dir
    from gateway.rollout import Rollouts
    from gateway.store.rollouts import MemoryRolloutStore

    (tmp_path / "chat.yaml").write_text(policy_yaml("chat", sims[0].url, sims[1].url, weight=5))
    routes, _ = load_dir(tmp_path)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def run() -> None:
        state = MemoryRolloutStore()
        await state.start(routes.values())
        rollouts = Rollouts(state, routes.get, Tracing(provider))
        await rollouts.rollback("chat", "admin", "p99 doubled")

    asyncio.run(run())
    (span,) = exporter.get_finished_spans()
    assert span.name == "rollout chat" and span.attributes == {
        "canarygate.route": "chat",
        "canarygate.rollout.version": 2,
    }
    (event,) = span.events
    assert event.name == "canarygate.rollout.transition"
    assert dict(event.attributes or {}) == {
        "canarygate.rollout.phase": "rolled_back",
        "canarygate.rollout.weight": 0.0,
        "canarygate.rollout.reason": "p99 doubled",
        "canarygate.rollout.by": "admin",
    }


def test_the_request_span_names_its_cohort(sims: tuple[Sim, Sim], tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    text = (
        policy_yaml("chat", sims[0].url, sims[1].url) + "cohorts: {source: header:x-tenant, values: [acme]}\n"
    )
    (tmp_path / "chat.yaml").write_text(text)
    app = create_app(Settings(policy_dir=tmp_path, watch_policies=False), tracing=Tracing(provider))
    with BackgroundServer(app) as server:
        for tenant in ("acme", "someone-else"):
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
            response = httpx.post(
                f"{server.url}/v1/chat/completions", json=body, headers={"x-tenant": tenant}
            )
            assert response.status_code == 200
    servers = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert [s.attributes["canarygate.cohort"] for s in servers] == ["acme", "other"]  # type: ignore[index]
