"""Hostile input against one gateway process: what each probe costs in memory, and whether the gateway
keeps answering while it runs.

Each probe runs against a gateway of its own (`python -m gateway serve`, one worker) in front of a
fixed upstream that answers every request with the content the probe sets. While the probe's requests
are in flight, a second client polls /healthz back to back; the slowest /healthz answer in that window
is the stall the probe caused (a few ms when the serving loop is free; 30 s means no answer). RSS is
read from /admin/runtime before and after the memory probes (with the schema check workers' after a +).

Probes: four requests, each with a distinct 1.2 MB schema (20,000 properties with a pattern); 900
distinct schemas just under the 64 KiB limit; a catastrophic pattern (in an anyOf that lets every
string through, so all are checked) over 150 answer strings; a recursive oneOf over an answer nested
40 deep; a 9 MB request body; a YAML alias bomb dropped into the watched policy directory; 170
slowloris connections (a partial head, then a byte every second; the gateway runs with
CANARYGATE_CLIENT_TIMEOUT_S=10).

Usage: python bench/hostile.py [--json] [--probes a,b]. To compare revisions, run it with PYTHONPATH
pointing at an older checkout (a git worktree): the gateway under test is whatever `python -m gateway`
imports.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from run import free_port, wait_up

from tests.wellformed import WellFormed, well_formed

TOKEN = "bench-admin-token"
POLICY = """
route: chat
arms:
  base: {{url: {upstream}, model: m}}
