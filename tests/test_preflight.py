"""Pre-flight end to end: held-out sets in both formats (and their mistakes), the CLI against the simulator
(as both checkpoints and as the judge), the report's figures against hand-computed ones, the HTML page in
a real headless Chromium, the exit codes, Ctrl-C, and the rollout's pre-flight phase."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import heldout
from gateway.preflight.dataset import DatasetError, load
from gateway.synth import prompt_text, task_marker
from tests.conftest import REPO, GatewayFactory, Sim, policy_yaml, wait_for
from tests.test_cli import canarygate
from tests.test_evaluation import evaluation

TOKEN = "admin-secret-token"
CATEGORIES = {"format", "tool-use", "multi-step", "adversarial", "out-of-domain", "policy-conflict"}
SET = REPO / "datasets" / "support-heldout.jsonl"
JUDGED = (
    "    - {name: adherence, kind: rubric, rubric: instruction_adherence}\n"
    "    - {name: preference, kind: pairwise}\n"
)


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def marked(i: int) -> dict[str, Any]:
    """A chat item whose expected answer is the simulator's task marker for it."""
    messages = [{"role": "user", "content": f"task {i}"}]
    return {
        "id": f"t{i}",
        "messages": messages,
        "category": "even" if i % 2 == 0 else "odd",
        "expected": {"contains": task_marker(prompt_text({"messages": messages}))},
    }


def policy(base: Sim, candidate: Sim, *, gates: str, judged: bool = False, extra: str = "") -> str:
    text = policy_yaml("chat", base.url, candidate.url).replace("rollout:\n  weight: 0\n", "")
    text += "mirror: {percent: 100}\n" if judged else ""
    text += f"rollout:\n  steps: [50]\n  confidence: 0.95\n  gates:\n{gates}{extra}"
    return text + (evaluation(base.url, JUDGED) if judged else "")


def preflight(policy_dir: Path, dataset: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return canarygate(
        "preflight", str(dataset), "--route", "chat", "--policies", str(policy_dir), *args, env=env
    )


def report(prefix: Path) -> dict[str, Any]:
    return json.loads(Path(f"{prefix}.json").read_text())  # type: ignore[no-any-return]


# -- held-out sets -----------------------------------------------------------------------------------


def test_both_formats_load_with_their_labels_and_expectations(tmp_path: Path) -> None:
    path = write(tmp_path / "set.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "hi"}], "tags": ["greeting", "short"],
         "cohort": "vip", "tools": [], "expected": {"tool": "lookup", "contains": "hello"}},
        "",
        {"input": "What is 2+2?", "ideal": ["4", "four"], "category": "math"},
        {"input": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "France?"}],
         "ideal": "Paris"},
        {"messages": [{"role": "user", "content": "json"}], "expected": {"json_schema": {"type": "object"}}},
    ])  # fmt: skip
    items = load(path)
    assert [i.id for i in items] == ["a", "line-3", "line-4", "line-5"]
    assert (items[0].category, items[0].tags, items[0].cohort) == ("greeting", ("greeting", "short"), "vip")
    assert items[0].expected.tool == "lookup" and items[0].expected.contains == ("hello",)
    assert items[1].request == {"messages": [{"role": "user", "content": "What is 2+2?"}]}
    assert (items[1].category, items[1].expected.answer) == ("math", "4")
    assert items[2].request["messages"][0]["role"] == "system" and items[2].expected.answer == "Paris"
    fmt = items[3].request["response_format"]  # an expected schema is asked for, as a client would
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == {"type": "object"}
    assert [i.id for i in load(path, limit=2)] == ["a", "line-3"]
    shuffled = [i.id for i in load(path, shuffle=7)]
    assert sorted(shuffled) == sorted(i.id for i in items) and shuffled == [
        i.id for i in load(path, shuffle=7)
    ]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("not json", "set.jsonl:2: not JSON"),
        ("[1, 2]", "set.jsonl:2: each line must be a JSON object, got list"),
        ('{"prompt": "hi"}', "set.jsonl:2: prompt: not a field of an item"),
        ('{"messages": []}', "set.jsonl:2: messages: must be a non-empty list of messages"),
        ('{"messages": [{"content": "x"}]}', "set.jsonl:2: messages[0]: a message is an object with a role"),
        (
            '{"messages": [{"role": "user", "content": "x"}], "expected": {"tool": 3}}',
            "set.jsonl:2: expected.tool: must be a string",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}], "expected": {"answr": "x"}}',
            "set.jsonl:2: expected.answr: not a field",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}], "expected": {"json_schema": {"type": 5}}}',
            "set.jsonl:2: ",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}], "tools": {"a": 1}}',
            "set.jsonl:2: tools: must be a list of tool objects",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}], "category": ""}',
            "set.jsonl:2: category: a string of 1-64 characters",
        ),
        ('{"input": "x", "ideal": 4}', "set.jsonl:2: ideal: must be a string or a list of strings"),
        ('{"input": "x", "extra": 1}', "set.jsonl:2: extra: not a field of an evals item"),
        ('{"id": "t1", "messages": [{"role": "user", "content": "x"}]}', "item ids used twice: t1"),
    ],
)
def test_a_bad_line_is_named_by_line_and_field(tmp_path: Path, line: str, says: str) -> None:
    path = write(
        tmp_path / "set.jsonl", [{"id": "t1", "messages": [{"role": "user", "content": "ok"}]}, line]
    )
    with pytest.raises(DatasetError) as caught:
        load(path)
    assert says in str(caught.value)


