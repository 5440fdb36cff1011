"""The CLI as users run it: check, serve (one and several workers), reload on SIGHUP and on file change."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, GatewayFactory, Sim, closed_port, policy_yaml, up, wait_for

ADMIN = {"Authorization": "Bearer t"}


def canarygate(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def test_check_accepts_the_example_policies() -> None:
    result = canarygate("check", "policies")
    assert result.returncode == 0, result.stderr
    assert "support-assistant" in result.stdout and "20%" in result.stdout


def test_check_reports_file_line_field_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "route: r\narms:\n  base: {url: http://b/v1, model: m}\nrollout: {wieght: 5}\n"
    )
    result = canarygate("check", str(tmp_path))
    assert result.returncode == 2
    assert (
        f"{tmp_path / 'bad.yaml'}:4: rollout.wieght: is not a known field; did you mean 'weight'?"
        in result.stdout
    )


def test_check_warns_about_unset_secrets_unless_strict(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "route: r\narms:\n  base: {url: http://b/v1, model: m, api_key_env: NOPE_KEY}\n"
    )
    relaxed = canarygate("check", str(tmp_path))
    assert relaxed.returncode == 0 and "NOPE_KEY is not set (warning)" in relaxed.stdout
    assert canarygate("check", "--strict", str(tmp_path)).returncode == 2


def test_serve_refuses_an_invalid_policy(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("route: r\narms: {}\n")
    result = canarygate("serve", "--policies", str(tmp_path), "--port", str(closed_port()))
    assert result.returncode == 2
    assert "arms.base: is required but missing" in result.stderr
    assert "not serving" in result.stderr


def route_a_dir(tmp_path: Path, sim: Sim) -> Path:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "a.yaml").write_text(policy_yaml("route-a", sim.url))
    return policies


def model_ids(url: str) -> list[str]:
    return sorted(m["id"] for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"])


def test_sighup_reloads_and_keeps_the_last_good_policy(
    sims: tuple[Sim, Sim],
    serve,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    policies = route_a_dir(tmp_path, sims[0])
    process, url = serve(policies, env={"CANARYGATE_WATCH_POLICIES": "false", "CANARYGATE_ADMIN_TOKEN": "t"})
    chat = {"model": "route-a", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat).status_code == 200

    (policies / "b.yaml").write_text(policy_yaml("route-b", sims[0].url))
    process.send_signal(signal.SIGHUP)
    wait_for(lambda: model_ids(url) == ["route-a", "route-b"], message="route-b after SIGHUP")

    (policies / "b.yaml").write_text("route: route-b\narms:\n  base: {url: http://x/v1}\n")
    process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: bool(httpx.get(f"{url}/readyz", headers=ADMIN).json()["policies"]["last_reload_errors"]),
        message="the rejected reload to show in /readyz",
    )
    assert model_ids(url) == ["route-a", "route-b"]  # the last good policies keep serving
    assert httpx.post(f"{url}/v1/chat/completions", json=chat).status_code == 200
    log = Path(process.log.name).read_text()  # type: ignore[attr-defined]
    assert "policy reload rejected, keeping the previous policies" in log
    assert "b.yaml:3: arms.base.model: is required but missing" in log


def test_several_workers_serve_and_all_reload(
    sims: tuple[Sim, Sim],
    serve,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    policies = route_a_dir(tmp_path, sims[0])
    process, url = serve(policies, "--workers", "2", env={"CANARYGATE_WATCH_POLICIES": "false"})
    chat = {"model": "route-a", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as client:
        assert all(client.post(f"{url}/v1/chat/completions", json=chat).status_code == 200 for _ in range(20))
    (policies / "b.yaml").write_text(policy_yaml("route-b", sims[0].url))
    process.send_signal(signal.SIGHUP)

    def every_worker_reloaded() -> bool:
        # New connections land on either worker; 20 fresh ones in a row all seeing route-b means both have it.
        return all(model_ids(url) == ["route-a", "route-b"] for _ in range(20))

    wait_for(every_worker_reloaded, message="both workers to reload")
    assert process.poll() is None


def test_policy_file_change_is_picked_up(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    base, candidate = sims
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, weight=0)}, watch_policies=True)
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "user": "alice"}

    def arm() -> str:
        return gw.post("/v1/chat/completions", json=body).headers["x-canarygate-arm"]

    assert arm() == "base"
    (gw.policy_dir / "chat.yaml").write_text(policy_yaml("chat", base.url, candidate.url, weight=100))
    wait_for(lambda: arm() == "candidate", message="weight 100 to apply")
    (gw.policy_dir / "chat.yaml").write_text("route: chat\narms: nonsense\n")
    wait_for(lambda: bool(gw.app.services.routes.last_problems), message="the bad file to be seen")
    assert arm() == "candidate"


def test_the_watcher_follows_a_policy_directory_deleted_and_created_again(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    base, candidate = sims
    gw = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, weight=0)}, watch_policies=True)
    shutil.rmtree(gw.policy_dir)
    wait_for(lambda: bool(gw.app.services.routes.last_problems), message="the missing directory to be seen")
    assert model_ids(gw.url) == ["chat"]  # the last good policies keep serving
    gw.policy_dir.mkdir()
    (gw.policy_dir / "other.yaml").write_text(policy_yaml("other", base.url))
    wait_for(lambda: model_ids(gw.url) == ["other"], message="the new directory's policies")
    (gw.policy_dir / "more.yaml").write_text(policy_yaml("more", base.url))  # and it is watched
    wait_for(lambda: model_ids(gw.url) == ["more", "other"], message="a file added to the new directory")


def test_readyz_reports_each_upstream(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url, dead)}, admin_token="t")
    anonymous = httpx.get(f"{gw.url}/readyz")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}  # no detail to strangers
    response = httpx.get(f"{gw.url}/readyz", headers=ADMIN)
    assert response.status_code == 200  # a dead candidate must not take the gateway out of service
    body = response.json()
    assert body["status"] == "degraded"
    assert body["routes"]["chat"]["base"]["ok"] is True
    assert body["routes"]["chat"]["base"]["status"] == "unlisted"  # the simulator lists no models
    assert body["routes"]["chat"]["candidate"] == {
        "model": "tuned-model",
        "ok": False,
        "status": "unreachable",
        "detail": "could not connect to the candidate upstream: connection refused",
    }


def test_healthcheck_and_serve_take_host_and_port_from_the_environment(
    sims: tuple[Sim, Sim], tmp_path: Path
) -> None:
    (tmp_path / "chat.yaml").write_text(policy_yaml("chat", sims[0].url, None))
    port = closed_port()
    env = {"CANARYGATE_PORT": str(port), "CANARYGATE_HOST": "127.0.0.1"}
    down = canarygate("healthcheck", env=env)
    assert down.returncode == 1 and f"127.0.0.1:{port}/healthz" in down.stderr
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--policies", str(tmp_path)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: canarygate("healthcheck", env=env).returncode == 0, timeout=30, message="healthy")
    finally:
        process.terminate()
        process.wait(timeout=20)
    bad = canarygate("healthcheck", env={"CANARYGATE_PORT": "http"})
    assert bad.returncode == 2 and "CANARYGATE_PORT: expected a port number, got 'http'" in bad.stderr


def test_simulate_serves_with_per_model_knobs() -> None:
    port = closed_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "simulate",
            "--port",
            str(port),
            "--output-tokens",
            "3",
            "--model",
            "broken:error_rate=1,error_status=503",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: up(f"{url}/health"), timeout=20, message="simulator to start")
        ok = httpx.post(
            f"{url}/v1/chat/completions", json={"model": "fine", "messages": [], "temperature": 0}
        )
        assert ok.json()["usage"]["completion_tokens"] == 3
        broken = httpx.post(f"{url}/v1/chat/completions", json={"model": "broken", "messages": []})
        assert broken.status_code == 503
        taken = canarygate("simulate", "--port", str(port))
        assert taken.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}" in taken.stderr
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_port_in_use_names_the_address(
    tmp_path: Path, sims: tuple[Sim, Sim], workers: str
) -> None:
    (tmp_path / "chat.yaml").write_text(policy_yaml("chat", sims[0].url, None))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = canarygate("serve", "--policies", str(tmp_path), "--port", str(port), "--workers", workers)
    assert result.returncode == 2, result.stderr
    assert f"canarygate: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "choose another port" in result.stderr and "Traceback" not in result.stderr


def test_serve_logs_json_lines_for_log_pipelines(
    sims: tuple[Sim, Sim],
    serve,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """Every line one JSON object, uvicorn's own lines too; a rollout move and a reload each a line."""
    policies = route_a_dir(tmp_path, sims[0])
    process, url = serve(
        policies,
        "--log-format",
        "json",
        env={"CANARYGATE_ADMIN_TOKEN": "t", "CANARYGATE_WATCH_POLICIES": "false"},
    )
    assert httpx.post(f"{url}/admin/routes/route-a/pause", headers=ADMIN, timeout=10).status_code == 200
    process.send_signal(signal.SIGHUP)
    log = Path(process.log.name)  # type: ignore[attr-defined]
    wait_for(lambda: "policies reloaded" in log.read_text(), message="the reload's line")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(set(line) >= {"time", "level", "logger", "message"} for line in lines), lines
    messages = [line["message"] for line in lines]
    assert any(m.startswith("listening on http://127.0.0.1:") for m in messages), messages
    assert any(line["logger"] == "uvicorn.error" for line in lines)  # uvicorn's lines, in the same format
    assert any("route=route-a rollout state v2: paused" in m for m in messages), messages