rollout: {{weight: 0}}
validation: {{json: auto, tool_calls: true}}
"""
ALIAS_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "route: bomb\narms: {base: {url: 'http://127.0.0.1:9/v1', model: m}}\n"
)


class Gateway:
    def __init__(self, upstream: str, workdir: Path) -> None:
        self.policies = workdir / "policies"
        self.policies.mkdir()
        (self.policies / "chat.yaml").write_text(POLICY.format(upstream=upstream))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "CANARYGATE_ADMIN_TOKEN": TOKEN,
            "CANARYGATE_LOG_LEVEL": "error",
            "CANARYGATE_CLIENT_TIMEOUT_S": "10",
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--policies",
                str(self.policies),
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_up(f"{self.url}/healthz")

    def rss_mib(self) -> float | str:
        """The gateway's RSS (and its schema check workers', when it has them), MiB."""
        runtime = httpx.get(f"{self.url}/admin/runtime", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        rss = round(float(runtime["rss_bytes"]) / 2**20, 1)
        workers = runtime.get("schema_checks", {}).get("rss_bytes")
        return f"{rss}+{round(workers / 2**20, 1)}" if workers else rss

    def chat(self, timeout: float = 30, **body: Any) -> httpx.Response:
        payload = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], **body}
        return httpx.post(f"{self.url}/v1/chat/completions", json=payload, timeout=timeout)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # a loop held by a probe does not get to its signal handler
            self.process.kill()
            self.process.wait()


@contextmanager
def healthz_watch(url: str) -> Iterator[list[float]]:
    """Polls /healthz back to back while the block runs; yields the list of latencies (seconds; a probe
    that got no answer within 30 s counts as 30 s)."""
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                started = time.perf_counter()
                with suppress(httpx.HTTPError):
                    client.get(f"{url}/healthz")
                latencies.append(time.perf_counter() - started)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(60)


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def stall(gw: Gateway, run: Callable[[], Any]) -> dict[str, Any]:
    with healthz_watch(gw.url) as latencies:
        started = time.perf_counter()
        outcome = run()
        took = time.perf_counter() - started
    return {
        "probe_s": round(took, 2),
        "healthz_max_ms": round(max(latencies) * 1000, 1) if latencies else None,
        "healthz_answers": len(latencies),
        "outcome": outcome,
    }


def schema_memory(gw: Gateway) -> dict[str, Any]:
    def huge(n: int) -> dict[str, Any]:  # each distinct, so none is served from a cache
        properties = {f"field_{n}_{i}": {"type": "string", "pattern": "^[a-z]+$"} for i in range(20_000)}
        return {"type": "object", "properties": properties}

    def send(n: int) -> Any:
        return _bounded(lambda: gw.chat(**schema_format(huge(n))).status_code)

    before = gw.rss_mib()
    result = stall(gw, lambda: [send(n) for n in range(4)])
    result["rss_mib"] = (before, gw.rss_mib())
    return result


def distinct_schemas(gw: Gateway) -> dict[str, Any]:
    rss: list[float | str] = [gw.rss_mib()]

    def distinct(n: int) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {f"f{n}_{i}": {"type": "string", "maxLength": 9} for i in range(1400)},
        }

    def run() -> list[int]:
        statuses = set()
        for round_ in range(3):  # RSS after each round of 300: it levels off once the caches are full
            statuses |= {gw.chat(**schema_format(distinct(300 * round_ + n))).status_code for n in range(300)}
            rss.append(gw.rss_mib())
        return sorted(statuses)

    result = stall(gw, run)
    result["rss_mib"] = rss
    return result


def catastrophic_pattern(gw: Gateway) -> dict[str, Any]:
    # Each string fails the pattern only after backtracking, and then passes the second branch: all 150
    # are checked, and the answer is valid.
    WellFormed.content = json.dumps({"words": [f"{'a' * 30}b{i}" for i in range(150)]})  # distinct: no cache
    slow = {"anyOf": [{"type": "string", "pattern": r"(a*)*\1$"}, {"type": "string"}]}
    schema = {"type": "object", "properties": {"words": {"type": "array", "items": slow}}}
    return stall(gw, lambda: _bounded(lambda: gw.chat(**schema_format(schema)).status_code))


def recursive_one_of(gw: Gateway) -> dict[str, Any]:
    WellFormed.content = json.dumps({"x": json.loads("[0," * 40 + "0" + "]" * 40)})
    doubling = {
        "$defs": {
            "n": {
                "oneOf": [{"items": {"$ref": "#/$defs/n"}, "minItems": 2}, {"items": {"$ref": "#/$defs/n"}}]
            }
        },
        "type": "object",
        "properties": {"x": {"$ref": "#/$defs/n"}},
    }
    return stall(gw, lambda: _bounded(lambda: gw.chat(**schema_format(doubling)).status_code))


def big_body(gw: Gateway) -> dict[str, Any]:
    big: dict[str, Any] = {"metadata": {"pad": ["x" * 30] * 280_000}}  # about 9 MB
    return stall(gw, lambda: _bounded(lambda: gw.chat(**big).status_code))


def alias_bomb(gw: Gateway) -> dict[str, Any]:
    def run() -> str:
        (gw.policies / "bomb.yaml").write_text(ALIAS_BOMB)
        time.sleep(8)  # the watcher picks the file up and the reload runs
        return "written and read"

    return stall(gw, run)


def slowloris(gw: Gateway) -> dict[str, Any]:
    def run() -> str:
        sockets = []
        for _ in range(170):
            conn = socket.create_connection(("127.0.0.1", gw.port))
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            sockets.append(conn)
        started = time.monotonic()
        still_open = len(sockets)
        while still_open and time.monotonic() - started < 20:
            time.sleep(1)
            still_open = 0
            for conn in sockets:
                try:
                    conn.sendall(b"a")
                    still_open += 1
                except OSError:
                    pass
        for conn in sockets:
            conn.close()
        return f"{still_open} of 170 still open after {time.monotonic() - started:.0f} s"

    return stall(gw, run)


PROBES: dict[str, Callable[[Gateway], dict[str, Any]]] = {
    "schema_1_2_MB_x4": schema_memory,
    "schemas_60_KiB_x900": distinct_schemas,
    "catastrophic_pattern": catastrophic_pattern,
    "recursive_oneOf": recursive_one_of,
    "body_9_MB": big_body,
    "yaml_alias_bomb": alias_bomb,
    "slowloris_170": slowloris,
}


def _bounded(run: Callable[[], Any]) -> Any:
    try:
        return run()
    except httpx.HTTPError as exc:
        return f"no answer ({type(exc).__name__})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--probes", default=",".join(PROBES), help="comma-separated, of: %(default)s")
    args = parser.parse_args()
    chosen = args.probes.split(",")
    unknown = set(chosen) - set(PROBES)
    if unknown:
        parser.error(f"no such probe: {', '.join(sorted(unknown))}")
    results = {}
    answer = WellFormed.content
    with well_formed() as upstream:
        for name in chosen:  # each on a gateway of its own: one that a probe hangs is killed
            with tempfile.TemporaryDirectory() as workdir:
                gw = Gateway(upstream, Path(workdir))
                try:
                    results[name] = PROBES[name](gw)
                finally:
                    gw.stop()
                    WellFormed.content = answer
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, result in results.items():
            print(f"{name:22} {json.dumps(result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
