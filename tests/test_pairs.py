"""Noise floor, pair records in memory and in a real Redis, and their export through the CLI."""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import redis

from tests.conftest import CANDIDATE_MODEL, GatewayFactory, Sim, policy_yaml, wait_for
from tests.test_cli import canarygate
from tests.test_metrics import scrape, value

TOKEN = "admin-secret-token"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "the private prompt"}], "temperature": 0}
SHADOW_ALL = "mirror: {percent: 100, sample_by: request"


def export(gw_url: str, **params: Any) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{gw_url}/admin/pairs",
        params={"route": "chat", **params},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def drive(gw_url: str, candidate: Sim) -> None:
    """Two pairs that agree (plain answers), then one that disagrees (the candidate breaks JSON)."""
    for _ in range(2):
        httpx.post(f"{gw_url}/v1/chat/completions", json=CHAT)
    candidate.set_knobs(invalid_json_rate=1)
    httpx.post(f"{gw_url}/v1/chat/completions", json={**CHAT, "response_format": {"type": "json_object"}})


def test_records_export_and_content_capture(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    base, candidate = sims
    gw = make_gateway(
        {"chat": policy_yaml("chat", base.url, candidate.url, extra=SHADOW_ALL + "}")}, admin_token=TOKEN
    )
    drive(gw.url, candidate)
    wait_for(lambda: len(export(gw.url)) == 3, message="three compared pairs")
    newest, *_ = export(gw.url)
    assert newest["kind"] == "candidate" and newest["agree"] is False
    assert newest["checks"] == {"json_valid": False, "finish_reason": True}
    assert newest["shadow"]["model"] == CANDIDATE_MODEL and newest["primary"]["latency_ms"] > 0
    assert "prompt" not in newest and "output" not in newest["shadow"]  # no content unless captured
    assert [r["pair_id"] for r in export(gw.url, disagreements="true")] == [newest["pair_id"]]

    captured = make_gateway(
        {"chat": policy_yaml("chat", base.url, candidate.url, extra=SHADOW_ALL + ", capture_content: true}")},
        admin_token=TOKEN,
    )
    httpx.post(
        f"{captured.url}/v1/chat/completions", json={**CHAT, "response_format": {"type": "json_object"}}
    )
    wait_for(lambda: len(export(captured.url)) == 1)
    (record,) = export(captured.url)
    assert record["prompt"] == CHAT["messages"]
    assert record["shadow"]["output"]["content"] and record["primary"]["output"]["role"] == "assistant"


def test_the_cli_exports_jsonl_and_a_table(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    base, candidate = sims
    gw = make_gateway(
        {"chat": policy_yaml("chat", base.url, candidate.url, extra=SHADOW_ALL + "}")}, admin_token=TOKEN
    )
    drive(gw.url, candidate)
    wait_for(lambda: len(export(gw.url)) == 3)
    env = {"CANARYGATE_ADMIN_TOKEN": TOKEN, "CANARYGATE_URL": gw.url}
    jsonl = canarygate("pairs", "--route", "chat", "--disagreements", "--jsonl", env=env)
    assert jsonl.returncode == 0, jsonl.stderr
    (line,) = jsonl.stdout.splitlines()
    assert json.loads(line)["checks"]["json_valid"] is False
    table = canarygate("pairs", "--route", "chat", env=env)
    assert table.returncode == 0 and "json_valid" in table.stdout and "3 pair(s)" in table.stderr
    assert (
        canarygate(
            "pairs", "--route", "chat", env={"CANARYGATE_URL": gw.url, "CANARYGATE_ADMIN_TOKEN": ""}
        ).returncode
        == 2
    )
    wrong = canarygate("pairs", "--route", "chat", env={**env, "CANARYGATE_ADMIN_TOKEN": "nope"})
    assert wrong.returncode == 2 and "401" in wrong.stderr


def test_the_admin_api_needs_its_token(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    closed = make_gateway({"chat": policy_yaml("chat", sims[0].url)})
    disabled = httpx.get(f"{closed.url}/admin/pairs", params={"route": "chat"})
    assert disabled.status_code == 404 and "CANARYGATE_ADMIN_TOKEN" in disabled.json()["error"]["message"]
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)}, admin_token=TOKEN)
    assert httpx.get(f"{gw.url}/admin/pairs", params={"route": "chat"}).status_code == 401
    assert (
        httpx.get(
            f"{gw.url}/admin/pairs", params={"route": "chat"}, headers={"Authorization": "Bearer wrong"}
        ).status_code
        == 401
    )
    unknown = httpx.get(
        f"{gw.url}/admin/pairs", params={"route": "nope"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert unknown.status_code == 404


def test_noise_floor_replays_base_to_base(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    base, candidate = sims
    extra = "mirror: {percent: 0, noise_floor_percent: 100, sample_by: request}"
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, extra=extra)}, admin_token=TOKEN)
    for _ in range(3):
        httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "temperature": 1.0})

    def noise(result: str) -> float:
        return value(
            scrape(gw.url),
            "canarygate_noise_agreement_total",
            route="chat",
            check="finish_reason",
            result=result,
        )

    wait_for(lambda: noise("agree") == 3, message="three noise pairs compared")
    replays = [r for r in base.requests() if r["headers"].get("x-canarygate-mirror") == "1"]
    assert len(replays) == 3 and candidate.requests() == []
    s = scrape(gw.url)
    assert value(s, "canarygate_requests_total", route="chat", arm="base", mode="mirror", outcome="ok") == 3
    assert (
        value(s, "canarygate_mirror_agreement_total", route="chat", check="finish_reason", result="agree")
        == 0
    )
    assert {r["kind"] for r in export(gw.url)} == {"noise"}


def test_records_in_a_redis_stream(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, redis_prefix: str
) -> None:
    base, candidate = sims
    url = os.environ.get("CANARYGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    extra = SHADOW_ALL + ", records: 50}"
    gw = make_gateway(
        {"chat": policy_yaml("chat", base.url, candidate.url, extra=extra)},
        admin_token=TOKEN,
        redis_url=url,
        redis_prefix=redis_prefix,
    )
    drive(gw.url, candidate)
    client = redis.Redis.from_url(url)
    wait_for(lambda: client.xlen(f"{redis_prefix}pairs:chat") == 3, message="records flushed to the stream")
    assert len(export(gw.url)) == 3
    assert len(export(gw.url, disagreements="true")) == 1
    # a second replica sharing Redis sees the same records
    other = make_gateway(
        {"chat": policy_yaml("chat", base.url, candidate.url, extra=extra)},
        admin_token=TOKEN,
        redis_url=url,
        redis_prefix=redis_prefix,
    )
    assert [r["pair_id"] for r in export(other.url)] == [r["pair_id"] for r in export(gw.url)]
    client.close()
