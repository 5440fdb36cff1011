"""Rollout state: in memory, and shared through a real Redis (the machine's server, this test's own key
prefix; for outages, a redis-server each test starts itself on a free port and stops)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway.loader import load_dir
from gateway.route import Route
from gateway.store.rollouts import HISTORY, MemoryRolloutStore, RedisRolloutStore, VersionConflict, change
from gateway.store.shared import Shared
from gateway.tasks import Spawner
from tests.conftest import REDIS_URL, GatewayFactory, RedisServer, Sim, policy_yaml, up, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}


def routes_of(tmp_path: Path, text: str, name: str = "chat") -> list[Route]:
    directory = tmp_path / f"policies-{time.monotonic_ns()}"
    directory.mkdir()
    (directory / f"{name}.yaml").write_text(text)
    routes, problems = load_dir(directory)
    assert not [p for p in problems if p.severity == "error"]
    return list(routes.values())


def canary_text(weight: float = 10, model: str = "tuned-model") -> str:
    return policy_yaml("chat", "http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1", weight=weight).replace(
        "model: tuned-model", f"model: {model}"
    )


def test_memory_state_starts_from_the_policy_and_keeps_a_bounded_history(tmp_path: Path) -> None:
    async def run() -> None:
        state = MemoryRolloutStore()
        await state.start(routes_of(tmp_path, canary_text(weight=10)))
        first = state.current("chat")
        assert first is not None
        assert (first.phase, first.weight, first.version) == ("manual", 10, 1)
        for weight in range(60):
            await change(state, "chat", "test", f"to {weight}", weight=float(weight))
        last = state.current("chat")
        assert last is not None and last.weight == 59 and last.version == 61
        assert len(last.history) == HISTORY and last.history[-1].reason == "to 59"
        with pytest.raises(VersionConflict):
            await state.write(last.moved(reason="stale", by="test", weight=1.0), expect_version=3)
        # The same rollout reloaded keeps its state; a new candidate starts again from its policy.
        await state.adopt(routes_of(tmp_path, canary_text(weight=10)))
        assert state.current("chat") == last
        await state.adopt(routes_of(tmp_path, canary_text(weight=10, model="tuned-2")))
        fresh = state.current("chat")
        assert fresh is not None and fresh.weight == 10 and fresh.version == 1

    asyncio.run(run())


def test_redis_state_is_shared_compare_and_set_and_survives_an_emptied_store(
    tmp_path: Path, redis_prefix: str
) -> None:
    async def run() -> None:
        routes = routes_of(tmp_path, canary_text(weight=10))
        spawner = Spawner()
        shared = Shared(REDIS_URL, redis_prefix)
        a = RedisRolloutStore(shared, spawner)
        b = RedisRolloutStore(Shared(REDIS_URL, redis_prefix), spawner, poll_s=30)  # only pub/sub tells b
        await a.start(routes)
        await b.start(routes)
        await asyncio.sleep(0.2)  # subscriptions in place
        assert a.current("chat") == b.current("chat")
        started = time.monotonic()
        await change(a, "chat", "test", "up", weight=40.0)
        while getattr(b.current("chat"), "weight", None) != 40 and time.monotonic() - started < 1:
            await asyncio.sleep(0.01)
        seen = b.current("chat")
        assert seen is not None and seen.weight == 40, "b saw the change within 1 s"
        # b writes on top of what a wrote; a stale write of a's is refused.
        stale = a.current("chat")
        assert stale is not None
        await change(b, "chat", "test", "more", weight=50.0)
        with pytest.raises(VersionConflict):
            await a.write(stale.moved(reason="stale", by="test", weight=5.0), stale.version)
        # A restart of the process: a new instance reads where the rollout is.
        c = RedisRolloutStore(Shared(REDIS_URL, redis_prefix), spawner)
        await c.start(routes)
        resumed = c.current("chat")
        assert resumed is not None and resumed.weight == 50
        # Redis restarted empty (no persistence): a replica that knows the rollout writes it back.
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        await client.delete(f"{redis_prefix}rollout:chat")
        await client.aclose()
        await c.refresh()
        reseeded = c.current("chat")
        assert reseeded is not None and reseeded.weight == 50 and reseeded.version > resumed.version
        await change(a, "chat", "test", "after the restart", weight=60.0)
        await spawner.close()
        for state in (a, b, c):
            await state._shared.close()

    asyncio.run(run())


def admin_post(url: str, route: str, action: str, **body: object) -> httpx.Response:
    return httpx.post(f"{url}/admin/routes/{route}/{action}", json=body or None, headers=ADMIN, timeout=10)


def arm_of(url: str) -> str:
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=10)
    assert response.status_code == 200, response.text
    return response.headers["x-canarygate-arm"]


def test_two_gateway_processes_share_a_weight_change_within_a_second_and_a_restart_resumes(
    sims: tuple[Sim, Sim],
    serve,
    tmp_path: Path,
    redis_prefix: str,  # type: ignore[no-untyped-def]
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "chat.yaml").write_text(policy_yaml("chat", sims[0].url, sims[1].url, weight=0))
    env = {
        "CANARYGATE_REDIS_URL": REDIS_URL,
        "CANARYGATE_REDIS_PREFIX": redis_prefix,
        "CANARYGATE_ADMIN_TOKEN": "admin-secret",
        "CANARYGATE_WATCH_POLICIES": "false",
    }
    first, url_a = serve(policies, env=env)
    _, url_b = serve(policies, env=env)
    assert arm_of(url_b) == "base"
    changed = admin_post(url_a, "chat", "weight", weight=100, reason="all in")
    assert changed.status_code == 200, changed.text
    started = time.monotonic()
    wait_for(lambda: arm_of(url_b) == "candidate", timeout=1.0, message="the other replica to follow")
    assert time.monotonic() - started < 1.0
    detail = httpx.get(f"{url_b}/admin/routes/chat", headers=ADMIN).json()
    assert detail["weight"] == 100 and detail["history"][0]["reason"] == "all in"
    assert detail["history"][0]["by"] == "admin"

    first.terminate()
    first.wait(20)
    _, url_c = serve(policies, env=env)  # a restarted replica resumes where the rollout is
    assert httpx.get(f"{url_c}/admin/routes/chat", headers=ADMIN).json()["weight"] == 100
    assert arm_of(url_c) == "candidate"


def test_redis_down_keeps_serving_the_last_state_and_recovers(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, own_redis: RedisServer
) -> None:
    gw = make_gateway(
        {"chat": policy_yaml("chat", sims[0].url, sims[1].url, weight=0)},
        redis_url=own_redis.url,
        admin_token="admin-secret",
    )
    assert admin_post(gw.url, "chat", "weight", weight=100).status_code == 200
    assert arm_of(gw.url) == "candidate"

    own_redis.stop()
    for _ in range(20):
        assert arm_of(gw.url) == "candidate"  # fail static: the last state seen keeps serving
    refused = admin_post(gw.url, "chat", "weight", weight=0)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "state_unavailable"
    ready = httpx.get(f"{gw.url}/readyz", headers=ADMIN, timeout=10)
    assert ready.status_code == 200 and ready.json()["state"]["ok"] is False
    assert "canarygate_state_sync_errors_total" in httpx.get(f"{gw.url}/metrics").text
    pairs = httpx.get(f"{gw.url}/admin/pairs", params={"route": "chat"}, headers=ADMIN, timeout=10)
    assert pairs.status_code == 503 and pairs.json()["error"]["code"] == "state_unavailable"

    own_redis.start()  # empty: it kept nothing on disk
    wait_for(
        lambda: httpx.get(f"{gw.url}/readyz", headers=ADMIN, timeout=10).json()["state"]["ok"],
        message="resync",
    )
    assert arm_of(gw.url) == "candidate"  # the replica wrote its state back; the rollout did not reset
    assert admin_post(gw.url, "chat", "rollback").status_code == 200
    assert arm_of(gw.url) == "base"


def test_admin_operations_check_the_phase_and_say_what_to_fix(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway(
        {
            "chat": policy_yaml("chat", sims[0].url, sims[1].url, weight=10),
            "solo": policy_yaml("solo", sims[0].url),
        },
        admin_token="admin-secret",
    )
    assert httpx.get(f"{gw.url}/admin/routes").status_code == 401
    listed = httpx.get(f"{gw.url}/admin/routes", headers=ADMIN).json()
    assert {r["route"]: (r["phase"], r["weight"]) for r in listed["routes"]} == {
        "chat": ("manual", 10),
        "solo": ("manual", 0),
    }
    assert admin_post(gw.url, "chat", "resume").json()["error"]["code"] == "conflict"
    paused = admin_post(gw.url, "chat", "pause", reason="looking at a dashboard").json()
    assert (paused["phase"], paused["resume_to"]) == ("paused", "manual")
    assert admin_post(gw.url, "chat", "resume").json()["phase"] == "manual"
    promoted = admin_post(gw.url, "chat", "promote").json()
    assert (promoted["phase"], promoted["weight"]) == ("promoted", 100)
    rolled = admin_post(gw.url, "chat", "rollback").json()
    assert (rolled["phase"], rolled["weight"], rolled["mirror"]) == ("rolled_back", 0, False)
    assert admin_post(gw.url, "chat", "pause").status_code == 409
    bad = admin_post(gw.url, "chat", "weight", weight=150)
    assert bad.status_code == 400 and "[0, 100]" in bad.json()["error"]["message"]
    assert admin_post(gw.url, "chat", "weight").status_code == 400
    assert admin_post(gw.url, "solo", "promote").status_code == 409
    assert admin_post(gw.url, "nope", "promote").status_code == 404
    assert admin_post(gw.url, "chat", "explode").status_code == 404
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'canarygate_rollout_phase{phase="rolled_back",route="chat"} 1.0' in metrics
    assert 'canarygate_rollout_transitions_total{phase="promoted",route="chat"} 1.0' in metrics


def test_cli_verbs_drive_the_admin_api(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    gw = make_gateway(
        {"chat": policy_yaml("chat", sims[0].url, sims[1].url, weight=10)}, admin_token="admin-secret"
    )
    env = {"CANARYGATE_ADMIN_TOKEN": "admin-secret", "CANARYGATE_URL": gw.url, "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args], env=env, capture_output=True, text=True, timeout=30
        )

    moved = cli("set-weight", "chat", "35", "--reason", "step two")
    assert moved.returncode == 0, moved.stderr
    assert "manual" in moved.stdout and "35%" in moved.stdout
    status = cli("status", "chat")
    assert "step two" in status.stdout and "by admin:cli:" in status.stdout
    assert json.loads(cli("status", "--json").stdout)["routes"][0]["weight"] == 35
    refused = cli("resume", "chat")
    assert refused.returncode == 2 and "409" in refused.stderr and "not paused" in refused.stderr
    assert cli("rollback", "chat").returncode == 0
    assert arm_of(gw.url) == "base"
    for base_url in (f"{gw.url}/v1", f"{gw.url}/v1/", f" {gw.url}/ "):  # users copy their clients' base_url
        env["CANARYGATE_URL"] = base_url
        shown = cli("status", "chat")
        assert shown.returncode == 0 and "rolled_back" in shown.stdout, shown.stderr
    env["CANARYGATE_URL"] = "gateway:8080"
    wrong = cli("status")
    assert (
        wrong.returncode == 2 and "'gateway:8080' is not a gateway URL: give one like http://" in wrong.stderr
    )
    env["CANARYGATE_URL"] = gw.url
    env.pop("CANARYGATE_ADMIN_TOKEN")
    assert "CANARYGATE_ADMIN_TOKEN" in cli("status").stderr
    assert up(f"{gw.url}/healthz")


def drive(
    url: str,
    stop: threading.Event,
    json_mode: bool = False,
    extra: Callable[[int], dict[str, object]] | None = None,
) -> None:
    """Traffic from many users until stop is set (4 threads); extra(i) adds fields to request i."""

    def worker(offset: int) -> None:
        i = offset
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                body: dict[str, object] = {
                    "model": "chat",
                    "user": f"user-{i}",
                    "messages": [{"role": "user", "content": "hi"}],
                }
                if json_mode:
                    body["response_format"] = {"type": "json_object"}
                if extra is not None:
                    body.update(extra(i))
                client.post(f"{url}/v1/chat/completions", json=body)
                i += 4

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(4)]
    for thread in threads:
        thread.start()


def drive_until(
    url: str,
    phase: str,
    timeout: float,
    json_mode: bool = False,
    extra: Callable[[int], dict[str, object]] | None = None,
) -> None:
    """Traffic until the route `chat` reaches the phase (or the timeout fails the test)."""
    stop = threading.Event()
    drive(url, stop, json_mode, extra)
    try:
        wait_for(lambda: phase_of(url)[0] == phase, timeout=timeout, message=f"phase {phase}")
    finally:
        stop.set()


AUTOMATIC = """
rollout:
  steps: [20, 50, 100]
  interval_s: 1
  min_samples: {min_samples}
  gates:
    error_rate: {{max_increase: 0.02, critical: true}}
    validation_failure_rate: {{max_increase: 0.01, critical: true}}
    latency_p99_ratio: {{max: 5}}
