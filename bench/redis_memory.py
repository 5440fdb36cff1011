"""Redis memory per request record, per pair record and per route, measured on a redis-server of this
run's own (empty, so INFO's used_memory moves only with what is written here), through the gateway's own
stores. For contrast, request records also as the earlier layout kept them: one key per answer.

And what writing each request record through (a SET on the request's path) would cost the gateway,
against the batched flush it does: this process's CPU time and the wall time per record, the SETs one
after another as a request would await its own.

And bytes per open trace (agent runs summed until they end), in Redis and in the process.

Usage: python bench/redis_memory.py [--records 200000] [--pairs 20000] [--routes 200] [--traces 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.analysis import UNIT_GROUPS, ArmWindow
from gateway.asgi import new_request_id
from gateway.store.pairs import RedisPairStore
from gateway.store.records import RedisRecordStore
from gateway.store.rollouts import HISTORY, RouteState, Transition
from gateway.store.shared import Shared
from gateway.store.stats import RedisStatsStore, units_interval
from gateway.store.traces import MemoryTraceStore, RedisTraceStore, TraceMeta, trace_id
from gateway.tasks import Spawner

RECORD = "support-chat\x1fcandidate\x1fenterprise\x1f3f9a0c41d2b7e815"  # route, arm, cohort, rollout
TTL_S = 86400.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def pair(n: int) -> dict[str, Any]:
    """A pair record as the shadow path writes it (content capture off)."""
    side = {"model": "tuned-model", "latency_ms": 812.345, "output_tokens": 231, "finish_reason": "stop"}
    return {
        "pair_id": os.urandom(16).hex(),
        "kind": "candidate",
        "route": "support-chat",
        "time": "2026-12-06T23:59:59.123Z",
        "request_id": new_request_id(),
        "agree": n % 7 != 0,
        "checks": {"json_valid": True, "schema_valid": True, "tool_calls": n % 7 != 0},
        "primary": {**side, "model": "base-model"},
        "shadow": side,
    }


async def records(url: str, count: int, client: redis.Redis) -> tuple[float, float]:
    shared = Shared(url, "cg:")
    now = [time.time()]
    store = RedisRecordStore(shared, TTL_S, bound=count, clock=lambda: now[0])
    before = used(client)
    for start in range(0, count, 1000):  # steady traffic that fills the bound over the TTL
        await store.remember({new_request_id(): RECORD for _ in range(min(1000, count - start))})
        now[0] += TTL_S * 1000 / count
    bucketed = (used(client) - before) / count
    client.flushall()
    before = used(client)
    for start in range(0, count, 1000):  # the earlier layout: SET request:<id> record EX ttl
        pipe = shared.redis.pipeline(transaction=False)
        for _ in range(min(1000, count - start)):
            pipe.set(f"cg:request:{new_request_id()}", RECORD, ex=int(TTL_S))
        await pipe.execute()
    per_key = (used(client) - before) / count
    client.flushall()
    await shared.close()
    return bucketed, per_key


async def write_costs(url: str, count: int = 5000) -> tuple[float, float, float, float]:
    """(through: CPU µs and wall µs per record; batched: the same), 1,000 records per flush."""
    shared = Shared(url, "cg:")
    await shared.redis.ping()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        await shared.redis.set(f"cg:request:{new_request_id()}", RECORD, ex=int(TTL_S))
    through = ((time.process_time() - cpu) / count * 1e6, (time.perf_counter() - wall) / count * 1e6)
    store = RedisRecordStore(shared, TTL_S, bound=10 * count)
    batches = [{new_request_id(): RECORD for _ in range(1000)} for _ in range(count // 1000)]
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in batches:
        await store.remember(batch)
    batched = ((time.process_time() - cpu) / count * 1e6, (time.perf_counter() - wall) / count * 1e6)
    await shared.close()
    return (*through, *batched)


async def pairs(url: str, count: int, client: redis.Redis) -> float:
    spawner = Spawner()
    shared = Shared(url, "cg:")
    store = RedisPairStore(shared, spawner)
    before = used(client)
    for n in range(count):
        store.add(pair(n), count)  # the stream's cap at least the count: nothing trimmed
        if n % 1000 == 999:
            await store.flush()
    await store.flush()
    per_pair = (used(client) - before) / count
    client.flushall()
    await spawner.close()
    await shared.close()
    return per_pair


async def routes(
    url: str, count: int, client: redis.Redis
) -> tuple[float, float, float, tuple[float, float]]:
    """A route's rollout state with a full history, one interval's statistics of its three arms, and one
    step's windows per unit group of the three arms (one cohort)."""
    shared = Shared(url, "cg:")
    before = used(client)
    for n in range(count):
        now = time.time()
        history = tuple(
            Transition(now, "progressing", 5.0, 1, "gates passed: step 2 of 5", "controller", None)
            for _ in range(HISTORY)
        )
        state = RouteState(
            f"route-{n}", "3f9a0c41d2b7e815", "progressing", 5.0, True, 1, None, 60, now, history, now, now,
            tuple(f"{k:016x}" for k in range(10)),
        )  # fmt: skip
        await shared.redis.set(f"cg:rollout:route-{n}", state.to_json())
    per_route = (used(client) - before) / count
    stats = RedisStatsStore(shared)
    window = ArmWindow(
        requests=600, errors=3, invalid=2, fallbacks=1, tokens=90_000, tokens_sq=1.6e7, token_answers=590,
        expected=300.0, expected_sq=150.0, signed=-14, timed=600, log_latency=-130.5, log_latency_sq=180.2,
        ttfts=600, log_ttft=-900.1, log_ttft_sq=1400.7,
    )  # fmt: skip
    window.latency.update({b: 20 for b in range(20, 40)})
    window.ttft.update({b: 20 for b in range(10, 30)})

    async def added(name: str, one: ArmWindow, interval: int, groups: range) -> float:
        """used_memory per route after adding the window to the three arms (per unit group, when groups)."""
        before = used(client)
        for n in range(count):
            batch = {
                (f"{name}-{n}", "3f9a0c41d2b7e815", interval, f"{arm}@all#{g}" if groups else arm): one
                for arm in ("base", "candidate", "shadow")
                for g in groups or range(1)
            }
            await stats.add(batch, os.urandom(8).hex())
        return (used(client) - before) / count

    group = replace(window, latency={}, ttft={})  # a unit group's window: no histograms
    per_interval = await added("route", window, 1, range(0))
    per_step = await added("route", group, units_interval(1), range(UNIT_GROUPS))
    # The same with two evaluators' results in every window (results, sum, squares, flips each).
    scores = {"adherence": [180.0, 151.25, 139.5, 0.0], "preference": [90.0, 12.0, 30.0, 2.0]}
    per_interval_scored = await added("scored", replace(window, scores=scores), 1, range(0))
    per_step_scored = await added(
        "scored", replace(group, scores=scores), units_interval(1), range(UNIT_GROUPS)
    )
    client.flushall()
    await shared.close()
    per_evaluator = ((per_interval_scored - per_interval) / 2, (per_step_scored - per_step) / 2)
    return per_route, per_interval, per_step, per_evaluator


