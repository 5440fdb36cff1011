"""`canarygate demo`, the quick start's first command: every scenario, shortened, as CI runs it (no TTY:
plain lines, exit 0 only when the scenario's expected outcome happened)."""

from __future__ import annotations

import io
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from gateway.demo import Seen, Snapshot, Traffic, render
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
    # The gateway's log, at INFO, in a file of this run's own, named at the end: the rollback is in it.
    (named,) = re.findall(r"the gateway's log: (\S+)", out)
    log = Path(named)
    assert log.name.startswith(f"canarygate-demo-{scenario}-"), named
    text = log.read_text()
    log.unlink()
    assert re.search(r"INFO gateway route=assistant rollout state v\d+: rolled_back", text), text


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
    """In an 80x40 terminal (rich reads COLUMNS and LINES): the compact layout, nothing cut, and the gate
    that rolled the candidate back reads `fail`."""
    result = canarygate(
        "demo", "--port", "0", "--scenario", "flaky", "--live", *SHORT,
        env={"COLUMNS": "80", "LINES": "40"}, timeout=240,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    frame = out[: out.index("verdict:")].rstrip().splitlines()
    panel = frame[frame.index(next(line for line in frame if "canarygate demo: flaky" in line)) :]
    assert len(panel) <= 40 and max(len(line) for line in panel) <= 80, "\n".join(panel)
    assert "…" not in "\n".join(panel)
    for part in ("what users were served", "gates: candidate vs base", "controller", "latency above"):
        assert part in out, part
    assert re.search(r"error_rate ! +fail ", out), "\n".join(panel)


# --- the live view, drawn from a snapshot at two terminal sizes -------------------------------------


def _gate(name: str, result: str, value: float | None, threshold: float, critical: bool = False) -> dict:
    return {
        "gate": name, "result": result, "value": value, "threshold": threshold, "critical": critical,
        "n_base": 812, "n_candidate": 12345, "cohort": "all", "low": None, "high": None,
        "reason": f"{name}: its value vs the base's over the same intervals, allowed {threshold}",
    }  # fmt: skip


def _snapshot(history_reason: str) -> Snapshot:
    """A rollout rolled back on a critical gate, with everything the view can show at once: eight gates
    (two with long names), fallbacks, mirror agreement, validation failures of both kinds, client errors,
    and a history of five moves."""
    traffic = Traffic()
    now = time.monotonic()
    for i in range(400):
        traffic.seen.append(Seen(now - i * 0.01, "base", 0.383, 0.29 if i % 3 == 0 else None, None))
        traffic.total["base"] += 1
    for i in range(40):
        traffic.seen.append(Seen(now - i * 0.1, "candidate", 12.345, 11.111, "json_parse"))
        traffic.total["candidate"] += 1
    traffic.total["error"] = 2
    traffic.failures.append("APIConnectionError: Connection error. " * 4)
    gates = [
        _gate("error_rate", "pass", 0.0, 0.01, critical=True),
        _gate("validation_failure_rate", "fail", 0.0773, 0.01, critical=True),
        _gate("latency_p99_ratio", "pass", 0.64, 2.0),
        _gate("ttft_p50_ratio", "wait", 1.7, 1.6),
        _gate("steps_per_trace_ratio", "wait", None, 1.3),
        _gate("trace_failure_rate", "wait", None, 0.1),
        _gate("eval_score_decrease:expected_contains", "pass", 0.01, 0.05),
        _gate("pairwise_loss_rate:preference", "pass", 0.02, 0.05),
    ]
    analysis = {
        "gates": gates,
        "window": {"base": {"error_rate": 0.0}, "candidate": {"error_rate": 0.0893}},
        "decided": {"at": 1.0, "by": "controller", "phase": "rolled_back", "reason": history_reason},
    }
    moves = [
        ("rolled_back", 0, history_reason),
        ("progressing", 30, "step 2 of 4: every gate passed on 812 base and 790 candidate answers"),
        ("progressing", 10, "step 1 of 4: every gate passed"),
        ("shadow", 0, "pre-flight pass on 400 answers of heldout.jsonl"),
        ("preflight", 0, "policy loaded"),
    ]
    history = [{"phase": p, "weight": w, "step": -1, "reason": r} for p, w, r in moves]
    validation = {
        ("candidate", "primary"): Counter(json_parse=23, json_schema=4),
        ("candidate", "mirror"): Counter(tool_unknown=7),
    }
    agreement = {"json_valid": (73.0, 100.0), "tool_args": (2.0, 100.0), "finish_reason": (0.0, 0.0)}
    rollout = {"phase": "rolled_back", "weight": 0, "step": -1, "history": history}
    return Snapshot(
        57.4, rollout, analysis, validation, Counter(json_parse=20, http_5xx=3), agreement, traffic
    )


def _drawn(snap: Snapshot, width: int, height: int) -> list[str]:
    console = Console(width=width, height=height, record=True, file=io.StringIO())
    console.print(render(snap, "canarygate demo: bad-json", width, height))
    return console.export_text().rstrip("\n").splitlines()


FAILED = "gate failed: validation_failure_rate 7.74% vs base 0.01% over the same intervals, allowed +1.00%"


@pytest.mark.parametrize(("width", "height"), [(80, 40), (170, 60)])
def test_the_live_view_fits_its_terminal_and_cuts_no_column(width: int, height: int) -> None:
    lines = _drawn(_snapshot(FAILED), width, height)
    text = "\n".join(lines)
    assert len(lines) <= height and max(map(len, lines)) <= width, text
    assert "…" not in text  # rich's ellipsis: a cell cut short
    for cell in ("candidate", "json_parse 23", "eval_score_decrease:", "pairwise_loss_rate:preference"):
        assert cell in text, cell
    assert re.search(r"validation_failure_rate[ !(critical)]+[│ ]+fail ", text), text  # it failed: it says so
    assert FAILED.split(":")[1].split()[0] in text  # the controller's newest move
    assert "as the controller decided" in text
    assert "latency above: as the" in text  # the legend on the two latencies
    assert "mirror agreement (shadow vs base answer): json_valid 73%, tool_args 2%" in text
    assert "finish_reason" not in text  # nothing compared yet: not shown as 0%
    assert ("12345 / 12345" not in text) and "812 / 12345" in text
    if width == 80:
        assert "! critical gate" in text and "fallbacks to base: 23" in text
        assert "validation failures: candidate json_parse 23, tool_unknown 7, json_schema 4" in text


def test_a_long_decision_stays_whole_on_a_small_terminal() -> None:
    """What does not fit goes, older moves first: the move that says why the rollout stands where it
    does stays whole, and the view still fits."""
    reason = (
        FAILED + "; " + "; ".join(f"gate_{i} failed by a wide margin over six intervals" for i in range(6))
    )
    lines = _drawn(_snapshot(reason), 80, 40)
    text = " ".join(line.strip("│ ") for line in lines)
    assert len(lines) <= 40, "\n".join(lines)
    assert "gate_5 failed by a wide margin" in text
    assert "policy loaded" not in text  # the oldest move gave way


def test_the_first_snapshot_draws_without_an_analysis() -> None:
    snap = Snapshot(
        0.5, {"phase": "preflight", "weight": 0, "history": []}, None, {}, Counter(), {}, Traffic()
    )
    for width, height in ((80, 40), (170, 60)):
        text = "\n".join(_drawn(snap, width, height))
        assert "preflight" in text and "mirror agreement" not in text


def test_no_decision_in_time_exits_1() -> None:
    code, out = demo("--scenario", "healthy", "--duration", "2", "--users", "5")
    assert code == 1, out
    assert "verdict: no decision after" in out and "NOT as expected" in out
