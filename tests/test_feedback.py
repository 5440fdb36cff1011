"""Feedback: POST /v1/feedback credited to the arm, route and cohort that answered the request."""

from __future__ import annotations

import time

import httpx
import pytest

from gateway.analysis import ArmWindow, judge
from gateway.policy import Gates, RateGate
from tests.conftest import GatewayFactory, Sim, policy_yaml
from tests.test_metrics import scrape, value


def ask(url: str, tenant: str = "acme", **headers: str) -> httpx.Response:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"x-tenant": tenant, **headers}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response


def cohort_policy(sims: tuple[Sim, Sim]) -> str:
    text = policy_yaml(
        "chat", sims[0].url, sims[1].url, weight=100, extra="assignment: {allow_override_header: true}"
    )
    return text + "cohorts: {source: header:x-tenant, values: [acme]}\n"


def test_feedback_is_credited_to_the_arm_and_cohort_that_answered_once_per_request(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": cohort_policy(sims)}, api_keys=frozenset({"sk-1"}))
    auth = {"Authorization": "Bearer sk-1"}
    by_candidate = ask(gw.url, **auth).headers["x-request-id"]
    by_base = ask(gw.url, "initech", **auth, **{"x-canary": "base"}).headers["x-request-id"]

    def feedback(**body: object) -> httpx.Response:
        return httpx.post(f"{gw.url}/v1/feedback", json=body, headers=auth, timeout=10)

    first = feedback(request_id=by_candidate, score="down", escalated=True, comment="wrong invoice total")
    assert first.status_code == 200, first.text
    assert first.json() == {
        "object": "feedback",
        "request_id": by_candidate,
        "route": "chat",
        "arm": "candidate",
        "cohort": "acme",
        "recorded": True,
    }
    assert feedback(request_id=by_candidate, score="down").json()["recorded"] is False  # idempotent
    assert feedback(request_id=by_base, score=0.9).json()["arm"] == "base"
    samples = scrape(gw.url)

    def count(arm: str, cohort: str, kind: str) -> float:
        return value(samples, "canarygate_feedback_total", route="chat", arm=arm, cohort=cohort, value=kind)

    assert count("candidate", "acme", "negative") == 1  # once, though sent twice
    assert count("candidate", "acme", "escalated") == 1
    assert count("base", "other", "positive") == 1
    assert count("base", "acme", "negative") == 0

    unknown = feedback(request_id="not-a-request-we-answered", score="up")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "request_not_found"
    assert "x-request-id" in unknown.json()["error"]["message"]
    assert feedback(request_id=by_base, score=1.5).status_code == 400
    assert feedback(request_id=by_base, score="meh").status_code == 400
    assert httpx.post(f"{gw.url}/v1/feedback", json={"request_id": by_base, "score": "up"}).status_code == 401


def test_feedback_on_an_expired_answer_is_refused(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": cohort_policy(sims)}, feedback_ttl_s=1.0)
    rid = ask(gw.url).headers["x-request-id"]
    time.sleep(2.5)  # flushed to the store, then expired there
    answer = httpx.post(f"{gw.url}/v1/feedback", json={"request_id": rid, "score": "up"})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "request_not_found"


def test_feedback_gates_compare_the_share_of_negative_feedback() -> None:
    gates = Gates(
        negative_feedback_rate=RateGate(max_increase=0.02), escalation_rate=RateGate(max_increase=0.01)
    )
    base = ArmWindow(requests=5000, feedback=2000, negative=100, escalated=10)  # 5% negative
    worse = ArmWindow(requests=5000, feedback=2000, negative=300, escalated=80)  # 15% negative
    verdicts = {v.gate: v for v in judge(gates, [(base, worse)], confidence=0.99, min_samples=500)}
    assert verdicts["negative_feedback_rate"].result == "fail"
    assert verdicts["negative_feedback_rate"].value == pytest.approx(0.1)
    assert verdicts["escalation_rate"].result == "fail"
    assert verdicts["escalation_rate"].n_candidate == 2000  # rates over feedback received, not requests


def test_feedback_through_redis_reaches_another_replica_once(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, redis_prefix: str
) -> None:
    from tests.conftest import REDIS_URL

    shared = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix}
    answering = make_gateway({"chat": cohort_policy(sims)}, **shared)
    other = make_gateway({"chat": cohort_policy(sims)}, **shared)
    rid = ask(answering.url).headers["x-request-id"]
    time.sleep(1.5)  # the answering replica writes its assignment records once a second

    def feedback(url: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/feedback", json={"request_id": rid, "score": "down"}, timeout=10)

    first = feedback(other.url)
    assert first.status_code == 200, first.text
    assert (first.json()["arm"], first.json()["cohort"], first.json()["recorded"]) == (
        "candidate",
        "acme",
        True,
    )
    assert feedback(answering.url).json()["recorded"] is False  # once across replicas


def test_in_memory_assignment_records_keep_the_newest_within_their_bound() -> None:
    import asyncio

    from gateway.store.records import MemoryRecordStore

    async def run() -> None:
        store = MemoryRecordStore(ttl_s=60, size=100)
        dropped = 0
        for i in range(1000):
            dropped += await store.remember({f"r{i}": f"chat\x1fbase\x1fall\x1f{i}"})
            assert len(store._records) <= 100
        assert dropped == 900
        assert await store.recall("r999") == "chat\x1fbase\x1fall\x1f999"
        assert await store.recall("r0") is None  # the oldest went first
        assert await store.first_feedback("r999") and not await store.first_feedback("r999")

    asyncio.run(run())
