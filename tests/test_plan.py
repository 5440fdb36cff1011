"""canarygate plan: the rollout walked by the controller's own code on expected statistics, before it
starts; and the command a user runs, with its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.plan import Traffic, regression_of, walk
from gateway.policy import DEFAULT_GATES, Gates, RateGate, RatioGate, Rollout

STEPS = [1, 5, 25, 50, 100]


def test_an_identical_candidate_is_promoted_after_every_step_and_the_last_one_takes_longest() -> None:
    rollout = Rollout(steps=STEPS, min_samples=500)
    course = walk(rollout, Traffic(10_000))
    assert course.outcome == "promoted" and "after 4 steps" in course.reason
    # Non-inferiority at the last step: well past the four intervals that min_samples alone would take.
    assert 10 < course.intervals < 60
    assert max(course.holding, key=course.holding.__getitem__) == "validation_failure_rate"
    # Less traffic per interval: more intervals, never fewer.
    slower = walk(rollout, Traffic(2_000))
    assert slower.outcome == "promoted" and slower.intervals > course.intervals


def test_a_worse_candidate_is_rolled_back_and_a_larger_regression_sooner() -> None:
    rollout = Rollout(steps=STEPS, min_samples=500)
    traffic = Traffic(10_000)
    courses = [walk(rollout, traffic, {"validation_failure_rate": size}) for size in (0.004, 0.01, 0.03)]
    assert [c.outcome for c in courses] == ["rolled_back"] * 3
    assert courses[0].candidate_requests > courses[1].candidate_requests > courses[2].candidate_requests
    assert "validation_failure_rate" in courses[0].reason
    slow = walk(rollout, traffic, {"latency_p99_ratio": 1.5})
    assert slow.outcome == "rolled_back" and "latency_p99_ratio" in slow.reason
    # Within the threshold (+0.1 point against +0.2): promoted, later than an identical one.
    within = walk(rollout, traffic, {"validation_failure_rate": 0.001})
    assert within.outcome == "promoted" and within.intervals > walk(rollout, traffic).intervals


def test_the_mirror_only_phase_and_a_hold_on_fail() -> None:
    gates = Gates(validation_failure_rate=RateGate(max_increase=0.002), latency_p99_ratio=RatioGate(max=1.2))
    shadow = Rollout(steps=STEPS, shadow_first=True, gates=gates, on_fail="hold")
    course = walk(shadow, Traffic(10_000, mirror_percent=20), {"validation_failure_rate": 0.02})
    assert course.outcome == "held"  # a non-critical failure under on_fail: hold never rolls back
    assert walk(shadow, Traffic(10_000, mirror_percent=20)).outcome == "promoted"


def test_trace_gates_are_planned_per_trace_and_left_to_users_traffic_in_the_mirror_only_phase() -> None:
    gates = Gates(
        steps_per_trace_ratio=RatioGate(max=1.1, min_samples=100),
        trace_failure_rate=RateGate(max_increase=0.02),
    )
    rollout = Rollout(steps=STEPS, shadow_first=True, gates=gates)
    traffic = Traffic(10_000, mirror_percent=20, steps_per_trace=4)
    identical = walk(rollout, traffic)
    assert identical.outcome == "promoted"  # the mirror-only phase did not wait for traces it cannot see
    longer = walk(rollout, traffic, {"steps_per_trace_ratio": 1.3})
    assert longer.outcome == "rolled_back" and "steps_per_trace_ratio" in longer.reason
    failing = walk(rollout, traffic, {"trace_failure_rate": 0.1})
    assert failing.outcome == "rolled_back" and "trace_failure_rate" in failing.reason
    # Fewer steps per trace: more traces for the same requests, decided sooner.
    assert walk(rollout, replace(traffic, steps_per_trace=2), {"steps_per_trace_ratio": 1.3}).intervals <= (
        longer.intervals
    )


def test_default_regressions_are_twice_each_gate_s_margin() -> None:
    assert regression_of(DEFAULT_GATES, "validation_failure_rate") == pytest.approx(0.004)
    assert regression_of(DEFAULT_GATES, "latency_p99_ratio") == pytest.approx(1.4)
    with pytest.raises(ValueError, match="not configured"):
        regression_of(DEFAULT_GATES, "ttft_p50_ratio")


POLICY = """
route: digest
arms:
  base: {url: http://127.0.0.1:9/v1, model: base-model}
  candidate: {url: http://127.0.0.1:9/v1, model: tuned-model}
rollout:
  steps: [1, 5, 25, 50, 100]
  interval_s: 300
  min_samples: 500
"""


def plan(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "plan", *args, "--policies", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_plan_command_reads_the_route_s_policy_and_refuses_what_it_cannot_plan(tmp_path: Path) -> None:
    (tmp_path / "digest.yaml").write_text(POLICY)
    (tmp_path / "manual.yaml").write_text(
        POLICY.replace("route: digest", "route: manual").split("rollout:")[0] + "rollout: {weight: 5}\n"
    )
    shown = plan(tmp_path, "digest", "--requests", "10000")
    assert shown.returncode == 0, shown.stderr
    assert "an identical candidate: promoted after" in shown.stdout
    assert "validation_failure_rate +0.40 pts   rolled back" in shown.stdout
    assert "latency_p99_ratio x1.4" in shown.stdout and "min)" in shown.stdout
    answer = json.loads(
        plan(tmp_path, "digest", "--requests", "10000", "--json", "--worse", "error_rate=0.02").stdout
    )
    assert answer["identical"]["outcome"] == "promoted"
    assert [(w["gate"], w["outcome"]) for w in answer["worse"]] == [("error_rate", "rolled_back")]
    for args, message in (
        (("nope", "--requests", "10"), "no route 'nope'"),
        (("manual", "--requests", "10"), "has no automatic rollout"),
        (("digest", "--requests", "0"), "--requests must be a number of requests per interval in [1, 1e+09]"),
        (("digest", "--requests", "10", "--worse", "ttft_p50_ratio=1.2"), "GATE one of error_rate"),
        (("digest", "--requests", "10", "--worse", "error_rate=lots"), "give GATE=SIZE"),
        (("digest", "--requests", "nan"), "--requests must be a number of requests per interval"),
        (("digest", "--requests", "10", "--latency-p50", "0"), "--latency-p50 must be seconds"),
        (("digest", "--requests", "10", "--latency-sigma", "0"), "--latency-sigma must be"),
        (("digest", "--requests", "10", "--error-rate", "-1"), "--error-rate must be a fraction"),
        (("digest", "--requests", "10", "--validation-failure-rate", "1.5"), "must be a fraction"),
        (("digest", "--requests", "10", "--worse", "latency_p99_ratio=0"), "must be a factor in (0, 100]"),
        (("digest", "--requests", "10", "--worse", "error_rate=2"), "must be a fraction in [0, 1)"),
    ):
        refused = plan(tmp_path, *args)
        assert refused.returncode == 2 and message in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr
