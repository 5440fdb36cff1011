"""Reliability under load, loopback only, bounded in time: nothing dropped, duplicated or leaked.

soak suite: one gateway worker under sustained mixed load for --duration seconds (default 300): chat
answers, streams, JSON mode and tool calls from many users; candidate weight 20%, mirror 20%, the
candidate failing 5% of its calls (HTTP 500). Every answer is checked: a complete, valid answer (base
or candidate) or a documented OpenAI error; never a 5xx of the gateway's own. /admin/runtime is read
every 5 s: RSS growth after warm-up must stay under 10%; open file descriptors and asyncio tasks, read
idle before and after, must come back. A short direct phase (same mix, straight to the simulator)
gives the latency ratio in the same run.

streams suite: --streams (default 1000) concurrent streaming requests through one worker, then the
same straight to the simulator. Every stream must complete. Reported: RSS per open stream (RSS with
all open minus idle RSS, over the count) and the per-chunk trip time (the simulator stamps each event
with its send time; the client subtracts it on arrival), p50/p99 direct and through the gateway, and
their difference: what the gateway adds per chunk.

Usage: python bench/reliability.py [--suite all|soak|streams] [--duration 300] [--streams 1000]
Exits 1 when a check fails. Needs the dev extras (aiohttp for the load generator).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import free_port, wait_up

TOKEN = "bench-admin-token"
RECORDS = 20_000
BASE_MODEL, CANDIDATE_MODEL = "base-model", "tuned-model"
POLICY = """
route: chat
arms:
  base: {{url: {sim}, model: {base}}}
  candidate: {{url: {sim}, model: {candidate}}}
timeouts: {{connect_s: 2, first_token_s: 10, total_s: 60}}
rollout: {{weight: 20}}
mirror: {{percent: 20}}
validation: {{json: auto, tool_calls: true, stream: buffer}}
fallback:
  on: [connect_error, timeout, http_5xx, http_429, json_parse, json_schema, tool_unknown, tool_args_parse]
  budget: {{ratio: 0.5, window_s: 10, min_per_window: 20}}
"""
# The streams suite measures the relay itself: one arm, no mirror, timeouts that allow 1,000 opening at once.
STREAMS_POLICY = """
route: chat
arms:
  base: {{url: {sim}, model: {base}}}
