"""Open traces (an agent run, a conversation: the requests sharing a trace key), summed step by step
until no step has come for the route's idle timeout; then each is handed, once, to the replica that
ends it. In memory for one replica; in Redis (a hash per trace, a sorted set of their deadlines) for
several, where a trace's steps may reach any replica.

Bounded: at most max_open traces are kept open (the ones nearest their deadline end early, counted
as evicted), every hash expires on its own a while after its deadline, and the sums of a trace are a
dozen numbers."""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from redis.exceptions import RedisError

from gateway.store.shared import Shared

# What a trace sums: model calls, tokens (cached and reasoning ones are part of input and output), tool
# calls asked for, and its failures by kind (a step may count in several).
COUNTS = (
    "steps", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "tool_calls",
    "fallbacks", "invalid", "errors", "eval_failures",
)  # fmt: skip
FLOATS = ("cost",)
FAILURES = ("fallbacks", "invalid", "errors", "eval_failures")
INFLIGHT = "inflight"  # steps begun and not yet ended: a trace is never ended under a step in flight
MIXED = "mixed"  # the arm of a trace whose steps were served by both (its weight changed mid-run)
TTL_MARGIN_S = 3600  # a trace's hash outlives its deadline by this much, for a sweep that comes late
Ended = Literal["idle", "evicted"]


