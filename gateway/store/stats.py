"""Per-interval statistics of each arm of a rollout: the controller's evidence. Replicas add their
deltas once a second; the controller reads the sum over every replica."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

from redis.exceptions import RedisError

from gateway.analysis import ArmWindow
from gateway.store.shared import BATCH_MARK_S, Shared

# route, rollout, interval number, arm ("base", "candidate", "shadow", ...); interval -1 (stats.UNITS) holds
# the rollout's windows per unit group, arm "candidate@cohort#group".
StatsKey = tuple[str, str, int, str]
MEMORY_UNITS = 1_000_000  # units kept per step, arm and cohort in memory (a set; Redis keeps a HyperLogLog)
UNITS = -1  # the "intervals" under which the windows per unit group are kept: one per step, counting down


def units_interval(step: int) -> int:
    """Where a step's windows per unit group are kept: -1 for the mirror-only phase (step -1), -2 for
    the first step (and manual mode), and so on."""
    return UNITS - 1 - step


STATS_TTL_S = 7 * 86400


class StatsStore(Protocol):
    async def add(self, batch: Mapping[StatsKey, ArmWindow], batch_id: str) -> None:
        """Add per-interval statistics (deltas from one replica), once per batch_id: a batch sent again
        after a write that timed out (and may have been applied) is not counted twice."""

    async def read(self, route: str, rollout: str, intervals: range) -> dict[int, dict[str, ArmWindow]]:
        """interval -> arm -> statistics summed over every replica."""

    def keep_only(self, rollouts: set[tuple[str, str]]) -> None:
        """The (route, rollout) pairs still served: the statistics of the others may go."""

    async def seen(self, batch: Mapping[StatsKey, set[str]]) -> None:
        """Units served (opaque ids) per (route, rollout, step's interval number, "arm@cohort")."""

    async def units(self, route: str, rollout: str, interval: int, arms: list[str]) -> dict[str, int]:
        """How many distinct units each arm ("arm@cohort") served in the step (estimates, in Redis)."""


class MemoryStatsStore:
    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], dict[int, dict[str, ArmWindow]]] = {}
        self._seen: dict[StatsKey, set[str]] = {}  # exact sets, up to MEMORY_UNITS each

    async def add(self, batch: Mapping[StatsKey, ArmWindow], batch_id: str) -> None:
        for (route, rollout, interval, arm), window in batch.items():
            arms = self._stats.setdefault((route, rollout), {}).setdefault(interval, {})
            arms.setdefault(arm, ArmWindow()).merge(window)

    async def read(self, route: str, rollout: str, intervals: range) -> dict[int, dict[str, ArmWindow]]:
        stored = self._stats.get((route, rollout), {})
        return {i: stored[i] for i in intervals if i in stored}

    def keep_only(self, rollouts: set[tuple[str, str]]) -> None:
        for key in [k for k in self._stats if k not in rollouts]:
            del self._stats[key]  # statistics of rollouts that ended
        for seen in [k for k in self._seen if (k[0], k[1]) not in rollouts]:
            del self._seen[seen]

    async def seen(self, batch: Mapping[StatsKey, set[str]]) -> None:
        for key, units in batch.items():
            kept = self._seen.setdefault(key, set())
            if len(kept) < MEMORY_UNITS:
                kept.update(units)

    async def units(self, route: str, rollout: str, interval: int, arms: list[str]) -> dict[str, int]:
        return {arm: len(self._seen.get((route, rollout, interval, arm), ())) for arm in arms}


# A statistics batch, applied once: KEYS[1] marks the batch as applied (for ARGV[1] s); ARGV[2] is the
# keys' TTL; then per key: its name, its number of operations, and each as field, "i"|"f"|"s", amount
# (HINCRBY, HINCRBYFLOAT, or SADD of the field to a set).
_ADD_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local i = 3
while i <= #ARGV do
  local key, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  for _ = 1, n do
    if ARGV[i + 1] == 'f' then
      redis.call('HINCRBYFLOAT', key, ARGV[i], ARGV[i + 2])
    elseif ARGV[i + 1] == 's' then
      redis.call('SADD', key, ARGV[i])
    else
      redis.call('HINCRBY', key, ARGV[i], ARGV[i + 2])
    end
    i = i + 3
  end
  redis.call('EXPIRE', key, ARGV[2])
