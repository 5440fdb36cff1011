"""Request records: request id -> who answered it (route, arm, cohort, rollout), kept for feedback, and
which request ids already had their feedback counted.

In memory: the newest CANARYGATE_MEMORY_RECORDS. In Redis: the newest CANARYGATE_REDIS_RECORDS, each for
CANARYGATE_FEEDBACK_TTL_S at most, packed into small hashes (Redis stores a hash of up to 128 short
fields as one compact listpack: ~4 times less memory than a key per record). A hash holds the records of
one time bucket (a 48th of the TTL) and one shard of request ids; a bucket's hashes expire together, and
when the records kept pass the bound the oldest bucket goes first, so the newest answers always take
feedback. The bound and the TTL must be the same on every replica (they decide where a record lives).
"""

from __future__ import annotations

import math
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from typing import Generic, Protocol, TypeVar

from redis.exceptions import RedisError

from gateway.store.shared import Shared

V = TypeVar("V")

MEMORY_RECORDS = 200_000  # default bound of in-memory records (the oldest go first)
REDIS_RECORDS = 2_000_000  # default bound of records in Redis
BUCKETS = 48  # time buckets per TTL
SHARD_FILL = 100  # records per hash at the bound, under Redis's hash-max-listpack-entries (128)


class RecordStore(Protocol):
    ttl_s: float

    async def remember(self, records: Mapping[str, str]) -> int:
        """Keep request id -> record; returns how many older records were dropped to stay in bound."""

    async def recall(self, request_id: str) -> str | None:
        """The record of a request id, or None when unknown, expired or dropped."""

    async def first_feedback(self, request_id: str) -> bool:
        """True the first time feedback arrives for this request id, False on a repeat."""


class MemoryRecordStore:
    def __init__(self, ttl_s: float, size: int = MEMORY_RECORDS) -> None:
        self.ttl_s = ttl_s
        self._records: Ring[str] = Ring(size)  # request id -> "expiry\x1frecord"
        self._feedback: Ring[float] = Ring(size)  # request id -> until when it counted

    async def remember(self, records: Mapping[str, str]) -> int:
        expires = f"{time.monotonic() + self.ttl_s:.3f}\x1f"
        return sum(self._records.put(request_id, expires + record) for request_id, record in records.items())

    async def recall(self, request_id: str) -> str | None:
        found = self._records.get(request_id)
        if found is None:
            return None
        expires, _, record = found.partition("\x1f")
        return record if float(expires) >= time.monotonic() else None

    async def first_feedback(self, request_id: str) -> bool:
        now = time.monotonic()
        if (self._feedback.get(request_id) or 0.0) > now:
            return False
        self._feedback.put(request_id, now + self.ttl_s)
        return True


class Ring(Generic[V]):
    """The newest `size` entries by key: a ring of keys beside a dict, so the oldest leaves in O(1).
    (Trimming a dict oldest-first scans the holes deletions leave; rebuilding it stalls the loop.)"""

    def __init__(self, size: int) -> None:
        self._keys: list[str | None] = [None] * size
        self._values: dict[str, V] = {}
        self._next = 0

    def put(self, key: str, value: V) -> bool:
        """Keeps key -> value; True when the oldest entry went to make room."""
        evicted = False
        if key not in self._values:
            oldest = self._keys[self._next]
            if oldest is not None:
                evicted = self._values.pop(oldest, None) is not None
            self._keys[self._next] = key
            self._next = (self._next + 1) % len(self._keys)
        self._values[key] = value
        return evicted

    def get(self, key: str) -> V | None:
        return self._values.get(key)

    def __len__(self) -> int:
        return len(self._values)