def test_a_log_format_the_gateway_does_not_know_is_refused() -> None:
    result = canarygate("serve", env={"CANARYGATE_LOG_FORMAT": "yaml"})
    assert result.returncode == 2
    assert "CANARYGATE_LOG_FORMAT: expected one of text, json, got 'yaml'" in result.stderr


def test_check_takes_files_and_directories_and_tells_every_problem_at_once(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.yaml").write_text("route: a\narms:\n  base: {url: http://b/v1, model: m}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "route: b\narms:\n  base: {url: http://b/v1, model: m}\n  candidate: {url: http://c/v1, model: c}\n"
        "rollout:\n  weight: 10\n  steps: [50, 10]\nmirror: {percent: lots}\n"
    )
    again = tmp_path / "again.yml"
    again.write_text("# route a, a second time\nroute: a\narms:\n  base: {url: http://b/v1, model: m}\n")
    one = canarygate("check", str(good / "a.yaml"))
    assert one.returncode == 0 and "ok  a " in one.stdout, one.stdout + one.stderr
    every = canarygate("check", str(good), str(broken), str(again), str(tmp_path / "nowhere"))
    assert every.returncode == 2
    lines = every.stdout.splitlines()
    assert f"{tmp_path / 'nowhere'}: no such file or directory" in lines
    assert f"{broken}:7: rollout.steps: must increase step by step, got [50.0, 10.0]" in lines
    assert (
        f"{broken}:7: rollout.steps: set either weight (manual mode) or steps (automatic mode), not both"
        in lines
    )
    assert any(
        line.startswith(f"{broken}:8: mirror.percent: Input should be a valid number") for line in lines
    )
    assert f"{again}:2: route: 'a' is already defined in {good / 'a.yaml'}" in lines
    assert "ok  a " in every.stdout  # the good file is still said to be good
    assert "5 problem(s) in 3 file(s)" in every.stderr  # (the missing path counts as a file)
