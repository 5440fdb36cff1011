"""The Grafana dashboard and the alert rules, against a real Prometheus scraping a running gateway."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.app import create_app
from gateway.server import BackgroundServer
from gateway.settings import Settings
from tests.conftest import Sim, closed_port, policy_yaml, wait_for

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())
RULES = yaml.safe_load((MONITORING / "alerts.yaml").read_text())


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` installs Debian's prometheus package (apt-get)")
    return path


def panel_queries() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]


def readme_queries() -> list[str]:
    """The PromQL examples in the README: one per block of lines after a comment."""
    readme = (MONITORING.parent / "README.md").read_text()
    (block,) = re.findall(r"```promql\n(.*?)```", readme, re.S)
    queries, current = [], []
    for line in [*block.splitlines(), "# end"]:
        if line.startswith("#"):
            if current:
                queries.append("\n".join(current))
            current = []
        elif line.strip():
            current.append(line)
    return queries


def rules(kind: str) -> list[dict[str, Any]]:
    return [r for group in RULES["groups"] for r in group["rules"] if kind in r]


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", "alerts.yaml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yaml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    # every alert has a unit test in which it fires
    names = {
        t["alertname"]
        for case in yaml.safe_load((MONITORING / "alerts_test.yaml").read_text())["tests"]
        for t in case.get("alert_rule_test", [])
        if t["exp_alerts"]
    }
    assert names == {r["alert"] for r in rules("alert")}


def test_dashboard_json_is_generated_from_its_source() -> None:
    spec = importlib.util.spec_from_file_location("build_dashboard", MONITORING / "build_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == (MONITORING / "grafana-dashboard.json").read_text(), (
        "run python monitoring/build_dashboard.py"
    )


def test_dashboard_has_grafanas_structure() -> None:
    assert DASHBOARD["uid"] and DASHBOARD["title"] and isinstance(DASHBOARD["schemaVersion"], int)
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert (
        variables["route"]["type"] == "query" and variables["route"]["datasource"]["uid"] == "${datasource}"
    )
    assert "label_values(canarygate_requests_total, route)" in variables["route"]["definition"]
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        assert panel["type"] == "timeseries" and panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"]
        for target in panel["targets"]:
            assert target["refId"] and target["datasource"]["uid"] == "${datasource}"
            assert 'route=~"$route"' in target["expr"]
    titles = " ".join(p["title"] for p in DASHBOARD["panels"]).lower()
    for topic in (
        "requests",
        "error rate",
        "validation",
        "fallback",
        "latency",
        "time to first token",
        "tokens",
        "rollout weight",
        "circuit",
        "mirror",
        "per finished trace",
        "traces: failure rate",
    ):
        assert topic in titles


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        port = closed_port()
        shutil.copy(MONITORING / "alerts.yaml", tmp_path / "alerts.yaml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "alerts.yaml")],
            "scrape_configs": [{"job_name": "canarygate", "static_configs": [{"targets": [target]}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        processes.append(
            subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=20)


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert response["status"] == "success", (expr, response)
    return response["data"]["result"]  # type: ignore[no-any-return]


def test_every_panel_and_rule_against_a_real_prometheus(
    sims: tuple[Sim, Sim], prometheus: Any, tmp_path: Path
) -> None:
    base, candidate = sims
    directory = tmp_path / "policies"
    directory.mkdir()
    breaker = "fallback: {circuit_breaker: {window: 20, min_requests: 8, failure_rate: 0.5, open_s: 600}}"
    judged = (  # the base's simulator is the judge too; shadow pairs and the noise floor are judged
        "mirror: {percent: 100, noise_floor_percent: 100, sample_by: request}\n"
        f"evaluation:\n  judge: {{url: {base.url}, model: judge, price: {{input_per_million: 1, "
        "output_per_million: 2}}\n  evaluators:\n"
        "    - {name: adherence, kind: rubric, rubric: instruction_adherence}\n"
        "    - {name: preference, kind: pairwise}\n"
    )
    (directory / "chat.yaml").write_text(
        policy_yaml(
            "chat",
            base.url,
            candidate.url,
            weight=50,
            extra=f"{breaker}\n{judged}traces: {{idle_timeout_s: 1}}",
        )
    )
    automatic = "rollout: {steps: [50, 100], interval_s: 600, min_samples: 10}"  # judged, never moved
    (directory / "auto.yaml").write_text(
        policy_yaml("auto", base.url, candidate.url, extra=automatic).replace("rollout:\n  weight: 0\n", "")
    )
    # A rollout that starts with pre-flight on a held-out set of its own (it passes, then waits unmoved).
    (directory / "set.jsonl").write_text(
        "".join(f'{{"messages": [{{"role": "user", "content": "q{i}"}}]}}\n' for i in range(10))
    )
    preflight = (
        "rollout:\n  steps: [50, 100]\n  interval_s: 600\n  preflight:\n    dataset: set.jsonl\n"
        "    min_samples: 5\n    gates: {error_rate: {max_increase: 0.9}}\n"
    )
    (directory / "pre.yaml").write_text(
        policy_yaml("pre", base.url, candidate.url, extra=preflight).replace("rollout:\n  weight: 0\n", "")
    )
    app = create_app(Settings(policy_dir=directory, watch_policies=False))
    with BackgroundServer(app) as gateway:
        server = prometheus(f"127.0.0.1:{gateway.port}")
        wait_for(lambda: _ready(server), timeout=30, message="prometheus to scrape the gateway")

        def send(user: int, headers: dict[str, str] | None = None, **extra: Any) -> None:
            body = {
                "model": "chat",
                "messages": [{"role": "user", "content": "hi"}],
                "user": f"u{user}",
                **extra,
            }
            httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=10)

        for user in range(40):  # both arms answer, streams too; every fourth user's two calls are a trace
            send(user, stream=user % 4 == 0, stream_options={"include_usage": True})
            send(user, model="auto")  # the controller's gates get values
            if user % 4 == 1:
                for _ in range(2):
                    send(user, headers={"x-conversation-id": f"conversation-{user}"})
        time.sleep(2)
        candidate.set_knobs(invalid_json_rate=1)
        for user in range(40):  # the candidate's JSON breaks: validation failures and fallbacks
            send(user, response_format={"type": "json_object"})
        candidate.set_knobs(invalid_json_rate=0, error_rate=1)
        for user in range(40):  # then it fails outright, until its circuit opens
            send(user)
            if user % 4 == 1:  # the candidate's traces get failed steps (fallbacks)
                send(user, headers={"x-conversation-id": f"failing-{user}"})
        time.sleep(3)  # a few more scrapes and rule evaluations

        window = "1m"
        for expr in panel_queries():
            concrete = expr.replace("$route", ".*").replace("$cohort", ".*")
            concrete = concrete.replace("$__rate_interval", window)
            assert query(server, concrete), f"no series for panel query: {concrete}"
        examples = readme_queries()
        assert len(examples) == 6
        for expr in examples:
            assert query(server, expr), f"no series for the README's example: {expr}"
        for rule in rules("record"):
            assert query(server, rule["record"]), f"recording rule {rule['record']} produced nothing"
        fired = {
            "CanarygateCandidateErrorRateAboveBase",
            "CanarygateCandidateValidationFailures",
            "CanarygateFallbackRateHigh",
            "CanarygateCircuitOpen",
        }
        for rule in rules("alert"):
            result = query(server, rule["expr"])  # every alert expression parses ...
            if rule["alert"] in fired:  # ... and the ones this traffic trips have series (pending or firing)
                assert result, f"{rule['alert']} did not trip: {rule['expr']}"
        states = httpx.get(f"{server}/api/v1/rules").json()["data"]["groups"]
        unhealthy = [
            (r["name"], r.get("lastError")) for g in states for r in g["rules"] if r["health"] != "ok"
        ]
        assert unhealthy == []
        pending = {
            a["labels"]["alertname"] for a in httpx.get(f"{server}/api/v1/alerts").json()["data"]["alerts"]
        }
        assert fired <= pending


def _ready(server: str) -> bool:
    try:
        result = query(server, 'count_over_time(up{job="canarygate"}[1m]) >= 2 and up{job="canarygate"} == 1')
    except (httpx.TransportError, ValueError, AssertionError):
        return False
    return bool(result)
