"""What the Redis stores keep, and for how long, on the machine's real Redis (this test's own prefix):
request records within their bound and TTL, pair streams and a deleted route's state that expire, and
a command on a connection Redis closed (a restart) that is sent again rather than failed."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from gateway.store import Store
from gateway.store.pairs import PAIRS_TTL_S
from gateway.store.records import BUCKETS, MemoryRecordStore, RedisRecordStore
from gateway.store.rollouts import FORGOTTEN_S, RedisRolloutStore
from gateway.store.shared import Shared
from gateway.tasks import Spawner
from tests.conftest import REDIS_URL, RedisServer
from tests.test_state import canary_text, routes_of

HOUR = 3600.0


def record(n: int) -> str:
    return f"chat\x1fcandidate\x1fall\x1f{n:016x}"


def test_request_records_are_found_for_their_ttl_on_any_replica_and_then_gone(redis_prefix: str) -> None:
    now = [1_000_000.0]

    async def run() -> None:
        shared = Shared(REDIS_URL, redis_prefix)
        writer = RedisRecordStore(shared, ttl_s=24 * HOUR, bound=10_000, clock=lambda: now[0])
        reader = RedisRecordStore(shared, ttl_s=24 * HOUR, bound=10_000, clock=lambda: now[0] - 30)  # behind
        ours = str(uuid.uuid4())
        try:
            await writer.remember({ours: record(1), "client-chosen id": record(2)})
            assert await reader.recall(ours) == record(1)  # a replica whose clock runs 30 s behind
            assert await reader.recall("client-chosen id") == record(2)
            assert await reader.recall(str(uuid.uuid4())) is None
            assert await reader.recall(ours.upper()) is None  # another spelling is another id
            now[0] += 23 * HOUR  # a day later, give or take a bucket: still there
            assert await writer.recall(ours) == record(1)
            now[0] += 2 * HOUR  # past the TTL: not looked for; and its hash expires with its bucket
            assert await writer.recall(ours) is None
            client = shared.redis
            keys = [k async for k in client.scan_iter(match=f"{redis_prefix}requests:*")]
            ttls = [await client.ttl(k) for k in keys]
            assert keys and all(ttl > 0 for ttl in ttls)
            assert await writer.first_feedback(ours) and not await reader.first_feedback(ours)
        finally:
            await shared.close()

    asyncio.run(run())


def test_request_records_stay_within_their_bound_the_oldest_going_first(redis_prefix: str) -> None:
    now = [2_000_000.0]
    ttl_s = 24 * HOUR
    bound = 2_000

    async def run() -> None:
        shared = Shared(REDIS_URL, redis_prefix)
        store = RedisRecordStore(shared, ttl_s=ttl_s, bound=bound, clock=lambda: now[0])
        ids: list[str] = []
        dropped = 0
        try:
            for _ in range(30):  # thirty buckets of 100 records each: half as much again as the bound
                batch = {str(uuid.uuid4()): record(n) for n in range(100)}
                ids += batch
                dropped += await store.remember(batch)
                now[0] += ttl_s / BUCKETS
            kept = [rid for rid in ids if await store.recall(rid) is not None]
            assert bound - 100 < len(kept) <= bound  # whole buckets go: within one bucket of the bound
            assert dropped == len(ids) - len(kept)
            assert kept == ids[-len(kept) :]  # the newest answers still take feedback
            counts = await shared.redis.hgetall(f"{redis_prefix}requests-counts")
            assert sum(int(v) for v in counts.values()) == len(kept)
            for key in [k async for k in shared.redis.scan_iter(match=f"{redis_prefix}requests:*")]:
                assert await shared.redis.object("encoding", key) == b"listpack"  # the compact encoding
        finally:
            await shared.close()

    asyncio.run(run())


def test_the_memory_record_store_says_how_many_it_dropped() -> None:
    async def run() -> None:
        store = MemoryRecordStore(ttl_s=60, size=10)
        assert await store.remember({f"r{n}": record(n) for n in range(8)}) == 0
        assert await store.remember({f"r{n}": record(n) for n in range(8, 12)}) == 2
        assert await store.recall("r1") is None and await store.recall("r11") == record(11)

    asyncio.run(run())


def test_pair_streams_expire_after_their_last_record(redis_prefix: str) -> None:
    async def run() -> None:
        spawner = Spawner()
        store = Store.redis(REDIS_URL, redis_prefix, spawner)
        try:
            store.pairs.add({"pair_id": "p1", "route": "chat", "agree": True}, 100)
            assert [r["pair_id"] for r in await store.pairs.recent("chat", 10, False)] == ["p1"]
            ttl = await store.shared.redis.ttl(f"{redis_prefix}pairs:chat")  # type: ignore[union-attr]
            assert PAIRS_TTL_S - 60 < ttl <= PAIRS_TTL_S
        finally:
            await spawner.close()
            await store.close()

    asyncio.run(run())


def test_a_route_no_replica_serves_is_forgotten_and_one_that_serves_it_writes_it_back(
    tmp_path: Path, redis_prefix: str
) -> None:
    (chat,) = routes_of(tmp_path, canary_text(weight=30))
    (other,) = routes_of(tmp_path, canary_text(weight=30).replace("chat", "other"), name="other")

    async def run() -> None:
        spawner = Spawner()
        shared = Shared(REDIS_URL, redis_prefix)
        old = RedisRolloutStore(shared, spawner, poll_s=30)  # a replica whose policies have both routes
        new = RedisRolloutStore(Shared(REDIS_URL, redis_prefix), spawner, poll_s=30)  # "other" deleted
        client = shared.redis
        try:
            await old.adopt([chat, other])
            await new.adopt([chat])
            assert await client.ttl(f"{redis_prefix}rollout:chat") == -1  # served: kept
            ttl = await client.ttl(f"{redis_prefix}rollout:other")
            assert FORGOTTEN_S - 60 < ttl <= FORGOTTEN_S
            await client.delete(f"{redis_prefix}rollout:other")  # as if its TTL ran out
            await old.refresh()  # a replica still serving it resumes it where it was
            resumed = old.current("other")
            assert resumed is not None and resumed.weight == 30
            assert await client.ttl(f"{redis_prefix}rollout:other") == -1
        finally:
            await spawner.close()
            await shared.close()
            await new._shared.close()

    asyncio.run(run())


def test_a_command_on_a_connection_redis_closed_is_sent_again_not_failed(own_redis: RedisServer) -> None:
    async def run() -> None:
        shared = Shared(own_redis.url, "t:")
        store = RedisRecordStore(shared, ttl_s=60)
        try:
            await store.remember({"before": record(1)})  # a pooled connection, idle from now on
            own_redis.stop()
            own_redis.start()  # Redis restarts (empty)
            assert await store.first_feedback("after")  # answered, not StateUnavailable
            assert shared.error is None
        finally:
            await shared.close()

    asyncio.run(run())
