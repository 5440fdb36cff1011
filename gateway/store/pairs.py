"""Pair records: compared shadow pairs, kept for export (counterexamples for the next tuning round).

In memory by default (a bounded deque per route); with CANARYGATE_REDIS_URL, a capped Redis stream per
route shared by every replica, written in batches by one background flusher (never a round trip per
request), kept PAIRS_TTL_S after its last record (a deleted route's goes then). Redis being down never
fails a request: records wait in a bounded buffer, then are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from typing import Any, Protocol

import orjson
from redis.exceptions import RedisError

from gateway.store.shared import BATCH_MARK_S, Shared
from gateway.tasks import Spawner

log = logging.getLogger("gateway.store.pairs")
PAIRS_TTL_S = 7 * 86400


class PairStore(Protocol):
    def start(self) -> None: ...

    def add(self, record: dict[str, Any], limit: int) -> None: ...

    async def recent(
        self, route: str, count: int, disagreements: bool, decisive: bool = False
    ) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class MemoryPairStore:
    def __init__(self) -> None:
        self._records: dict[str, deque[dict[str, Any]]] = {}

    def start(self) -> None:
        pass

    def add(self, record: dict[str, Any], limit: int) -> None:
        kept = self._records.get(record["route"])
        if kept is None or kept.maxlen != limit:
            kept = deque(kept or (), maxlen=limit)
            self._records[record["route"]] = kept
        kept.append(record)

    async def recent(
        self, route: str, count: int, disagreements: bool, decisive: bool = False
    ) -> list[dict[str, Any]]:
        found = [r for r in reversed(self._records.get(route, ())) if wanted(r, disagreements, decisive)]
        return found[:count]

    async def close(self) -> None:
        pass


def wanted(record: dict[str, Any], disagreements: bool, decisive: bool) -> bool:
    """disagreements: only pairs that disagree on a check; decisive: only pairs a pairwise judge decided
    (a win or a loss for the candidate)."""
    if disagreements and record["agree"]:
        return False
    if decisive:
        verdicts = record.get("verdicts") or {}
        return any(v.get("verdict") in ("win", "loss") for v in verdicts.values())
    return True


# A batch of pair records, added once: KEYS[1] marks the batch as added (for ARGV[1] s); ARGV[2] is the
# streams' TTL; then per record: its stream, the stream's cap, the record.
_ADD_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 3, #ARGV, 3 do
  redis.call('XADD', ARGV[i], 'MAXLEN', '~', ARGV[i + 1], '*', 'record', ARGV[i + 2])
  redis.call('EXPIRE', ARGV[i], ARGV[2])
end
return 1
"""


class RedisPairStore:
    """A capped stream per route (XADD MAXLEN ~), fed from a local buffer flushed twice a second."""

    FLUSH_S = 0.5
    BUFFER = 10_000
    SCAN = 100_000

    def __init__(self, shared: Shared, spawner: Spawner) -> None:
        self._shared = shared
        self._redis = shared.redis
        self._prefix = shared.prefix
        self._buffer: deque[tuple[dict[str, Any], int]] = deque(maxlen=self.BUFFER)
        self._wake = asyncio.Event()
        self._failing = False
        self._unsent: tuple[str, list[tuple[dict[str, Any], int]]] | None = None  # (batch id, records)
        self._flushing = asyncio.Lock()
        self._add_once = self._redis.register_script(_ADD_ONCE)
        self._spawner = spawner

    def start(self) -> None:
        self._spawner.spawn(self._flush_forever(), name="pair-records-flush")

    def key(self, route: str) -> str:
        return f"{self._prefix}pairs:{route}"

    def add(self, record: dict[str, Any], limit: int) -> None:
        self._buffer.append((record, limit))  # past BUFFER records (Redis away), the oldest go first

    async def recent(
        self, route: str, count: int, disagreements: bool, decisive: bool = False
    ) -> list[dict[str, Any]]:
        await self.flush()
        # Newest first; the stream is capped, so scanning it for disagreements stays bounded.
        scan = self.SCAN if disagreements or decisive else count
        try:
            entries = await self._redis.xrevrange(self.key(route), count=scan)
        except RedisError as exc:
            self._shared.unavailable(exc)
        records = [orjson.loads(fields[b"record"]) for _, fields in entries or () if fields]
        return [r for r in records if wanted(r, disagreements, decisive)][:count]

    async def flush(self) -> None:
        """Sends what failed last time (as it was, under its id: a write that timed out may have been
        applied, and the store adds a batch id once), then what came since. One flush at a time: the
        periodic one and a reader's (`recent`) would otherwise each take the other's batch for theirs."""
        async with self._flushing:
            while self._unsent is not None or self._buffer:
                if self._unsent is None:
                    self._unsent = (os.urandom(12).hex(), list(self._buffer))
                    self._buffer.clear()
                batch_id, pending = self._unsent
                args: list[str | int | bytes] = [BATCH_MARK_S, PAIRS_TTL_S]
                for record, limit in pending:
                    args += (self.key(record["route"]), limit, orjson.dumps(record))
                try:
                    await self._add_once(keys=[f"{self._prefix}pairs-batch:{batch_id}"], args=args)
                except (RedisError, OSError) as exc:
                    if not self._failing:
                        log.warning("pair records cannot reach Redis, holding up to %d: %s", self.BUFFER, exc)
                    self._failing = True
                    return
                self._unsent = None
                if self._failing:
                    log.warning("pair records reach Redis again")
                self._failing = False

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_S)
            await self.flush()

    async def close(self) -> None:
        await self.flush()  # the connection is the store's: it closes it
