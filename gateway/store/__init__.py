"""What canarygate keeps, and where: in this process (the default), or in Redis, shared by every
replica (CANARYGATE_REDIS_URL). One module per kind of record, its memory and Redis stores side by side:

  rollouts.py  rollout state per route and its transitions: authoritative, compare-and-set
  stats.py     per-interval statistics of each arm: the controller's evidence
  lease.py     which replica runs the controller
  records.py   request id -> who answered, for feedback; feedback already counted
  pairs.py     compared shadow pairs, for export
  traces.py    open traces (agent runs) summed step by step, each handed once to a replica when it ends

Redis down: requests never fail for it; writes raise StateUnavailable and readers serve what they saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gateway.route import Route
from gateway.store.lease import Lease, MemoryLease, RedisLease
from gateway.store.pairs import MemoryPairStore, PairStore, RedisPairStore
from gateway.store.records import (
    MEMORY_RECORDS,
    REDIS_RECORDS,
    MemoryRecordStore,
    RecordStore,
    RedisRecordStore,
)
from gateway.store.rollouts import POLL_S, MemoryRolloutStore, RedisRolloutStore, RolloutStore
from gateway.store.shared import Shared, StateUnavailable
from gateway.store.stats import MemoryStatsStore, RedisStatsStore, StatsStore
from gateway.store.traces import MemoryTraceStore, RedisTraceStore, TraceStore
from gateway.tasks import Spawner

__all__ = ["StateUnavailable", "Store"]


@dataclass
class Store:
    backend: str  # "memory" or "redis"
    rollouts: RolloutStore
    stats: StatsStore
    lease: Lease
    records: RecordStore
    pairs: PairStore
    traces: TraceStore
    shared: Shared | None = None

    @classmethod
    def memory(cls, records_ttl_s: float = 86400.0, records: int = MEMORY_RECORDS) -> Store:
        records_store = MemoryRecordStore(records_ttl_s, records)
        return cls(
            "memory",
            MemoryRolloutStore(),
            MemoryStatsStore(),
            MemoryLease(),
            records_store,
            MemoryPairStore(),
            MemoryTraceStore(),
        )

    @classmethod
    def redis(
        cls,
        url: str,
        prefix: str,
        spawner: Spawner,
        records_ttl_s: float = 86400.0,
        records: int = REDIS_RECORDS,
        on_error: Callable[[], object] | None = None,
        poll_s: float | None = None,
    ) -> Store:
        """Every store on one Redis client (one connection pool)."""
        shared = Shared(url, prefix, on_error)
        return cls(
            backend="redis",
            rollouts=RedisRolloutStore(shared, spawner, POLL_S if poll_s is None else poll_s),
            stats=RedisStatsStore(shared),
            lease=RedisLease(shared),
            records=RedisRecordStore(shared, records_ttl_s, records),
            pairs=RedisPairStore(shared, spawner),
            traces=RedisTraceStore(shared),
            shared=shared,
        )

    async def start(self, routes: Iterable[Route]) -> None:
        """Reads (or starts) every route's rollout, then starts the background syncs and flushes."""
        await self.rollouts.start(routes)
        self.pairs.start()

    def health(self) -> dict[str, Any]:
        return self.shared.health() if self.shared is not None else {"backend": "memory", "ok": True}

    async def close(self) -> None:
        await self.pairs.close()
        if self.shared is not None:
            await self.shared.close()
