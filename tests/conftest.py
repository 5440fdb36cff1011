"""Fixtures: simulated upstreams and gateways as real uvicorn servers on ephemeral loopback ports."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.loader import load_dir
from gateway.server import BackgroundServer
from gateway.settings import Settings
from gateway.simulator import Simulator

REPO = Path(__file__).resolve().parent.parent
BASE_MODEL = "base-model"
CANDIDATE_MODEL = "tuned-model"


@dataclass
class Sim:
    server: BackgroundServer
    simulator: Simulator

    @property
    def url(self) -> str:
        return f"{self.server.url}/v1"

    def set_knobs(self, **knobs: Any) -> None:
        httpx.put(f"{self.server.url}/sim/knobs", json={"default": knobs}).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.server.url}/sim/requests").json()  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.server.url}/sim/stats").json()  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def _sim_servers() -> Iterator[tuple[Sim, Sim]]:
    sims = []
    for _ in range(2):
        simulator = Simulator()
        sims.append(Sim(BackgroundServer(simulator.app()).start(), simulator))
    yield sims[0], sims[1]
    for sim in sims:
        sim.server.stop()


@pytest.fixture
def sims(_sim_servers: tuple[Sim, Sim]) -> tuple[Sim, Sim]:
    """(base, candidate) simulators, reset to default knobs for each test."""
    from gateway.synth import Knobs

    for sim in _sim_servers:
        sim.simulator.default = Knobs()
        sim.simulator.models.clear()
        sim.simulator.served_models = []
        sim.simulator.api_key = None
        sim.simulator.interrupt = False
        sim.simulator.uuid_request_ids = False
        httpx.post(f"{sim.server.url}/sim/reset").raise_for_status()
    return _sim_servers


def policy_yaml(
    route: str,
    base_url: str,
    candidate_url: str | None = None,
    *,
    weight: float = 0,
    extra: str = "",
    base_extra: str = "",
    candidate_extra: str = "",
) -> str:
    text = f"""
    route: {route}
    arms:
      base:
        url: {base_url}
        model: {BASE_MODEL}
    """
    text = textwrap.dedent(text)
    if base_extra:
        text += textwrap.indent(textwrap.dedent(base_extra).strip() + "\n", "    ")
    if candidate_url:
        text += f"  candidate:\n    url: {candidate_url}\n    model: {CANDIDATE_MODEL}\n"
        if candidate_extra:
            text += textwrap.indent(textwrap.dedent(candidate_extra).strip() + "\n", "    ")
    text += f"rollout:\n  weight: {weight}\n"
    if extra:
        text += textwrap.dedent(extra).strip() + "\n"
    return text


@dataclass
class Gateway:
    server: BackgroundServer
    policy_dir: Path
    app: Any

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, api_key: str = "unused", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=30, **kwargs)


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    started: list[Gateway] = []

    def make(policies: dict[str, str], registry: Any = None, **settings: Any) -> Gateway:
        policy_dir = tmp_path / f"policies-{len(started)}"
        policy_dir.mkdir()
        for name, text in policies.items():
            (policy_dir / f"{name}.yaml").write_text(text)
        settings.setdefault("watch_policies", False)
        problems = [str(p) for p in load_dir(policy_dir)[1] if p.severity == "error"]
        assert not problems, "\n".join(problems)
        config = Settings(policy_dir=policy_dir, **settings)
        app = create_app(config, registry=registry)
        server = BackgroundServer(app, head_timeout_s=config.client_timeout_s).start()
        gateway = Gateway(server, policy_dir, app)
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.server.stop()


REDIS_URL = os.environ.get("CANARYGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own; only its keys are deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"canarygate-test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    processes: list[subprocess.Popen[str]] = []

    def start(
        policy_dir: Path, *args: str, env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[str], str]:
        # --port 0: the gateway binds a free port itself and says which in its first line (a port chosen
        # here and closed could be taken before the gateway binds it)
        log = open(tmp_path / f"serve-{len(processes)}.log", "w+")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--policies", str(policy_dir), "--port", "0", *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        process.log = log  # type: ignore[attr-defined]
        processes.append(process)

        def listening() -> str | None:
            text = Path(log.name).read_text()
            assert process.poll() is None, text
            found = re.search(r"listening on (http://[0-9.]+:[0-9]+)", text)
            return found.group(1) if found else None

        wait_for(lambda: listening() is not None, timeout=30, message="gateway to listen")
        url = listening()
        assert url is not None

        def healthy() -> bool:
            assert process.poll() is None, Path(log.name).read_text()
            return up(f"{url}/healthz")

        wait_for(healthy, timeout=30, message="gateway to start")
        return process, url

    yield start
    for process in processes:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        process.log.close()  # type: ignore[attr-defined]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RawUpstream:
    """A raw-socket upstream for misbehaviour a real server cannot produce, one thread per connection.
    The first path segment of a request (/<name>/v1/...) picks the behaviour that answers it; a proxy
    request (absolute-form target) picks "proxy"; /hang/v1 holds the request until release()."""

    def __init__(self, behaviours: dict[str, Callable[[socket.socket], None]]) -> None:
        self.behaviours = behaviours
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.hanging = threading.Semaphore(0)  # released once per request that is being held
        self._release = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        self.listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                part = conn.recv(65536)
                if not part:
                    return
                data += part
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + body)
            target = head.split(b" ", 2)[1].decode()
            name = "proxy" if target.startswith("http://") else target.split("/")[1]
            try:
                if name == "hang":
                    self.hanging.release()
                    self._release.wait(60)
                else:
                    self.behaviours[name](conn)
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the gateway hung up first: what a flood or a cut is for


class RedisServer:
    """A redis-server of the test's own, on a free port, that can be stopped and started again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port)
        wait_for(lambda: _pings(client), message="redis-server to start")
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def _pings(client: object) -> bool:
    import redis

    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except redis.ConnectionError:
        return False


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    server = RedisServer(closed_port())
    server.start()
    yield server
    server.stop()