STEP_SUMS = {"input_tokens": 812, "output_tokens": 95, "cached_tokens": 512, "tool_calls": 1, "cost": 0.00041}


def _trace(i: int) -> tuple[str, TraceMeta]:
    """The i-th open trace of the measurement: its id and what its first step says of it."""
    name = f"conversation-{i:08d}"
    meta = TraceMeta("support-agent", name, "3f9a0c41d2b7e815", "candidate", "all", i % 64, 1, f"{i:016x}")
    return trace_id("support-agent", name), meta


async def traces(url: str, count: int, client: redis.Redis) -> tuple[float, float]:
    """Bytes per open trace: in Redis (its hash after four steps, and its place in the deadlines' set)
    through the gateway's store, and in this process's memory store (tracemalloc)."""
    sums = {**{k: v * 4 for k, v in STEP_SUMS.items()}, "inflight": -4}  # four steps begun and ended
    shared = Shared(url, "cg:")
    store = RedisTraceStore(shared)
    before = used(client)
    for start in range(0, count, 1000):
        batch = {}
        for i in range(start, min(start + 1000, count)):
            tid, meta = _trace(i)
            for _ in range(4):
                await store.step(tid, meta, 1000.0, 1300.0, count)
            batch[tid] = (1300.0, sums)
        await store.add(batch, 1000.0)
    in_redis = (used(client) - before) / count
    client.flushall()
    await shared.close()
    memory = MemoryTraceStore()
    tracemalloc.start()
    for i in range(count):
        tid, meta = _trace(i)
        for _ in range(4):
            memory.step_now(tid, meta, 1000.0, 1300.0, count)
        await memory.add({tid: (1300.0, sums)}, 1000.0)
    in_process = tracemalloc.get_traced_memory()[0] / count
    tracemalloc.stop()
    return in_redis, in_process


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--routes", type=int, default=200)
    parser.add_argument("--traces", type=int, default=100_000)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis(port=port)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        version = client.info("server")["redis_version"]
        bucketed, per_key = await records(url, args.records, client)
        per_pair = await pairs(url, args.pairs, client)
        per_route, per_interval, per_step, per_evaluator = await routes(url, args.routes, client)
        costs = await write_costs(url)
        trace_redis, trace_memory = await traces(url, args.traces, client)
    finally:
        client.close()
        server.terminate()
        server.wait(10)
    print(f"redis {version}, used_memory deltas")
    print(f"request record: {bucketed:.0f} B (one key each, as before: {per_key:.0f} B)")
    print(f"pair record (content capture off): {per_pair:.0f} B")
    print(f"route: rollout state with {HISTORY} transitions {per_route:.0f} B")
    print(f"route statistics: {per_interval:.0f} B per interval")
    print(f"route statistics per unit group: {per_step:.0f} B per step and cohort")
    print(
        f"each evaluator adds {per_evaluator[0]:.0f} B per interval and {per_evaluator[1]:.0f} B per step "
        "and cohort (three arms' results)"
    )
    print(
        f"open trace (4 steps, {args.traces:,} open): {trace_redis:.0f} B in Redis, "
        f"{trace_memory:.0f} B in the process without Redis"
    )
    through_cpu, through_wall, batched_cpu, batched_wall = costs
    print(f"request record written through: {through_cpu:.0f} µs CPU, {through_wall:.0f} µs wall each")
    print(f"request record batched (1,000 a flush): {batched_cpu:.1f} µs CPU, {batched_wall:.1f} µs wall")


if __name__ == "__main__":
    asyncio.run(main())
