"""Security: the admin token guard, secrets that never leave the environment, upstream URLs the client
cannot choose, and the headers a client may not pass through."""

from __future__ import annotations

import hmac
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import REPO, GatewayFactory, Sim, closed_port, policy_yaml, up, wait_for

UPSTREAM_KEY = "sk-upstream-6f1d0c8a9b7e4d21"
CLIENT_KEY = "sk-client-3a9e77d0c1b24f58"
ADMIN_TOKEN = "admin-token-0b5c2e9f8d7a6413"
GATEWAY = [sys.executable, "-m", "gateway"]
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def trap() -> Iterator[list[str]]:
    """A server nobody should reach: it records every request that arrives."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hits.append(f"http://127.0.0.1:{server.server_address[1]}")  # [0] is the address, not a hit
    yield hits
    server.shutdown()
    server.server_close()


def test_admin_needs_the_token_and_is_off_without_one(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)}, admin_token=ADMIN_TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"}):
        for method, path in (("GET", "/admin/routes"), ("POST", "/admin/routes/chat/pause")):
            response = httpx.request(method, f"{gw.url}{path}", headers=headers, timeout=10)
            assert response.status_code == 401, (headers, path, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert ADMIN_TOKEN not in response.text
    ok = httpx.get(f"{gw.url}/admin/routes", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert ok.status_code == 200

    off = make_gateway({"chat": policy_yaml("chat", sims[0].url)})
    response = httpx.get(f"{off.url}/admin/routes", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 404
    assert "the admin API is disabled: set CANARYGATE_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_the_admin_token_is_compared_in_constant_time(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No timing oracle: the check goes through hmac.compare_digest, never ==."""
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr("gateway.app.hmac.compare_digest", spy)
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)}, admin_token=ADMIN_TOKEN)
    httpx.get(f"{gw.url}/admin/routes", headers={"Authorization": "Bearer guess"})
    httpx.get(f"{gw.url}/admin/routes")
    assert seen == [(b"guess", ADMIN_TOKEN.encode()), (b"", ADMIN_TOKEN.encode())]


def test_a_client_cannot_make_the_gateway_call_a_url_of_its_choosing(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, trap: list[str]
) -> None:
    address, hits = trap[0], trap
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url, sims[1].url, weight=50)})
    attempts = [
        {"json": {**CHAT, "model": f"{address}/v1"}},
        {"json": {**CHAT, "model": "../chat"}},
        {"json": {**CHAT, "base_url": address, "api_base": address, "url": address}},
        {"json": CHAT, "headers": {"Host": address[7:], "X-Forwarded-Host": address[7:]}},
        {"json": CHAT, "headers": {"X-Upstream-Url": address, "Forwarded": f"host={address[7:]}"}},
    ]
    for attempt in attempts:
        response = gw.post("/v1/chat/completions", **attempt)
        assert response.status_code in (200, 404), response.text
    for path in (f"/v1/chat/completions/../../{address}", f"//{address[7:]}/v1/chat/completions"):
        assert gw.post(path, json=CHAT).status_code == 404
    assert hits == [address]  # nothing reached the trap


