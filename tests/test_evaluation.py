"""Evaluators and the pairwise judge, end to end: the simulator as both checkpoints and as the judge (it
knows which of its answers did the task), the official openai client, the gateway on loopback."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import create_app
from gateway.server import BackgroundServer
from gateway.settings import Settings
from gateway.synth import Knobs
from gateway.tracing import Tracing
from tests.conftest import GatewayFactory, RawUpstream, Sim, closed_port, policy_yaml, wait_for
from tests.test_cli import canarygate
from tests.test_metrics import scrape, value

TOKEN = "admin-secret-token"
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
    for name in ("lookup_order", "refund_order", "cancel_order")
]
SHADOW = "mirror: {percent: 100, sample_by: request, capture_content: true}"


def evaluation(judge_url: str, evaluators: str, judge_extra: str = "") -> str:
    return (
        f"evaluation:\n  judge: {{url: {judge_url}, model: judge, max_concurrency: 2{judge_extra}}}\n"
        f"  evaluators:\n{evaluators}"
    )


EVERY_KIND = """\
    - {name: adherence, kind: rubric, rubric: instruction_adherence}
    - {name: preference, kind: pairwise}
    - {name: tools, kind: tool_selection}
    - {name: greets, kind: regex, pattern: "^re-[0-9a-f]{8} "}
    - {name: polite, kind: contains, text: [please, thank]}
    - {name: short, kind: max_length, max_chars: 400}
    - {name: named, kind: json_path, path: "$.name"}