timeouts: {{connect_s: 10, first_token_s: 60, total_s: 120}}
"""
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_order",
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]},
        },
    }
]


class Stack:
    """The simulator and one gateway worker as real processes on loopback."""

    def __init__(
        self, work: Path, sim_args: list[str], extra_env: dict[str, str] | None = None, policy: str = POLICY
    ) -> None:
        self.work = work
        self.sim_port, self.gw_port = free_port(), free_port()
        exe = [sys.executable, "-m", "gateway"]
        self.sim = subprocess.Popen(
            [*exe, "simulate", "--port", str(self.sim_port), *sim_args],
            stdout=subprocess.DEVNULL,
            stderr=(work / "sim.log").open("w"),
        )
        wait_up(f"{self.sim_url}/health")
        policies = work / "policies"
        policies.mkdir(exist_ok=True)
        (policies / "chat.yaml").write_text(
            policy.format(sim=f"{self.sim_url}/v1", base=BASE_MODEL, candidate=CANDIDATE_MODEL)
        )
        env = {
            **os.environ,
            "CANARYGATE_ADMIN_TOKEN": TOKEN,
            "CANARYGATE_LOG_LEVEL": "warning",
            **(extra_env or {}),
        }
        self.gw = subprocess.Popen(
            [
                *exe,
                "serve",
                "--policies",
                str(policies),
                "--port",
                str(self.gw_port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=(work / "gateway.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        wait_up(f"{self.gw_url}/healthz")

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    @property
    def gw_url(self) -> str:
        return f"http://127.0.0.1:{self.gw_port}"

    def runtime(self) -> dict[str, Any]:
        response = httpx.get(f"{self.gw_url}/admin/runtime", headers={"Authorization": f"Bearer {TOKEN}"})
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def close(self) -> None:
        for process in (self.gw, self.sim):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()


# --- one request and its check ----------------------------------------------------------------------


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    arms: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    def bad(self, kind: str, detail: str) -> None:
        self.outcomes[kind] += 1
        if len(self.broken) < 20:
            self.broken.append(f"{kind}: {detail[:300]}")


def make_body(rng: random.Random, base_model: str | None = None) -> tuple[dict[str, Any], str]:
    kind = rng.choices(["chat", "stream", "json", "tools"], weights=[45, 30, 15, 10])[0]
    body: dict[str, Any] = {
        "model": base_model or "chat",
        "messages": [{"role": "user", "content": f"question {rng.randrange(10**6)}"}],
        "user": f"user-{rng.randrange(500)}",
    }
    if kind == "stream":
        body["stream"] = True
    elif kind == "json":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}}
        body["stream"] = rng.random() < 0.5
    elif kind == "tools":
        body["tools"] = TOOLS
        body["tool_choice"] = "required"
    return body, kind


def check_answer(kind: str, body: dict[str, Any], message: dict[str, Any]) -> str | None:
    """None when the answer is what the request asked for; otherwise what is wrong."""
    if kind == "tools":
        calls = message.get("tool_calls") or []
        if not calls or calls[0]["function"]["name"] != "get_order":
            return f"no get_order call: {message}"
        json.loads(calls[0]["function"]["arguments"])
    elif kind == "json":
        parsed = json.loads(message.get("content") or "")
        if not isinstance(parsed, dict) or not {"city", "days"} <= parsed.keys():
            return f"content breaks the schema: {message.get('content')}"
    elif not message.get("content"):
        return f"empty answer: {message}"
    return None


def assemble(events: list[dict[str, Any]]) -> dict[str, Any]:
    content, calls = "", {}
    for event in events:
        for choice in event.get("choices", []):
            delta = choice.get("delta", {})
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                entry = calls.setdefault(call["index"], {"function": {"name": "", "arguments": ""}})
                function = call.get("function", {})
                entry["function"]["name"] += function.get("name") or ""
                entry["function"]["arguments"] += function.get("arguments") or ""
    return {"content": content, "tool_calls": [calls[i] for i in sorted(calls)]}


async def one_request(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], kind: str, tally: Tally
) -> None:
    started = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            raw = await response.read()
            status = response.status
            arm = response.headers.get("x-canarygate-arm", "direct")
    except (TimeoutError, aiohttp.ClientError) as exc:
        tally.bad("transport_error", repr(exc))
        return
    tally.latencies.append(time.perf_counter() - started)
    text = raw.decode("utf-8", "replace")
    if status != 200:
        try:
            error = json.loads(text)["error"]
            documented = {"type", "code", "message"} <= error.keys()
        except (ValueError, KeyError, TypeError):
            tally.bad("malformed_error", f"{status} {text}")
            return
        if status >= 500 and error["type"] != "upstream_error":
            tally.bad("gateway_5xx", f"{status} {text}")
        elif documented:
            tally.outcomes[f"error_{status}_{error['code']}"] += 1
        else:
            tally.bad("malformed_error", f"{status} {text}")
        return
    try:
        if body.get("stream"):
            blocks = [b for b in text.split("\n\n") if b.strip()]
            if not blocks or blocks[-1].strip() != "data: [DONE]":
                tally.bad("incomplete_stream", text[-300:])
                return
            events = [json.loads(b.split("data: ", 1)[1]) for b in blocks[:-1] if "data: " in b]
            if any("error" in e for e in events):
                tally.bad("stream_error_event", text[-300:])
                return
            message = assemble(events)
        else:
            message = json.loads(text)["choices"][0]["message"]
        problem = check_answer(kind, body, message)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        problem = f"unparseable: {exc!r} {text[:200]}"
    if problem is not None:
        tally.bad("invalid_answer", problem)
        return
    tally.outcomes["ok"] += 1
    tally.arms[arm] += 1


async def drive(url: str, seconds: float, concurrency: int, tally: Tally, model: str | None = None) -> None:
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                body, kind = make_body(rng, model)
                await one_request(session, url, body, kind, tally)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- soak -------------------------------------------------------------------------------------------


def soak(duration: float, work: Path) -> tuple[list[str], bool]:
    sim_args = ["--latency-s", "0.005", "--time-per-token-s", "0.001", "--output-tokens", "24"]
    sim_args += [
        "--model",
        f"{CANDIDATE_MODEL}:error_rate=0.05,error_status=500,latency_s=0.005,time_per_token_s=0.001",
    ]
    # Assignment records (for feedback) are bounded: 200,000 by default, ~220 B each. The soak bounds
    # them at 20,000 so they fill during warm-up and growth after it shows anything unbounded.
    stack = Stack(work, sim_args, {"CANARYGATE_MEMORY_RECORDS": str(RECORDS)})
    lines, ok = [], True
    try:
        direct = Tally()
        asyncio.run(drive(stack.sim_url, 15, 32, direct, model=BASE_MODEL))
        asyncio.run(drive(stack.gw_url, 5, 32, Tally()))  # warm every path once
        time.sleep(17)  # idle upstream connections expire (keep-alive 15 s)
        before = stack.runtime()
        tally = Tally()
        samples: list[tuple[float, int]] = []

        async def sampled() -> None:
            task = asyncio.create_task(drive(stack.gw_url, duration, 32, tally))
            started = time.monotonic()
            while not task.done():
                await asyncio.sleep(5)
                runtime = await asyncio.to_thread(stack.runtime)
                samples.append((time.monotonic() - started, runtime["rss_bytes"]))
            await task

        asyncio.run(sampled())
        time.sleep(17)
        after = stack.runtime()
    finally:
        stack.close()
    warm = max(30.0, duration * 0.2)
    settled = [rss for t, rss in samples if t >= warm]
    start_rss, end_rss = settled[0], statistics.median(settled[-6:])
    growth = (end_rss - start_rss) / start_rss
    requests = sum(tally.outcomes.values())
    broken = sum(n for k, n in tally.outcomes.items() if k not in ("ok",) and not k.startswith("error_"))
    lines.append(
        f"soak: {duration:.0f} s (assignment records bounded at {RECORDS:,}), {requests} requests "
        f"({requests / duration:.0f}/s), "
        f"arms {dict(tally.arms)}, outcomes {dict(tally.outcomes)}"
    )
    via_ms = [quantile(tally.latencies, q) * 1000 for q in (0.5, 0.99)]
    direct_ms = [quantile(direct.latencies, q) * 1000 for q in (0.5, 0.99)]
    lines.append(
        f"  latency p50/p99: gateway {via_ms[0]:.1f}/{via_ms[1]:.1f} ms, direct {direct_ms[0]:.1f}/"
        f"{direct_ms[1]:.1f} ms (ratios {via_ms[0] / direct_ms[0]:.2f}/{via_ms[1] / direct_ms[1]:.2f})"
    )
    lines.append(
        f"  RSS after warm-up ({warm:.0f} s) {start_rss / 2**20:.1f} MiB -> end {end_rss / 2**20:.1f} MiB "
        f"({growth * 100:+.1f}%); idle before/after: fds {before['open_fds']}/{after['open_fds']}, "
        f"tasks {before['tasks']}/{after['tasks']}, upstream calls in flight "
        f"{_in_flight(before)}/{_in_flight(after)}"
    )
    checks = {
        "every request answered completely or with a documented error": broken == 0,
        "no 5xx of the gateway's own": tally.outcomes["gateway_5xx"] == 0,
        "RSS growth after warm-up under 10%": growth < 0.10,
        "file descriptors back to idle": after["open_fds"] <= before["open_fds"] + 2,
        "asyncio tasks back to idle": after["tasks"] <= before["tasks"] + 2,
        "both arms answered": tally.arms["base"] > 0 and tally.arms["candidate"] > 0,
    }
    for name, passed in checks.items():
        lines.append(f"  {'ok ' if passed else 'FAIL'} {name}")
        ok &= passed
    lines.extend(f"  e.g. {b}" for b in tally.broken[:5])
    return lines, ok


# --- many open streams ------------------------------------------------------------------------------


async def streams_through(url: str, count: int, model: str, rss: Any) -> tuple[list[float], int, int]:
    """count concurrent stamped streams; returns per-chunk trip times, streams completed, peak RSS."""
    trips: list[float] = []
    completed = 0
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "tell me a story"}],
        "stream": True,
        "metadata": {"sim_stamp": True},
    }
    opened = asyncio.Event()
    started = 0
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            nonlocal completed, started
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                assert response.status == 200, await response.text()
                started += 1
                if started == count:
                    opened.set()
                buffer = b""
                async for data in response.content.iter_any():
                    now = time.time()
                    buffer += data
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        for line in event.split(b"\n"):
                            if line.startswith(b": sent "):
                                trips.append(now - float(line[7:]))
                if event.strip() == b"data: [DONE]" or buffer.strip() == b"data: [DONE]":
                    completed += 1

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        await asyncio.wait_for(opened.wait(), 60)
        await asyncio.sleep(1)
        peak = await asyncio.to_thread(rss)
        await asyncio.gather(*tasks, return_exceptions=False)
    return trips, completed, peak


def streams(count: int, work: Path) -> tuple[list[str], bool]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8 * count)), hard))  # children inherit
    # Each stream: 60 events, one every 0.25 s: 15 s open, ~4,000 events/s across 1,000 streams.
    sim = ["--latency-s", "0.5", "--time-per-token-s", "0.25", "--output-tokens", "60"]
    stack = Stack(work, sim, policy=STREAMS_POLICY)
    try:
        asyncio.run(streams_through(stack.gw_url, 20, "chat", lambda: 0))  # warm
        time.sleep(1)
        idle = stack.runtime()["rss_bytes"]
        via, via_done, peak = asyncio.run(
            streams_through(stack.gw_url, count, "chat", lambda: stack.runtime()["rss_bytes"])
        )
        direct, direct_done, _ = asyncio.run(streams_through(stack.sim_url, count, BASE_MODEL, lambda: 0))
    finally:
        stack.close()
    per_stream = (peak - idle) / count
    added_p50 = quantile(via, 0.5) - quantile(direct, 0.5)
    added_p99 = quantile(via, 0.99) - quantile(direct, 0.99)
    via_ms = [quantile(via, q) * 1000 for q in (0.5, 0.99)]
    direct_ms = [quantile(direct, q) * 1000 for q in (0.5, 0.99)]
    lines = [
        f"streams: {count} concurrent through one worker: {via_done} completed (direct {direct_done}); "
        f"RSS idle {idle / 2**20:.1f} MiB, all open {peak / 2**20:.1f} MiB: "
        f"{per_stream / 1024:.1f} KiB per open stream",
        f"  per-chunk trip p50/p99: direct {direct_ms[0]:.2f}/{direct_ms[1]:.2f} ms, "
        f"gateway {via_ms[0]:.2f}/{via_ms[1]:.2f} ms; "
        f"added p50 {added_p50 * 1000:.2f} ms, p99 {added_p99 * 1000:.2f} ms ({len(via)} chunks)",
    ]
    ok = via_done == count and direct_done == count
    lines.append(f"  {'ok ' if ok else 'FAIL'} every stream completed")
    return lines, ok


def _in_flight(runtime: dict[str, Any]) -> int:
    return sum(int(pool["in_flight"]) for pool in runtime["upstream_pools"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=["all", "soak", "streams"], default="all")
    parser.add_argument("--duration", type=float, default=300.0, help="soak seconds")
    parser.add_argument("--streams", type=int, default=1000)
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory(prefix="canarygate-reliability-") as tmp:
        if args.suite in ("all", "streams"):
            (Path(tmp) / "streams").mkdir()
            lines, passed = streams(args.streams, Path(tmp) / "streams")
            print("\n".join(lines), flush=True)
            ok &= passed
        if args.suite in ("all", "soak"):
            (Path(tmp) / "soak").mkdir()
            lines, passed = soak(args.duration, Path(tmp) / "soak")
            print("\n".join(lines), flush=True)
            ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
