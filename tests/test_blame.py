"""A failing candidate never reaches a user and is never promoted: blame by comparison (a failure the base
shares is the request's), the budget opening the circuit, malformed answers as validation failures, and
readiness that knows a misconfigured arm. Real loopback servers, the openai SDK where users have it."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.readiness import CACHE_S, Readiness
from gateway.rollout import Controller, Rollouts
from gateway.stats import Recorder
from gateway.store import Store
from gateway.synth import Knobs
from gateway.upstream import Upstream
from tests.conftest import (
    BASE_MODEL,
    CANDIDATE_MODEL,
    GatewayFactory,
    RawUpstream,
    Sim,
    policy_yaml,
    wait_for,
)
from tests.test_cli import canarygate
from tests.test_fallback import JSON_OBJECT, JSON_SCHEMA, MESSAGES, WITH_TOOLS
from tests.test_metrics import scrape, value
from tests.test_state import routes_of


def chat(url: str, user: str, **extra: Any) -> httpx.Response:
    body = {"model": "chat", "user": user, "messages": MESSAGES, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def streamed_content(response: httpx.Response) -> tuple[str, list[dict[str, Any]]]:
    """The content a streamed answer assembles to, and its events (an error event included)."""
    events = [
        json.loads(line[6:])
        for line in response.text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    content = "".join(
        (choice.get("delta") or {}).get("content") or ""
        for event in events
        for choice in (event.get("choices") if isinstance(event.get("choices"), list) else [])
    )
    return content, events


@pytest.mark.parametrize("misconfiguration", ["model", "key"])
def test_a_misconfigured_candidate_falls_back_is_blamed_and_readiness_says_why(
    sims: tuple[Sim, Sim],
    make_gateway: GatewayFactory,
    monkeypatch: pytest.MonkeyPatch,
    misconfiguration: str,
) -> None:
    base, candidate = sims
    base.simulator.served_models = [BASE_MODEL]
    candidate_extra = ""
    if misconfiguration == "model":
        candidate.simulator.served_models = ["tuned-model-v2"]  # the policy names one it does not serve
    else:
        candidate.simulator.api_key = "the-right-key"
        monkeypatch.setenv("CANDIDATE_KEY", "a-stale-key")
        candidate_extra = "api_key_env: CANDIDATE_KEY"
    gw = make_gateway(
        {"chat": policy_yaml("chat", base.url, candidate.url, weight=100, candidate_extra=candidate_extra)},
        admin_token="t",
    )
    client = gw.client()
    for i in range(30):  # the SDK never sees the candidate's 404 or 401
        if i % 2:
            completion = client.chat.completions.create(model="chat", messages=MESSAGES, user=f"u{i}")  # type: ignore[arg-type]
            assert completion.model == BASE_MODEL
        else:
            stream = client.chat.completions.create(
                model="chat",
                messages=MESSAGES,
                user=f"u{i}",
                stream=True,  # type: ignore[arg-type]
            )
            assert {chunk.model for chunk in stream} == {BASE_MODEL}
    response = chat(gw.url, "u-last")
    assert response.status_code == 200
    assert response.headers["x-canarygate-fallback"] in ("http_4xx", "circuit_open")

    samples = scrape(gw.url)
    refused = value(
        samples, "canarygate_requests_total", route="chat", arm="candidate", mode="primary", outcome="refused"
    )
    assert refused >= 5  # the candidate's own failure, counted with the errors, until its circuit opened
    assert (
        value(
            samples,
            "canarygate_requests_total",
            route="chat",
            arm="candidate",
            mode="primary",
            outcome="rejected",
        )
        == 0
    )
    assert value(samples, "canarygate_fallbacks_total", route="chat", reason="http_4xx") == refused
    assert value(samples, "canarygate_fallbacks_total", route="chat", reason="circuit_open") > 0
    assert value(samples, "canarygate_circuit_open", route="chat") == 1

    ready = httpx.get(f"{gw.url}/readyz", headers={"Authorization": "Bearer t"}).json()
    assert ready["status"] == "degraded"
    arms = ready["routes"]["chat"]
    assert arms["base"]["ok"] and arms["base"]["status"] == "ok"
    assert arms["candidate"]["ok"] is False
    if misconfiguration == "model":
        assert arms["candidate"]["status"] == "model_not_listed"
        assert (
            "tuned-model-v2" in arms["candidate"]["detail"]
            and "arms.candidate.model" in arms["candidate"]["detail"]
        )
    else:
        assert arms["candidate"]["status"] == "unauthorized"
        assert "a-stale-key" not in json.dumps(ready)  # never a secret in what the gateway tells
        assert "arms.candidate.api_key_env" in arms["candidate"]["detail"]


@pytest.mark.parametrize("status", [400, 500])
def test_a_request_both_arms_refuse_is_the_requests_fault_not_the_candidates(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, status: int
) -> None:
    base, candidate = sims
    for sim in sims:
        sim.set_knobs(error_rate=1, error_status=status)
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, weight=100)})
    for i in range(40):  # twice the breaker's min_requests
        response = chat(gw.url, f"u{i}", **JSON_SCHEMA)
        assert response.status_code == status  # the base's answer: the request fails everywhere
        assert response.headers["x-canarygate-arm"] == "base"
        assert response.headers["x-canarygate-fallback"] == ("http_4xx" if status < 500 else "http_5xx")
    samples = scrape(gw.url)
    assert value(samples, "canarygate_circuit_open", route="chat") == 0  # never blamed on the candidate
    outcome = "rejected" if status < 500 else "upstream_error"  # as the base's own counts: they cancel out
    assert value(samples, "canarygate_requests_total", route="chat", arm="candidate", outcome=outcome) == 40
    assert value(samples, "canarygate_fallbacks_total", route="chat", reason="circuit_open") == 0
    assert base.stats()["requests"][f"chat:{BASE_MODEL}"] == 40  # asked once per request


def test_a_spent_budget_opens_the_circuit_and_no_user_sees_a_candidate_failure(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    candidate.set_knobs(invalid_json_rate=1)  # every answer the candidate gives is broken
    policies = {
        f"w{weight}": policy_yaml(f"w{weight}", base.url, candidate.url, weight=weight)
        for weight in (10, 50, 100)
    }
    gw = make_gateway(policies, admin_token="admin")  # default fallback: budget 20% over 10 s, at least 5
    for route in policies:
        for i in range(60):
            body = {
                "model": route,
                "user": f"u{i}",
                "messages": MESSAGES,
                "stream": bool(i % 2),
                **JSON_OBJECT,
            }
            response = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30)
            assert response.status_code == 200, response.text
            assert response.headers["x-canarygate-arm"] == "base"
            content = (
                streamed_content(response)[0]
                if i % 2
                else response.json()["choices"][0]["message"]["content"]
            )
            assert isinstance(json.loads(content), dict)  # a valid answer, every time
    samples = scrape(gw.url)
    assert value(samples, "canarygate_circuit_open", route="w100") == 1
    assert value(samples, "canarygate_fallbacks_total", route="w100", reason="circuit_open") > 0

    def window() -> dict[str, Any]:
        admin = {"Authorization": "Bearer admin"}
        analysis = httpx.get(f"{gw.url}/admin/routes/w100/analysis", headers=admin, timeout=10)
        return analysis.json()["window"]  # type: ignore[no-any-return]

    wait_for(lambda: window()["candidate"]["requests"] == 60, message="the statistics to be flushed")
    assert window()["base"]["requests"] == 0  # the candidate's users answered by the base are not base data


MALFORMED_REQUESTS = [
    pytest.param({}, False, id="plain-json"),  # no rules: the answer's shape is still checked
    pytest.param(WITH_TOOLS, False, id="tools-json"),  # a tool name as a list
    pytest.param(JSON_OBJECT, True, id="json-held-stream"),  # choices: 5, delta.tool_calls: 5 in a stream
]


@pytest.mark.parametrize(("extra", "stream"), MALFORMED_REQUESTS)
def test_malformed_candidate_output_falls_back_and_is_counted_never_a_500(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, extra: dict[str, Any], stream: bool
) -> None:
    base, candidate = sims
    candidate.set_knobs(malformed_rate=1)
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, weight=100)})
    reasons = []
    for i in range(12):
        response = chat(gw.url, f"u{i}", stream=stream, **extra)
        assert response.status_code == 200, response.text
        assert response.headers["x-canarygate-arm"] == "base"
        reasons.append(response.headers["x-canarygate-fallback"])
    # each one falls back, until the spent budget opens the candidate's circuit
    assert reasons[0] == "malformed" and set(reasons) <= {"malformed", "circuit_open"}
    failed = reasons.count("malformed")
    samples = scrape(gw.url)
    labels = {"route": "chat", "arm": "candidate"}
    assert value(samples, "canarygate_validation_failures_total", **labels, kind="malformed") == failed
    assert value(samples, "canarygate_requests_total", **labels, outcome="invalid_output") == failed
    assert value(samples, "canarygate_requests_total", route="chat", outcome="internal_error") == 0


def test_a_malformed_relayed_stream_is_counted_and_recorded_against_the_candidate(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    """A passthrough stream cannot be taken back: it reaches the client as sent, and the candidate is
    charged with it (validation, breaker), never a 500 or a disconnect."""
    base, candidate = sims
    candidate.set_knobs(malformed_rate=1)
    policy = policy_yaml(
        "chat", base.url, candidate.url, weight=100, extra="validation: {stream: passthrough}"
    )
    gw = make_gateway({"chat": policy})
    for i in range(25):
        response = chat(gw.url, f"u{i}", stream=True, **JSON_OBJECT)
        assert response.status_code == 200
        if response.headers["x-canarygate-arm"] == "candidate":
            assert streamed_content(response)[1]  # relayed as it came
    samples = scrape(gw.url)
    assert (
        value(
            samples, "canarygate_validation_failures_total", route="chat", arm="candidate", kind="malformed"
        )
        >= 20
    )
    assert value(samples, "canarygate_circuit_open", route="chat") == 1  # recorded as failures
    assert value(samples, "canarygate_requests_total", route="chat", outcome="internal_error") == 0


SHADOW_FIRST = """
rollout:
  shadow_first: true
  steps: [50, 100]
  interval_s: 1
  min_samples: 10
  gates:
    error_rate: {max_increase: 0.05, critical: true}