"""


def ask(gw_url: str, n: int, **extra: Any) -> None:
    """n chat requests, each its own prompt (temperature 0: the same prompt, the same answer)."""
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            body = {"model": "chat", "messages": [{"role": "user", "content": f"task {i}"}], "temperature": 0}
            response = client.post(f"{gw_url}/v1/chat/completions", json={**body, **extra})
            assert response.status_code == 200, response.text


def analysis(gw_url: str) -> dict[str, Any]:
    response = httpx.get(
        f"{gw_url}/admin/routes/chat/analysis", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def pairs(gw_url: str, **params: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{gw_url}/admin/pairs",
        params={"route": "chat", "limit": "1000", **params},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def judged(gw_url: str, evaluator: str, kind: str = "candidate") -> dict[str, float]:
    s = scrape(gw_url)
    return {
        v: value(s, "canarygate_eval_verdicts_total", route="chat", evaluator=evaluator, verdict=v, kind=kind)
        for v in ("win", "tie", "loss", "flip")
    }


def test_every_evaluator_kind_scores_both_arms_and_the_judge_catches_a_candidate_that_ignores_the_task(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    candidate.set_knobs(quality=0)  # fluent, well-formed, never the task
    extra = f"{SHADOW}\n{evaluation(base.url, EVERY_KIND)}"
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, extra=extra)}, admin_token=TOKEN)
    ask(gw.url, 12)
    ask(gw.url, 4, tools=TOOLS)
    ask(gw.url, 4, response_format={"type": "json_object"})

    def score(evaluator: str, arm: str, mode: str, stat: str = "sum") -> float:
        return value(scrape(gw.url), f"canarygate_eval_score_{stat}", route="chat", evaluator=evaluator,
                     arm=arm, mode=mode)  # fmt: skip

    wait_for(lambda: judged(gw.url, "preference")["loss"] == 20, message="20 judged pairs, all losses")
    wait_for(lambda: score("adherence", "candidate", "mirror", "count") == 20, message="20 rubric scores")
    wait_for(lambda: score("adherence", "base", "primary", "count") == 20)
    assert score("adherence", "base", "primary") == 20  # every base answer does the task: 5/5
    assert score("adherence", "candidate", "mirror") == 0  # none of the candidate's does: 1/5
    assert judged(gw.url, "preference") == {"win": 0, "tie": 0, "loss": 20, "flip": 0}
    # Deterministic checks, on both arms: the regex finds the task marker only in the base's answers.
    assert score("greets", "base", "primary") == 12 and score("greets", "candidate", "mirror") == 0
    assert score("short", "base", "primary", "count") == 20 == score("short", "base", "primary")
    assert score("named", "base", "primary", "count") == 20  # json_path: only JSON answers have $.name
    # tool_selection on pairs: the candidate picks another declared tool than the base every time.
    assert score("tools", "candidate", "mirror", "count") == 4 and score("tools", "candidate", "mirror") == 0

    wait_for(lambda: analysis(gw.url)["evaluations"]["preference"].get("shadow", {}).get("pairs") == 20)
    view = analysis(gw.url)["evaluations"]
    assert view["adherence"]["base"] == {"results": 20, "mean": 1.0}
    assert view["adherence"]["shadow"] == {"results": 20, "mean": 0.0}
    assert view["preference"]["shadow"] == {"pairs": 20, "wins": 0, "losses": 20, "ties": 0, "flips": 0}

    records = pairs(gw.url)
    assert len(records) == 20
    assert all(r["verdicts"]["preference"]["verdict"] == "loss" for r in records)
    assert all("reason" in r["verdicts"]["preference"] for r in records)  # captured content: with reasons

    env = {"CANARYGATE_ADMIN_TOKEN": TOKEN, "CANARYGATE_URL": gw.url}
    table = canarygate("compare", "chat", env=env)
    assert table.returncode == 0, table.stderr
    assert "preference (pairwise, 100% sampled)" in table.stdout
    assert "candidate vs base: 0 wins, 0 ties, 20 losses of 20 pairs" in table.stdout

    preference = canarygate("pairs", "--route", "chat", "--format", "preference", "--limit", "1000", env=env)
    assert preference.returncode == 0, preference.stderr
    rows = [json.loads(line) for line in preference.stdout.splitlines()]
    assert len(rows) == 20
    row = rows[0]
    assert set(row) == {"input", "preferred_output", "non_preferred_output"}
    assert row["input"]["messages"][0]["role"] == "user"
    (preferred,) = row["preferred_output"]
    assert preferred["role"] == "assistant" and preferred != row["non_preferred_output"][0]
    with_tools = [r for r in rows if r["input"]["tools"]]
    assert len(with_tools) == 4 and with_tools[0]["input"]["tools"] == TOOLS
    sft = canarygate("pairs", "--route", "chat", "--format", "sft", "--limit", "1000", env=env)
    sft_rows = [json.loads(line) for line in sft.stdout.splitlines()]
    assert len(sft_rows) == 20 and sft_rows[0]["messages"][-1]["role"] == "assistant"


def test_a_judge_that_always_prefers_the_first_answer_gives_ties_not_wins(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    base.simulator.models["judge"] = Knobs(judge_prefers_first=1)  # pure position bias
    candidate.set_knobs(quality=0)
    evaluators = "    - {name: preference, kind: pairwise}\n"
    extra = f"{SHADOW}\n{evaluation(base.url, evaluators)}"
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, extra=extra)}, admin_token=TOKEN)
    ask(gw.url, 10)
    wait_for(lambda: judged(gw.url, "preference")["tie"] == 10, message="10 ties")
    assert judged(gw.url, "preference") == {"win": 0, "tie": 10, "loss": 0, "flip": 10}
    assert pairs(gw.url, decisive="true") == []  # nothing to learn from a verdict the order decided


def test_the_noise_floor_calibrates_the_judge(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    base, candidate = sims
    evaluators = "    - {name: preference, kind: pairwise}\n    - {name: tools, kind: tool_selection}\n"
    extra = "mirror: {percent: 0.001, noise_floor_percent: 100, sample_by: request}\n" + evaluation(
        base.url, evaluators
    )
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, extra=extra)}, admin_token=TOKEN)
    ask(gw.url, 6, tools=TOOLS)
    wait_for(lambda: judged(gw.url, "preference", "noise")["tie"] == 6, message="6 noise-floor ties")
    wait_for(lambda: analysis(gw.url)["evaluations"]["preference"].get("noise", {}).get("ties") == 6)
    view = analysis(gw.url)["evaluations"]
    assert view["preference"]["noise"]["ties"] == 6
    assert view["tools"]["base"] == {"results": 6, "mean": 1.0}  # the base agrees with itself
    table = canarygate("compare", "chat", env={"CANARYGATE_ADMIN_TOKEN": TOKEN, "CANARYGATE_URL": gw.url})
    assert "base vs base (calibration): 0 wins, 6 ties, 0 losses of 6 pairs" in table.stdout


def _words(conn: socket.socket) -> None:
    """A judge that answers, but in words, not the verdict's JSON."""
    answer = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Looks good!"},
                                      "finish_reason": "stop"}]}).encode()  # fmt: skip
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(answer)}\r\n\r\n"
    )
    conn.sendall(head.encode() + answer)