def test_the_cli_refuses_a_bad_set_or_route_with_exit_code_2(sims: tuple[Sim, Sim], tmp_path: Path) -> None:
    base, candidate = sims
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "chat.yaml").write_text(
        policy(base, candidate, gates="    error_rate: {max_increase: 0.05}\n")
    )
    bad = write(tmp_path / "bad.jsonl", ['{"messages": "hi"}'])
    result = preflight(policies, bad)
    assert result.returncode == 2 and "bad.jsonl:1: messages: must be a non-empty list" in result.stderr
    missing = preflight(policies, tmp_path / "nowhere.jsonl")
    assert missing.returncode == 2 and "nowhere.jsonl: cannot be read" in missing.stderr
    schema = write(tmp_path / "schema.jsonl", [{"messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "no"}}}}])  # fmt: skip
    result = preflight(policies, schema)
    assert result.returncode == 2 and "line 1:" in result.stderr and "Traceback" not in result.stderr
    result = canarygate("preflight", str(bad), "--route", "nope", "--policies", str(policies))
    assert result.returncode == 2 and "no route 'nope'" in result.stderr


def test_the_shipped_example_set_is_what_its_generator_writes() -> None:
    assert SET.read_text() == heldout.text(), "run python -m gateway.heldout > datasets/support-heldout.jsonl"
    items = load(SET)
    assert len(items) == 80
    categories = {i.category for i in items}
    assert categories == CATEGORIES
    assert {i.cohort for i in items} == {"enterprise", "self-serve"}
    assert sum(i.expected.tool is not None for i in items) == 15
    assert sum("response_format" in i.request for i in items) == 15


# -- the CLI against the simulator -------------------------------------------------------------------


def test_the_report_s_figures_are_the_hand_computed_ones(sims: tuple[Sim, Sim], tmp_path: Path) -> None:
    """Ten items: the candidate fails JSON on every answer and its tool choices differ; the figures are
    counted by hand from what each arm did."""
    base, candidate = sims
    candidate.set_knobs(invalid_json_rate=1.0, latency_s=0.05)
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("a", "b")
    ]
    rows = []
    for i in range(10):
        row: dict[str, Any] = {"id": f"i{i}", "messages": [{"role": "user", "content": f"q{i}"}]}
        if i < 4:
            row |= {"category": "json", "response_format": {"type": "json_object"}}
        elif i < 7:
            row |= {"category": "tools", "tools": tools, "expected": {"tool": "a"}}
        else:
            row |= {"category": "text", "expected": {"contains": "zzz-never"}}
        rows.append(row)
    dataset = write(tmp_path / "set.jsonl", rows)
    policies = tmp_path / "policies"
    policies.mkdir()
    gates = "    validation_failure_rate: {max_increase: 0.05}\n    error_rate: {max_increase: 0.05}\n"
    (policies / "chat.yaml").write_text(policy(base, candidate, gates=gates))
    prefix = tmp_path / "out" / "r"
    result = preflight(policies, dataset, "--report", str(prefix), "--min-samples", "5")
    out = report(prefix)
    base_arm, cand_arm = out["arms"]["base"], out["arms"]["candidate"]
    assert (out["items"], out["answered"], out["interrupted"]) == (10, 10, None)
    assert base_arm["validation_failures"]["events"] == 0
    assert cand_arm["validation_failures"]["events"] == 4  # every JSON answer cut short
    assert cand_arm["failures_by_kind"] == {"json_parse": 4}
    assert base_arm["json_valid"]["rate"] == 1.0 and cand_arm["json_valid"]["rate"] == 0.0
    assert base_arm["json_valid"]["n"] == 4 and base_arm["schema_valid"] is None
    assert out["categories"]["json"]["candidate"]["validation_failures"]["rate"] == 1.0
    assert out["categories"]["text"]["base"]["validation_failures"]["rate"] == 0.0
    assert base_arm["scores"]["expected_contains"] == {
        "n": 3,
        "mean": 0.0,
        "low": 0.0,
        "high": pytest.approx(0.5615, abs=1e-3),
    }
    # Wilson's interval for 0 of 3 at 95%: [0, 0.5615]; for 4 of 4 failing, the candidate's validation rate:
    assert cand_arm["validation_failures"]["rate"] == 0.4
    tool = [
        s for s in (base_arm["scores"]["expected_tool"]["mean"], cand_arm["scores"]["expected_tool"]["mean"])
    ]
    assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in tool)
    assert cand_arm["latency_ms"]["p50"] > base_arm["latency_ms"]["p50"]
    gate = next(g for g in out["gates"] if g["gate"] == "validation_failure_rate" and g["cohort"] == "all")
    assert gate["value"] == pytest.approx(0.4) and gate["n_base"] == 10 and gate["n_candidate"] == 10
    # Ten answers cannot tell 40 points apart from 5 at this confidence (the rollout's own statistics):
    assert gate["result"] == "wait" and "past the threshold" in gate["needed"]
    assert out["verdict"] == "undecided" and result.returncode == 3, result.stdout + result.stderr
    worst = out["worst"][0]
    assert worst["category"] == "json" and "prompt" not in worst and "answer" not in worst["candidate"]
    md = Path(f"{prefix}.md").read_text()
    assert (
        "UNDECIDED" in md
        and "| validation_failure_rate | wait |" in md
        and "## Category `json` (4 items)" in md
    )


def test_a_candidate_that_ignores_instructions_fails_and_a_healthy_one_passes(
    sims: tuple[Sim, Sim], tmp_path: Path
) -> None:
    """The shipped example set, judged: a candidate that ignores the task in 40% of its answers fails on
    the judge's gates and the set's own expectations; the same checkpoint as the base passes."""
    base, candidate = sims
    policies = tmp_path / "policies"
    policies.mkdir()
    gates = (
        "    error_rate: {max_increase: 0.05}\n"
        "    eval_score_decrease: {adherence: {max_decrease: 0.05}}\n"
        "    pairwise_loss_rate: {preference: {max: 0.05}}\n"
    )
    (policies / "chat.yaml").write_text(policy(base, candidate, gates=gates, judged=True))
    candidate.set_knobs(quality=0.6)
    prefix = tmp_path / "subtle"
    result = preflight(
        policies, SET, "--samples", "2", "--concurrency", "8", "--report", str(prefix), "--capture"
    )
    out = report(prefix)
    assert result.returncode == 1 and out["verdict"] == "fail", result.stdout
    failed = {g["gate"] for g in out["gates"] if g["result"] == "fail" and g["cohort"] == "all"}
    assert failed == {"eval_score_decrease:adherence", "pairwise_loss_rate:preference"}
    pairs = out["pairs"]["preference"]
    assert pairs["wins"] == 0 and pairs["losses"] > 0 and pairs["pairs"] == 160
    assert out["arms"]["candidate"]["scores"]["expected_contains"]["mean"] < 1.0
    assert out["arms"]["base"]["scores"]["expected_contains"]["mean"] == 1.0
    assert set(out["categories"]) == CATEGORIES
    assert set(out["cohorts"]) == {"enterprise", "self-serve"}
    assert "prompt" in out["worst"][0] and out["worst"][0]["candidate"]["answer"]
    assert "[####" in result.stderr  # the progress line

    candidate.set_knobs(quality=1.0)
    prefix = tmp_path / "healthy"
    result = preflight(policies, SET, "--samples", "2", "--concurrency", "8", "--report", str(prefix))
    out = report(prefix)
    assert out["verdict"] == "pass" and result.returncode == 0, result.stdout
    assert all(g["non_inferior"] for g in out["gates"] if g["cohort"] == "all")


def test_too_small_a_set_is_undecided_and_says_what_size_would_decide(
    sims: tuple[Sim, Sim], tmp_path: Path
) -> None:
    base, candidate = sims
    policies = tmp_path / "policies"
    policies.mkdir()
    gates = "    error_rate: {max_increase: 0.01}\n"
    (policies / "chat.yaml").write_text(policy(base, candidate, gates=gates))
    dataset = write(tmp_path / "set.jsonl", [marked(i) for i in range(30)])
    prefix = tmp_path / "r"
    result = preflight(policies, dataset, "--report", str(prefix), "--min-samples", "10")
    out = report(prefix)
    assert result.returncode == 3 and out["verdict"] == "undecided"
    gate = out["gates"][0]
    assert gate["result"] == "pass" and not gate["non_inferior"]
    size = int(gate["needed"].split("about ")[1].split()[0])
    assert size > 30 and "(this run: 30)" in gate["needed"]
    few = preflight(policies, dataset, "--report", str(prefix), "--limit", "5", "--min-samples", "10")
    assert few.returncode == 3 and "min_samples per arm: base 5/10" in report(prefix)["gates"][0]["needed"]


def test_through_a_running_gateway_with_the_arm_forced(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    base, candidate = sims
    candidate.set_knobs(invalid_json_rate=1.0)
    gates = "    validation_failure_rate: {max_increase: 0.05}\n"
    text = policy(base, candidate, gates=gates) + (
        "assignment: {allow_override_header: true}\n"
        "validation: {json: auto}\n"
        "fallback: {on: [json_parse, http_5xx], budget: {ratio: 1.0, min_per_window: 1000}}\n"
    )
    gw = make_gateway({"chat": text}, admin_token=TOKEN)
    rows = [{"id": f"j{i}", "messages": [{"role": "user", "content": f"j{i}"}],
             "response_format": {"type": "json_object"}} for i in range(12)]  # fmt: skip
    dataset = write(tmp_path / "set.jsonl", rows)
    prefix = tmp_path / "r"
    result = preflight(
        gw.policy_dir, dataset, "--url", gw.url, "--report", str(prefix), "--min-samples", "10"
    )
    out = report(prefix)
    # The gateway fell back to the base for every candidate answer: that is the candidate's failure.
    assert out["arms"]["candidate"]["failures_by_kind"] == {"json_parse": 12}, out["arms"]["candidate"]
    assert out["arms"]["base"]["validation_failures"]["events"] == 0
    assert out["verdict"] == "fail" and result.returncode == 1
    refused = policy(base, candidate, gates=gates)  # no override header: the gateway chooses the arm
    other = make_gateway({"chat": refused})
    result = preflight(other.policy_dir, dataset, "--url", other.url, "--report", str(prefix))
    assert result.returncode == 2 and "allow_override_header" in result.stderr


def test_ctrl_c_leaves_a_partial_report_that_says_so(sims: tuple[Sim, Sim], tmp_path: Path) -> None:
    base, candidate = sims
    candidate.set_knobs(latency_s=0.2)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "chat.yaml").write_text(
        policy(base, candidate, gates="    error_rate: {max_increase: 0.01}\n")
    )
    dataset = write(tmp_path / "set.jsonl", [marked(i) for i in range(400)])
    prefix = tmp_path / "r"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "preflight", str(dataset), "--route", "chat", "--policies",
         str(policies), "--report", str(prefix), "--concurrency", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    first = process.stderr.readline()  # the first progress line: an item has been answered
    assert "1/400" in first or "/400" in first, first
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "partial report" in err
    out = report(prefix)
    assert out["interrupted"] == "stopped by the user (Ctrl-C)" and out["verdict"] == "undecided"
    assert 1 <= out["answered"] < 400
    assert "the run stopped early" in Path(f"{prefix}.md").read_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_html_report_renders_its_tables_and_charts_in_a_real_browser(
    sims: tuple[Sim, Sim], tmp_path: Path
) -> None:
    base, candidate = sims
    candidate.set_knobs(quality=0.7)
    policies = tmp_path / "policies"
    policies.mkdir()
    gates = (
        "    eval_score_decrease: {adherence: {max_decrease: 0.05}}\n"
        "    pairwise_loss_rate: {preference: {max: 0.05}}\n"
    )
    (policies / "chat.yaml").write_text(policy(base, candidate, gates=gates, judged=True))
    prefix = tmp_path / "r"
    result = preflight(policies, SET, "--report", str(prefix), "--limit", "30", "--capture")
    assert result.returncode in (1, 3), result.stderr
    page = Path(f"{prefix}.html")
    assert "<script" not in page.read_text()  # self-contained and static: nothing to run or fetch
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'id="verdict"' in html
    for table in ("gates", "arms", "pairs", "categories-format", "cohorts-enterprise"):
        assert f'data-table="{table}"' in html, table
    assert html.count("<tr>") > 40
    # The first 30 items are two categories: a bar per arm for each of their two scores.
    assert html.count('class="bar base"') == 4 and html.count('class="bar candidate"') == 4
    assert html.count('class="bar loss"') == 3  # the whole set and each category
    assert 'id="worst"' in html


# -- the rollout's pre-flight phase --------------------------------------------------------------------


def rollout_policy(base: Sim, candidate: Sim, dataset: Path | None, extra: str = "") -> str:
    preflight_section = (
        "  preflight:\n    min_samples: 20\n    concurrency: 8\n    gates:\n"
        "      error_rate: {max_increase: 0.1}\n"
        "      eval_score_decrease: {adherence: {max_decrease: 0.1}}\n"
        "      pairwise_loss_rate: {preference: {max: 0.1}}\n"
    )
    if dataset is not None:
        preflight_section += f"    dataset: {dataset}\n"
    gates = (
        "    error_rate: {max_increase: 0.05}\n"
        "    eval_score_decrease: {adherence: {max_decrease: 0.05}}\n"
        "    pairwise_loss_rate: {preference: {max: 0.05}}\n"
    )
    return policy(base, candidate, gates=gates, judged=True, extra=preflight_section + extra)


def state(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/admin/routes/chat", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    return response.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize(("quality", "phase"), [(0.4, "rolled_back"), (1.0, "progressing")])
def test_the_rollout_starts_with_pre_flight_and_moves_by_its_verdict(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, tmp_path: Path, quality: float, phase: str
) -> None:
    base, candidate = sims
    candidate.set_knobs(quality=quality)
    dataset = write(tmp_path / "set.jsonl", [marked(i) for i in range(120)])
    gw = make_gateway({"chat": rollout_policy(base, candidate, dataset)}, admin_token=TOKEN)
    assert state(gw.url)["phase"] == "preflight"
    wait_for(lambda: state(gw.url)["phase"] != "preflight", timeout=60, message="the end of pre-flight")
    view = state(gw.url)
    assert view["phase"] == phase, view
    moved = view["history"][0]
    assert moved["by"] == "controller" and "pre-flight" in moved["reason"], moved
    assert moved["gates"] and all(g["n_base"] >= 20 for g in moved["gates"] if g["cohort"] == "all")
    # Nothing reached a user from the candidate while it was judged, nor any shadow call.
    assert not [r for r in candidate.requests() if r.get("headers", {}).get("x-canarygate-mirror")]
    status = canarygate("status", "chat", "--url", gw.url, env={"CANARYGATE_ADMIN_TOKEN": TOKEN})
    assert "pre-flight" in status.stdout, status.stdout
    compare = canarygate("compare", "chat", "--url", gw.url, env={"CANARYGATE_ADMIN_TOKEN": TOKEN})
    assert compare.returncode == 0, compare.stderr
    if phase == "rolled_back":  # the verdicts it was decided on
        assert "on these verdicts: pre-flight fail" in compare.stdout, compare.stdout
        assert "pairwise_loss_rate:preference" in compare.stdout


def test_an_undecided_pre_flight_holds_and_says_what_would_decide(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    base, candidate = sims
    dataset = write(tmp_path / "set.jsonl", [marked(i) for i in range(20)])
    gates = "{error_rate: {max_increase: 0.001}}"
    extra = f"  preflight: {{dataset: {dataset}, min_samples: 10, gates: {gates}}}\n"
    text = policy(base, candidate, gates="    error_rate: {max_increase: 0.05}\n", extra=extra)
    gw = make_gateway({"chat": text}, admin_token=TOKEN)
    wait_for(lambda: state(gw.url)["version"] > 1, timeout=30, message="the pre-flight's verdict")
    view = state(gw.url)
    held = view["history"][0]
    assert view["phase"] == "preflight", view
    assert held["reason"].startswith("held in pre-flight: pre-flight undecided"), held
    assert "answers per arm would decide it (this run: 20)" in held["reason"]
    time.sleep(2)  # the controller ticks every second: a held verdict is not run (nor written) again
    assert state(gw.url)["version"] == view["version"]
    compare = canarygate("compare", "chat", "--url", gw.url, env={"CANARYGATE_ADMIN_TOKEN": TOKEN})
    assert compare.returncode == 0, compare.stderr
    assert "on these verdicts: held in pre-flight" in compare.stdout and "needs about" in compare.stdout


def test_a_recorded_pre_flight_moves_a_rollout_waiting_for_one(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    base, candidate = sims
    gw = make_gateway({"chat": rollout_policy(base, candidate, None)}, admin_token=TOKEN)
    wait_for(lambda: "waiting for a recorded" in state(gw.url)["history"][0]["reason"], timeout=20)
    dataset = write(tmp_path / "set.jsonl", [marked(i) for i in range(60)])
    env = {"CANARYGATE_ADMIN_TOKEN": TOKEN}
    prefix = tmp_path / "r"
    result = preflight(
        gw.policy_dir,
        dataset,
        "--record",
        "--admin-url",
        gw.url,
        "--report",
        str(prefix),
        "--min-samples",
        "20",
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    view = state(gw.url)
    assert view["phase"] == "progressing" and view["history"][0]["by"] == "admin"
    assert "recorded by admin: pre-flight pass" in view["history"][0]["reason"]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    bad = httpx.post(f"{gw.url}/admin/routes/chat/preflight", json={"verdict": "maybe"}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error", bad.text
    anonymous = httpx.post(f"{gw.url}/admin/routes/chat/preflight", json={"verdict": "pass"})
    assert anonymous.status_code == 401
    again = preflight(
        gw.policy_dir, dataset, "--record", "--admin-url", gw.url, "--report", str(prefix), env=env
    )
    assert again.returncode == 2 and "not in its pre-flight phase" in again.stderr


def test_a_policy_s_pre_flight_mistakes_are_named(tmp_path: Path, sims: tuple[Sim, Sim]) -> None:
    base, candidate = sims
    cases = {
        "    preflight: {dataset: x.jsonl, gates: {ttft_p50_ratio: {max: 2}}}\n": "cannot measure it",
        "    preflight: {dataset: x.jsonl, gates: {eval_score_decrease: {nope: {max_decrease: 0.1}}}}\n": (
            "'nope' is not an evaluator"
        ),
    }
    for extra, says in cases.items():
        policies = tmp_path / f"p{len(says)}"
        policies.mkdir()
        text = policy(
            base,
            candidate,
            gates="    error_rate: {max_increase: 0.05}\n",
            extra=extra.replace("    ", "  ", 1),
        )
        (policies / "chat.yaml").write_text(text)
        result = canarygate("check", str(policies))
        assert result.returncode == 2 and says in result.stdout, result.stdout
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    extra = "  preflight: {dataset: missing.jsonl}\n"
    (nowhere / "chat.yaml").write_text(
        policy(base, candidate, gates="    error_rate: {max_increase: 0.05}\n", extra=extra)
    )
    result = canarygate("check", str(nowhere))
    assert (
        result.returncode == 2
        and "rollout.preflight.dataset" in result.stdout
        and "no such file" in result.stdout
    )
    manual = tmp_path / "manual"
    manual.mkdir()
    text = policy_yaml("chat", base.url, candidate.url) + "  preflight: {dataset: x.jsonl}\n"
    (manual / "chat.yaml").write_text(text)
    result = canarygate("check", str(manual))
    assert result.returncode == 2 and "rollout.preflight.dataset: needs steps" in result.stdout, result.stdout