def test_hop_by_hop_and_canary_headers_are_handled_as_documented(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    gw = make_gateway(
        {
            "chat": policy_yaml("chat", base.url, candidate.url, weight=0),
            "open": policy_yaml(
                "open", base.url, candidate.url, weight=0, extra="assignment: {allow_override_header: true}"
            ),
        }
    )
    hop = {
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "X-Canary": "candidate",
        "X-Client-Private": "not for upstream",
    }
    before = len(base.requests())
    forced = gw.post("/v1/chat/completions", json=CHAT, headers=hop)
    assert forced.status_code == 200
    assert forced.headers["x-canarygate-arm"] == "base"  # the route does not allow the override
    arrived = {k.lower() for k in base.requests()[before]["headers"]}
    for name in ("x-drop-me", "keep-alive", "te", "proxy-authorization", "x-canary", "x-client-private"):
        assert name not in arrived, name
    assert (
        gw.post("/v1/chat/completions", json={**CHAT, "model": "open"}, headers=hop).headers[
            "x-canarygate-arm"
        ]
        == "candidate"
    )
    bad = gw.post("/v1/chat/completions", json={**CHAT, "model": "open"}, headers={"X-Canary": "evil"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_header"


def test_secrets_never_reach_logs_errors_metrics_or_spans(sims: tuple[Sim, Sim], tmp_path: Path) -> None:
    """A whole gateway process, logging at debug and printing every span: after successes, failures,
    streams, a leaking upstream and bad credentials, none of the three secrets appears anywhere."""
    base, candidate = sims
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "chat.yaml").write_text(
        policy_yaml(
            "chat",
            base.url,
            candidate.url,
            weight=50,
            base_extra="api_key_env: UPSTREAM_KEY",
            candidate_extra="api_key_env: UPSTREAM_KEY",
            extra="mirror: {percent: 100}",
        )
    )
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    (policies / "dead.yaml").write_text(policy_yaml("dead", dead, base_extra="api_key_env: UPSTREAM_KEY"))
    port = closed_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "UPSTREAM_KEY": UPSTREAM_KEY,
        "CANARYGATE_API_KEYS": CLIENT_KEY,
        "CANARYGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "OTEL_TRACES_EXPORTER": "console",
        "CANARYGATE_TRACE_CONTENT": "true",
    }
    log = tmp_path / "gateway.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [*GATEWAY, "serve", "--policies", str(policies), "--port", str(port), "--log-level", "debug"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: up(f"{url}/healthz"), timeout=30, message="gateway")
            seen = _exercise(url, base, candidate)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    seen.append(log.read_text())
    everything = "\n".join(seen)
    assert "gen_ai.operation.name" in everything  # spans were printed, so they were searched
    assert "upstream_connect_error" in everything and "invalid_api_key" in everything
    for secret in (UPSTREAM_KEY, CLIENT_KEY, ADMIN_TOKEN):
        assert secret not in everything
        assert secret[3:] not in everything  # not even without its prefix
    # The upstream key goes where it belongs, and only there; the client's key never goes upstream.
    arrived = [r["headers"] for sim in (base, candidate) for r in sim.requests()]
    assert any(h.get("authorization") == f"Bearer {UPSTREAM_KEY}" for h in arrived)
    assert not any(CLIENT_KEY in str(h) for h in arrived)


def _exercise(url: str, base: Sim, candidate: Sim) -> list[str]:
    """Traffic of every kind; returns every body and header the gateway answered with."""
    seen: list[str] = []
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0)
    for user in range(6):
        messages: Any = [{"role": "user", "content": "hi"}]
        raw = client.chat.completions.with_raw_response.create(
            model="chat", messages=messages, user=f"u{user}"
        )
        seen += [raw.text, str(raw.headers)]
        stream = client.chat.completions.create(model="chat", messages=messages, stream=True, user=f"s{user}")
        seen += [chunk.model_dump_json() for chunk in stream]
    candidate.set_knobs(error_rate=1.0, error_status=500)
    try:
        for user in range(6):
            response = httpx.post(
                f"{url}/v1/chat/completions",
                json={**CHAT, "user": f"f{user}"},
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            )
            seen += [response.text, str(response.headers)]
    finally:
        candidate.set_knobs(error_rate=0.0)
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    for request in (
        {"json": {**CHAT, "model": "dead"}, "headers": auth},
        {"json": CHAT, "headers": {"Authorization": f"Bearer {CLIENT_KEY}x"}},
        {"json": CHAT, "headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"}},
        {"content": b"{not json", "headers": auth},
    ):
        response = httpx.post(f"{url}/v1/chat/completions", **request, timeout=30)  # type: ignore[arg-type]
        assert response.status_code >= 400
        seen += [response.text, str(response.headers)]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for path in ("/metrics", "/readyz", "/admin/routes", "/admin/routes/chat", "/admin/runtime"):
        response = httpx.get(f"{url}{path}", headers=admin, timeout=30)
        seen += [response.text, str(response.headers)]
    wrong = httpx.get(f"{url}/admin/routes", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert wrong.status_code == 401
    seen.append(wrong.text)
    pairs = httpx.get(f"{url}/admin/pairs", params={"route": "chat"}, headers=admin, timeout=30)
    seen.append(pairs.text)
    return seen


def test_a_rotated_keys_file_is_read_again_and_an_emptied_one_keeps_the_keys_in_force(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    from gateway.settings import Settings

    keys = tmp_path / "keys"
    keys.write_text("sk-old\n")
    settings = Settings.from_env({"CANARYGATE_API_KEYS_FILE": str(keys), "CANARYGATE_API_KEYS": "sk-env"})
    gw = make_gateway(
        {"chat": policy_yaml("chat", sims[0].url)},
        api_keys=settings.api_keys,
        api_keys_file=settings.api_keys_file,
        env_api_keys=settings.env_api_keys,
        admin_token=ADMIN_TOKEN,
    )

    def status(key: str) -> int:
        return gw.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
        ).status_code

    def keys_view() -> dict[str, Any]:
        detail = httpx.get(f"{gw.url}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        return detail["api_keys"]  # type: ignore[no-any-return]

    assert status("sk-old") == 200 and status("sk-env") == 200
    keys.write_text("# emptied by mistake\n")  # a botched rotation must not turn authentication off
    wait_for(lambda: keys_view()["last_error"] is not None, message="the emptied file to be read")
    assert "holds no keys" in keys_view()["last_error"]
    assert status("sk-old") == 200 and status("nothing") == 401 and keys_view()["keys"] == 2
    rotated = tmp_path / "keys.new"
    rotated.write_text("sk-new\n")
    rotated.replace(keys)  # as a mounted secret is swapped: a new file in place of the old
    wait_for(lambda: keys_view()["reloads"] == 1, message="the rotated file to be read")
    assert keys_view()["last_error"] is None
    assert status("sk-new") == 200 and status("sk-env") == 200 and status("sk-old") == 401
