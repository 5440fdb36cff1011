"""The evaluators as pure functions, their policy (each mistake named with its file, line and field),
the judge's prompts and verdicts, and the quality gates' statistics."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest

from gateway.analysis import ArmWindow, Paired, judge, loss_rate, score_decrease
from gateway.evaluation.checks import check, same_tools
from gateway.evaluation.evaluations import sampled
from gateway.evaluation.prompts import BadVerdict, pairwise_prompt, read, rubric_prompt, swapped
from gateway.loader import load_file
from gateway.policy import Evaluator, Gates

POLICY = """\
route: chat
arms:
  base: {url: http://base:8000/v1, model: m}
  candidate: {url: http://tuned:8000/v1, model: t}
mirror: {percent: 10}
evaluation:
  judge: {url: http://judge:8000/v1, model: j}
  evaluators:
    - {name: adherence, kind: rubric, rubric: instruction_adherence}
    - {name: preference, kind: pairwise}
rollout:
  steps: [10, 100]
  gates:
    eval_score_decrease: {adherence: {max_decrease: 0.05}}
    pairwise_loss_rate: {preference: {max: 0.05}}
"""


def answer(content: str | None = None, calls: list[str] | None = None, tokens: int = 5) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": "{}"}}
            for i, n in enumerate(calls)
        ]
    return {"id": "chatcmpl-1", "choices": [{"message": message}], "usage": {"completion_tokens": tokens}}


def evaluator(**fields: Any) -> Evaluator:
    return Evaluator(name="e", **fields)


@pytest.mark.parametrize(
    ("fields", "text", "score"),
    [
        ({"kind": "regex", "pattern": r"\border \d+"}, "your ORDER 1234 ships", 1.0),
        ({"kind": "regex", "pattern": r"\border \d+", "case_sensitive": True}, "ORDER 1234", 0.0),
        ({"kind": "regex", "pattern": "sorry", "expect": False}, "Sorry, I cannot", 0.0),
        ({"kind": "contains", "text": ["refund", "return"]}, "You can RETURN it", 1.0),
        ({"kind": "contains", "text": ["refund"], "expect": False}, "no word of it", 1.0),
        ({"kind": "max_length", "max_chars": 5}, "123456", 0.0),
        ({"kind": "max_length", "max_tokens": 5}, "whatever length", 1.0),
        ({"kind": "json_path", "path": "$.status", "equals": "ok"}, '{"status": "ok"}', 1.0),
        ({"kind": "json_path", "path": "$.items[0].id"}, '{"items": []}', 0.0),
        ({"kind": "json_path", "path": "$.status"}, "not json at all", 0.0),
    ],
)
def test_deterministic_checks(fields: dict[str, Any], text: str, score: float) -> None:
    result = check(evaluator(**fields), answer(text), {})
    assert result is not None
    assert result.score == score and result.label == ("pass" if score else "fail") and result.explanation


def test_tool_selection_against_the_expected_tool_or_the_base_s_choice() -> None:
    expected = evaluator(kind="tool_selection", expected_from="metadata:tool")
    payload = {"metadata": {"tool": "refund"}, "tools": [{}]}
    assert check(expected, answer(calls=["refund"]), payload).score == 1.0  # type: ignore[union-attr]
    assert check(expected, answer(calls=["lookup"]), payload).label == "incorrect"  # type: ignore[union-attr]
    assert check(expected, answer("words"), {"tools": [{}]}) is None  # nothing to compare with
    paired = evaluator(kind="tool_selection")
    assert paired.on_pairs and not expected.on_pairs
    assert same_tools(paired, payload, answer(calls=["a"]), answer(calls=["a"])).score == 1.0  # type: ignore[union-attr]
    assert same_tools(paired, payload, answer(calls=["a"]), answer("words")).score == 0.0  # type: ignore[union-attr]
    assert same_tools(paired, {}, answer("x"), answer("y")) is None  # no tools declared: no choice made


def test_a_regex_reads_a_bounded_part_of_a_huge_answer() -> None:
    result = check(evaluator(kind="contains", text=["needle"]), answer("x" * 10_000_000 + "needle"), {})
    assert result is not None and result.score == 0.0  # past MAX_TEXT: never read


def test_sampling_is_by_request_id_and_nested() -> None:
    ids = [f"req-{i}" for i in range(20_000)]
    half = {i for i in ids if sampled(i, 0.5)}
    tenth = {i for i in ids if sampled(i, 0.1)}
    assert abs(len(half) / len(ids) - 0.5) < 0.02 and abs(len(tenth) / len(ids) - 0.1) < 0.01
    assert tenth <= half  # a smaller rate takes a subset: every evaluator sees the same requests
    assert all(sampled(i, 1.0) for i in ids[:10])


def test_judge_prompts_put_the_answers_in_tags_and_verdicts_must_match_the_schema() -> None:
    payload = {"messages": [{"role": "user", "content": "x" * 50_000}], "tools": [{"type": "function"}]}
    body = rubric_prompt("task_completion", payload, answer("y" * 50_000), 1000)
    user = body["messages"][1]["content"]
    assert "<request>" in user and "<answer>" in user and "more characters not shown" in user
    assert len(user) < 4000  # the request and the answer are cut to the judge's bound
    assert body["response_format"]["json_schema"]["name"] == "canarygate_rubric"
    assert body["temperature"] == 0
    pair = pairwise_prompt(None, payload, answer("first"), answer("second"), 1000)["messages"][1]["content"]
    assert pair.index("first") < pair.index("<answer_b>") < pair.index("second")

    def verdict(content: str, schema: str = "canarygate_rubric") -> Any:
        return read(answer(content), schema)

    assert verdict('{"reason": "ok", "score": 5}').score == 1.0
    assert verdict('```json\n{"reason": "meh", "score": 3}\n```').score == 0.5  # a fenced verdict is read
    assert verdict('{"reason": "b", "winner": "B"}', "canarygate_pairwise").winner == "B"
    for bad in (
        '{"score": 9, "reason": ""}',
        '{"reason": "x"}',
        "I like it",
        '{"reason": "x", "score": 2.5}',
    ):
        with pytest.raises(BadVerdict):
            verdict(bad)


@pytest.mark.parametrize(
    ("base_first", "candidate_first", "expected"),
    [
        ("B", "A", ("win", -1.0, False)),  # the candidate preferred in both orders
        ("A", "B", ("loss", 1.0, False)),  # the base preferred in both orders
        ("A", "A", ("tie", 0.0, True)),  # the first answer always: the position decided
        ("B", "B", ("tie", 0.0, True)),  # the second answer always
        ("tie", "tie", ("tie", 0.0, False)),
        ("B", "tie", ("tie", 0.0, False)),  # one order undecided: no verdict survives the swap
        ("tie", "B", ("tie", 0.0, False)),
    ],
)
def test_a_pair_s_verdict_must_survive_the_order_swap(
    base_first: str, candidate_first: str, expected: tuple[str, float, bool]
) -> None:
    assert swapped(base_first, candidate_first) == expected


def test_the_example_policy_with_evaluation_loads(tmp_path: Path) -> None:
    path = tmp_path / "chat.yaml"
    path.write_text(POLICY)
    policy, problems = load_file(path)
    assert problems == []
    assert policy is not None
    assert [n for n, _ in policy.rollout.gates.configured()] == [
        "eval_score_decrease:adherence",
        "pairwise_loss_rate:preference",
    ]


@pytest.mark.parametrize(
    ("old", "new", "where", "fragment"),
    [
        ("  judge: {url: http://judge:8000/v1, model: j}\n", "", "evaluation", "set evaluation.judge"),
        (
            "kind: rubric, rubric: instruction_adherence",
            "kind: rubric",
            "evaluation.evaluators[0]",
            "needs rubric",
        ),
        ("name: adherence,", "name: Adherence,", "evaluation.evaluators[0].name", "not an evaluator name"),
        ("{adherence: {max_decrease", "{nope: {max_decrease", "", "'nope' is not an evaluator"),
        ("pairwise_loss_rate: {preference", "pairwise_loss_rate: {adherence", "", "use eval_score_decrease"),
        ("mirror: {percent: 10}", "mirror: {percent: 0}", "", "set mirror.percent above 0"),
        ("kind: pairwise}", "kind: pairwise, arms: [base]}", "evaluation.evaluators[1]", "drop arms"),
        ("kind: pairwise}", "kind: regex, pattern: '('}", "evaluation.evaluators[1]", "does not compile"),
        ("kind: pairwise}", "kind: json_path, path: '$.['}", "evaluation.evaluators[1]", "path:"),
        ("kind: pairwise}", "kind: max_length}", "evaluation.evaluators[1]", "max_chars or max_tokens"),
        (
            "kind: pairwise}",
            "kind: contains, text: [a], pattern: b}",
            "evaluation.evaluators[1]",
            "does not take",
        ),
        (
            "model: j}",
            "model: j, timeouts: {connect_s: 9, total_s: 1}}",
            "evaluation.judge.timeouts",
            "exceed",
        ),
        ("model: j}", "model: j, url: ftp://x}", "", "mapping"),
    ],
)
def test_evaluation_mistakes_are_named(tmp_path: Path, old: str, new: str, where: str, fragment: str) -> None:
    assert old in POLICY
    path = tmp_path / "chat.yaml"
    path.write_text(POLICY.replace(old, new))
    _, problems = load_file(path)
    assert problems, "expected a problem"
    problem = problems[0]
    assert fragment in problem.message, problem
    assert problem.path.startswith(where), problem
    assert problem.line > 0


def window(evaluator: str, values: list[float]) -> ArmWindow:
    w = ArmWindow()
    for v in values:
        w.score(evaluator, v)
    return w


def test_score_decrease_passes_equal_arms_and_fails_a_clearly_worse_candidate() -> None:
    rng = random.Random(7)
    kw: dict[str, Any] = {"alpha": 0.01, "n_star": 1000, "min_samples": 100}

    def arm(p: float, n: int) -> tuple[float, float, float]:
        values = [1.0 if rng.random() < p else 0.0 for _ in range(n)]
        return sum(values), sum(v * v for v in values), float(n)

    same = score_decrease("g", [(arm(0.9, 2000), arm(0.9, 2000))], 0.05, **kw)
    assert same.result == "pass" and abs(same.value) < 0.03  # type: ignore[arg-type]
    worse = score_decrease("g", [(arm(0.9, 2000), arm(0.7, 2000))], 0.05, **kw)
    assert worse.result == "fail" and worse.low > 0.05  # type: ignore[operator]
    few = score_decrease("g", [(arm(0.9, 50), arm(0.7, 50))], 0.05, **kw)
    assert few.result == "wait" and few.needs is None  # judge() fills in needs
    nothing = score_decrease("g", [((0, 0, 0), arm(0.5, 10))], 0.05, **kw)
    assert nothing.result == "wait" and nothing.value is None


def test_loss_rate_reads_wins_ties_and_losses() -> None:
    kw: dict[str, Any] = {"alpha": 0.01, "n_star": 1000, "min_samples": 50}
    # 120 losses, 40 wins, 240 ties: losses - wins = 20%
    verdict = loss_rate("p", (80.0, 160.0, 400.0), 0.05, **kw)
    assert verdict.result == "fail" and math.isclose(verdict.value, 0.2)  # type: ignore[arg-type]
    assert "120 losses, 40 wins, 240 ties in 400 judged pairs" in verdict.reason
    even = loss_rate("p", (0.0, 40.0, 400.0), 0.05, **kw)
    assert even.result == "pass"
    assert loss_rate("p", (0.0, 0.0, 0.0), 0.05, **kw).result == "wait"


def test_judge_reads_quality_gates_from_the_pairs_windows_in_every_phase() -> None:
    gates = Gates.model_validate(
        {
            "pairwise_loss_rate": {"pref": {"max": 0.05, "min_samples": 20}},
            "eval_score_decrease": {"tools": {"max_decrease": 0.05, "min_samples": 20}},
        }
    )
    base, candidate = ArmWindow(), ArmWindow()  # the live arms: no pair results in them
    noise = window("tools", [1.0] * 100)  # the base agrees with itself...
    shadow = window("tools", [1.0] * 50 + [0.0] * 50)  # ...the candidate with the base half the time
    shadow.merge(window("pref", [1.0] * 40 + [0.0] * 60))
    paired = Paired([(noise, shadow)], None, frozenset({"pref", "tools"}))
    verdicts = {
        v.gate: v for v in judge(gates, [(base, candidate)], confidence=0.99, min_samples=500, paired=paired)
    }
    assert verdicts["pairwise_loss_rate:pref"].result == "fail"
    assert verdicts["eval_score_decrease:tools"].result == "fail"
    assert math.isclose(verdicts["eval_score_decrease:tools"].value, 0.5)  # type: ignore[arg-type]
    waiting = judge(gates, [(base, candidate)], confidence=0.99, min_samples=500)
    assert all(v.result == "wait" for v in waiting)