end
return 1
"""
_COUNTS = (
    "requests", "unattempted", "errors", "invalid", "fallbacks", "tokens", "token_answers",
    "feedback", "negative", "escalated", "timed", "ttfts", "signed", "traces", "trace_failures",
    "trace_steps",
)  # fmt: skip
_FLOATS = (
    "tokens_sq", "cost", "cost_sq", "expected", "expected_sq", "log_latency", "log_latency_sq", "log_ttft",
    "log_ttft_sq", "trace_steps_sq", "trace_cost", "trace_cost_sq",
)  # fmt: skip


class RedisStatsStore:
    """A hash per (route, rollout, interval), field "arm|name", kept STATS_TTL_S after its last write.
    The windows per unit group (negative intervals) are a small hash each, field "name", listed in a set
    "...:{interval}:arms": Redis keeps a hash of few short fields as one compact listpack, where a hash
    of thousands of fields (64 groups x arms x 14 sums) costs about 2.5 times as much."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._prefix = shared.prefix
        self._add_once = shared.redis.register_script(_ADD_ONCE)

    async def add(self, batch: Mapping[StatsKey, ArmWindow], batch_id: str) -> None:
        """One script call per flush: HINCRBY into a hash per (route, rollout, interval), applied once per
        batch id (a batch whose write timed out, and is sent again, may have been applied already)."""
        args: list[str | int | float] = [BATCH_MARK_S, STATS_TTL_S]
        listed: dict[str, list[str]] = {}  # index set -> the unit groups' hashes it lists
        for (route, rollout, interval, arm), w in batch.items():
            key = f"{self._prefix}stats:{route}:{rollout}:{interval}"
            prefix = f"{arm}|"
            if interval < 0:  # a unit group's window: a small hash of its own
                listed.setdefault(f"{key}:arms", []).append(arm)
                key, prefix = f"{key}:{arm}", ""
            fields: list[str | int | float] = []
            for name in _COUNTS:
                if value := getattr(w, name):
                    fields += (f"{prefix}{name}", "i", value)
            for name in _FLOATS:
                if value := getattr(w, name):
                    fields += (f"{prefix}{name}", "f", repr(float(value)))
            for kind, hist in (("l", w.latency), ("t", w.ttft)):
                for bucket, count in hist.items():
                    fields += (f"{prefix}{kind}{bucket}", "i", count)
            for evaluator, values in w.scores.items():  # "ev:NAME:0".."3": results, sum, squares, flips
                for i, value in enumerate(values):
                    if value:
                        fields += (f"{prefix}ev:{evaluator}:{i}", "f", repr(float(value)))
            args += (key, len(fields) // 3, *fields)
        for index, arms in listed.items():
            args += (index, len(arms), *(x for arm in arms for x in (arm, "s", 0)))
        marker = f"{self._prefix}stats-batch:{batch_id or os.urandom(12).hex()}"
        try:
            await self._add_once(keys=[marker], args=args)
        except RedisError as exc:
            self._shared.unavailable(exc, write=True)

    async def read(self, route: str, rollout: str, intervals: range) -> dict[int, dict[str, ArmWindow]]:
        key = f"{self._prefix}stats:{route}:{rollout}"
        pipe = self._shared.redis.pipeline(transaction=False)
        for interval in intervals:
            if interval < 0:
                pipe.smembers(f"{key}:{interval}:arms")
            else:
                pipe.hgetall(f"{key}:{interval}")
        try:
            answers = await pipe.execute()
            groups = [
                (i, sorted(m.decode() for m in a))
                for i, a in zip(intervals, answers, strict=True)
                if i < 0 and a
            ]
            pipe = self._shared.redis.pipeline(transaction=False)
            for interval, arms in groups:
                for arm in arms:
                    pipe.hgetall(f"{key}:{interval}:{arm}")
            windows = iter(await pipe.execute() if groups else [])
        except RedisError as exc:
            self._shared.unavailable(exc)
        out: dict[int, dict[str, ArmWindow]] = {}
        for interval, fields in zip(intervals, answers, strict=True):
            if fields and interval >= 0:
                out[interval] = _windows(fields)
        for interval, arms in groups:
            out[interval] = {arm: _window(next(windows)) for arm in arms}
        return out

    def keep_only(self, rollouts: set[tuple[str, str]]) -> None:
        pass  # each hash expires STATS_TTL_S after its last write

    async def seen(self, batch: Mapping[StatsKey, set[str]]) -> None:
        """A HyperLogLog per (route, rollout, step, arm@cohort): 12 KB at most, whatever the units."""
        pipe = self._shared.redis.pipeline(transaction=False)
        for (route, rollout, interval, arm), units in batch.items():
            key = f"{self._prefix}seen:{route}:{rollout}:{interval}:{arm}"
            members = list(units)
            for start in range(0, len(members), 1000):
                pipe.pfadd(key, *members[start : start + 1000])
            pipe.expire(key, STATS_TTL_S)
        try:
            await pipe.execute()
        except RedisError as exc:
            self._shared.unavailable(exc, write=True)

    async def units(self, route: str, rollout: str, interval: int, arms: list[str]) -> dict[str, int]:
        pipe = self._shared.redis.pipeline(transaction=False)
        for arm in arms:
            pipe.pfcount(f"{self._prefix}seen:{route}:{rollout}:{interval}:{arm}")
        try:
            counts = await pipe.execute()
        except RedisError as exc:
            self._shared.unavailable(exc)
        return {arm: int(count) for arm, count in zip(arms, counts, strict=True)}


def _windows(fields: Mapping[bytes, bytes]) -> dict[str, ArmWindow]:
    """An interval's hash: every arm's window, field "arm|name"."""
    arms: dict[str, ArmWindow] = {}
    for raw_name, raw_value in fields.items():
        arm, _, name = raw_name.decode().partition("|")
        _set(arms.setdefault(arm, ArmWindow()), name, raw_value)
    return arms


def _window(fields: Mapping[bytes, bytes]) -> ArmWindow:
    """A unit group's hash: one window, field "name"."""
    window = ArmWindow()
    for raw_name, raw_value in fields.items():
        _set(window, raw_name.decode(), raw_value)
    return window


def _set(window: ArmWindow, name: str, raw_value: bytes) -> None:
    if name.startswith("ev:"):
        evaluator, _, index = name[3:].rpartition(":")
        window.scores.setdefault(evaluator, [0.0, 0.0, 0.0, 0.0])[int(index)] = float(raw_value)
    elif name in _FLOATS:
        setattr(window, name, float(raw_value))
    elif name in _COUNTS:
        setattr(window, name, int(raw_value))
    elif name[:1] in ("l", "t"):
        hist = window.latency if name[0] == "l" else window.ttft
        hist[int(name[1:])] = int(raw_value)