mirror: {percent: 100, sample_by: request}
"""


def test_readiness_is_cached_and_the_controller_holds_in_shadow_until_the_candidate_is_ready(
    sims: tuple[Sim, Sim], tmp_path: Path
) -> None:
    base, candidate = sims
    base.simulator.served_models = [BASE_MODEL]
    candidate.simulator.served_models = ["tuned-model-v2"]  # the policy's model is not (yet) served
    text = policy_yaml("chat", base.url, candidate.url).replace("rollout:\n  weight: 0\n", "") + SHADOW_FIRST
    (route,) = routes_of(tmp_path, text)

    async def run() -> None:
        store = Store.memory()
        await store.start([route])
        state = store.rollouts
        upstream = Upstream()
        now = [time.time()]
        readiness = Readiness(upstream, timeout_s=5, clock=lambda: now[0])
        controller = Controller(
            store.lease,
            store.stats,
            Rollouts(state, lambda _: route),
            lambda: [route],
            ready=readiness.check,
            clock=lambda: now[0],
        )
        recorder = Recorder(store.stats, state)
        for _ in range(40):  # healthy shadow traffic, as the ledger books it
            recorder.record(route, "base", "ok", 0.05, False, 10, None)
            recorder.record(route, "shadow", "ok", 0.05, False, 10, None)
        await recorder.flush()
        try:
            for _ in range(3):  # three interval ends: the gates pass, the candidate is not ready
                now[0] += 1.5
                await controller.consider(route)
            current = state.current("chat")
            assert current is not None and current.phase == "shadow"
            holds = [t.reason for t in current.history if t.reason.startswith("held in shadow")]
            assert holds == [  # said once, with what to fix
                "held in shadow: the candidate is not ready (model_not_listed): the candidate upstream "
                "does not serve the model 'tuned-model' (arms.candidate.model); it lists: tuned-model-v2"
            ]
            models_asked = candidate.stats()["requests"]["models"]
            assert models_asked == 1  # three checks within CACHE_S: one probe
            candidate.simulator.served_models = [CANDIDATE_MODEL]  # fixed on the server
            now[0] += CACHE_S
            await controller.consider(route)
            current = state.current("chat")
            assert current is not None and (current.phase, current.weight) == ("progressing", 50)
            assert current.history[-1].gates is not None  # the verdicts it advanced on
        finally:
            await upstream.close()

    asyncio.run(run())


def test_readyz_never_fans_out_to_the_upstreams_per_call(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url)}, admin_token="t")
    for _ in range(20):
        assert httpx.get(f"{gw.url}/readyz", headers={"Authorization": "Bearer t"}).status_code == 200
    assert base.stats()["requests"]["models"] == 1 and candidate.stats()["requests"]["models"] == 1


# Every kind of candidate failure, each on a route of its own: (candidate knobs, request fields, the gate
# that must see it). connect_error comes from a raw socket that closes without answering.
FAILURE_KINDS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "connect_error": ({}, {}, "error_rate"),
    "timeout": ({"hang_rate": 1}, {}, "error_rate"),
    "http_5xx": ({"error_rate": 1, "error_status": 503}, {}, "error_rate"),
    "http_429": ({"error_rate": 1, "error_status": 429}, {}, "error_rate"),
    "http_4xx": ({"error_rate": 1, "error_status": 404}, {}, "error_rate"),
    "malformed": ({"malformed_rate": 1}, {}, "validation_failure_rate"),
    "json_parse": ({"invalid_json_rate": 1}, JSON_OBJECT, "validation_failure_rate"),
    "json_schema": ({"schema_mismatch_rate": 1}, JSON_SCHEMA, "validation_failure_rate"),
    "tool_unknown": ({"wrong_tool_rate": 1}, WITH_TOOLS, "validation_failure_rate"),
    "tool_args_parse": ({"bad_args_rate": 1}, WITH_TOOLS, "validation_failure_rate"),
    "tool_args_schema": ({"args_mismatch_rate": 1}, WITH_TOOLS, "validation_failure_rate"),
    "tool_choice": (
        {"ignore_tool_choice_rate": 1},
        {**WITH_TOOLS, "tool_choice": "required"},
        "validation_failure_rate",
    ),
}
EVERY_KIND_ROLLOUT = """
rollout:
  {shadow}steps: [50, 100]
  interval_s: 1
  min_samples: 10
  gates:
    error_rate: {{max_increase: 0.05, critical: true}}
    validation_failure_rate: {{max_increase: 0.05, critical: true}}
