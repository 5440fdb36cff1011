"""Replicas as they are deployed: three real `canarygate serve` processes on one real Redis (a
redis-server of this test's own), behind a real nginx, with the official openai SDK as the client and
its own retries off, so every error a client would see is counted. Each test does to the fleet what
production does to it (a rolling update, Redis frozen, a replica stopped under load) and asserts that no
client saw an error and no count was doubled."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.conftest import REPO, RedisServer, Sim, closed_port, policy_yaml, up, wait_for

AUTOMATIC = """
rollout:
  steps: [30, 40, 50, 60, 70, 80, 90]
  interval_s: 1
  min_samples: 10
  gates:
    error_rate: {max_increase: 0.05, critical: true}
"""

ADMIN_TOKEN = "fleet-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

NGINX_CONF = """
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream gateways {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://gateways;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 30s;
        }}
    }}
}}
"""


@dataclass
class Replica:
    policies: Path
    args: tuple[str, ...]
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Fleet:
    """Replicas on one Redis behind one nginx (round robin, upstream keep-alive, as in a cluster)."""

    work: Path
    redis: RedisServer
    replicas: list[Replica] = field(default_factory=list)
    nginx: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CANARYGATE_REDIS_URL": self.redis.url,
            "CANARYGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "CANARYGATE_WATCH_POLICIES": "false",
            "CANARYGATE_SHUTDOWN_TIMEOUT_S": "10",
        }

    def start(self, policy_dir: Path, count: int = 3) -> list[Replica]:
        """count single-worker replicas on the same policies, and nginx in front of them."""
        started = [self.start_replica(Replica(policy_dir, ())) for _ in range(count)]
        self.start_nginx()
        return started

    def replace(self, old: Replica, policy_dir: Path) -> Replica:
        """A rolling update's step: the replica stops, and one with the new policies takes its place."""
        assert old.process is not None
        old.process.send_signal(signal.SIGTERM)
        old.process.wait(30)
        self.replicas.remove(old)
        return self.start_replica(Replica(policy_dir, (), port=old.port))

    def start_replica(self, replica: Replica) -> Replica:
        replica.port = replica.port or closed_port()
        replica.log = log_path = self.work / f"serve-{replica.port}.log"
        with log_path.open("wb") as log:
            replica.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--policies",
                    str(replica.policies),
                    "--port",
                    str(replica.port),
                    *replica.args,
                ],
                cwd=REPO,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def healthy() -> bool:
            assert replica.process is not None and replica.process.poll() is None, log_path.read_text()
            return up(f"{replica.url}/readyz")

        wait_for(healthy, timeout=60, message="a replica to start")
        self.replicas.append(replica)
        return replica

    def start_nginx(self) -> None:
        self.port = closed_port()
        servers = "\n".join(f"        server 127.0.0.1:{r.port};" for r in self.replicas)
        conf = self.work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.work, port=self.port, servers=servers))
        self.nginx = subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"])
        wait_for(lambda: up(f"{self.url}/healthz"), message="nginx to start")

    def proxy_errors(self) -> str:
        log = self.work / "error.log"
        return log.read_text()[-3000:] if log.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {r.log}\n{r.log.read_text()[-3000:]}" for r in self.replicas if r.log)

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            if replica.process is not None:
                try:
                    replica.process.wait(20)
                except subprocess.TimeoutExpired:
                    replica.process.kill()
        if self.nginx is not None:
            self.nginx.terminate()
            self.nginx.wait(10)


@pytest.fixture
def fleet(tmp_path: Path, own_redis: RedisServer) -> Iterator[Fleet]:
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed (make test installs it)")
    for temp in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / temp).mkdir()
    fleet = Fleet(tmp_path, own_redis)
    yield fleet
    fleet.stop()


def policies(tmp_path: Path, name: str, text: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "chat.yaml").write_text(text)
    return directory