def trace_id(route: str, trace: str, scope: str | None = None) -> str:
    """A trace's id in the store: bounded and printable, whatever the client's key. scope: the client's
    API key, when keys are required: two clients' conversations "1" are two traces, and one client's
    feedback never reaches another's."""
    return hashlib.sha256(f"{route}\x1f{scope or ''}\x1f{trace}".encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class TraceMeta:
    """Who a trace is, from its first step."""

    route: str
    trace: str
    rollout: str
    arm: str  # base or candidate: the arm assigned; MIXED once steps were assigned both
    cohort: str
    group: int  # its unit's (routing.Unit), for the design effects
    sign: int
    unit: str  # its unit's opaque id, "" without one


@dataclass(slots=True)
class Finished:
    meta: TraceMeta
    started: float
    ended: Ended
    sums: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return self.sums.get(name, 0)

    @property
    def failed(self) -> bool:
        return any(self.sums.get(kind, 0) for kind in FAILURES)


class TraceStore(Protocol):
    local: bool  # a step's index is known at once (no round trip)

    async def step(self, tid: str, meta: TraceMeta, now: float, deadline: float, max_open: int) -> int:
        """A step begins: the trace is opened (or its arm marked MIXED when this step's differs), its
        step count and its steps in flight go up by one and its deadline moves to `deadline` (now + the
        idle timeout). Returns the step's index (1..)."""

    async def add(self, batch: Mapping[str, tuple[float, Mapping[str, float]]], now: float) -> int:
        """Steps' sums, per trace id: (its new deadline, field -> amount; INFLIGHT -1 per step ended).
        Returns how many traces had ended already (their late sums are dropped)."""

    async def finished(self, now: float, limit: int, max_open: int) -> list[Finished]:
        """Traces past their deadline with no step in flight (one with a step in flight is looked at
        again an idle timeout later), and the soonest-due ones beyond max_open: each returned (and
        forgotten) once, whichever replica asks."""

    async def open_count(self) -> int: ...


@dataclass(slots=True)
class _Open:
    meta: TraceMeta
    started: float
    deadline: float
    idle: float  # its idle timeout
    sums: dict[str, float]
    inflight: int = 0


class MemoryTraceStore:
    local = True

    def __init__(self) -> None:
        self._open: OrderedDict[str, _Open] = OrderedDict()  # by last activity, the least recent first
        self._deadlines: list[tuple[float, str]] = []  # a heap; an entry whose trace moved on is stale
        self._evicted: list[Finished] = []

    def step_now(self, tid: str, meta: TraceMeta, now: float, deadline: float, max_open: int) -> int:
        entry = self._open.get(tid)
        if entry is None:
            entry = self._open[tid] = _Open(meta, now, deadline, deadline - now, {})
            heapq.heappush(self._deadlines, (deadline, tid))
            while len(self._open) > max_open:  # the least recently active ends early
                old = self._open.popitem(last=False)[1]
                self._evicted.append(Finished(old.meta, old.started, "evicted", old.sums))
        else:
            self._touch(tid, entry, deadline)
            if entry.meta.arm != meta.arm:
                entry.meta = replace(entry.meta, arm=MIXED)
        entry.inflight += 1
        entry.sums["steps"] = entry.sums.get("steps", 0) + 1
        return int(entry.sums["steps"])

    def _touch(self, tid: str, entry: _Open, deadline: float) -> None:
        self._open.move_to_end(tid)
        if deadline > entry.deadline:
            entry.deadline = deadline
            heapq.heappush(self._deadlines, (deadline, tid))
            if len(self._deadlines) > 4 * len(self._open) + 1024:  # mostly stale: keep it to the open
                self._deadlines = [(e.deadline, t) for t, e in self._open.items()]
                heapq.heapify(self._deadlines)

    async def step(self, tid: str, meta: TraceMeta, now: float, deadline: float, max_open: int) -> int:
        return self.step_now(tid, meta, now, deadline, max_open)

    async def add(self, batch: Mapping[str, tuple[float, Mapping[str, float]]], now: float) -> int:
        gone = 0
        for tid, (deadline, sums) in batch.items():
            entry = self._open.get(tid)
            if entry is None:
                gone += 1
                continue
            self._touch(tid, entry, deadline)
            for name, amount in sums.items():
                if name == INFLIGHT:
                    entry.inflight += int(amount)
                else:
                    entry.sums[name] = entry.sums.get(name, 0) + amount
        return gone

    async def finished(self, now: float, limit: int, max_open: int) -> list[Finished]:
        out, self._evicted = self._evicted[:limit], self._evicted[limit:]
        while self._deadlines and self._deadlines[0][0] <= now and len(out) < limit:  # only what is due
            deadline, tid = heapq.heappop(self._deadlines)
            entry = self._open.get(tid)
            if entry is None or entry.deadline != deadline:
                continue  # ended or evicted already, or its deadline moved on
            if entry.inflight > 0:  # a step still running (a long generation): looked at again later
                self._touch(tid, entry, now + entry.idle)
                continue
            del self._open[tid]
            out.append(Finished(entry.meta, entry.started, "idle", entry.sums))
        return out

    async def open_count(self) -> int:
        return len(self._open)


def _fields(meta: TraceMeta) -> dict[str, str | int]:
    return {name: getattr(meta, name) for name in TraceMeta.__slots__}


# KEYS[1]: the trace's hash, KEYS[2]: the open traces' deadlines. ARGV: id, deadline, ttl, then the meta
# fields (route, trace, rollout, arm, cohort, group, sign, unit), now and the idle timeout. Returns the
# step's index.
_STEP = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'route', ARGV[4], 'trace', ARGV[5], 'rollout', ARGV[6], 'arm', ARGV[7],
    'cohort', ARGV[8], 'group', ARGV[9], 'sign', ARGV[10], 'unit', ARGV[11], 'started', ARGV[12],
    'idle', ARGV[13])
elseif redis.call('HGET', KEYS[1], 'arm') ~= ARGV[7] then
  redis.call('HSET', KEYS[1], 'arm', 'mixed')
