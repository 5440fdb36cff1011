"""What `model` in an answer says: the model that answered, as its server names it (the default), or with
`answer_model: route` the route's name, in every API, streamed and not, whichever arm answered (a
fallback too) and in a stored response read back: the client cannot tell the arms apart by it."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import pytest

from gateway.apis import renamed, renamed_events
from tests.conftest import BASE_MODEL, CANDIDATE_MODEL, GatewayFactory, Sim, policy_yaml

APIS = "apis: [chat, completions, embeddings, responses, messages]"


def gateway(sims: tuple[Sim, Sim], make_gateway: GatewayFactory, answer_model: str, weight: float) -> str:
    extra = f"answer_model: {answer_model}\nassignment: {{allow_override_header: true}}"
    policy = policy_yaml(
        "assistant",
        sims[0].url,
        sims[1].url,
        weight=weight,
        extra=extra,
        base_extra=APIS,
        candidate_extra=APIS,
    )
    return str(make_gateway({"assistant": policy}).url)


CALLS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/embeddings", {"input": "hi"}),
    ("/v1/responses", {"input": "hi"}),
    ("/v1/messages", {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}),
]


def models_said(url: str, path: str, body: dict[str, Any], arm: str, stream: bool) -> list[str]:
    """Every `model` the client reads in the answer (each event's, for a stream)."""
    sent = {"model": "assistant", **body, **({"stream": True} if stream else {})}
    reply = httpx.post(f"{url}{path}", json=sent, headers={"x-canary": arm}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-canarygate-arm"] == arm
    if not stream:
        return [reply.json()["model"]]
    said = []
    for line in reply.text.splitlines():
        if line.startswith("data: {"):
            event = httpx.Response(200, content=line[6:]).json()
            for holder in (event, event.get("response") or {}, event.get("message") or {}):
                if "model" in holder:
                    said.append(holder["model"])
    assert said, reply.text
    return said


@pytest.mark.parametrize(("path", "body"), CALLS)
def test_answers_name_the_route_whichever_arm_answered(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, path: str, body: dict[str, Any]
) -> None:
    url = gateway(sims, make_gateway, "route", 50)
    for arm in ("base", "candidate"):
        for stream in (False, True) if path != "/v1/embeddings" else (False,):
            assert set(models_said(url, path, body, arm, stream)) == {"assistant"}, (arm, stream)


@pytest.mark.parametrize(("path", "body"), CALLS)
def test_by_default_answers_name_the_model_that_answered(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, path: str, body: dict[str, Any]
) -> None:
    url = gateway(sims, make_gateway, "upstream", 50)
    for arm, model in (("base", BASE_MODEL), ("candidate", CANDIDATE_MODEL)):
        for stream in (False, True) if path != "/v1/embeddings" else (False,):
            assert set(models_said(url, path, body, arm, stream)) == {model}, (arm, stream)


def test_the_anthropic_sdk_reads_the_route_name_and_a_fallback_is_named_alike(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    sims[1].set_knobs(error_rate=1.0)  # the candidate fails every call: the base answers instead
    url = gateway(sims, make_gateway, "route", 100)
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    message = client.messages.create(
        model="assistant", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.model == "assistant"
    with client.messages.stream(
        model="assistant", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.model == "assistant"


def test_renaming_touches_only_where_an_answer_names_its_model() -> None:
    """A tool's input (an object in the Messages API) may hold a "model" key: it stays as it was."""
    answer = (
        b'{"id":"msg_1","model":"ckpt-7","content":[{"type":"tool_use","id":"t","name":"pick",'
        b'"input":{"model":"gpt-x"}}]}'
    )
    assert renamed(answer, "r") == (
        b'{"id":"msg_1","model":"r","content":[{"type":"tool_use","id":"t","name":"pick",'
        b'"input":{"model":"gpt-x"}}]}'
    )
    # In a stream, a tool's input arrives as a string of partial JSON: its quotes are escaped.
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"ckpt-7"}}\n\n'
        b'event: content_block_delta\r\ndata: {"type":"content_block_delta","delta":'
        b'{"type":"input_json_delta","partial_json":"{\\"model\\": \\"gpt-x\\"}"}}\r\n\r\n'
        b'data: {"id":"c","model" : "ckpt-\\"7\\"","choices":[]}\n\n'
        b"data: [DONE]\n\n"
        b'data: {"model":"ckpt'  # cut short: passes as it is
    )
    out = renamed_events(events, "r")
    assert b'"message":{"model":"r"}' in out
    assert b'"partial_json":"{\\"model\\": \\"gpt-x\\"}"' in out
    assert b'"model" : "r","choices"' in out  # a value with escaped quotes, replaced whole
    assert out.endswith(b'data: [DONE]\n\ndata: {"model":"ckpt') and b"\r\n\r\n" in out
    assert renamed(b'{"error":{"message":"no"}}', "r") == b'{"error":{"message":"no"}}'
    assert renamed(b"not json", "r") == b"not json"
