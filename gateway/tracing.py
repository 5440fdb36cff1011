"""OpenTelemetry traces: a SERVER span per request and a CLIENT span per upstream attempt, with the
GenAI semantic conventions and canarygate.* attributes.

Off unless the standard OTEL_* variables ask for an exporter (OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_TRACES_EXPORTER); when off, no span is made and the
client's traceparent reaches the upstream unchanged. Prompts and completions are recorded only with
CANARYGATE_TRACE_CONTENT=true.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from opentelemetry import baggage, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.upstream import Call

OPERATIONS = {
    "chat": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
    "messages": "chat",
}
CONTENT_LIMIT = 16 * 1024
# The OpenTelemetry semantic conventions the spans follow (GenAI: span names "{gen_ai.operation.name}
# {gen_ai.request.model}", gen_ai.* attributes); the tracer says so in its schema URL.
SEMCONV_VERSION = "1.44.0"
# gen_ai.provider.name: the API the upstream speaks (the server behind it may be vLLM, llama.cpp, ...).
PROVIDERS = {"messages": "anthropic"}
PROVIDER = "openai"
# What the arm's upstream calls carry in W3C baggage, so spans downstream can be grouped by arm.
BAGGAGE = ("canarygate.route", "canarygate.arm", "canarygate.rollout")
MAX_CONTEXTS = 1024


class Tracing:
    def __init__(self, provider: TracerProvider | None, *, record_content: bool = False) -> None:
        self.provider = provider
        schema = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
        self.tracer = provider.get_tracer("canarygate", schema_url=schema) if provider is not None else None
        self.record_content = record_content
        self._propagator = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
        self._contexts: dict[tuple[str, str, str], Context] = {}

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Tracing:
        exporter = _exporter(environ)
        if exporter is None:
            return cls(None)
        provider = TracerProvider(resource=Resource.create({"service.name": "canarygate"}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, record_content=environ.get("CANARYGATE_TRACE_CONTENT", "").lower() == "true")

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()

    def server_span(self, headers: Mapping[str, str], endpoint: str) -> Span | None:
        """The request's span, continuing the client's trace (W3C traceparent) when it sent one."""
        if self.tracer is None:
            return None
        operation = OPERATIONS[endpoint]
        return self.tracer.start_span(
            operation,
            context=self._propagator.extract(headers),
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": PROVIDERS.get(endpoint, PROVIDER),
                "canarygate.mode": "primary",
            },
        )

    def rollout_transition(
        self, route: str, version: int, phase: str, weight: float, reason: str, by: str
    ) -> None:
        """A rollout state change as a short span of its own with a `canarygate.rollout.transition` event,
        so trace backends show promotions and rollbacks beside the traffic they judged."""
        if self.tracer is None:
            return
        attributes: dict[str, str | int] = {"canarygate.route": route, "canarygate.rollout.version": version}
        span = self.tracer.start_span(f"rollout {route}", context=Context(), attributes=attributes)
        span.add_event(
            "canarygate.rollout.transition",
            {
                "canarygate.rollout.phase": phase,
                "canarygate.rollout.weight": weight,
                "canarygate.rollout.reason": reason[:500],
                "canarygate.rollout.by": by,
            },
        )
        span.end()

    def name_route(self, span: Span, endpoint: str, route: str, payload: Any) -> None:
        span.update_name(f"{OPERATIONS[endpoint]} {route}")
        span.set_attributes(
            {"gen_ai.request.model": route, "canarygate.route": route, **_request_attributes(payload)}
        )
        if self.record_content and isinstance(payload, dict):
            given = payload.get("messages", payload.get("input"))  # chat and Messages; Responses
            if given is not None:
                span.set_attribute("gen_ai.input.messages", _truncate(given))

    def client_span(
        self, server: Span, route: str, call: Call, *, conversation: str | None = None, rollout: str = ""
    ) -> Span | None:
        """Start an attempt's span, a child of the request's; its traceparent, and the route, arm and
        rollout as baggage (beside any the client sent), go in the call's headers."""
        if self.tracer is None:
            return None
        attributes = _attempt_attributes(route, call, "primary")
        if conversation is not None:
            attributes["gen_ai.conversation.id"] = conversation
        span = self.tracer.start_span(
            f"{OPERATIONS[call.endpoint]} {call.arm.model}",
            context=trace.set_span_in_context(server),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        context = trace.set_span_in_context(
            span, self._baggage(call.headers, (route, call.arm.name, rollout))
        )
        self._propagator.inject(call.headers, context=context)
        return span

    def _baggage(self, headers: Mapping[str, str], ours: tuple[str, str, str]) -> Context:
        """The baggage an upstream call carries: the client's (the call's headers carry it on, as
        upstream_headers copied it), then the route's, arm's and rollout's. Without the client's, the same
        few contexts serve every call (kept per route, arm and rollout)."""
        sent = headers.get("baggage")
        if not sent:
            cached = self._contexts.get(ours)
            if cached is not None:
                return cached
        context = self._propagator.extract({"baggage": sent}) if sent else Context()
        for name, value in zip(BAGGAGE, ours, strict=True):
            context = baggage.set_baggage(name, value, context)
        if not sent:
            if len(self._contexts) >= MAX_CONTEXTS:
                self._contexts.clear()  # rollouts come and go: start again rather than grow
            self._contexts[ours] = context
        return context

    def mirror_span(self, primary: Span | None, route: str, call: Call) -> Span | None:
        """A shadow call is a trace of its own, linked to the primary request's span: it never lengthens
        the user's trace. Its traceparent goes in the call's headers."""
        if self.tracer is None:
            return None
        links = [Link(primary.get_span_context())] if primary is not None else []
        span = self.tracer.start_span(
            f"{OPERATIONS[call.endpoint]} {call.arm.model}",
            context=Context(),
            kind=SpanKind.CLIENT,
            links=links,
            attributes=_attempt_attributes(route, call, "mirror"),
        )
        self._propagator.inject(call.headers, context=trace.set_span_in_context(span))
        return span

    def end_client(
        self,
        span: Span,
        answer: Mapping[str, Any] | None,
        validation: str,
        error: Any,
        status: int | None,
        *,
        outcome: str | None = None,
        end_ns: int | None = None,
    ) -> None:
        """End an attempt's span, at end_ns (it may be booked after it ended: a failure is judged once
        the other arm has answered the same request)."""
        span.set_attribute("canarygate.validation.result", validation)
        if outcome is not None:
            span.set_attribute("canarygate.outcome", outcome)
        if answer is not None:
            _response_attributes(span, answer, self.record_content)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None:
            span.set_attribute("error.type", getattr(error, "code", type(error).__name__))
            span.set_status(Status(StatusCode.ERROR, getattr(error, "message", str(error))))
        span.end(end_time=end_ns)

    def evaluation(
        self,
        judged: Span | None,
        route: str,
        result: Any,
        response_id: str | None,
        *,
        judge_reason: bool = False,
    ) -> None:
        """An evaluator's result as a `gen_ai.evaluation.result` event. Results come after the judged span
        has ended (OpenTelemetry spans cannot change then), so each is the event of a zero-length span
        parented to the judged one, as the GenAI conventions' tracing bridges do. judge_reason: the
        explanation is a judge's words about the content, recorded only with CANARYGATE_TRACE_CONTENT."""
        if self.tracer is None or judged is None:
            return
        attributes: dict[str, str | float] = {
            "gen_ai.evaluation.name": result.evaluator,
            "gen_ai.evaluation.score.value": result.score,
            "gen_ai.evaluation.score.label": result.label,
        }
        if result.explanation and (self.record_content or not judge_reason):
            attributes["gen_ai.evaluation.explanation"] = result.explanation[:1000]
        if response_id:
            attributes["gen_ai.response.id"] = response_id
        span = self.tracer.start_span(
            f"evaluate {result.evaluator}",
            context=trace.set_span_in_context(judged),
            attributes={"canarygate.route": route, "gen_ai.evaluation.name": result.evaluator},
        )
        span.add_event("gen_ai.evaluation.result", attributes)
        span.end()

    def end_server(self, span: Span, arm: str | None, fallback: str | None, status: int, error: Any) -> None:
        if arm is not None:
            span.set_attribute("canarygate.arm", arm)
        if fallback is not None:
            span.set_attribute("canarygate.fallback.reason", fallback)
        span.set_attribute("http.response.status_code", status)
        if error is not None:
            span.set_attribute("error.type", getattr(error, "code", type(error).__name__))
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, getattr(error, "message", str(error))))
        span.end()