end
redis.call('HINCRBY', KEYS[1], 'inflight', 1)
local steps = redis.call('HINCRBY', KEYS[1], 'steps', 1)
redis.call('ZADD', KEYS[2], 'GT', ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return steps
"""
# KEYS[1]: the open traces' deadlines. ARGV: the hashes' prefix, ttl, then per trace: id, deadline, the
# number of fields, and each field's name and amount. Sums of a trace that has ended are dropped.
# Returns how many traces had.
_ADD = """
local gone, i = 0, 3
while i <= #ARGV do
  local id, deadline, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local key = ARGV[1] .. id
  i = i + 3
  if redis.call('EXISTS', key) == 1 then
    for j = 0, n - 1 do
      redis.call('HINCRBYFLOAT', key, ARGV[i + 2 * j], ARGV[i + 2 * j + 1])
    end
    redis.call('ZADD', KEYS[1], 'XX', 'GT', deadline, id)
    redis.call('EXPIRE', key, ARGV[2])
  else
    gone = gone + 1
  end
  i = i + 2 * n
end
return gone
"""
# KEYS[1]: the open traces' deadlines. ARGV: the hashes' prefix, now, limit, max_open. Pops the traces
# due with no step in flight (one with a step in flight is looked at again an idle timeout later; one
# whose hash expired is let go) and, beyond max_open, the soonest due; returns, per trace, why it ended
# and its hash.
_FINISHED = """
local out = {}
local function pop(id, why)
  local key = ARGV[1] .. id
  redis.call('ZREM', KEYS[1], id)
  local fields = redis.call('HGETALL', key)
  redis.call('DEL', key)
  if #fields > 0 then
    table.insert(out, why)
    table.insert(out, fields)
  end
end
local limit = tonumber(ARGV[3])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, limit)) do
  local state = redis.call('HMGET', ARGV[1] .. id, 'inflight', 'idle')
  if state[1] and tonumber(state[1]) > 0 then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(state[2] or 1), id)
  else
    pop(id, 'idle')
  end
end
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
if over > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, math.min(over, limit) - 1)) do
    pop(id, 'evicted')
  end
end
return out
"""


class RedisTraceStore:
    """A hash per open trace ({prefix}trace:{id}: the meta fields, started, and the sums), and one sorted
    set of the open traces' deadlines ({prefix}traces:open). A hash expires TTL_MARGIN_S after its
    deadline should a sweep never come."""

    local = False

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._hashes = f"{shared.prefix}trace:"
        self._open = f"{shared.prefix}traces:open"
        redis = shared.redis
        self._step = redis.register_script(_STEP)
        self._add = redis.register_script(_ADD)
        self._finished = redis.register_script(_FINISHED)

    async def step(self, tid: str, meta: TraceMeta, now: float, deadline: float, max_open: int) -> int:
        ttl = int(deadline - now) + TTL_MARGIN_S
        args = (tid, repr(deadline), ttl, *(_fields(meta).values()), repr(now), repr(deadline - now))
        try:
            return int(await self._step(keys=[self._hashes + tid, self._open], args=args))
        except RedisError as exc:
            self._shared.unavailable(exc, write=True)

    async def add(self, batch: Mapping[str, tuple[float, Mapping[str, float]]], now: float) -> int:
        if not batch:
            return 0
        args: list[str | int] = [self._hashes, 0]
        longest = 0.0
        for tid, (deadline, sums) in batch.items():
            fields = [x for name, amount in sums.items() if amount for x in (name, repr(float(amount)))]
            args += (tid, repr(deadline), len(fields) // 2, *fields)
            longest = max(longest, deadline)
        args[1] = int(longest - now) + TTL_MARGIN_S
        try:
            return int(await self._add(keys=[self._open], args=args))
        except RedisError as exc:
            self._shared.unavailable(exc, write=True)

    async def finished(self, now: float, limit: int, max_open: int) -> list[Finished]:
        try:
            raw = await self._finished(keys=[self._open], args=[self._hashes, repr(now), limit, max_open])
        except RedisError as exc:
            self._shared.unavailable(exc, write=True)
        out = []
        for why, fields in zip(raw[::2], raw[1::2], strict=True):
            values = {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}
            meta = TraceMeta(
                values.get("route", ""), values.get("trace", ""), values.get("rollout", ""),
                values.get("arm", MIXED), values.get("cohort", "all"), int(values.get("group", 0)),
                int(values.get("sign", 1)), values.get("unit", ""),
            )  # fmt: skip
            sums = {name: float(values[name]) for name in (*COUNTS, *FLOATS) if name in values}
            ended: Ended = "evicted" if why == b"evicted" else "idle"
            out.append(Finished(meta, float(values.get("started", now)), ended, sums))
        return out

    async def open_count(self) -> int:
        try:
            return int(await self._shared.redis.zcard(self._open))
        except RedisError as exc:
            self._shared.unavailable(exc)