# KEYS[1]: the bucket counts (bucket -> records in it); KEYS[2..]: the hashes written. ARGV: 1 this bucket,
# 2 how long its hashes live from now (s), 3 the bound, 4 hashes per bucket, 5 the hashes' key prefix, 6 the
# oldest bucket still alive; then per hash: its number of records, and each record as field, value.
# Returns the number of records dropped (oldest buckets first) to stay within the bound.
_REMEMBER = """
local counts, bucket, bound = KEYS[1], ARGV[1], tonumber(ARGV[3])
local added, i = 0, 7
for k = 2, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, n do
    added = added + redis.call('HSET', KEYS[k], ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  redis.call('EXPIRE', KEYS[k], ARGV[2])
end
redis.call('HINCRBY', counts, bucket, added)
redis.call('EXPIRE', counts, ARGV[2])
local total, alive = 0, {}
local all = redis.call('HGETALL', counts)
for j = 1, #all, 2 do
  local b = tonumber(all[j])
  if b < tonumber(ARGV[6]) then
    redis.call('HDEL', counts, all[j])
  else
    total = total + tonumber(all[j + 1])
    table.insert(alive, b)
  end
end
table.sort(alive)
local dropped = 0
for _, b in ipairs(alive) do
  if total <= bound or b >= tonumber(bucket) then break end
  local n = tonumber(redis.call('HGET', counts, b))
  for s = 0, tonumber(ARGV[4]) - 1 do redis.call('UNLINK', ARGV[5] .. b .. ':' .. s) end
  redis.call('HDEL', counts, b)
  total = total - n
  dropped = dropped + n
end
return dropped
"""


class RedisRecordStore:
    def __init__(
        self,
        shared: Shared,
        ttl_s: float,
        bound: int = REDIS_RECORDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._shared = shared
        self.ttl_s = ttl_s
        self._bound = bound
        self._clock = clock
        self._bucket_s = max(60, math.ceil(ttl_s / BUCKETS))
        self._shards = max(1, math.ceil(bound / BUCKETS / SHARD_FILL))
        self._hashes = f"{shared.prefix}requests:"
        self._counts = f"{shared.prefix}requests-counts"
        self._remember = shared.redis.register_script(_REMEMBER)

    def _hash(self, bucket: int, field: bytes) -> str:
        return f"{self._hashes}{bucket}:{zlib.crc32(field) % self._shards}"

    async def remember(self, records: Mapping[str, str]) -> int:
        if not records:
            return 0
        now = self._clock()
        bucket = int(now // self._bucket_s)
        lives_s = math.ceil((bucket + 1) * self._bucket_s + self.ttl_s - now)  # the bucket's end + the TTL
        oldest = int((now - self.ttl_s) // self._bucket_s)
        hashes: dict[str, list[bytes | str]] = {}
        for request_id, record in records.items():
            field = _field(request_id)
            hashes.setdefault(self._hash(bucket, field), []).extend((field, record))
        args: list[bytes | str | int] = [bucket, lives_s, self._bound, self._shards, self._hashes, oldest]
        for pairs in hashes.values():
            args += (len(pairs) // 2, *pairs)
        try:
            return int(await self._remember(keys=[self._counts, *hashes], args=args))
        except RedisError as exc:
            self._shared.unavailable(exc, write=True)

    async def recall(self, request_id: str) -> str | None:
        """Newest bucket first; one bucket past now, for a replica whose clock runs ahead of ours."""
        field = _field(request_id)
        now = self._clock()
        newest = int(now // self._bucket_s) + 1
        oldest = int((now - self.ttl_s) // self._bucket_s)
        pipe = self._shared.redis.pipeline(transaction=False)
        for bucket in range(newest, oldest - 1, -1):
            pipe.hget(self._hash(bucket, field), field)
        try:
            found = await pipe.execute()
        except RedisError as exc:
            self._shared.unavailable(exc)
        for raw in found:
            if raw is not None:
                return raw.decode() if isinstance(raw, bytes) else str(raw)
        return None

    async def first_feedback(self, request_id: str) -> bool:
        key = f"{self._shared.prefix}feedback:{request_id}"
        try:
            return bool(await self._shared.redis.set(key, b"1", nx=True, ex=max(1, int(self.ttl_s))))
        except RedisError as exc:
            self._shared.unavailable(exc, write=True)


def _field(request_id: str) -> bytes:
    """A request id as a hash field: the gateway's own ids (UUIDs) as their 16 bytes, behind a zero byte
    no other id can start with; any other id as it is."""
    try:
        parsed = uuid.UUID(request_id) if len(request_id) == 36 else None
    except ValueError:
        parsed = None
    if parsed is not None and str(parsed) == request_id:
        return b"\x00" + parsed.bytes
    return request_id.encode()