def _exporter(environ: Mapping[str, str]) -> SpanExporter | None:
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    chosen = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if chosen == "none" or (not chosen and not endpoint):
        return None
    if chosen == "console":
        return ConsoleSpanExporter()
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    # The exporters read their endpoint, headers, timeout and compression from the same variables.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def _attempt_attributes(route: str, call: Call, mode: str) -> dict[str, Any]:
    url = call.arm.urls[call.endpoint]
    return {
        "gen_ai.operation.name": OPERATIONS[call.endpoint],
        "gen_ai.provider.name": PROVIDERS.get(call.endpoint, PROVIDER),
        "gen_ai.request.model": call.arm.model,
        "server.address": url.host or "",
        "server.port": url.port or 0,
        "canarygate.route": route,
        "canarygate.arm": call.arm.name,
        "canarygate.mode": mode,
    }


def _request_attributes(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        return {}
    out: dict[str, Any] = {}
    for field, attribute in (
        ("max_tokens", "gen_ai.request.max_tokens"),
        ("max_output_tokens", "gen_ai.request.max_tokens"),
        ("temperature", "gen_ai.request.temperature"),
        ("top_p", "gen_ai.request.top_p"),
        ("seed", "gen_ai.request.seed"),
    ):
        value = payload.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[attribute] = value
    return out


def _response_attributes(span: Span, answer: Mapping[str, Any], record_content: bool) -> None:
    if isinstance(answer.get("model"), str):
        span.set_attribute("gen_ai.response.model", answer["model"])
    if isinstance(answer.get("id"), str):
        span.set_attribute("gen_ai.response.id", answer["id"])
    usage = answer.get("usage")
    if isinstance(usage, dict):
        for field, detail, attribute in (
            ("prompt_tokens", None, "gen_ai.usage.input_tokens"),
            ("completion_tokens", None, "gen_ai.usage.output_tokens"),
            # Parts of the two above, when the upstream reports them (OpenAI's usage details).
            ("prompt_tokens_details", "cached_tokens", "gen_ai.usage.cache_read.input_tokens"),
            ("completion_tokens_details", "reasoning_tokens", "gen_ai.usage.reasoning.output_tokens"),
        ):
            value = usage.get(field)
            if detail is not None:
                value = value.get(detail) if isinstance(value, dict) else None
            if isinstance(value, int) and not isinstance(value, bool):
                span.set_attribute(attribute, value)
    choices = answer.get("choices")
    if isinstance(choices, list):
        reasons = [c.get("finish_reason") for c in choices if isinstance(c, dict) and c.get("finish_reason")]
        if reasons:
            span.set_attribute("gen_ai.response.finish_reasons", reasons)
        if record_content:
            messages = [c.get("message") or c.get("text") for c in choices if isinstance(c, dict)]
            span.set_attribute("gen_ai.output.messages", _truncate(messages))


def _truncate(value: Any) -> str:
    return orjson.dumps(value).decode()[:CONTENT_LIMIT]