@pytest.mark.parametrize("failure", ["refused", "hangs", "http_500", "not_json"])
def test_a_failing_judge_changes_nothing_for_users(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, failure: str
) -> None:
    base, candidate = sims
    raw = RawUpstream({"words": _words})
    judge_url = {
        "refused": f"http://127.0.0.1:{closed_port()}/v1",
        "hangs": f"{raw.url}/hang/v1",
        "http_500": base.url,
        "not_json": f"{raw.url}/words/v1",
    }[failure]
    base.simulator.models["judge"] = Knobs(error_rate=1)
    evaluators = "    - {name: adherence, kind: rubric, rubric: task_completion}\n"
    evaluators += "    - {name: preference, kind: pairwise}\n"
    limits = (
        ", timeouts: {connect_s: 1, total_s: 1}, circuit_breaker: {min_requests: 4, window: 10, open_s: 600}"
    )
    extra = f"{SHADOW}\n{evaluation(judge_url, evaluators, limits)}"
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, extra=extra)}, admin_token=TOKEN)
    try:
        started = time.perf_counter()
        ask(gw.url, 8)
        took = time.perf_counter() - started
        outcome = {"refused": "error", "hangs": "timeout", "http_500": "error", "not_json": "invalid"}[
            failure
        ]

        def calls(outcome: str) -> float:
            return value(scrape(gw.url), "canarygate_judge_calls_total", route="chat", outcome=outcome)

        wait_for(lambda: calls(outcome) >= 4, timeout=20, message=f"judge calls failing with {outcome}")
        wait_for(lambda: calls("circuit_open") >= 1, timeout=20, message="the judge's circuit opens")
        assert calls("ok") == 0
        s = scrape(gw.url)
        assert (
            value(s, "canarygate_requests_total", route="chat", arm="base", mode="primary", outcome="ok") == 8
        )
        assert value(s, "canarygate_judge_circuit_open", route="chat") == 1
        skipped = [v for (n, ls), v in s.items() if n == "canarygate_evaluations_skipped_total"]
        assert sum(skipped) >= 4
        assert (
            took < 20
        )  # users never waited for the judge (eight answers; a hung judge's calls take 1 s each)
    finally:
        raw.close()


def test_the_judge_s_budgets_bound_its_calls(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    base, candidate = sims
    evaluators = "    - {name: adherence, kind: rubric, rubric: instruction_adherence}\n"
    extra = f"{SHADOW}\n{evaluation(base.url, evaluators, ', requests_per_minute: 5')}"
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, extra=extra)}, admin_token=TOKEN)
    ask(gw.url, 10)  # 20 answers to judge (base primary and candidate shadow), 5 calls allowed a minute

    def counts() -> dict[str, float]:
        s = scrape(gw.url)
        out = {
            o: value(s, "canarygate_judge_calls_total", route="chat", outcome=o)
            for o in ("ok", "rate_limited")
        }
        out["answers"] = value(s, "canarygate_requests_total", route="chat", outcome="ok")  # both arms, modes
        return out

    wait_for(lambda: counts()["answers"] == 20, message="20 answers")
    wait_for(
        lambda: counts()["ok"] + counts()["rate_limited"] == 20, message="every answer judged or refused"
    )
    assert counts() == {"ok": 5, "rate_limited": 15, "answers": 20}
    s = scrape(gw.url)
    assert value(s, "canarygate_evaluations_skipped_total", route="chat", reason="rate_limited") == 15


