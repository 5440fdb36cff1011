"""End to end: the openai SDK -> gateway -> simulated model servers, all real servers on loopback."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import openai
import pytest

from tests.conftest import BASE_MODEL, CANDIDATE_MODEL, GatewayFactory, Sim, policy_yaml

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]


def canary(sims: tuple[Sim, Sim], weight: float = 0, **kwargs: str) -> dict[str, str]:
    base, candidate = sims
    return {"chat": policy_yaml("chat", base.url, candidate.url, weight=weight, **kwargs)}


def test_chat_completion_goes_to_base_with_model_rewritten(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway(canary(sims))
    raw = gw.client().chat.completions.with_raw_response.create(
        model="chat",
        messages=[{"role": "user", "content": "hello"}],
        extra_headers={"x-request-id": "req-123"},
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.model == BASE_MODEL
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert raw.headers["x-canarygate-route"] == "chat"
    assert raw.headers["x-canarygate-arm"] == "base"
    ours = raw.headers["x-request-id"]
    assert str(uuid.UUID(ours)) == ours  # the gateway's own id, a UUID: the client's is never a key
    (seen,) = sims[0].requests()
    assert seen["body"]["model"] == BASE_MODEL
    assert seen["headers"]["x-request-id"] == ours  # and never forwarded: the upstream gets ours
    assert "authorization" not in seen["headers"]  # the client's key never goes upstream by default
    assert sims[1].requests() == []


def test_the_gateway_mints_every_request_id_and_keeps_the_clients_for_its_logs(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="gateway")
    sims[0].set_knobs(error_rate=1, error_status=400)  # an error: logged with both ids
    gw = make_gateway(canary(sims))
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
    ids = set()
    for given in (None, "bad id with spaces", "trace-77", "trace-77"):
        headers = {"x-request-id": given} if given else {}
        ids.add(gw.post("/v1/chat/completions", json=body, headers=headers).headers["x-request-id"])
    assert len(ids) == 4 and all(str(uuid.UUID(rid)) == rid for rid in ids)  # one per request, never theirs
    assert {r["headers"]["x-request-id"] for r in sims[0].requests()} == ids
    logged = [r.getMessage() for r in caplog.records if "client_request_id=trace-77 " in r.getMessage()]
    assert len(logged) == 2 and all(line.split()[0][len("request_id=") :] in ids for line in logged)


def test_streaming_is_relayed_chunk_by_chunk(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    sims[0].set_knobs(time_per_token_s=0.05, output_tokens=20)
    gw = make_gateway(canary(sims))
    started = time.monotonic()
    arrivals = []
    text = ""
    usage = None
    stream = gw.client().chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        arrivals.append(time.monotonic() - started)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert len(text.split()) == 20
    assert usage is not None and usage.completion_tokens == 20  # include_usage honoured
    # 20 tokens at 50 ms each take ~1 s upstream; a buffering proxy would deliver everything at the end.
    assert arrivals[-1] - arrivals[0] > 0.5
    assert arrivals[1] < arrivals[-1] - 0.5


def test_stream_response_headers(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    gw = make_gateway(canary(sims, weight=100))
    with gw.client().chat.completions.with_streaming_response.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
    ) as response:
        lines = list(response.iter_lines())
    assert response.headers["x-canarygate-arm"] == "candidate"
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
    assert sims[1].requests()[0]["body"]["model"] == CANDIDATE_MODEL


def test_tool_calls_non_streaming_and_streaming(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    client = make_gateway(canary(sims)).client()
    messages = [{"role": "user", "content": "weather in Paris?"}]
    completion = client.chat.completions.create(
        model="chat", messages=messages, tools=TOOLS, tool_choice="required"
    )
    (call,) = completion.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)
    assert completion.choices[0].finish_reason == "tool_calls"

    name, arguments = "", ""
    for chunk in client.chat.completions.create(model="chat", messages=messages, tools=TOOLS, stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name += delta.function.name or "" if delta.function else ""
            arguments += delta.function.arguments or "" if delta.function else ""
    assert name == "get_weather"
    assert "city" in json.loads(arguments)
    assert sims[0].requests()[-1]["body"]["tools"] == TOOLS  # forwarded untouched


def test_response_format_json_schema(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    client = make_gateway(canary(sims)).client()
    schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
    completion = client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "sum"}],
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    assert isinstance(json.loads(completion.choices[0].message.content or "")["total"], float)


def test_embeddings_and_completions(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    base, _ = sims
    gw = make_gateway({"embed": policy_yaml("embed", base.url)})
    client = gw.client()
    embeddings = client.embeddings.create(model="embed", input=["one", "two"])  # the SDK asks for base64
    assert [len(d.embedding) for d in embeddings.data] == [16, 16]
    completion = client.completions.create(model="embed", prompt="Say hi", max_tokens=5)
    assert completion.choices[0].finish_reason == "length"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="embed", prompt="hi", stream=True)
        if c.choices
    )
    assert len(streamed.split()) == 16


def test_models_lists_routes(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    base, candidate = sims
    gw = make_gateway(
        {"a": policy_yaml("route-a", base.url), "b": policy_yaml("route-b", base.url, candidate.url)}
    )
    client = gw.client()
    assert sorted(m.id for m in client.models.list()) == ["route-a", "route-b"]
    assert client.models.retrieve("route-b").id == "route-b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_sticky_assignment_and_split(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    gw = make_gateway(
        canary(sims, weight=30, extra="assignment: {sticky_keys: [header:x-session-id, body:user]}")
    )
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    arms = {
        gw.post("/v1/chat/completions", json=body, headers={"x-session-id": "s-1"}).headers[
            "x-canarygate-arm"
        ]
        for _ in range(15)
    }
    assert len(arms) == 1
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        served = [
            client.post("/v1/chat/completions", json={**body, "user": f"user-{i}"}).headers[
                "x-canarygate-arm"
            ]
            for i in range(400)
        ]
    assert 0.22 < served.count("candidate") / 400 < 0.38


def test_override_header(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
    allowed = make_gateway(canary(sims, extra="assignment: {allow_override_header: true}"))
    assert (
        allowed.post("/v1/chat/completions", json=body, headers={"x-canary": "candidate"}).headers[
            "x-canarygate-arm"
        ]
        == "candidate"
    )
    bad = allowed.post("/v1/chat/completions", json=body, headers={"x-canary": "tuned"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-canary"
    ignored = make_gateway(canary(sims))
    assert (
        ignored.post("/v1/chat/completions", json=body, headers={"x-canary": "candidate"}).headers[
            "x-canarygate-arm"
        ]
        == "base"
    )


def test_credentials_and_extra_headers(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_BASE_KEY", "sk-base-secret")
    gw = make_gateway(
        canary(
            sims,
            weight=0,
            extra="assignment: {allow_override_header: true}",
            base_extra="api_key_env: TEST_BASE_KEY\nheaders: {X-Team: search}",
            candidate_extra="forward_client_auth: true",
        )
    )
    client = gw.client(api_key="client-key")
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "x"}], extra_headers={"x-canary": "candidate"}
    )
    base_seen = sims[0].requests()[-1]["headers"]
    assert base_seen["authorization"] == "Bearer sk-base-secret"
    assert base_seen["x-team"] == "search"
    assert sims[1].requests()[-1]["headers"]["authorization"] == "Bearer client-key"


def test_gateway_api_keys(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    gw = make_gateway(canary(sims), api_keys=frozenset({"good-key"}))
    with pytest.raises(openai.AuthenticationError) as wrong:
        gw.client(api_key="bad-key").chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}]
        )
    assert wrong.value.code == "invalid_api_key"
    missing = gw.post("/v1/chat/completions", json={"model": "chat", "messages": []})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(f"{gw.url}/v1/models").status_code == 401
    ok = gw.client(api_key="good-key")
    assert ok.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}]).choices
    assert [m.id for m in ok.models.list()] == ["chat"]
    assert httpx.get(f"{gw.url}/healthz").status_code == 200  # probes need no key


def test_plain_text_completions_are_served_by_the_candidate_and_never_held_to_json(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    """/v1/completions answers are text: only a request that asks for JSON holds them to it. (Every text
    completion used to fail json_parse: the candidate's always fell back, the base's counted as invalid.)"""
    from tests.test_metrics import scrape, value

    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url, sims[1].url, weight=100)})
    for stream in (False, True):
        for _ in range(3):
            reply = gw.post("/v1/completions", json={"model": "chat", "prompt": "hi", "stream": stream})
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-canarygate-arm"] == "candidate"
            assert "x-canarygate-fallback" not in reply.headers
    samples = scrape(gw.url)
    assert value(samples, "canarygate_validation_failures_total", route="chat") == 0
    asked = {"model": "chat", "prompt": "hi", "response_format": {"type": "json_object"}}
    reply = gw.post("/v1/completions", json=asked)  # asked for JSON: the simulator's text is not
    assert reply.headers.get("x-canarygate-fallback") == "json_parse", reply.headers