fallback: {{budget: {{ratio: 1, min_per_window: 1000}}}}
mirror: {{percent: {mirror}, sample_by: request}}
"""


@pytest.mark.parametrize("phase", ["progressing", "shadow"])
def test_every_candidate_failure_kind_is_seen_by_the_gates_and_rolled_back(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, phase: str
) -> None:
    base, candidate = sims
    raw = RawUpstream({"close": lambda conn: None})  # reads the request, closes without a word
    policies = {}
    for kind, (knobs, _, _) in FAILURE_KINDS.items():
        model = f"cand-{kind}"
        candidate.simulator.models[model] = Knobs(**knobs)
        url = f"{raw.url}/close/v1" if kind == "connect_error" else candidate.url
        extra = "timeouts: {connect_s: 0.5, total_s: 0.5, first_token_s: 0.5}" if kind == "timeout" else ""
        text = policy_yaml(f"k-{kind}", base.url, url, candidate_extra=extra)
        text = text.replace(f"model: {CANDIDATE_MODEL}", f"model: {model}").replace(
            "rollout:\n  weight: 0\n", ""
        )
        shadow = "shadow_first: true\n  " if phase == "shadow" else ""
        policies[kind] = text + EVERY_KIND_ROLLOUT.format(
            shadow=shadow, mirror=100 if phase == "shadow" else 0
        )
    gw = make_gateway(policies, admin_token="admin-secret")
    admin = {"Authorization": "Bearer admin-secret"}

    def phases() -> dict[str, str]:
        return {
            r["route"]: r["phase"]
            for r in httpx.get(f"{gw.url}/admin/routes", headers=admin).json()["routes"]
        }

    errors: list[str] = []
    stop = threading.Event()

    def user(offset: int) -> None:
        i = offset
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                for kind, (_, fields, _) in FAILURE_KINDS.items():
                    body = {"model": f"k-{kind}", "user": f"u{i}", "messages": MESSAGES, **fields}
                    response = client.post(f"{gw.url}/v1/chat/completions", json=body)
                    if response.status_code != 200:
                        errors.append(f"{kind}: {response.status_code} {response.text[:200]}")
                i += 4

    threads = [threading.Thread(target=user, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(
            lambda: set(phases().values()) == {"rolled_back"},
            timeout=90,
            message=f"every route rolled back ({phases()})",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        raw.close()
    assert errors == []  # no user saw any of it
    for kind, (_, _, gate) in FAILURE_KINDS.items():
        history = httpx.get(f"{gw.url}/admin/routes/k-{kind}", headers=admin).json()["history"]
        assert history[0]["by"] == "controller" and history[0]["reason"].startswith(f"gate failed: {gate}"), (
            kind
        )
        if phase == "shadow":
            assert [t["phase"] for t in history] == ["rolled_back", "shadow"], kind  # no user ever served
        analysis = httpx.get(f"{gw.url}/admin/routes/k-{kind}/analysis", headers=admin).json()
        assert analysis["candidate_measured_as"] == ("shadow" if phase == "shadow" else "candidate")
        verdicts = {v["gate"]: v["result"] for v in analysis["gates"]}
        assert verdicts[gate] == "fail", (kind, analysis)  # the verdict it was rolled back on
        assert analysis["decided"]["by"] == "controller"
        assert analysis["window"]["candidate"]["requests"] > 0  # the data it was decided on
        if phase == "shadow" and kind == "http_4xx":
            compare = canarygate(
                "compare",
                f"k-{kind}",
                env={"CANARYGATE_ADMIN_TOKEN": "admin-secret", "CANARYGATE_URL": gw.url},
            )
            assert compare.returncode == 0, compare.stderr
            assert "candidate measured as shadow (its shadow calls)" in compare.stdout
            assert "rolled_back by controller" in compare.stdout
            assert re.search(r"^error_rate \* +fail", compare.stdout, re.MULTILINE), compare.stdout


def test_compare_judges_a_manual_rollout_without_acting_on_it(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    candidate.set_knobs(error_rate=1, error_status=404)  # a candidate-only 4xx: the candidate's fault
    gw = make_gateway(
        {"chat": policy_yaml("chat", base.url, candidate.url, weight=50)}, admin_token="admin-secret"
    )
    for i in range(40):
        assert chat(gw.url, f"u{i}").status_code == 200
    admin = {"Authorization": "Bearer admin-secret"}

    def analysis() -> dict[str, Any]:
        return httpx.get(f"{gw.url}/admin/routes/chat/analysis", headers=admin).json()  # type: ignore[no-any-return]

    wait_for(lambda: analysis()["window"]["candidate"]["attempts"] > 0, message="the statistics flush")
    window = analysis()["window"]["candidate"]
    assert window["error_rate"] == 1.0  # refused: counted with the errors
    env = {"CANARYGATE_ADMIN_TOKEN": "admin-secret", "CANARYGATE_URL": gw.url}
    compare = canarygate("compare", "chat", env=env)
    assert compare.returncode == 0, compare.stderr
    assert "manual mode: the gates as the controller would judge them" in compare.stdout
    assert "error_rate *" in compare.stdout
    assert "per interval, newest last:" in compare.stdout
    (errors,) = [g for g in analysis()["gates"] if g["gate"] == "error_rate"]
    assert errors["intervals"] and {row["value"] for row in errors["intervals"]} == {1.0}  # every interval
    assert sum(row["n_candidate"] for row in errors["intervals"]) == errors["n_candidate"]
    assert (
        httpx.get(f"{gw.url}/admin/routes/chat", headers=admin).json()["phase"] == "manual"
    )  # nothing acted


@pytest.mark.parametrize("base_refuses_too", [False, True])
def test_a_shadow_call_is_blamed_only_when_the_primary_did_not_fail_the_same_way(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, base_refuses_too: bool
) -> None:
    base, candidate = sims
    candidate.set_knobs(error_rate=1, error_status=404)
    if base_refuses_too:
        base.set_knobs(error_rate=1, error_status=404)
    mirror = "mirror: {percent: 100, sample_by: request}"
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, weight=0, extra=mirror)})
    for i in range(10):
        assert chat(gw.url, f"u{i}").status_code == (404 if base_refuses_too else 200)
    labels = {"route": "chat", "arm": "candidate", "mode": "mirror"}
    wait_for(
        lambda: (
            sum(
                value(scrape(gw.url), "canarygate_requests_total", **labels, outcome=o)
                for o in ("refused", "rejected")
            )
            == 10
        ),
        message="every shadow call booked",
    )
    samples = scrape(gw.url)
    assert value(samples, "canarygate_requests_total", **labels, outcome="refused") == (
        0 if base_refuses_too else 10
    )
    assert value(samples, "canarygate_requests_total", **labels, outcome="rejected") == (
        10 if base_refuses_too else 0
    )