def test_sampling_takes_the_same_requests_for_every_evaluator_and_both_sides_of_a_pair(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    evaluators = (
        "    - {name: adherence, kind: rubric, rubric: instruction_adherence, sample: 0.3}\n"
        "    - {name: short, kind: max_length, max_chars: 10000, sample: 0.3}\n"
    )
    extra = f"{SHADOW}\n{evaluation(base.url, evaluators)}"
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, extra=extra)}, admin_token=TOKEN)
    ask(gw.url, 60)

    def count(evaluator: str, arm: str, mode: str) -> float:
        return value(scrape(gw.url), "canarygate_eval_score_count", route="chat", evaluator=evaluator,
                     arm=arm, mode=mode)  # fmt: skip

    n = count("short", "base", "primary")
    assert 5 <= n <= 35  # about 30% of 60
    wait_for(lambda: count("adherence", "candidate", "mirror") == n, message="the same sample everywhere")
    assert count("adherence", "base", "primary") == n == count("short", "candidate", "mirror")


def test_results_are_gen_ai_evaluation_result_events_on_the_judged_span(
    sims: tuple[Sim, Sim], tmp_path: Any
) -> None:
    base, candidate = sims
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    evaluators = (
        "    - {name: adherence, kind: rubric, rubric: instruction_adherence}\n"
        "    - {name: short, kind: max_length, max_chars: 3}\n"
    )
    (tmp_path / "chat.yaml").write_text(
        policy_yaml("chat", base.url, candidate.url, weight=100, extra=evaluation(base.url, evaluators))
    )
    app = create_app(Settings(policy_dir=tmp_path, watch_policies=False), tracing=Tracing(provider))
    server = BackgroundServer(app).start()
    try:
        ask(server.url, 1)

        def events() -> list[Any]:
            return [
                e
                for s in exporter.get_finished_spans()
                for e in s.events
                if e.name == "gen_ai.evaluation.result"
            ]

        wait_for(lambda: len(events()) == 2, message="two evaluation events")
        spans = {s.name: s for s in exporter.get_finished_spans()}
        attempt = next(s for name, s in spans.items() if name.startswith("chat tuned-model"))
        for name in ("evaluate adherence", "evaluate short"):
            assert spans[name].parent is not None
            assert spans[name].parent.span_id == attempt.context.span_id  # the judged attempt's child
        by_name = {e.attributes["gen_ai.evaluation.name"]: e.attributes for e in events()}
        assert by_name["short"]["gen_ai.evaluation.score.label"] == "fail"
        assert "characters, at most 3" in by_name["short"]["gen_ai.evaluation.explanation"]
        assert by_name["adherence"]["gen_ai.evaluation.score.value"] == 1.0
        assert "gen_ai.evaluation.explanation" not in by_name["adherence"]  # a judge's words: content
        assert by_name["adherence"]["gen_ai.response.id"].startswith("chatcmpl-")
    finally:
        server.stop()


