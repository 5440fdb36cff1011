"""Bad input and upstream faults: every answer is an OpenAI-format error, never a stack trace."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.server import BackgroundServer
from tests.conftest import GatewayFactory, Sim, closed_port, policy_yaml, wait_for

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert {"message", "type", "code"} <= error.keys()
    assert "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code
    assert response.headers["x-request-id"]
    return error  # type: ignore[no-any-return]


@pytest.fixture
def chat_gateway(sims: tuple[Sim, Sim], make_gateway: GatewayFactory):  # type: ignore[no-untyped-def]
    return make_gateway({"chat": policy_yaml("chat", sims[0].url)}, max_body_bytes=64 * 1024)


def test_malformed_json(chat_gateway) -> None:  # type: ignore[no-untyped-def]
    error = assert_openai_error(
        chat_gateway.post("/v1/chat/completions", content=b'{"model": "chat",'), 400, "invalid_json"
    )
    assert error["type"] == "invalid_request_error"
    assert "not valid JSON" in str(error["message"])
    assert_openai_error(chat_gateway.post("/v1/chat/completions", content=b"[1, 2]"), 400, "invalid_json")
    assert_openai_error(chat_gateway.post("/v1/chat/completions", content=b""), 400, "invalid_json")
    assert_openai_error(chat_gateway.post("/v1/chat/completions", content=b"\xff\xfe{}"), 400, "invalid_json")


def test_missing_and_unknown_model(chat_gateway) -> None:  # type: ignore[no-untyped-def]
    assert_openai_error(
        chat_gateway.post("/v1/chat/completions", json={"messages": []}), 400, "missing_model"
    )
    error = assert_openai_error(
        chat_gateway.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404, "model_not_found"
    )
    assert "gpt-9" in str(error["message"]) and error["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{chat_gateway.url}/v1", api_key="x", max_retries=0).chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "x"}]
        )


def test_field_and_type_checks(chat_gateway) -> None:  # type: ignore[no-untyped-def]
    assert_openai_error(
        chat_gateway.post("/v1/chat/completions", json={"model": "chat"}), 400, "missing_field"
    )
    assert_openai_error(chat_gateway.post("/v1/chat/completions", json={**CHAT, "stream": "yes"}), 400)
    assert_openai_error(chat_gateway.post("/v1/chat/completions", json={**CHAT, "messages": "hi"}), 400)
    assert_openai_error(
        chat_gateway.post("/v1/embeddings", json={"model": "chat", "input": "x", "stream": True}), 400
    )
    wrong_type = chat_gateway.post(
        "/v1/chat/completions",
        content=b"model=chat",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert_openai_error(wrong_type, 415, "unsupported_media_type")


def test_body_size_limit(chat_gateway) -> None:  # type: ignore[no-untyped-def]
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]}
    assert_openai_error(chat_gateway.post("/v1/chat/completions", json=big), 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no content-length: the limit is enforced while reading
        yield b'{"model": "chat", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}]}'

    assert_openai_error(
        chat_gateway.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        ),
        413,
    )


def test_wrong_method_and_path(chat_gateway) -> None:  # type: ignore[no-untyped-def]
    assert_openai_error(httpx.get(f"{chat_gateway.url}/v1/chat/completions"), 405, "method_not_allowed")
    response = httpx.get(f"{chat_gateway.url}/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_upstream_refuses_connection(make_gateway: GatewayFactory) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", f"http://127.0.0.1:{closed_port()}/v1")})
    error = assert_openai_error(gw.post("/v1/chat/completions", json=CHAT), 502, "upstream_connect_error")
    assert "127.0.0.1" not in str(error["message"])  # upstream addresses are not told to clients
    assert_openai_error(gw.post("/v1/chat/completions", json={**CHAT, "stream": True}), 502)


def test_first_token_timeout(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    sims[0].set_knobs(latency_s=2.0)
    gw = make_gateway(
        {
            "chat": policy_yaml(
                "chat", sims[0].url, extra="timeouts: {connect_s: 1, first_token_s: 0.3, total_s: 10}"
            )
        }
    )
    started = time.monotonic()
    error = assert_openai_error(
        gw.post("/v1/chat/completions", json={**CHAT, "stream": True}), 504, "upstream_timeout"
    )
    assert "first_token_s" in str(error["message"])
    assert time.monotonic() - started < 1.5


def test_total_timeout(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    sims[0].set_knobs(latency_s=2.0)
    gw = make_gateway(
        {
            "chat": policy_yaml(
                "chat", sims[0].url, extra="timeouts: {connect_s: 0.5, first_token_s: 0.5, total_s: 0.5}"
            )
        }
    )
    error = assert_openai_error(gw.post("/v1/chat/completions", json=CHAT), 504, "upstream_timeout")
    assert "total_s" in str(error["message"])


def test_total_timeout_mid_stream_sends_an_error_event(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    sims[0].set_knobs(time_per_token_s=0.2, output_tokens=20)
    gw = make_gateway(
        {
            "chat": policy_yaml(
                "chat", sims[0].url, extra="timeouts: {connect_s: 1, first_token_s: 1, total_s: 1}"
            )
        }
    )
    stream = gw.client().chat.completions.create(model="chat", messages=CHAT["messages"], stream=True)  # type: ignore[call-overload]
    received = []

    def consume() -> None:
        received.extend(stream)

    with pytest.raises(openai.APIError, match="did not finish within"):
        consume()
    assert len(received) >= 2  # tokens sent before the deadline did reach the client


def test_upstream_error_passes_through(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    sims[0].set_knobs(error_rate=1.0, error_status=503)
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)})
    error = assert_openai_error(gw.post("/v1/chat/completions", json=CHAT), 503)
    assert error["message"] == "simulated upstream failure"
    sims[0].set_knobs(error_rate=1.0, error_status=429)
    limited = gw.post("/v1/chat/completions", json=CHAT)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "0"
    with pytest.raises(openai.RateLimitError):
        gw.client().chat.completions.create(model="chat", messages=CHAT["messages"])  # type: ignore[call-overload]


@pytest.fixture
def rogue_upstream() -> Iterator[str]:
    """An upstream that misbehaves: echoes credentials in errors, answers HTML, dies mid-stream."""

    async def leak(request: Request) -> Response:
        body = {
            "error": {
                "message": f"bad key {request.headers.get('authorization')}",
                "type": "auth",
                "code": 401,
            }
        }
        return Response(__import__("json").dumps(body), 401, media_type="application/json")

    async def html(_: Request) -> Response:
        return Response("<html><body>502 Bad Gateway</body></html>", 502, media_type="text/html")

    async def dying(_: Request) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            head = b'data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"m","choi'
            yield head + b'ces":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
            yield head
            raise RuntimeError("upstream crashed mid-stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    routes = [
        Route("/leak/v1/chat/completions", leak, methods=["POST"]),
        Route("/html/v1/chat/completions", html, methods=["POST"]),
        Route("/dying/v1/chat/completions", dying, methods=["POST"]),
    ]
    with BackgroundServer(Starlette(routes=routes), log_level="critical") as server:
        yield server.url


def test_secrets_are_scrubbed_from_upstream_errors(
    rogue_upstream: str, make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROGUE_KEY", "sk-very-secret")
    gw = make_gateway(
        {"chat": policy_yaml("chat", f"{rogue_upstream}/leak/v1", base_extra="api_key_env: ROGUE_KEY")}
    )
    response = gw.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(response, 401)
    assert "sk-very-secret" not in response.text
    assert "[REDACTED]" in response.text


def test_html_error_is_wrapped(rogue_upstream: str, make_gateway: GatewayFactory) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", f"{rogue_upstream}/html/v1")})
    error = assert_openai_error(gw.post("/v1/chat/completions", json=CHAT), 502, "upstream_http_502")
    assert "HTML page" in str(error["message"])


def test_upstream_dying_mid_stream(rogue_upstream: str, make_gateway: GatewayFactory) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", f"{rogue_upstream}/dying/v1")})
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10
    ) as r:
        body = r.read().decode()
    assert r.status_code == 200
    events = [e for e in body.split("\n\n") if e]
    assert '"content":"Hel"' in events[0]
    assert events[-1].startswith('data: {"error"')  # the partial event was dropped, not glued to the error
    assert "upstream_protocol_error" in events[-1]
    assert len(events) == 2


def test_client_disconnect_cancels_the_upstream(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    sims[0].set_knobs(time_per_token_s=0.05, output_tokens=400)
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)})
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10
    ) as r:
        for _ in r.iter_bytes():
            break
    wait_for(
        lambda: sims[0].stats()["streams"]["cancelled"] == 1, timeout=5, message="upstream stream cancelled"
    )
    assert sims[0].stats()["active_streams"] == 0


def test_client_disconnect_while_waiting_for_a_non_streamed_answer(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    sims[0].set_knobs(hang_rate=1.0)
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, timeout=0.5)
    # The hanging upstream sees its own client (the gateway) go away: the upstream call was abandoned.
    wait_for(
        lambda: sims[0].stats()["hangs"] == {"started": 1, "released": 1},
        timeout=5,
        message="upstream request abandoned",
    )


def test_every_error_is_logged_once_with_its_request_id(
    chat_gateway,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    caplog.set_level("INFO", logger="gateway")
    chat_gateway.post(
        "/v1/chat/completions", json={**CHAT, "model": "nope"}, headers={"x-request-id": "trace-1"}
    )
    httpx.get(f"{chat_gateway.url}/v1/chat/completions", headers={"x-request-id": "trace-2"})
    httpx.get(f"{chat_gateway.url}/v2/unknown", headers={"x-request-id": "trace-3"})
    for rid in ("trace-1", "trace-2", "trace-3"):  # the client's id, kept beside the gateway's own
        lines = [r.getMessage() for r in caplog.records if f"client_request_id={rid} " in r.getMessage()]
        assert len(lines) == 1, lines


def test_non_proxy_endpoints_return_a_request_id(chat_gateway) -> None:  # type: ignore[no-untyped-def]
    response = httpx.get(f"{chat_gateway.url}/v2/unknown")
    error = assert_openai_error(response, 404, "not_found")
    assert "GET /v2/unknown" in str(error["message"])
    minted = httpx.get(f"{chat_gateway.url}/v1/models", headers={"x-request-id": "abc"}).headers[
        "x-request-id"
    ]
    assert minted != "abc" and str(uuid.UUID(minted)) == minted
