"""`canarygate demo`: simulated checkpoints behind the gateway, driven by the official openai client."""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import threading
import time
from collections import defaultdict
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.app import create_app
from gateway.loader import PolicyError
from gateway.routetable import RouteTable
from gateway.server import BackgroundServer
from gateway.settings import Settings
from gateway.simulator import Simulator
from gateway.synth import Knobs

DEMO_KEY = "demo-key"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
DEMO_KNOBS = Knobs(latency_s=0.02, time_per_token_s=0.002, output_tokens=24)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Find an order by id",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    }
]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "amount": {"type": "number"}},
    "required": ["name", "amount"],
}


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    users: set[str] = field(default_factory=set)


def run_demo(policy_dir: Path, port: int, duration: float, users: int, keep_serving: bool) -> int:
    try:
        import openai
    except ImportError:
        print("canarygate demo needs the openai client: pip install 'canarygate[demo]'", file=sys.stderr)
        return 2
    table = RouteTable(policy_dir)
    try:
        table.load()
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    origins = sorted(
        {
            urlsplit(arm.url).netloc
            for route in table.routes()
            for arm in route.arms()
            if urlsplit(arm.url).hostname in LOOPBACK
        }
    )
    with ExitStack() as stack:
        for origin in origins:
            parts = urlsplit(f"http://{origin}")
            stack.enter_context(
                BackgroundServer(Simulator(DEMO_KNOBS).app(), parts.hostname or "127.0.0.1", parts.port or 80)
            )
            print(f"simulated model server  http://{origin}/v1")
        gateway = stack.enter_context(
            BackgroundServer(create_app(Settings(policy_dir=policy_dir)), port=port)
        )
        print(
            f"gateway                 {gateway.url}/v1   routes: {', '.join(r.name for r in table.routes())}"
        )
        print(f"sending {duration:g}s of traffic from {users} simulated users through the openai client ...")
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=DEMO_KEY, max_retries=0)
        tallies = asyncio.run(_traffic(client, [r.name for r in table.routes()], duration, users))
        _report(tallies)
        if keep_serving:
            auth = f"-H 'Authorization: Bearer {DEMO_KEY}'"
            print(f"\nstill serving: curl {auth} {gateway.url}/v1/models  (Ctrl-C stops)")
            with suppress(KeyboardInterrupt):
                threading.Event().wait()
    failed = sum(t.errors for t in tallies.values())
    return 0 if failed == 0 else 1


async def _traffic(
    client: Any, routes: list[str], duration: float, users: int
) -> dict[tuple[str, str], Tally]:
    tallies: dict[tuple[str, str], Tally] = defaultdict(Tally)
    arms_by_user: dict[tuple[str, str], set[str]] = defaultdict(set)
    deadline = time.monotonic() + duration
    next_report = time.monotonic() + 3

    async def user(index: int) -> None:
        nonlocal next_report
        rng = random.Random(index)
        name = f"user-{index:03d}"
        while time.monotonic() < deadline:
            route = rng.choice(routes)
            started = time.perf_counter()
            try:
                arm = await _one_request(client, route, name, rng)
            except Exception as exc:  # every failure is shown in the summary, none is hidden
                tallies[(route, "error")].errors += 1
                print(f"  request failed on {route}: {exc}")
                continue
            tally = tallies[(route, arm)]
            tally.latencies.append(time.perf_counter() - started)
            tally.users.add(name)
            arms_by_user[(route, name)].add(arm)
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + 3
                done = sum(len(t.latencies) for t in tallies.values())
                print(f"  {done} requests answered so far")
            await asyncio.sleep(rng.uniform(0.05, 0.3))

    await asyncio.gather(*(user(i) for i in range(users)))
    switched = [key for key, arms in arms_by_user.items() if len(arms) > 1 and key[0] != "embed"]
    print(
        f"sticky assignment: {len(arms_by_user) - len(switched)} of {len(arms_by_user)} (route, user) pairs"
        " stayed on one arm" + (f"; switched: {switched[:5]}" if switched else "")
    )
    return tallies


async def _one_request(client: Any, route: str, user: str, rng: random.Random) -> str:
    headers = {"x-user-id": user, "x-tenant-id": f"tenant-{int(user[-3:]) % 20:02d}"}
    if route == "embed":
        raw = await client.embeddings.with_raw_response.create(
            model=route, input=["hello", user], extra_headers=headers
        )
        raw.parse()
        return str(raw.headers["x-canarygate-arm"])
    messages = [{"role": "user", "content": f"Help {user} with order {rng.randint(1000, 9999)}"}]
    kind = rng.random()
    if kind < 0.25:
        async with client.chat.completions.with_streaming_response.create(
            model=route,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        ) as response:
            async for _ in response.iter_lines():
                pass
            return str(response.headers["x-canarygate-arm"])
    extra: dict[str, Any] = {}
    if route == "extractor":
        extra["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "invoice", "schema": SCHEMA},
        }
    elif kind < 0.4:
        extra["tools"] = TOOLS
    raw = await client.chat.completions.with_raw_response.create(
        model=route, messages=messages, extra_headers=headers, **extra
    )
    raw.parse()
    return str(raw.headers["x-canarygate-arm"])


def _report(tallies: dict[tuple[str, str], Tally]) -> None:
    totals: dict[str, int] = defaultdict(int)
    for (route, _), tally in tallies.items():
        totals[route] += len(tally.latencies)
    print(
        f"\n{'route':<20} {'arm':<10} {'requests':>8} {'share':>7} {'users':>6} {'p50 ms':>8} {'p99 ms':>8}"
    )
    for (route, arm), tally in sorted(tallies.items()):
        if arm == "error":
            print(f"{route:<20} {'(failed)':<10} {tally.errors:>8}")
            continue
        lat = sorted(tally.latencies)
        p50 = statistics.median(lat) * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        share = 100 * len(lat) / max(1, totals[route])
        users = len(tally.users)
        print(f"{route:<20} {arm:<10} {len(lat):>8} {share:>6.1f}% {users:>6} {p50:>8.1f} {p99:>8.1f}")
