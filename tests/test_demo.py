"""`canarygate demo`, the quick start's first command, on free ports so it cannot collide."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import closed_port
from tests.test_cli import REPO, canarygate


def test_demo_sends_traffic_and_reports_both_arms(tmp_path: Path) -> None:
    base_port, candidate_port = closed_port(), closed_port()
    for policy in (REPO / "policies").glob("*.yaml"):
        text = policy.read_text().replace("127.0.0.1:9001", f"127.0.0.1:{base_port}")
        (tmp_path / policy.name).write_text(text.replace("127.0.0.1:9002", f"127.0.0.1:{candidate_port}"))
    result = canarygate(
        "demo", "--policies", str(tmp_path), "--port", str(closed_port()), "--duration", "3", "--users", "12"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"simulated model server  http://127.0.0.1:{base_port}/v1" in result.stdout
    assert "(route, user) pairs stayed on one arm" in result.stdout
    assert "switched" not in result.stdout
    rows = {
        tuple(line.split()[:2])
        for line in result.stdout.splitlines()
        if line.startswith(("support", "embed"))
    }
    assert {("support-assistant", "base"), ("embed", "base")} <= rows
    assert "(failed)" not in result.stdout
