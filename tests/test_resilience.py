"""Faults in the middle of traffic: upstreams that die, hang or babble; reloads, SIGTERM and Redis
restarts while requests are in flight; a client too slow to read its stream. Nothing is lost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import (
    REPO,
    GatewayFactory,
    RawUpstream,
    RedisServer,
    Sim,
    closed_port,
    policy_yaml,
    up,
    wait_for,
)
from tests.test_metrics import scrape, value

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
)


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


BEHAVIOURS: dict[str, Callable[[socket.socket], None]] = {
    "silent": lambda conn: time.sleep(30),  # accepts, reads, never answers
    "close": lambda conn: None,  # reads the request and closes: nothing was sent
    "garbage": lambda conn: conn.sendall(b"\x00\xff\xfe not http at all \r\n\r\n"),
    "truncated": lambda conn: conn.sendall(
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"id": "x", "cho'
    ),
    "midstream": lambda conn: conn.sendall(SSE_HEAD + _chunked(CHUNK)),  # one event, then gone
}


@pytest.fixture(scope="module")
def rogue() -> Iterator[str]:
    """A raw-socket upstream whose path picks how it misbehaves: /silent/v1, /close/v1, ..."""
    upstream = RawUpstream(BEHAVIOURS)
    yield upstream.url
    upstream.close()


FALLBACK = "fallback: {on: [connect_error, timeout, http_5xx]}"
FAST = "timeouts: {connect_s: 1, first_token_s: 1, total_s: 5}"


@pytest.mark.parametrize("behaviour", ["silent", "close", "garbage", "truncated"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_broken_candidate_is_answered_by_the_base(
    behaviour: str, stream: bool, rogue: str, sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    policy = policy_yaml(
        "chat", sims[0].url, f"{rogue}/{behaviour}/v1", weight=100, candidate_extra=FAST, extra=FALLBACK
    )
    gw = make_gateway({"chat": policy})
    started = time.monotonic()
    response = gw.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert response.status_code == 200, response.text
    assert response.headers["x-canarygate-arm"] == "base"
    expected = "timeout" if behaviour == "silent" else "connect_error"
    assert response.headers["x-canarygate-fallback"] == expected
    # A silent stream is cut at first_token_s (1 s); a silent JSON answer at total_s (5 s).
    assert time.monotonic() - started < (3 if stream else 7)
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]")
    metrics = scrape(gw.url)
    assert value(metrics, "canarygate_fallbacks_total", route="chat", reason=expected) == 1


@pytest.mark.parametrize("behaviour", ["silent", "close", "garbage", "truncated"])
def test_a_broken_base_gives_a_clear_error(behaviour: str, rogue: str, make_gateway: GatewayFactory) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", f"{rogue}/{behaviour}/v1", base_extra=FAST)})
    response = gw.post("/v1/chat/completions", json=CHAT)
    status, code = (504, "upstream_timeout") if behaviour == "silent" else (502, "upstream_protocol_error")
    if behaviour == "close":
        code = "upstream_protocol_error"
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["type"] == "upstream_error"


def test_upstream_killed_mid_stream_ends_with_an_error_event_and_is_counted(
    rogue: str, make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", f"{rogue}/midstream/v1", base_extra=FAST)})
    client = gw.client()
    received = []
    stream = client.chat.completions.create(model="chat", messages=CHAT["messages"], stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError, match="closed the connection"):
        received.extend(chunk.choices[0].delta.content for chunk in stream)
    assert received == ["Hel"]  # what was sent stays sent; nothing half-made follows it
    metrics = scrape(gw.url)
    assert (
        value(metrics, "canarygate_requests_total", route="chat", arm="base", outcome="upstream_error") == 1
    )


def open_streams(sim: Sim) -> int:
    streams = sim.stats()["streams"]
    return int(streams["started"] - streams["completed"] - streams["cancelled"])


def _load(
    url: str, requests: int, stream: bool = False, workers: int = 8
) -> list[httpx.Response | Exception]:
    def one(index: int) -> httpx.Response | Exception:
        try:
            return httpx.post(
                f"{url}/v1/chat/completions", json={**CHAT, "stream": stream, "user": f"u{index}"}, timeout=30
            )
        except httpx.HTTPError as exc:
            return exc

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(requests)))


def _complete(response: httpx.Response | Exception) -> bool:
    if isinstance(response, Exception) or response.status_code != 200:
        return False
    if response.headers["content-type"].startswith("text/event-stream"):
        return response.text.rstrip().endswith("data: [DONE]")
    return bool(response.json()["choices"])


def test_policy_reloads_during_traffic_fail_no_request(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    slow = "timeouts: {total_s: 30}"
    gw = make_gateway(
        {"chat": policy_yaml("chat", sims[0].url, sims[1].url, weight=10, extra=slow)}, watch_policies=True
    )
    sims[0].set_knobs(latency_s=0.05)
    sims[1].set_knobs(latency_s=0.05)
    stop = threading.Event()

    def edit_forever() -> None:  # the file watcher reloads (debounced), as on a live edit
        count = 0
        while not stop.is_set():
            weight = (count * 37) % 101
            policy = policy_yaml("chat", sims[0].url, sims[1].url, weight=weight, extra=slow)
            (gw.policy_dir / "chat.yaml").write_text(policy)
            count += 1
            time.sleep(0.4)

    try:
        routes = gw.app.services.routes
        reloads = routes.reloads
        with ThreadPoolExecutor(1) as pool:
            pool.submit(edit_forever)
            results = _load(gw.url, 300) + _load(gw.url, 150, stream=True)
            stop.set()
        assert routes.reloads - reloads >= 3
    finally:
        sims[0].set_knobs(latency_s=0.0)
        sims[1].set_knobs(latency_s=0.0)
    assert [r for r in results if not _complete(r)] == []


def _start(policies: Path, port: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--policies", str(policies), "--port", str(port)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    wait_for(lambda: up(f"http://127.0.0.1:{port}/healthz"), timeout=30, message="gateway")
    return process


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
    sims: tuple[Sim, Sim], tmp_path: Path
) -> None:
    (tmp_path / "chat.yaml").write_text(policy_yaml("chat", sims[0].url, extra="timeouts: {total_s: 30}"))
    port = closed_port()
    url = f"http://127.0.0.1:{port}"
    process = _start(tmp_path, port, tmp_path / "gw.log", CANARYGATE_SHUTDOWN_TIMEOUT_S="10")
    sims[0].set_knobs(time_per_token_s=0.1, output_tokens=20)  # each answer takes ~2 s
    admitted = _admitted(sims[0])
    try:
        with ThreadPoolExecutor(12) as pool:
            streams = [pool.submit(_load, url, 1, True, 1) for _ in range(6)]
            answers = [pool.submit(_load, url, 1, False, 1) for _ in range(6)]
            # Every request has reached the upstream (so it is in flight at the gateway) before the signal.
            wait_for(lambda: _admitted(sims[0]) - admitted >= 12, timeout=30, message="requests in flight")
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):
                httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=5)
            results = [r for future in streams + answers for r in future.result()]
        started = time.monotonic()
        process.wait(timeout=15)
        assert time.monotonic() - started < 10
    finally:
        sims[0].set_knobs(time_per_token_s=0.0, output_tokens=16)
        if process.poll() is None:
            process.kill()
    assert [r for r in results if not _complete(r)] == []
    assert process.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in (tmp_path / "gw.log").read_text()


def _admitted(sim: Sim) -> int:
    return sum(count for key, count in sim.stats()["requests"].items() if key.startswith("chat:"))


def test_a_redis_restart_during_traffic_fails_no_request(
    sims: tuple[Sim, Sim],
    make_gateway: GatewayFactory,
    own_redis: RedisServer,
) -> None:
    gw = make_gateway(
        {"chat": policy_yaml("chat", sims[0].url, sims[1].url, weight=30)},
        redis_url=own_redis.url,
        redis_prefix=f"test-resilience-{os.getpid()}:",
        admin_token="t",
    )
    results = _load(gw.url, 40)
    own_redis.stop()
    wait_for(
        lambda: (
            not httpx.get(f"{gw.url}/readyz", headers={"Authorization": "Bearer t"}).json()["state"]["ok"]
        ),
        timeout=10,
        message="blind",
    )
    results += _load(gw.url, 40) + _load(gw.url, 10, stream=True)  # served while Redis is down
    own_redis.start()
    results += _load(gw.url, 40) + _load(gw.url, 10, stream=True)
    assert len(results) == 140
    assert [r for r in results if not _complete(r)] == []
    wait_for(
        lambda: httpx.get(f"{gw.url}/readyz", headers={"Authorization": "Bearer t"}).json()["state"]["ok"],
        timeout=10,
        message="state back",
    )


def test_a_client_that_stops_reading_holds_the_upstream_not_the_gateways_memory(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    """Back-pressure end to end: the stream stalls at the upstream instead of piling up in the gateway."""
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url, extra="timeouts: {total_s: 120}")})
    sims[0].set_knobs(output_tokens=400_000, time_per_token_s=0.0)
    host, port = gw.url.removeprefix("http://").split(":")
    body = b'{"model": "chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            sock.recv(4096)  # the stream started; now read nothing
            time.sleep(3)
            assert open_streams(sims[0]) == 1  # the upstream is held back, not drained into memory
            (pool,) = gw.app.services.upstream.stats()
            assert pool["in_flight"] == 1
    finally:
        sims[0].set_knobs(output_tokens=16)
    wait_for(lambda: open_streams(sims[0]) == 0, timeout=10, message="upstream stream cancelled")
