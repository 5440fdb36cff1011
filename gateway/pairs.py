"""Pair records: compared shadow pairs, kept for export (counterexamples for the next tuning round).

In memory by default (a bounded deque per route); with CANARYGATE_REDIS_URL, a capped Redis stream per
route shared by every replica, written in batches by one background flusher (never a round trip per
request). Redis being down never fails a request: records wait in a bounded buffer, then are dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.state import StateUnavailable
from gateway.tasks import Spawner

log = logging.getLogger("gateway.pairs")


class PairStore(Protocol):
    def add(self, record: dict[str, Any], limit: int) -> None: ...

    async def recent(self, route: str, count: int, disagreements: bool) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class MemoryPairStore:
    def __init__(self) -> None:
        self._records: dict[str, deque[dict[str, Any]]] = {}

    def add(self, record: dict[str, Any], limit: int) -> None:
        kept = self._records.get(record["route"])
        if kept is None or kept.maxlen != limit:
            kept = deque(kept or (), maxlen=limit)
            self._records[record["route"]] = kept
        kept.append(record)

    async def recent(self, route: str, count: int, disagreements: bool) -> list[dict[str, Any]]:
        found = [r for r in reversed(self._records.get(route, ())) if not disagreements or not r["agree"]]
        return found[:count]

    async def close(self) -> None:
        pass


class RedisPairStore:
    """A capped stream per route (XADD MAXLEN ~), fed from a local buffer flushed twice a second."""

    FLUSH_S = 0.5
    BUFFER = 10_000
    SCAN = 100_000

    def __init__(self, url: str, prefix: str, spawner: Spawner) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._prefix = prefix
        self._buffer: deque[tuple[dict[str, Any], int]] = deque(maxlen=self.BUFFER)
        self._wake = asyncio.Event()
        self._failing = False
        spawner.spawn(self._flush_forever(), name="pair-records-flush")

    def key(self, route: str) -> str:
        return f"{self._prefix}pairs:{route}"

    def add(self, record: dict[str, Any], limit: int) -> None:
        self._buffer.append((record, limit))  # past BUFFER records (Redis away), the oldest go first

    async def recent(self, route: str, count: int, disagreements: bool) -> list[dict[str, Any]]:
        await self.flush()
        # Newest first; the stream is capped, so scanning it for disagreements stays bounded.
        scan = self.SCAN if disagreements else count
        try:
            entries = await self._redis.xrevrange(self.key(route), count=scan)
        except RedisError as exc:
            raise StateUnavailable(str(exc)) from exc
        records = [orjson.loads(fields[b"record"]) for _, fields in entries or () if fields]
        return [r for r in records if not disagreements or not r["agree"]][:count]

    async def flush(self) -> None:
        if not self._buffer:
            return
        pending = list(self._buffer)
        self._buffer.clear()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for record, limit in pending:
                    pipe.xadd(
                        self.key(record["route"]),
                        {"record": orjson.dumps(record)},
                        maxlen=limit,
                        approximate=True,
                    )
                await pipe.execute()
            if self._failing:
                log.warning("pair records reach Redis again")
            self._failing = False
        except (RedisError, OSError) as exc:
            self._buffer.extendleft(reversed(pending))  # keep them for the next try (bounded)
            if not self._failing:
                log.warning("pair records cannot reach Redis, holding up to %d: %s", self.BUFFER, exc)
            self._failing = True

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_S)
            await self.flush()

    async def close(self) -> None:
        await self.flush()
        await self._redis.aclose()