class Load:
    """Client threads sending chat requests through the proxy back to back, as users would, with the
    SDK's retries off: every error a user would see is counted, by kind."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self._url = url
        self._stop = threading.Event()
        self.answers = 0
        self.arms: dict[str, int] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def _run(self, n: int) -> None:
        client = openai.OpenAI(base_url=f"{self._url}/v1", api_key="unused", max_retries=0, timeout=30)
        sent = 0
        while not self._stop.is_set():
            sent += 1
            try:
                reply = client.chat.completions.with_raw_response.create(
                    model="chat", messages=[{"role": "user", "content": "hi"}], user=f"user-{n}-{sent % 50}"
                )
                arm = reply.headers["x-canarygate-arm"]
                with self._lock:
                    self.answers += 1
                    self.arms[arm] = self.arms.get(arm, 0) + 1
            except openai.APIError as exc:
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:300])

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        print(f"load: {self.answers} answers {self.arms}, {len(self.errors)} errors")  # shown on failure

    def wait_for_answers(self, more: int) -> None:
        target = self.answers + more
        wait_for(lambda: self.answers >= target, timeout=60, message=f"{more} more answers")


def admin(url: str, action: str, key: str | None = None, **body: Any) -> httpx.Response:
    headers = {**ADMIN, "Idempotency-Key": key} if key else ADMIN
    return httpx.post(f"{url}/admin/routes/chat/{action}", json=body or None, headers=headers, timeout=15)


def rollout(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/admin/routes/chat", headers=ADMIN, timeout=15).json()  # type: ignore[no-any-return]


def arms_of(url: str, count: int = 20) -> set[str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    return {
        client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], user=f"user-{n}"
        ).headers["x-canarygate-arm"]
        for n in range(count)
    }


@pytest.mark.parametrize("workers", [2, 1])
def test_a_replica_stopped_under_load_loses_no_request(
    fleet: Fleet, sims: tuple[Sim, Sim], workers: int
) -> None:
    directory = policies(fleet.work, "policies", policy_yaml("chat", sims[0].url, sims[1].url, weight=20))
    many = fleet.start_replica(Replica(directory, ("--workers", str(workers))))
    for _ in range(2):
        fleet.start_replica(Replica(directory, ()))
    fleet.start_nginx()
    with Load(fleet.url) as load:
        load.wait_for_answers(100)
        assert many.process is not None
        many.process.send_signal(signal.SIGTERM)  # what Kubernetes does to a pod in a rolling update
        many.process.wait(30)
        load.wait_for_answers(200)  # and the others carry on
    assert many.process.returncode in (0, -signal.SIGTERM), fleet.logs()  # uvicorn ends by the signal it got
    assert load.errors == [], (
        f"{len(load.errors)} of {load.answers + len(load.errors)}: {load.errors[:5]}\n{fleet.proxy_errors()}"
    )


def test_a_rolling_update_neither_undoes_a_rollback_nor_lets_replicas_fight(
    fleet: Fleet, sims: tuple[Sim, Sim]
) -> None:
    old = policies(fleet.work, "old", policy_yaml("chat", sims[0].url, sims[1].url, weight=50))
    new = policies(
        fleet.work,
        "new",
        policy_yaml("chat", sims[0].url, sims[1].url, weight=50).replace("tuned-model", "tuned-2"),
    )
    first, *others = fleet.start(old)
    with Load(fleet.url) as load:
        load.wait_for_answers(50)
        rolled_back = admin(fleet.url, "rollback", reason="bad answers")
        assert rolled_back.status_code == 200, rolled_back.text
        load.wait_for_answers(50)
        updated = fleet.replace(first, new)  # the first pod of a rolling update: the new rollout starts
        load.wait_for_answers(100)
        started = rollout(updated.url)
        assert (started["phase"], started["weight"]) == ("manual", 50)
        for replica in others:  # still on the old policy: they follow the new rollout's state, serve the base
            wait_for(lambda r=replica: rollout(r.url)["version"] == started["version"], message="the others")  # type: ignore[misc]
            skew = httpx.get(f"{replica.url}/readyz", headers=ADMIN, timeout=15).json()["policy_skew"]
            assert skew["chat"]["policy_is"] == "superseded"
            assert arms_of(replica.url) == {"base"}  # the rolled-back candidate reaches no one
        time.sleep(3)  # three polls of every replica: nobody writes the rollout back and forth
        assert rollout(fleet.url)["version"] == started["version"]
        history = [t["reason"] for t in rollout(updated.url)["history"]]
        assert history == ["policy loaded"]  # the new rollout's own history, written once
    assert load.errors == [], f"{len(load.errors)}: {load.errors[:5]}\n{fleet.proxy_errors()}"


def test_redis_frozen_mid_write_costs_clients_nothing_and_nothing_is_counted_twice(
    fleet: Fleet, sims: tuple[Sim, Sim]
) -> None:
    fleet.start(policies(fleet.work, "policies", policy_yaml("chat", sims[0].url, sims[1].url, weight=50)))
    assert fleet.redis.process is not None
    with Load(fleet.url) as load:
        load.wait_for_answers(50)
        fleet.redis.process.send_signal(signal.SIGSTOP)  # frozen: every write times out after 2 s
        try:
            load.wait_for_answers(100)  # answered all along, from the last state seen
            frozen = admin(fleet.url, "weight", key="raise-1", weight=80, reason="more")
            assert frozen.status_code == 503 and frozen.json()["error"]["code"] == "state_unavailable"
        finally:
            fleet.redis.process.send_signal(signal.SIGCONT)
        load.wait_for_answers(50)
    retried = admin(fleet.url, "weight", key="raise-1", weight=80, reason="more")  # the operator retries
    assert retried.status_code == 200, retried.text
    keys = [t.get("key") for t in rollout(fleet.url)["history"]]
    assert keys.count("weight:raise-1") == 1  # applied once
    answered = load.answers

    def counted() -> int:
        window = httpx.get(f"{fleet.url}/admin/routes/chat/analysis", headers=ADMIN, timeout=15).json()[
            "window"
        ]
        return int(window["base"]["requests"] + window["candidate"]["requests"])

    wait_for(lambda: counted() >= answered, timeout=15, message="every replica's statistics to arrive")
    time.sleep(1.5)  # one flush more: anything counted twice would show now
    assert counted() == answered
    assert load.errors == [], f"{len(load.errors)}: {load.errors[:5]}\n{fleet.proxy_errors()}"


def test_feedback_sent_the_moment_an_answer_arrives_is_found_through_the_proxy(
    fleet: Fleet, sims: tuple[Sim, Sim]
) -> None:
    fleet.start(policies(fleet.work, "policies", policy_yaml("chat", sims[0].url, sims[1].url, weight=50)))
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)
    for n in range(12):  # round robin: the feedback goes to another replica than the answer, mostly
        answer = client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], user=f"user-{n}"
        )
        given = httpx.post(
            f"{fleet.url}/v1/feedback",
            json={"request_id": answer.headers["x-request-id"], "score": "down"},
            timeout=15,
        )
        assert given.status_code == 200, given.text
        assert given.json()["recorded"] and given.json()["arm"] == answer.headers["x-canarygate-arm"]


def test_an_operator_s_pause_holds_while_the_controller_walks_the_rollout(
    fleet: Fleet, sims: tuple[Sim, Sim]
) -> None:
    text = policy_yaml("chat", sims[0].url, sims[1].url).replace("rollout:\n  weight: 0\n", "") + AUTOMATIC
    fleet.start(policies(fleet.work, "policies", text))
    with Load(fleet.url) as load:
        for _ in range(4):  # the leader judges every second, on some replica; the operator, through nginx
            moved = lambda: rollout(fleet.url)["history"][0]["by"] == "controller"  # noqa: E731
            wait_for(moved, timeout=30, message="the controller to take a step")
            paused = admin(fleet.url, "pause", reason="looking")  # while the controller judges the next
            assert paused.status_code == 200, paused.text
            time.sleep(2.5)  # two controller ticks and more: a move judged before the pause is dropped
            assert rollout(fleet.url)["phase"] == "paused"
            assert admin(fleet.url, "resume", reason="carry on").status_code == 200
    history = rollout(fleet.url)["history"]
    walked = list(reversed(history))
    after_pause = [t for before, t in pairwise(walked) if before["phase"] == "paused"]
    assert len(after_pause) == 4 and all(t["by"] == "admin" for t in after_pause)  # only the operator's
    assert [t["weight"] for t in walked if t["by"] == "controller"][:4] == [40, 50, 60, 70]
    assert load.errors == [], f"{len(load.errors)}: {load.errors[:5]}\n{fleet.proxy_errors()}"


def test_a_leader_that_stops_gives_the_lease_up_on_its_way_out(fleet: Fleet, sims: tuple[Sim, Sim]) -> None:
    fleet.start(policies(fleet.work, "policies", policy_yaml("chat", sims[0].url, sims[1].url, weight=20)))

    def controllers() -> dict[str, Replica]:
        views = {
            r.url: httpx.get(f"{r.url}/readyz", headers=ADMIN, timeout=15).json() for r in fleet.replicas
        }
        return {
            views[r.url]["controller"]["owner"]: r
            for r in fleet.replicas
            if views[r.url]["controller"]["leading"]
        }

    wait_for(lambda: len(controllers()) == 1, message="one replica to lead")
    ((owner, leader),) = controllers().items()
    assert leader.process is not None
    leader.process.send_signal(signal.SIGTERM)
    leader.process.wait(30)
    client = redis.Redis.from_url(fleet.redis.url)
    held = client.get("canarygate:controller")
    client.close()
    assert held is None or held.decode() != owner  # given up at once, not left to its 10 s TTL
    fleet.replicas.remove(leader)
    wait_for(lambda: len(controllers()) == 1, message="another replica to lead")
