"""`canarygate demo`, the quick start's first command: every scenario, shortened, as CI runs it (no TTY:
plain lines, exit 0 only when the scenario's expected outcome happened)."""

from __future__ import annotations

import re

import pytest

from tests.test_cli import canarygate

SHORT = ["--interval", "2", "--duration", "150"]  # a busy machine decides later, not otherwise
# The demo may take its whole --duration and its start: pytest's own limit (120 s) must not cut it short
# first, or a busy machine fails a demo that would have passed (seen in a clean-clone run).
pytestmark = pytest.mark.timeout(300)


def demo(*args: str) -> tuple[int, str]:
    """The demo's own --duration decides when it gives up; the timeout only catches a demo that hangs."""
    # --port 0: the demo's gateway binds a free port itself (a port closed here and handed over could be
    # taken by then, by the demo's own simulators among others: seen in a clean-clone run)
    result = canarygate("demo", "--port", "0", *args, env={"COLUMNS": "200"}, timeout=240)
    return result.returncode, result.stdout + result.stderr


def test_healthy_candidate_is_promoted_step_by_step() -> None:
    code, out = demo("--scenario", "healthy", *SHORT)
    assert code == 0, out
    assert "expected: promoted" in out
    moves = re.findall(r"controller: (\w+) at (\d+)%", out)
    assert moves == [
        ("preflight", "0"),  # the policy's first phase: the held-out set
        ("shadow", "0"),
        ("progressing", "10"),
        ("progressing", "30"),
        ("progressing", "60"),
        ("promoted", "100"),  # reaching 100% is the promotion: no base left to compare with
    ], out
    assert "verdict: promoted after 3 steps" in out
    assert "as expected" in out and "0 client errors" in out
    assert re.search(r"gate latency_p99_ratio +pass", out)
    assert "canarygate compare assistant" in out  # where to look next


@pytest.mark.parametrize(
    ("scenario", "gate"),
    [
        ("bad-json", "validation_failure_rate"),
        ("wrong-tools", "validation_failure_rate"),
        ("flaky", "error_rate"),
        ("slow", "_ratio"),
        ("agent-loops", "steps_per_trace_ratio"),  # its agents' runs take more calls than the base's
        ("misconfigured", "error_rate"),  # its shadow calls all fail with a 404 the base does not give
    ],
)
def test_a_bad_candidate_is_rolled_back_before_users_notice(scenario: str, gate: str) -> None:
    code, out = demo("--scenario", scenario, *SHORT)
    assert code == 0, out
    assert "expected: rolled back" in out
    (verdict,) = re.findall(r"verdict: rolled back .*", out)
    assert gate in verdict, verdict
    assert "as expected" in out and "0 client errors" in out  # fallback answered every failed call


def test_only_the_judge_sees_the_subtle_candidate_and_it_never_reaches_a_user() -> None:
    """Caught by pre-flight: the judge and the held-out set's own expectations see what users would."""
    code, out = demo("--scenario", "subtle", *SHORT)
    assert code == 0, out
    (verdict,) = re.findall(r"verdict: rolled back .*", out)
    assert "in pre-flight, before any user or shadow call" in verdict, verdict
    assert "pairwise_loss_rate:preference" in verdict and "eval_score_decrease:adherence" in verdict
    for gate in ("error_rate", "validation_failure_rate", "latency_p99_ratio"):
        assert not re.search(rf"gate {gate} +fail", out), out  # format and operations see nothing wrong
    assert "and 0 by the candidate; 0 client errors" in out


def test_the_live_view_draws_arms_gates_and_the_controller() -> None:
    code, out = demo("--scenario", "flaky", "--live", *SHORT)
    assert code == 0, out
    for part in ("what users were served", "gates: candidate vs base", "controller", "error_rate (critical)"):
        assert part in out, part


def test_no_decision_in_time_exits_1() -> None:
    code, out = demo("--scenario", "healthy", "--duration", "2", "--users", "5")
    assert code == 1, out
    assert "verdict: no decision after" in out and "NOT as expected" in out
