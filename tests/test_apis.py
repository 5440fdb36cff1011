"""The Responses API and Anthropic's Messages API through the gateway, with their official SDKs as clients:
forwarded as they are, validated in their own shapes (streams as the SDKs assemble them), falling back,
mirrored and compared, counted by API, and a Responses conversation kept on the arm whose server holds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway.synth import Knobs
from tests.conftest import (
    BASE_MODEL,
    CANDIDATE_MODEL,
    REDIS_URL,
    GatewayFactory,
    RedisServer,
    Sim,
    policy_yaml,
    wait_for,
)
from tests.test_metrics import scrape, value

APIS = "apis: [chat, responses, messages]"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
# The same tools in each API's words.
RESPONSES_TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather", "parameters": WEATHER},
    {"type": "function", "name": "get_time", "description": "Time", "parameters": {"type": "object"}},
]
MESSAGES_TOOLS = [
    {"name": "get_weather", "description": "Weather", "input_schema": WEATHER},
    {"name": "get_time", "description": "Time", "input_schema": {"type": "object"}},
]
ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
    "required": ["answer", "confidence"],
}
TEXT_FORMAT = {"format": {"type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}}


def route(
    base: Sim, candidate: Sim | None = None, weight: float = 0, extra: str = "", name: str = "agent"
) -> str:
    return policy_yaml(
        name,
        base.url,
        candidate.url if candidate is not None else None,
        weight=weight,
        base_extra=APIS,
        candidate_extra=APIS if candidate is not None else "",
        extra=extra,
    )


def claude(gw: Any, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, **kwargs)


def served(sim: Sim, endpoint: str) -> list[dict[str, Any]]:
    return [r for r in sim.requests() if r["endpoint"] == endpoint]


# --- forwarded as they are ------------------------------------------------------------------------------


def test_responses_and_messages_are_forwarded_as_they_are_streamed_and_not(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, _ = sims
    gw = make_gateway({"agent": route(base)})
    client = gw.client()

    response = client.responses.create(model="agent", input="Say hello", instructions="Be brief")
    assert response.status == "completed" and response.output_text
    assert response.model == BASE_MODEL  # the arm's model, as the server named it
    sent = served(base, "responses")[-1]
    assert sent["body"]["model"] == BASE_MODEL and sent["body"]["instructions"] == "Be brief"

    events = list(client.responses.create(model="agent", input="Say hello", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    with client.responses.stream(model="agent", input="Say hello") as stream:
        final = stream.get_final_response()
    assert final.output_text and final.usage is not None and final.usage.output_tokens > 0

    message = claude(gw).messages.create(
        model="agent", max_tokens=64, messages=[{"role": "user", "content": "Say hello"}], system="Be brief"
    )
    assert (
        message.type == "message" and message.content[0].type == "text" and message.stop_reason == "end_turn"
    )
    sent = served(base, "messages")[-1]
    assert sent["body"]["system"] == "Be brief"
    assert sent["headers"]["anthropic-version"]  # what the server is to speak, from the client
    with claude(gw).messages.stream(
        model="agent", max_tokens=64, messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].type == "text" and streamed.content[0].text
    assert streamed.usage.output_tokens > 0

    samples = scrape(gw.url)
    for api, count in (("responses", 3), ("messages", 2)):
        assert value(samples, "canarygate_requests_total", route="agent", api=api, outcome="ok") == count
    assert value(samples, "canarygate_tokens_total", route="agent", arm="base", type="output") > 0


def test_a_route_whose_arms_do_not_serve_an_api_answers_404_naming_it(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    policy = policy_yaml("chat", base.url, candidate.url, base_extra=APIS)  # the candidate: chat only
    gw = make_gateway({"chat": policy})
    with pytest.raises(openai.NotFoundError) as caught:
        gw.client().responses.create(model="chat", input="hi")
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "api_not_served"
    assert "'chat'" in error["message"] and "Responses API" in error["message"]
    assert "arms.candidate.apis" in error["message"]
    with pytest.raises(anthropic.NotFoundError) as refused:
        claude(gw).messages.create(model="chat", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "error"  # Anthropic's shape, on its API
    assert body["error"]["type"] == "not_found_error" and "Messages API" in body["error"]["message"]
    assert not served(base, "responses") and not served(candidate, "messages")


def test_messages_clients_authenticate_with_x_api_key_and_hear_errors_in_anthropics_shape(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, _ = sims
    gw = make_gateway({"agent": route(base)}, api_keys=frozenset({"sk-gw"}))
    ok = anthropic.Anthropic(base_url=gw.url, api_key="sk-gw", max_retries=0)
    assert ok.messages.create(
        model="agent", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
    ).content
    assert "x-api-key" not in served(base, "messages")[-1]["headers"]  # the gateway's key stays here
    with pytest.raises(anthropic.AuthenticationError) as caught:
        claude(gw).messages.create(model="agent", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    for body, param in (
        ({"model": "agent", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        ({"model": "agent", "max_tokens": 8}, "messages"),
    ):
        answer = gw.post("/v1/messages", json=body, headers={"x-api-key": "sk-gw"})
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == param and answer.json()["type"] == "error"
    refused = gw.post(
        "/v1/responses", json={"model": "agent", "input": 5}, headers={"authorization": "Bearer sk-gw"}
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"  # OpenAI's shape
    assert (
        gw.post(
            "/v1/responses", json={"model": "agent", "input": "hi"}, headers={"x-api-key": "sk-gw"}
        ).status_code
        == 401
    )


# --- validation and fallback ----------------------------------------------------------------------------


FALLBACK = """
fallback:
  on: [connect_error, timeout, http_5xx, malformed, json_parse, json_schema, tool_unknown,
       tool_args_parse, tool_args_schema, tool_choice]
  budget: {ratio: 1, min_per_window: 100}
  circuit_breaker: {enabled: false}
validation:
  stream: buffer
"""


@pytest.mark.parametrize("stream", [False, True])
def test_responses_tools_and_text_format_are_validated_and_a_failing_candidate_falls_back(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, stream: bool
) -> None:
    base, candidate = sims
    gw = make_gateway({"agent": route(base, candidate, weight=100, extra=FALLBACK)})
    client = gw.client()

    def ask(**kwargs: Any) -> Any:
        if stream:
            with client.responses.stream(model="agent", input="Weather in Paris?", **kwargs) as s:
                return s.get_final_response()
        return client.responses.create(model="agent", input="Weather in Paris?", **kwargs)

    cases: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({"wrong_tool_rate": 1}, {"tools": RESPONSES_TOOLS}, "tool_unknown"),
        ({"bad_args_rate": 1}, {"tools": RESPONSES_TOOLS}, "tool_args_parse"),
        (
            {"args_mismatch_rate": 1},
            {"tools": RESPONSES_TOOLS, "tool_choice": {"type": "function", "name": "get_weather"}},
            "tool_args_schema",
        ),
        (
            {"ignore_tool_choice_rate": 1},
            {"tools": RESPONSES_TOOLS, "tool_choice": {"type": "function", "name": "get_time"}},
            "tool_choice",
        ),
        (
            {"ignore_tool_choice_rate": 1},
            {"tools": RESPONSES_TOOLS, "tool_choice": "required"},
            "tool_choice",
        ),
        ({"schema_mismatch_rate": 1}, {"text": TEXT_FORMAT}, "json_schema"),
        ({"invalid_json_rate": 1}, {"text": {"format": {"type": "json_object"}}}, "json_parse"),
        # (a stream with nothing asked of it is relayed as it comes: its shape is checked once it is out)
        ({"malformed_rate": 1}, {"tools": RESPONSES_TOOLS} if stream else {}, "malformed"),
    ]
    for knobs, request, kind in cases:
        candidate.simulator.default = Knobs(**knobs)  # these knobs only
        before = value(scrape(gw.url), "canarygate_fallbacks_total", route="agent", reason=kind)
        answer = ask(**request)
        assert answer.model == BASE_MODEL, kind  # the base's answer: the candidate's never reached the user
        calls = [item for item in answer.output if item.type == "function_call"]
        if "tools" in request:
            assert calls and all(c.name in ("get_weather", "get_time") for c in calls)
            assert all(isinstance(json.loads(c.arguments), dict) for c in calls)
        if "text" in request:
            assert isinstance(json.loads(answer.output_text), dict)
        after = scrape(gw.url)
        assert value(after, "canarygate_fallbacks_total", route="agent", reason=kind) == before + 1, kind
        assert (
            value(after, "canarygate_validation_failures_total", arm="candidate", kind=kind, api="responses")
            >= 1
        )
    candidate.simulator.default = Knobs()
    assert ask(tools=RESPONSES_TOOLS).model == CANDIDATE_MODEL  # a good answer is the candidate's


@pytest.mark.parametrize("stream", [False, True])
def test_messages_tool_use_and_output_format_are_validated_and_a_failing_candidate_falls_back(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, stream: bool
) -> None:
    base, candidate = sims
    gw = make_gateway({"agent": route(base, candidate, weight=100, extra=FALLBACK)})
    client = claude(gw)
    messages = [{"role": "user", "content": "Weather in Paris?"}]

    def ask(**kwargs: Any) -> Any:
        if stream:
            with client.messages.stream(model="agent", max_tokens=256, messages=messages, **kwargs) as s:
                return s.get_final_message()
        return client.messages.create(model="agent", max_tokens=256, messages=messages, **kwargs)

    output_config = {"format": {"type": "json_schema", "schema": ANSWER}}
    cases: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({"wrong_tool_rate": 1}, {"tools": MESSAGES_TOOLS}, "tool_unknown"),
        ({"bad_args_rate": 1}, {"tools": MESSAGES_TOOLS}, "tool_args_parse"),
        (
            {"args_mismatch_rate": 1},
            {"tools": MESSAGES_TOOLS, "tool_choice": {"type": "tool", "name": "get_weather"}},
            "tool_args_schema",
        ),
        (
            {"ignore_tool_choice_rate": 1},
            {"tools": MESSAGES_TOOLS, "tool_choice": {"type": "tool", "name": "get_time"}},
            "tool_choice",
        ),
        (
            {"ignore_tool_choice_rate": 1},
            {"tools": MESSAGES_TOOLS, "tool_choice": {"type": "none"}},
            "tool_choice",
        ),
        ({"schema_mismatch_rate": 1}, {"output_config": output_config}, "json_schema"),
        ({"malformed_rate": 1}, {"tools": MESSAGES_TOOLS} if stream else {}, "malformed"),
    ]
    for knobs, request, kind in cases:
        candidate.simulator.default = Knobs(**knobs)  # these knobs only
        before = value(scrape(gw.url), "canarygate_fallbacks_total", route="agent", reason=kind)
        answer = ask(**request)
        assert answer.model == BASE_MODEL, kind
        uses = [block for block in answer.content if block.type == "tool_use"]
        if request.get("tool_choice", {}).get("type") == "none":
            assert not uses
        elif "tools" in request:
            assert uses and all(
                isinstance(u.input, dict) and u.name in ("get_weather", "get_time") for u in uses
            )
        after = scrape(gw.url)
        assert value(after, "canarygate_fallbacks_total", route="agent", reason=kind) == before + 1, kind
        assert (
            value(after, "canarygate_validation_failures_total", arm="candidate", kind=kind, api="messages")
            >= 1
        )
    candidate.simulator.default = Knobs()
    assert ask(tools=MESSAGES_TOOLS).model == CANDIDATE_MODEL


def test_a_passthrough_stream_is_validated_as_the_sdk_assembles_it_and_counted(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    """Streams relayed as they arrive cannot be taken back: their failures are counted, and the client's
    SDK sees the stream whole."""
    base, _ = sims
    base.set_knobs(args_mismatch_rate=1)
    gw = make_gateway({"agent": route(base)})
    with gw.client().responses.stream(
        model="agent",
        input="Weather?",
        tools=RESPONSES_TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
    ) as stream:
        final = stream.get_final_response()
    assert final.output[0].type == "function_call"
    with claude(gw).messages.stream(
        model="agent",
        max_tokens=64,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=MESSAGES_TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        message = stream.get_final_message()
    assert message.content[0].type == "tool_use"
    samples = scrape(gw.url)
    for api in ("responses", "messages"):
        assert value(samples, "canarygate_validation_failures_total", api=api, kind="tool_args_schema") == 1


def test_request_fields_of_each_dialect_are_checked_with_the_field_named(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, _ = sims
    gw = make_gateway({"agent": route(base)})
    bad = [
        (
            "/v1/responses",
            {"input": "x", "tool_choice": {"type": "function"}, "tools": RESPONSES_TOOLS},
            "tool_choice",
        ),
        ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, None),
        (
            "/v1/responses",
            {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": 5}}]},
            None,
        ),
        (
            "/v1/messages",
            {"max_tokens": 8, "messages": [], "tool_choice": {"type": "tool"}, "tools": MESSAGES_TOOLS},
            None,
        ),
        (
            "/v1/messages",
            {
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "x"}],
                "tool_choice": "auto",
                "tools": MESSAGES_TOOLS,
            },
            "tool_choice",
        ),
        (
            "/v1/messages",
            {
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"name": "f", "input_schema": {"type": 5}}],
            },
            None,
        ),
    ]
    for path, body, param in bad:
        answer = gw.post(path, json={"model": "agent", **body})
        assert answer.status_code == 400, (path, body, answer.text)
        error = answer.json()["error"]
        assert error["message"] and "Traceback" not in answer.text
        if param is not None:
            assert error["param"] == param
    assert not base.requests()


# --- state on the server that holds it ------------------------------------------------------------------


def set_weight(gw: Any, weight: float) -> None:
    changed = gw.post(
        "/admin/routes/agent/weight",
        json={"weight": weight, "reason": "test"},
        headers={"authorization": "Bearer admin-secret"},
    )
    assert changed.status_code == 200, changed.text
    assert gw.app.services.routes.get("agent").weight == weight


def follow_up(client: openai.OpenAI, previous: str, **kwargs: Any) -> Any:
    return client.responses.create(model="agent", previous_response_id=previous, input="And then?", **kwargs)


def test_previous_response_id_stays_on_the_arm_that_made_it_whatever_the_weight(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    mirror = "mirror:\n  percent: 100\n"
    gw = make_gateway({"agent": route(base, candidate, weight=50, extra=mirror)}, admin_token="admin-secret")
    client = gw.client()
    made = {}
    for user in range(40):  # users on both arms
        response = client.responses.create(
            model="agent", input="Hello", extra_headers={"x-user-id": f"u{user}"}
        )
        made.setdefault(response.model, response.id)
        if len(made) == 2:
            break
    assert set(made) == {BASE_MODEL, CANDIDATE_MODEL}
    set_weight(gw, 0)
    for _ in range(2):
        for model, rid in made.items():
            answer = follow_up(client, rid)  # the simulator holds each response on its own server only
            assert answer.model == model and answer.previous_response_id == rid
            made[model] = answer.id  # a chain: each step continues the last
    with client.responses.stream(
        model="agent", previous_response_id=made[CANDIDATE_MODEL], input="Go on"
    ) as s:
        assert s.get_final_response().model == CANDIDATE_MODEL
    # Stateful requests are never mirrored (the other server does not hold the conversation): each server
    # saw exactly the follow-ups of its own responses, none as a shadow call; first turns were mirrored.
    for sim, count in ((base, 2), (candidate, 3)):
        continued = [r for r in served(sim, "responses") if r["body"].get("previous_response_id")]
        assert len(continued) == count
        assert not [r for r in continued if "x-canarygate-mirror" in r["headers"]]
    assert [r for r in served(candidate, "responses") if "x-canarygate-mirror" in r["headers"]]
    unknown = gw.post(
        "/v1/responses", json={"model": "agent", "input": "x", "previous_response_id": "resp_nope"}
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "previous_response_not_found"
    assert unknown.json()["error"]["param"] == "previous_response_id"


def test_a_conversation_stays_on_the_arm_of_its_first_turn(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    gw = make_gateway({"agent": route(base, candidate, weight=50)}, admin_token="admin-secret")
    client = gw.client()
    arms = {}
    for n in range(12):
        conversation = f"conv_{n}"
        first = client.responses.create(model="agent", input="Hi", conversation=conversation)
        arms[conversation] = first.model
    assert set(arms.values()) == {BASE_MODEL, CANDIDATE_MODEL}
    set_weight(gw, 100)
    for conversation, model in arms.items():
        assert (
            client.responses.create(model="agent", input="More", conversation={"id": conversation}).model
            == model
        )


def test_a_pinned_candidate_gone_after_a_rollback_is_a_clear_error(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    gw = make_gateway({"agent": route(base, candidate, weight=100)}, watch_policies=True)
    made = gw.client().responses.create(model="agent", input="Hi")
    assert made.model == CANDIDATE_MODEL
    (gw.policy_dir / "agent.yaml").write_text(route(base))  # the candidate is gone
    wait_for(lambda: gw.app.services.routes.get("agent").candidate is None, message="the policy to reload")
    answer = gw.post("/v1/responses", json={"model": "agent", "input": "x", "previous_response_id": made.id})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "previous_response_unavailable" and "candidate" in error["message"]
    assert not [r for r in base.requests() if r["body"].get("previous_response_id")]


def test_previous_response_id_is_followed_across_replicas_sharing_redis(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, redis_prefix: str
) -> None:
    base, candidate = sims
    policies = {"agent": route(base, candidate, weight=50)}
    one = make_gateway(policies, redis_url=REDIS_URL, redis_prefix=redis_prefix)
    two = make_gateway(policies, redis_url=REDIS_URL, redis_prefix=redis_prefix)
    chains = {}
    for user in range(40):
        made = one.client().responses.create(
            model="agent", input="Hi", extra_headers={"x-user-id": f"u{user}"}
        )
        chains.setdefault(made.model, made.id)
    assert set(chains) == {BASE_MODEL, CANDIDATE_MODEL}
    for step in range(4):  # each step on the other replica, at once
        gw = two if step % 2 == 0 else one
        for model, rid in chains.items():
            answer = follow_up(gw.client(), rid)
            assert answer.model == model
            chains[model] = answer.id
    unknown = two.post(
        "/v1/responses", json={"model": "agent", "input": "x", "previous_response_id": "resp_x"}
    )
    assert unknown.status_code == 404  # asked again for a moment, then refused
    assert unknown.json()["error"]["code"] == "previous_response_not_found"


def test_pins_are_a_clients_own_when_keys_are_required(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, _ = sims
    gw = make_gateway({"agent": route(base)}, api_keys=frozenset({"sk-a", "sk-b"}))
    made = gw.client(api_key="sk-a").responses.create(model="agent", input="Hi")
    assert follow_up(gw.client(api_key="sk-a"), made.id).previous_response_id == made.id
    with pytest.raises(openai.NotFoundError):
        follow_up(gw.client(api_key="sk-b"), made.id)


# --- shadows, pairs, spans ------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_shadow_calls_are_made_in_the_clients_api_and_compared(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, api: str
) -> None:
    base, candidate = sims
    extra = "mirror:\n  percent: 100\n  records: 100\n  capture_content: true\n"
    gw = make_gateway({"agent": route(base, candidate, weight=0, extra=extra)}, admin_token="admin-secret")
    for n in range(3):
        if api == "responses":
            gw.client().responses.create(
                model="agent", input=f"Weather {n}?", tools=RESPONSES_TOOLS, temperature=0
            )
        else:
            claude(gw).messages.create(
                model="agent",
                max_tokens=64,
                messages=[{"role": "user", "content": f"Weather {n}?"}],
                tools=MESSAGES_TOOLS,
            )

    def compared() -> bool:
        return (
            value(scrape(gw.url), "canarygate_mirror_agreement_total", route="agent", check="tool_name") == 3
        )

    wait_for(compared, message="three shadow pairs compared")
    shadows = served(candidate, api)
    assert len(shadows) == 3 and all(r["body"]["model"] == CANDIDATE_MODEL for r in shadows)
    samples = scrape(gw.url)
    assert (
        value(samples, "canarygate_requests_total", arm="candidate", mode="mirror", api=api, outcome="ok")
        == 3
    )
    # Both sides called a declared tool: the pair compares them as calls (names, then arguments).
    agreed = value(
        samples, "canarygate_mirror_agreement_total", route="agent", check="tool_name", result="agree"
    )
    assert agreed == 3
    records = httpx.get(
        f"{gw.url}/admin/pairs", params={"route": "agent"}, headers={"authorization": "Bearer admin-secret"}
    )
    assert records.status_code == 200, records.text
    kept = [json.loads(line) for line in records.text.splitlines()]
    assert len(kept) == 3
    prompts = {json.dumps(record["prompt"]) for record in kept}
    assert all("Weather" in p for p in prompts)  # the request's input (Responses) or messages, as sent


def test_spans_name_the_operation_and_the_provider_of_each_api(sims: tuple[Sim, Sim], tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from gateway.app import create_app
    from gateway.server import BackgroundServer
    from gateway.settings import Settings
    from gateway.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    (tmp_path / "agent.yaml").write_text(route(sims[0]))
    app = create_app(Settings(policy_dir=tmp_path, watch_policies=False), tracing=Tracing(provider))
    with BackgroundServer(app) as server:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="x").responses.create(
            model="agent", input="Hi", max_output_tokens=9
        )
        anthropic.Anthropic(base_url=server.url, api_key="x").messages.create(
            model="agent", max_tokens=9, messages=[{"role": "user", "content": "Hi"}]
        )
    spans = exporter.get_finished_spans()
    clients = sorted((s for s in spans if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    servers = sorted((s for s in spans if s.kind == SpanKind.SERVER), key=lambda s: s.start_time or 0)
    assert [s.name for s in clients] == [f"chat {BASE_MODEL}"] * 2
    assert [s.attributes["gen_ai.provider.name"] for s in clients] == ["openai", "anthropic"]  # type: ignore[index]
    assert [s.attributes["gen_ai.provider.name"] for s in servers] == ["openai", "anthropic"]  # type: ignore[index]
    for span in clients:
        attributes = span.attributes or {}
        assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
        assert attributes["gen_ai.response.model"] == BASE_MODEL
        assert attributes["gen_ai.response.finish_reasons"] == ("length",)  # 9 tokens: cut at the limit
        assert str(attributes["gen_ai.response.id"]).startswith(("resp_", "msg_"))
    assert servers[0].attributes["gen_ai.request.max_tokens"] == 9  # type: ignore[index]


def _cut_stream(first_events: bytes) -> Any:
    def behave(conn: Any) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        conn.sendall(b"%x\r\n%s\r\n" % (len(first_events), first_events))
        # ... and the connection ends without the stream's last event

    return behave


def test_a_stream_cut_short_is_told_to_the_client_in_its_apis_words(make_gateway: GatewayFactory) -> None:
    from tests.conftest import RawUpstream

    created = {
        "type": "response.created",
        "response": {"id": "resp_1", "status": "in_progress", "output": []},
    }
    started = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "m",
            "usage": {"input_tokens": 1, "output_tokens": 1},
        },
    }
    raw = RawUpstream(
        {
            "responses": _cut_stream(
                b"event: response.created\ndata: " + json.dumps(created).encode() + b"\n\n"
            ),
            "messages": _cut_stream(b"event: message_start\ndata: " + json.dumps(started).encode() + b"\n\n"),
        }
    )
    try:
        gw = make_gateway(
            {
                "r": policy_yaml("r", f"{raw.url}/responses/v1", base_extra=APIS),
                "m": policy_yaml("m", f"{raw.url}/messages/v1", base_extra=APIS),
            }
        )
        with pytest.raises(openai.APIError) as caught:
            for _ in gw.client().responses.create(model="r", input="Hi", stream=True):
                pass
        assert "stream" in caught.value.message or "upstream" in caught.value.message
        with (
            pytest.raises(anthropic.APIStatusError) as refused,
            claude(gw).messages.stream(
                model="m", max_tokens=8, messages=[{"role": "user", "content": "Hi"}]
            ) as s,
        ):
            s.get_final_message()
        assert refused.value.body["type"] == "error"  # type: ignore[index]
        assert refused.value.body["error"]["type"] == "api_error"  # type: ignore[index]
        samples = scrape(gw.url)
        for name, api in (("r", "responses"), ("m", "messages")):
            assert (
                value(samples, "canarygate_requests_total", route=name, api=api, outcome="upstream_error")
                == 1
            )
    finally:
        raw.close()


def test_answers_of_both_apis_take_feedback_and_count_in_the_rollout(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    gw = make_gateway({"agent": route(base, candidate, weight=50)}, admin_token="admin-secret")
    ids = []
    for user in range(10):
        raw = gw.client().responses.with_raw_response.create(
            model="agent", input="Hi", extra_headers={"x-user-id": f"r{user}"}
        )
        ids.append(raw.headers["x-request-id"])
        raw = claude(gw).messages.with_raw_response.create(
            model="agent",
            max_tokens=8,
            messages=[{"role": "user", "content": "Hi"}],
            extra_headers={"x-user-id": f"m{user}"},
        )
        ids.append(raw.headers["x-request-id"])
    for rid in ids:
        assert gw.post("/v1/feedback", json={"request_id": rid, "score": "up"}).status_code == 200
    samples = scrape(gw.url)
    assert value(samples, "canarygate_feedback_total", route="agent", value="positive") == 20
    assert value(samples, "canarygate_requests_total", route="agent", mode="primary", outcome="ok") == 20

    def counted() -> bool:  # the rollout's statistics: every answer, on the arm that gave it
        view = httpx.get(
            f"{gw.url}/admin/routes/agent/analysis", headers={"authorization": "Bearer admin-secret"}
        )
        window = view.json()["window"]
        return window["base"]["requests"] + window["candidate"]["requests"] == 20 and all(
            window[arm]["output_tokens_mean"] for arm in ("base", "candidate")
        )

    wait_for(counted, message="20 answers in the rollout's statistics")


def test_the_judge_reads_both_apis_and_catches_a_candidate_that_ignores_the_task(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    candidate.set_knobs(quality=0)  # fluent, well-formed, never the task
    extra = (
        "mirror: {percent: 100, sample_by: request, capture_content: true}\n"
        f"evaluation:\n  judge: {{url: {base.url}, model: judge, max_concurrency: 2}}\n  evaluators:\n"
        "    - {name: adherence, kind: rubric, rubric: instruction_adherence}\n"
        "    - {name: preference, kind: pairwise}\n"
        '    - {name: greets, kind: regex, pattern: "^re-[0-9a-f]{8} "}\n'
    )
    gw = make_gateway({"agent": route(base, candidate, extra=extra)})
    for n in range(4):
        gw.client().responses.create(model="agent", input=f"task {n}", instructions="Do the task")
        claude(gw).messages.create(
            model="agent",
            max_tokens=64,
            system="Do the task",
            messages=[{"role": "user", "content": f"job {n}"}],
        )

    def scored(evaluator: str, arm: str, mode: str, stat: str = "count") -> float:
        return value(
            scrape(gw.url),
            f"canarygate_eval_score_{stat}",
            route="agent",
            evaluator=evaluator,
            arm=arm,
            mode=mode,
        )

    def losses() -> float:
        return value(
            scrape(gw.url),
            "canarygate_eval_verdicts_total",
            route="agent",
            evaluator="preference",
            verdict="loss",
        )

    wait_for(lambda: losses() == 8, message="8 judged pairs, all the candidate's losses")
    wait_for(
        lambda: (
            scored("adherence", "candidate", "mirror") == 8 and scored("adherence", "base", "primary") == 8
        )
    )
    assert scored("adherence", "base", "primary", "sum") == 8  # every base answer does the task
    assert scored("adherence", "candidate", "mirror", "sum") == 0
    assert (
        scored("greets", "base", "primary", "sum") == 8
        and scored("greets", "candidate", "mirror", "sum") == 0
    )


def test_a_stored_response_is_read_from_the_server_that_holds_it(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    """Background responses are only ever read by their id: retrieve, input items, cancel and delete go
    to the arm that made the response, whatever the weight."""
    base, candidate = sims
    gw = make_gateway({"agent": route(base, candidate, weight=50)}, api_keys=frozenset({"sk-a", "sk-b"}))
    client = gw.client(api_key="sk-a")
    made = {}
    for user in range(40):
        response = client.responses.create(
            model="agent", input="Hello", background=True, extra_headers={"x-user-id": f"u{user}"}
        )
        assert response.status == "queued"  # not made yet: not validated, not a failure
        made.setdefault(response.model, response.id)
    assert set(made) == {BASE_MODEL, CANDIDATE_MODEL}
    for model, rid in made.items():
        done = client.responses.retrieve(rid)
        assert done.id == rid and done.model == model and done.status == "completed" and done.output_text
        items = client.responses.input_items.list(rid)
        assert [item.content[0].text for item in items.data] == ["Hello"]  # type: ignore[union-attr]
        assert client.responses.cancel(rid).status == "cancelled"
    with pytest.raises(openai.NotFoundError) as caught:
        gw.client(api_key="sk-b").responses.retrieve(made[BASE_MODEL])  # another client's: not known to it
    assert caught.value.body["code"] == "response_not_found"  # type: ignore[index]
    assert client.responses.delete(made[BASE_MODEL]) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made[BASE_MODEL])  # the server's own 404, passed on
    for path, method in (("/v1/responses/x/other", "GET"), ("/v1/responses/x/cancel", "GET")):
        answer = httpx.request(method, f"{gw.url}{path}", headers={"authorization": "Bearer sk-a"})
        assert answer.status_code in (404, 405) and answer.json()["error"]["message"]
    unauthenticated = httpx.get(f"{gw.url}/v1/responses/{made[CANDIDATE_MODEL]}")
    assert unauthenticated.status_code == 401
    reads = [r for r in candidate.requests() if r["endpoint"] == "stored"]
    assert {r["method"] for r in reads} == {"GET", "POST"}
    assert all(r["headers"].get("authorization") is None for r in reads)  # the client's key stays here


def test_a_relayed_stream_past_the_buffer_bound_is_not_kept_but_its_response_is_still_followed(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, _ = sims
    base.set_knobs(output_tokens=400)
    # json: always: an answer that is not JSON fails, when it is validated
    extra = "validation: {max_buffer_bytes: 4096, stream: passthrough, json: always}"
    gw = make_gateway({"agent": route(base, extra=extra)})
    with gw.client().responses.stream(model="agent", input="Tell me") as s:
        final = s.get_final_response()
    assert final.status == "completed" and len(final.output_text.split()) == 400  # the client got all of it
    samples = scrape(gw.url)
    assert value(samples, "canarygate_validation_failures_total", route="agent", api="responses") == 0
    assert value(samples, "canarygate_usage_missing_total", route="agent", arm="base") == 1  # not rebuilt
    assert follow_up(gw.client(), final.id).previous_response_id == final.id


def test_with_redis_down_a_response_known_here_is_followed_and_one_that_is_not_is_a_503(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, own_redis: RedisServer
) -> None:
    base, candidate = sims
    policies = {"agent": route(base, candidate, weight=50)}
    one = make_gateway(policies, redis_url=own_redis.url)
    two = make_gateway(policies, redis_url=own_redis.url)
    made = one.client().responses.create(model="agent", input="Hi")
    assert follow_up(two.client(), made.id).model == made.model  # through Redis: the record is there
    own_redis.stop()
    assert follow_up(one.client(), made.id).model == made.model  # this replica's own record
    elsewhere = one.client().responses.create(model="agent", input="Hi")  # its record stays on `one`
    refused = two.post(
        "/v1/responses", json={"model": "agent", "input": "x", "previous_response_id": elsewhere.id}
    )
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "state_unavailable"
    assert "retry" in refused.json()["error"]["message"]