"""


def automatic_policy(sims: tuple[Sim, Sim], min_samples: int) -> str:
    text = policy_yaml("chat", sims[0].url, sims[1].url)
    return text.replace("rollout:\n  weight: 0\n", "") + AUTOMATIC.format(min_samples=min_samples)


def test_the_controller_promotes_a_healthy_candidate_through_every_step(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": automatic_policy(sims, 30)}, admin_token="admin-secret")
    drive_until(gw.url, "promoted", timeout=40)
    history = httpx.get(f"{gw.url}/admin/routes/chat", headers=ADMIN).json()["history"]
    walked = [(t["phase"], t["weight"], t["by"]) for t in reversed(history)]
    assert walked == [
        ("progressing", 20, "policy"),
        ("progressing", 50, "controller"),
        ("promoted", 100, "controller"),  # a step at 100% is the promotion: no base left to compare with
    ]
    time.sleep(1.5)  # what was counted before the promotion is flushed
    analysis = httpx.get(f"{gw.url}/admin/routes/chat/analysis", headers=ADMIN)
    assert analysis.status_code == 200
    counted = analysis.json()["window"]["candidate"]["requests"]
    for _ in range(20):
        assert arm_of(gw.url) == "candidate"
    time.sleep(1.5)  # past a statistics flush
    after = httpx.get(f"{gw.url}/admin/routes/chat/analysis", headers=ADMIN).json()
    assert after["window"]["candidate"]["requests"] == counted  # promoted: nothing left to judge
    gates = {g["gate"]: g for g in analysis.json()["gates"]}
    assert {name: g["result"] for name, g in gates.items() if not name.startswith("sample_ratio")} == {
        "error_rate": "pass",
        "validation_failure_rate": "pass",
        "latency_p99_ratio": "pass",
    }
    # The sample-ratio checks of the last step, as the controller decided on them: never a mismatch (it
    # would have held), and "wait" when the step was too short for min_samples (it advanced after one
    # interval). Each request counted with its chance of the candidate, and each user (its "user" field)
    # noted once for the step, by the proxy: the candidate's, at least, that the step was passed on.
    for name in ("sample_ratio", "sample_ratio_units"):
        check = gates[name]
        assert check["result"] in ("pass", "wait") and check["n_candidate"] > 0, check
        assert check["value"] is None or abs(check["value"]) < 0.2, check
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'canarygate_gate_threshold{gate="latency_p99_ratio",route="chat"} 5.0' in metrics
    compare = subprocess.run(
        [sys.executable, "-m", "gateway", "compare", "chat"],
        env={"CANARYGATE_ADMIN_TOKEN": "admin-secret", "CANARYGATE_URL": gw.url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert compare.returncode == 0, compare.stderr
    assert "validation_failure_rate *" in compare.stdout and "pass" in compare.stdout
    assert "rollout so far:" in compare.stdout
    assert "sample ratio of requests: ok: candidate" in compare.stdout, compare.stdout


def test_the_controller_rolls_back_a_candidate_failing_json_before_the_second_step(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, redis_prefix: str
) -> None:
    sims[1].set_knobs(invalid_json_rate=0.05)
    gw = make_gateway(
        {"chat": automatic_policy(sims, 200)},
        admin_token="admin-secret",
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
    )
    drive_until(gw.url, "rolled_back", timeout=60, json_mode=True)
    detail = httpx.get(f"{gw.url}/admin/routes/chat", headers=ADMIN).json()
    weights = [t["weight"] for t in detail["history"] if t["phase"] == "progressing"]
    assert weights == [20]  # never reached the second step
    last = detail["history"][0]
    assert last["by"] == "controller" and last["reason"].startswith("gate failed: validation_failure_rate")
    assert detail["weight"] == 0 and detail["mirror"] is False
    assert arm_of(gw.url) == "base"


def test_clients_that_leave_the_candidate_before_its_answer_hold_the_rollout_on_a_sample_ratio_mismatch(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    """The candidate answers after 3 s; the clients (the openai SDK) give up after 0.5 s. A request whose
    client left says nothing about the arm and is not counted, so only base answers are: the gates never
    see a failure, but the candidate's share of the counted requests is 0% against the step's 20%. The
    rollout holds at its first step, says why, and the metric says so."""
    import openai

    from gateway.rollout import MISMATCH

    sims[1].set_knobs(latency_s=3.0)
    gw = make_gateway({"chat": automatic_policy(sims, 20)}, admin_token="admin-secret")
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", timeout=0.5, max_retries=0)
    stop = threading.Event()
    gave_up = [0]

    def user(offset: int) -> None:
        i = offset
        while not stop.is_set():
            try:
                client.chat.completions.create(
                    model="chat", user=f"user-{i}", messages=[{"role": "user", "content": "hi"}]
                )
            except openai.APITimeoutError:
                gave_up[0] += 1
            i += 4

    threads = [threading.Thread(target=user, args=(k,), daemon=True) for k in range(4)]
    for thread in threads:
        thread.start()
    try:

        def held() -> bool:
            history = httpx.get(f"{gw.url}/admin/routes/chat", headers=ADMIN, timeout=10).json()["history"]
            return any(t["reason"].startswith(MISMATCH) for t in history)

        wait_for(held, timeout=60, message="a hold for a sample ratio mismatch")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    detail = httpx.get(f"{gw.url}/admin/routes/chat", headers=ADMIN, timeout=10).json()
    assert (detail["phase"], detail["weight"]) == ("progressing", 20)  # neither advanced nor rolled back
    (reason,) = [t["reason"] for t in detail["history"] if t["reason"].startswith(MISMATCH)]
    # the check of requests or of units, whichever found it first (both see a candidate never counted)
    assert "cohort all: candidate 0.00% of" in reason and "expected 20.00%" in reason, reason
    assert gave_up[0] > 0
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    assert 'canarygate_sample_ratio_mismatch{cohort="all",route="chat"} 1.0' in metrics


def phase_of(url: str) -> tuple[str, float]:
    detail = httpx.get(f"{url}/admin/routes/chat", headers=ADMIN, timeout=10).json()
    return detail["phase"], detail["weight"]


def test_a_restarted_gateway_resumes_the_step_and_the_controller_holds_while_redis_is_down(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, own_redis: RedisServer
) -> None:
    policies = {"chat": automatic_policy(sims, 30).replace("interval_s: 1", "interval_s: 2")}
    first = make_gateway(policies, admin_token="admin-secret", redis_url=own_redis.url)
    stop = threading.Event()
    drive(first.url, stop)
    try:
        wait_for(lambda: phase_of(first.url) == ("progressing", 50), timeout=40, message="step 2")
        stop.set()
        # A new gateway (a restart) reads where the rollout is: step 2, not the policy's first step.
        second = make_gateway(policies, admin_token="admin-secret", redis_url=own_redis.url)
        assert phase_of(second.url) == ("progressing", 50)

        own_redis.stop()
        stop = threading.Event()
        drive(first.url, stop)
        time.sleep(5)  # more than two intervals of healthy traffic: a controller that could see would move
        for url in (first.url, second.url):
            assert phase_of(url) == ("progressing", 50)  # held, and still serving the last state
            assert arm_of(url) in ("base", "candidate")
        compared = httpx.get(f"{first.url}/admin/routes/chat/analysis", headers=ADMIN)
        assert compared.status_code == 503

        own_redis.start()  # empty: the replicas write the rollout back, then the controller resumes
        wait_for(
            lambda: phase_of(first.url)[0] == "promoted", timeout=40, message="promotion after the outage"
        )
    finally:
        stop.set()
    # The other replica learns it by pub/sub, or by its next poll of the state (every POLL_S).
    wait_for(lambda: phase_of(second.url)[0] == "promoted", timeout=10, message="the other replica")


def test_several_workers_without_redis_refuse_to_hold_rollout_state(
    tmp_path: Path, sims: tuple[Sim, Sim]
) -> None:
    import sys

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "chat.yaml").write_text(automatic_policy(sims, 30))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANARYGATE_")}
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--policies",
            str(policies),
            "--workers",
            "2",
            "--port",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2
    assert "routes chat roll out automatically" in refused.stderr
    assert "CANARYGATE_REDIS_URL" in refused.stderr


def test_shadow_first_judges_mirrored_traffic_before_any_user_sees_the_candidate(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    policy = automatic_policy(sims, 30).replace("  steps:", "  shadow_first: true\n  steps:")
    policy += "mirror: {percent: 100, sample_by: request}\n"
    gw = make_gateway({"chat": policy}, admin_token="admin-secret")
    assert phase_of(gw.url) == ("shadow", 0)
    assert arm_of(gw.url) == "base"
    stop = threading.Event()
    drive(gw.url, stop)
    try:
        wait_for(lambda: phase_of(gw.url) == ("progressing", 20), timeout=30, message="the first step")
    finally:
        stop.set()
    history = httpx.get(f"{gw.url}/admin/routes/chat", headers=ADMIN).json()["history"]
    assert [(t["phase"], t["weight"]) for t in reversed(history)][:2] == [("shadow", 0), ("progressing", 20)]
