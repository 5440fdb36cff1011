"""What the gateway says to a client who got something wrong: every 400 names its `param` and the type
it expected; every 404 names the nearest endpoint, or says the API is not served. Checked over each
endpoint and each field the gateway reads, not one example each."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, Sim, policy_yaml

TOKEN = "admin-secret"


@pytest.fixture
def gw_url(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> str:
    apis = "apis: [chat, completions, embeddings, responses, messages]"
    policy = policy_yaml("chat", sims[0].url, sims[1].url, base_extra=apis, candidate_extra=apis)
    return str(make_gateway({"chat": policy}, admin_token=TOKEN).url)


def refused(url: str, method: str, path: str, body: Any = None, *, status: int = 400) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"} if path.startswith("/admin") else {}
    reply = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=10)
    assert reply.status_code == status, (path, body, reply.text)
    error: dict[str, Any] = reply.json()["error"]
    return error


CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "chat", "input": "hi"}
MESSAGES = {"model": "chat", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}

# (path, a good body, the field made wrong, its wrong value, what the message says it expected)
WRONG_FIELDS = [
    ("/v1/chat/completions", CHAT, "model", 123, "'model' must be a string"),
    ("/v1/chat/completions", CHAT, "model", ["chat"], "'model' must be a string"),
    ("/v1/chat/completions", CHAT, "stream", "yes", "'stream' must be true or false, not a string"),
    ("/v1/chat/completions", CHAT, "messages", {"role": "user"}, "'messages' must be an array"),
    (
        "/v1/chat/completions",
        CHAT,
        "response_format",
        {"type": "json_schema"},
        "json_schema.schema is required",
    ),
    ("/v1/chat/completions", CHAT, "tools", {"name": "x"}, "tools must be an array, not an object"),
    ("/v1/completions", {"model": "chat", "prompt": "hi"}, "model", 1.5, "'model' must be a string"),
    ("/v1/embeddings", {"model": "chat", "input": "hi"}, "stream", True, "embeddings cannot be streamed"),
    ("/v1/responses", RESPONSES, "input", 7, "'input' must be a string or an array"),
    ("/v1/responses", RESPONSES, "previous_response_id", 7, "'previous_response_id' must be a string"),
    ("/v1/responses", RESPONSES, "conversation", 7, "'conversation' must be a conversation id"),
    (
        "/v1/messages",
        MESSAGES,
        "max_tokens",
        "16",
        "'max_tokens' must be an integer (1 or more), not a string",
    ),
    ("/v1/messages", MESSAGES, "max_tokens", 0, "'max_tokens' must be 1 or more"),
    ("/v1/feedback", {"request_id": "r1", "score": "up"}, "score", 1.5, '\'score\' must be "up", "down"'),
    ("/v1/feedback", {"request_id": "r1", "score": "up"}, "score", "meh", '\'score\' must be "up", "down"'),
    ("/v1/feedback", {"request_id": "r1", "score": "up"}, "request_id", 5, "'request_id' must be a string"),
    (
        "/v1/feedback",
        {"request_id": "r1", "score": "up"},
        "escalated",
        "maybe",
        "'escalated' must be true or false",
    ),
    ("/v1/feedback", {"request_id": "r1", "score": "up"}, "colour", "red", "'colour' is not a field"),
    ("/admin/routes/chat/weight", {"weight": 5}, "weight", "five", "'weight' must be a number, not a string"),
    ("/admin/routes/chat/weight", {"weight": 5}, "by", "a b", "'by': String should match pattern"),
]


@pytest.mark.parametrize(("path", "good", "field", "value", "said"), WRONG_FIELDS)
def test_a_field_of_the_wrong_type_is_named_with_the_type_expected(
    gw_url: str, path: str, good: dict[str, Any], field: str, value: Any, said: str
) -> None:
    error = refused(gw_url, "POST", path, {**good, field: value})
    assert said in error["message"], error
    assert error["param"] is not None and error["param"].split(".")[0].split("[")[0] == field, error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": []}, "model"),
        ("/v1/chat/completions", {"model": "chat"}, "messages"),
        ("/v1/messages", {"model": "chat", "messages": []}, "messages"),
        ("/v1/messages", {**MESSAGES, "max_tokens": None}, "max_tokens"),
        ("/v1/feedback", {"request_id": "r1"}, "score"),
        ("/v1/feedback", {"score": "up"}, "request_id"),  # neither subject
        ("/v1/feedback", {"request_id": "r1", "trace_id": "t", "score": "up"}, "request_id"),  # both
        ("/v1/feedback", {"request_id": "r1", "route": "chat", "score": "up"}, "route"),
    ],
)
def test_a_missing_field_is_named(gw_url: str, path: str, body: dict[str, Any], param: str) -> None:
    error = refused(gw_url, "POST", path, body)
    assert error["param"] == param, error


def test_the_body_as_a_whole_has_no_param(gw_url: str) -> None:
    for path in ("/v1/chat/completions", "/v1/feedback"):
        error = refused(gw_url, "POST", path, [1, 2])
        assert error["param"] is None and "must be a JSON object" in error["message"], error
    reply = httpx.post(
        f"{gw_url}/v1/feedback", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]


def test_the_openai_sdk_reads_the_param_of_a_wrong_model(gw_url: str) -> None:
    client = openai.OpenAI(base_url=f"{gw_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=123, messages=[{"role": "user", "content": "hi"}])  # type: ignore[arg-type]
    assert caught.value.param == "model" and "must be a string" in caught.value.message


@pytest.mark.parametrize(
    ("method", "path", "said"),
    [
        ("GET", "/v1/admin/routes", "did you mean GET /admin/routes? The admin API"),
        ("POST", "/v1/admin/routes/chat/pause", "did you mean POST /admin/routes/chat/pause?"),
        ("GET", "/v1/metrics", "did you mean GET /metrics?"),
        ("GET", "/v1/readyz", "did you mean GET /readyz?"),
        ("POST", "/v1/chat/completion", "did you mean POST /v1/chat/completions?"),
        ("POST", "/chat/completion", "did you mean POST /v1/chat/completions?"),
        ("POST", "/v2/chat/completions", "did you mean POST /v1/chat/completions?"),
        ("GET", "/v1/model", "did you mean GET /v1/models?"),
        ("POST", "/v1/feedbacks", "did you mean POST /v1/feedback?"),
        ("GET", "/admin/route", "did you mean GET /admin/routes?"),
        ("POST", "/v1/images/generations", "does not serve the images API; it serves /v1/chat/completions"),
        ("POST", "/v1/audio/speech", "does not serve the audio API"),
        ("POST", "/v1/messages/count_tokens", "does not serve the token counting API"),
        ("POST", "/v1/conversations", "does not serve the conversations API"),
        ("GET", "/", "the OpenAI-compatible API is under /v1"),
        (
            "POST",
            "/v1/chat/completions" + "x" * 20_000,
            "the OpenAI-compatible API is under /v1",
        ),  # not compared
    ],
)
def test_a_404_names_the_nearest_endpoint(gw_url: str, method: str, path: str, said: str) -> None:
    error = refused(gw_url, method, path, status=404)
    assert said in error["message"], error
    assert "lives under /v1" not in error["message"]


def test_the_served_apis_are_never_told_they_are_not_served(gw_url: str) -> None:
    """/v1/responses and /v1/messages are served: a wrong method is a 405, a stored response's wrong
    path names its own endpoints."""
    for path in ("/v1/responses", "/v1/messages", "/v1/chat/completions"):
        reply = httpx.get(f"{gw_url}{path}", timeout=10)
        assert reply.status_code == 405 and "use POST" in reply.text, reply.text
    error = refused(gw_url, "GET", "/v1/responses/resp_1/input_item", status=404)
    assert "/v1/responses/{id}/input_items" in error["message"]