@pytest.fixture
def subtle(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> Any:
    """An automatic rollout whose only way to see the candidate's fault is the judge."""

    def start(gate: str) -> str:
        base, candidate = sims
        candidate.set_knobs(quality=0.6)  # valid, fast, fluent: 40% of its answers ignore the task
        evaluators = (
            "    - {name: adherence, kind: rubric, rubric: instruction_adherence}\n"
            "    - {name: preference, kind: pairwise}\n"
        )
        gates = {
            "pairwise_loss_rate": "pairwise_loss_rate: {preference: {max: 0.05, min_samples: 20}}",
            "eval_score_decrease": "eval_score_decrease: {adherence: {max_decrease: 0.05, min_samples: 20}}",
        }[gate]
        policy = policy_yaml("chat", base.url, candidate.url).replace("rollout:\n  weight: 0\n", "")
        policy += (
            "mirror: {percent: 100, sample_by: request}\n"
            "rollout:\n  shadow_first: true\n  steps: [50, 100]\n  interval_s: 1\n  min_samples: 20\n"
            f"  gates:\n    error_rate: {{max_increase: 0.05}}\n    {gates}\n"
            + evaluation(base.url, evaluators)
        )
        gw = make_gateway({"chat": policy}, admin_token=TOKEN)
        return gw.url

    return start


@pytest.mark.parametrize("gate", ["pairwise_loss_rate", "eval_score_decrease"])
def test_the_controller_rolls_back_a_candidate_only_the_judge_can_see_is_worse(
    subtle: Any, gate: str
) -> None:
    url = subtle(gate)
    deadline = time.monotonic() + 60
    phase = "shadow"
    while time.monotonic() < deadline and phase != "rolled_back":
        ask(url, 5)
        phase = analysis(url)["phase"]
    view = analysis(url)
    assert phase == "rolled_back", view
    assert f"{gate}:" in view["decided"]["reason"], view["decided"]
    assert view["candidate_measured_as"] == "shadow"  # caught before any user saw the candidate
    s = scrape(url)
    assert value(s, "canarygate_requests_total", route="chat", arm="candidate", mode="primary") == 0


@pytest.mark.skipif(
    not os.environ.get("CANARYGATE_TEST_LLAMA_URL"),
    reason="set CANARYGATE_TEST_LLAMA_URL to a llama-cpp-python server's /v1 (model alias in "
    "CANARYGATE_TEST_LLAMA_MODEL, default smol) to use it as the judge",
)
def test_a_real_instruct_model_as_the_judge(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    """A real judge on a one-slot server: every call ends in a counted outcome, users never wait for it,
    and whatever its biases, a verdict that flips with the order is a tie, never a win. What it said is
    printed (pytest -s): a 135M-parameter model is no judge, and the figures show it."""
    base, candidate = sims
    candidate.set_knobs(quality=0)
    url, model = (
        os.environ["CANARYGATE_TEST_LLAMA_URL"],
        os.environ.get("CANARYGATE_TEST_LLAMA_MODEL", "smol"),
    )
    judge = (
        f"evaluation:\n  judge: {{url: {url}, model: {model}, response_format: json_object, "
        "max_concurrency: 1, max_tokens: 96, timeouts: {total_s: 120}}\n  evaluators:\n"
        "    - {name: adherence, kind: rubric, rubric: instruction_adherence}\n"
        "    - {name: preference, kind: pairwise}\n"
    )
    gw = make_gateway(
        {"chat": policy_yaml("chat", base.url, candidate.url, extra=f"{SHADOW}\n{judge}")}, admin_token=TOKEN
    )
    started = time.perf_counter()
    ask(gw.url, 6)
    took = time.perf_counter() - started
    calls = 6 * 2 + 6 * 2  # a rubric per answer (base and shadow), two orders per pair

    def outcomes() -> dict[str, float]:
        s = scrape(gw.url)
        return {
            o: value(s, "canarygate_judge_calls_total", route="chat", outcome=o)
            for o in ("ok", "invalid", "error", "timeout")
        }

    wait_for(lambda: sum(outcomes().values()) == calls, timeout=600, message="every judge call to end")
    verdicts = judged(gw.url, "preference")
    view = analysis(gw.url)["evaluations"]
    print(f"\nreal judge {model}: calls {outcomes()}; pairs {verdicts}; rubric {view['adherence']}")
    print(f"the users' six answers took {took:.2f}s")
    s = scrape(gw.url)
    skipped = sum(
        v
        for (n, ls), v in s.items()
        if n == "canarygate_evaluations_skipped_total" and ("evaluator", "preference") in ls
    )
    assert sum(verdicts[v] for v in ("win", "tie", "loss")) + skipped == 6  # every pair judged, or counted
    assert verdicts["flip"] <= verdicts["tie"]  # a flip is a tie, never a win or a loss
    assert took < 30  # six answers; the judge's seconds per call never reached the users


def test_a_judge_on_a_one_slot_server_an_arm_uses_yields_to_users(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    """A judge call waits for the slot while a user's stream runs, and a user's request that finds a
    judge call running takes the slot from it. (A judge call sent in the very instant a user's request
    arrives can still reach the server second; the README says so: this test does not race them.)"""
    base, candidate = sims
    base.simulator.interrupt = True  # llama.cpp's way: a request arriving stops the running stream
    base.set_knobs(time_per_token_s=0.01, output_tokens=20)
    base.simulator.models["judge"] = Knobs(latency_s=2.0)  # a slow judge: a user will find it running
    evaluators = "    - {name: adherence, kind: rubric, rubric: instruction_adherence}\n"
    policy = policy_yaml(
        "chat",
        base.url,
        candidate.url,
        base_extra="max_concurrency: 1",
        extra=evaluation(base.url, evaluators).replace("max_concurrency: 2", "max_concurrency: 1"),
    )
    gw = make_gateway({"chat": policy})
    client = gw.client()

    def judge_calls_arrived() -> int:
        return int(base.stats()["requests"].get("chat:judge", 0))

    users = 4
    for i in range(users):
        messages = [{"role": "user", "content": f"task {i}"}]
        stream = client.chat.completions.create(model="chat", messages=messages, stream=True)  # type: ignore[arg-type]
        chunks = [c for c in stream if c.choices]
        assert chunks[-1].choices[0].finish_reason == "stop"  # never cut by a judge call
        # The judge call for this answer waited for the slot; once it is at the server, the next user
        # arrives while it runs.
        wait_for(lambda i=i: judge_calls_arrived() == i + 1, message=f"judge call {i + 1} at the server")

    def calls(outcome: str) -> float:
        return value(scrape(gw.url), "canarygate_judge_calls_total", route="chat", outcome=outcome)

    wait_for(lambda: calls("ok") + calls("preempted") == users, message="every judge call made or yielded")
    assert calls("preempted") >= 1  # users took the slot from running judge calls
    assert base.stats()["streams"]["interrupted"] == 0


def test_a_judge_s_own_calls_are_never_judged(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    """When the judge is this gateway (its url, a route as its model), its calls carry x-canarygate-judge:
    judging them would judge the judging, for ever."""
    base = sims[0]
    evaluators = "    - {name: short, kind: max_length, max_chars: 10000}\n"
    gw = make_gateway({"chat": policy_yaml("chat", base.url, extra=evaluation(base.url, evaluators))})
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    assert gw.post("/v1/chat/completions", json=body, headers={"X-Canarygate-Judge": "1"}).status_code == 200
    assert gw.post("/v1/chat/completions", json=body).status_code == 200

    def judged() -> float:
        return value(scrape(gw.url), "canarygate_eval_score_count", route="chat", evaluator="short")

    wait_for(lambda: judged() == 1, message="the user's answer evaluated")
    assert judged() == 1


def test_a_cohort_the_candidate_ignores_fails_its_own_pairwise_gate(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    """rollout.segments judges the quality gates per cohort too: a candidate that ignores only billing's
    tasks (a tenth of the traffic) loses the pairs of billing, and billing's own gate rolls it back."""
    from tests.conftest import CANDIDATE_MODEL
    from tests.test_state import ADMIN, drive_until

    base, candidate = sims
    candidate.simulator.models[f"{CANDIDATE_MODEL}@billing"] = Knobs(quality=0)
    text = policy_yaml("chat", base.url, candidate.url).replace("rollout:\n  weight: 0\n", "")
    text += (
        "cohorts: {source: 'metadata:intent', values: [billing, support]}\n"
        "mirror: {percent: 100, sample_by: request}\n"
        "rollout:\n  shadow_first: true\n  steps: [50, 100]\n  interval_s: 1\n  min_samples: 20\n"
        "  gates:\n    pairwise_loss_rate: {preference: {max: 0.2}}\n"
        "  segments: {by: cohort, min_share: 0.05}\n"
        + evaluation(base.url, "    - {name: preference, kind: pairwise}\n")
    )
    gw = make_gateway({"chat": text}, admin_token=ADMIN["Authorization"].removeprefix("Bearer "))

    def intent(i: int) -> dict[str, object]:
        name = "billing" if i % 10 == 0 else "support"
        return {"metadata": {"intent": name, "sim_profile": name}}

    drive_until(gw.url, "rolled_back", timeout=60, extra=intent)
    view = httpx.get(f"{gw.url}/admin/routes/chat/analysis", headers=ADMIN, timeout=10).json()
    assert view["decided"]["reason"].startswith("gate failed: pairwise_loss_rate:preference [cohort billing]")
    by_cohort = {g["cohort"]: g for g in view["gates"] if g["gate"] == "pairwise_loss_rate:preference"}
    assert by_cohort["billing"]["result"] == "fail" and by_cohort["billing"]["value"] == 1.0
    assert by_cohort["all"]["result"] in ("pass", "wait")  # a tenth of losses: within the aggregate's 20%
    assert by_cohort["support"]["value"] == 0.0
