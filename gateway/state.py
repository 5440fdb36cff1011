"""Rollout state per route: phase, weight, step, history. Shared by every replica through Redis, or kept
in this process (the embedded default).

The hot path never waits on the store: each replica serves from the last state it saw (`current`),
refreshed by a pub/sub message when another replica changes something, and by polling every second in
case a message was lost. Writes are compare-and-set on a version, so two replicas (or an operator and
the controller) never overwrite each other's change unseen. Redis down: the replica keeps serving with
what it saw last, writes fail with StateUnavailable, and sync resumes by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Generic, Literal, Protocol, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.analysis import ArmWindow
from gateway.route import Route
from gateway.tasks import Spawner

log = logging.getLogger("gateway.state")
V = TypeVar("V")

Phase = Literal["shadow", "progressing", "paused", "promoted", "rolled_back", "manual"]
PHASES: tuple[Phase, ...] = ("shadow", "progressing", "paused", "promoted", "rolled_back", "manual")
HISTORY = 50  # transitions kept per route
SUPERSEDED = 50  # earlier rollouts remembered per route
MEMORY_RECORDS = 200_000  # default bound of in-memory assignment records (the oldest go first)
StatsKey = tuple[str, str, int, str]  # route, rollout, interval number, arm ("base", "candidate", "shadow")
POLL_S = 1.0


class StateUnavailable(Exception):
    """The shared store cannot be reached. maybe_applied: a write was sent and its answer never came
    (a timeout), so it may have been applied; otherwise nothing was changed."""

    def __init__(self, message: str, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class VersionConflict(Exception):
    """Someone else changed the route's state first; read it again and decide again."""


@dataclass(frozen=True)
class Transition:
    at: float
    phase: Phase
    weight: float
    step: int
    reason: str
    by: str  # "admin", "controller", "policy"
    gates: list[dict[str, Any]] | None = None  # the controller's: the verdicts it decided on
    key: str | None = None  # the operator's Idempotency-Key: a retry of this change is not applied again


@dataclass(frozen=True)
class RouteState:
    route: str
    rollout: str  # which rollout this is: a digest of the candidate, salt and policy weight
    phase: Phase
    weight: float
    mirror: bool  # False once rolled back: shadow traffic stops too
    step: int  # index into rollout steps (-1: the mirror-only phase); 0 in manual mode
    resume_to: Phase | None  # while paused: the phase resume returns to
    version: int
    updated_at: float
    history: tuple[Transition, ...] = field(default=())
    started_at: float = 0.0  # when this rollout began: the analysis window opens here
    step_at: float = 0.0  # when the current phase or step began
    superseded: tuple[str, ...] = ()  # the route's earlier rollouts, oldest first: never started again

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> RouteState:
        raw = orjson.loads(data)
        raw["history"] = tuple(Transition(**t) for t in raw.get("history", ()))
        raw["superseded"] = tuple(raw.get("superseded", ()))
        return cls(**raw)

    def moved(
        self,
        *,
        reason: str,
        by: str,
        gates: list[dict[str, Any]] | None = None,
        key: str | None = None,
        **changes: Any,
    ) -> RouteState:
        """The next version: the changes, stamped and written into the history (with the gate verdicts
        the change was decided on, when the controller made it)."""
        now = time.time()
        if "step" in changes or "phase" in changes:
            changes.setdefault("step_at", now)
        state = replace(self, **changes, version=self.version + 1, updated_at=now)
        entry = Transition(now, state.phase, state.weight, state.step, reason, by, gates, key)
        return replace(state, history=(*self.history, entry)[-HISTORY:])


def initial(route: Route, replacing: RouteState | None = None) -> RouteState:
    """Where a rollout starts. Manual mode: the policy's weight, changed only by an operator from then
    on. Automatic mode: the mirror-only phase (shadow_first) or the first step. replacing: the route's
    rollout this one supersedes (remembered, so that no replica starts that one again)."""
    now = time.time()
    auto = route.automatic
    phase: Phase = "manual"
    step = 0
    weight = route.policy.rollout.weight if route.candidate is not None else 0.0
    if auto is not None and auto.steps:
        phase, step, weight = ("shadow", -1, 0.0) if auto.shadow_first else ("progressing", 0, auto.steps[0])
    entry = Transition(now, phase, weight, step, "policy loaded", "policy")
    return RouteState(
        route=route.name,
        rollout=route.rollout_key,
        phase=phase,
        weight=weight,
        mirror=True,
        step=step,
        resume_to=None,
        version=1,
        updated_at=now,
        history=(entry,),
        started_at=now,
        step_at=now,
        superseded=() if replacing is None else (*replacing.superseded, replacing.rollout)[-SUPERSEDED:],
    )


def order(route: Route, stored: RouteState | None) -> Literal["same", "newer", "older"]:
    """How this replica's policy for a route stands to the rollout stored for it: "same", "newer" (a
    rollout the store has not seen: it starts, superseding the stored one) or "older" (superseded already:
    never written again; the replica serves the route from the base until its policy catches up)."""
    if stored is None:
        return "newer"
    if stored.rollout == route.rollout_key:
        return "same"
    return "older" if route.rollout_key in stored.superseded else "newer"


def skewed(route: Route, state: RouteState | None) -> bool:
    """This replica's policy is not the active rollout's (a rolling update, a ConfigMap on its way)."""
    return state is not None and state.rollout != route.rollout_key


class State(Protocol):
    """Where rollout state lives. `current` is the replica's last view (no I/O: the hot path reads it)."""

    backend: str

    def current(self, route: str) -> RouteState | None: ...

    async def start(self, routes: Iterable[Route]) -> None: ...

    async def adopt(self, routes: Iterable[Route]) -> None:
        """Routes loaded or reloaded: start state for new rollouts, keep the rest."""

    async def write(self, new: RouteState, expect_version: int) -> None:
        """Compare-and-set: raises VersionConflict when the stored version is not expect_version."""

    async def refresh(self) -> None:
        """Read the store again now (after a conflict)."""

    async def add_stats(self, batch: Mapping[StatsKey, ArmWindow], batch_id: str = "") -> None:
        """Add per-interval statistics (deltas from one replica), once per batch_id: a batch sent again
        after a write that timed out (and may have been applied) is not counted twice."""

    async def read_stats(self, route: str, rollout: str, intervals: range) -> dict[int, dict[str, ArmWindow]]:
        """interval -> arm -> statistics summed over every replica."""

    async def lead(self, owner: str, ttl_s: float) -> bool:
        """Take or renew the controller lease; True while owner holds it."""

    async def resign(self, owner: str) -> None:
        """Give the lease up (at shutdown), if owner holds it: another replica takes it at its next tick."""

    async def remember(self, records: Mapping[str, str], ttl_s: float) -> None:
        """Keep request id -> assignment records (who answered) for ttl_s, for feedback."""

    async def recall(self, request_id: str) -> str | None:
        """The assignment record of a request id, or None when unknown or expired."""

    async def first_feedback(self, request_id: str, ttl_s: float) -> bool:
        """True the first time feedback arrives for this request id, False on a repeat."""

    def on_change(self, callback: Callable[[RouteState], object]) -> None: ...

    def health(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class MemoryState:
    """One process, nothing else needed; state lives as long as the process."""

    backend = "memory"

    def __init__(self, records: int = MEMORY_RECORDS) -> None:
        self._states: dict[str, RouteState] = {}
        self._callbacks: list[Callable[[RouteState], object]] = []
        self._stats: dict[tuple[str, str], dict[int, dict[str, ArmWindow]]] = {}
        self._records: Ring[str] = Ring(records)  # request id -> "expiry\x1frecord"
        self._feedback: Ring[float] = Ring(records)  # request id -> until when it counted

    def current(self, route: str) -> RouteState | None:
        return self._states.get(route)

    async def start(self, routes: Iterable[Route]) -> None:
        await self.adopt(routes)

    async def adopt(self, routes: Iterable[Route]) -> None:
        current = set()
        for route in routes:
            current.add((route.name, route.rollout_key))
            state = self._states.get(route.name)
            if order(route, state) == "newer":
                self._set(initial(route, state))
        for key in [k for k in self._stats if k not in current]:
            del self._stats[key]  # statistics of rollouts that ended

    async def add_stats(self, batch: Mapping[StatsKey, ArmWindow], batch_id: str = "") -> None:
        for (route, rollout, interval, arm), window in batch.items():
            arms = self._stats.setdefault((route, rollout), {}).setdefault(interval, {})
            arms.setdefault(arm, ArmWindow()).merge(window)

    async def read_stats(self, route: str, rollout: str, intervals: range) -> dict[int, dict[str, ArmWindow]]:
        stored = self._stats.get((route, rollout), {})
        return {i: stored[i] for i in intervals if i in stored}

    async def lead(self, owner: str, ttl_s: float) -> bool:
        return True  # one process: it is the controller

    async def resign(self, owner: str) -> None:
        pass

    async def remember(self, records: Mapping[str, str], ttl_s: float) -> None:
        expires = f"{time.monotonic() + ttl_s:.3f}\x1f"
        for request_id, record in records.items():
            self._records.put(request_id, expires + record)

    async def recall(self, request_id: str) -> str | None:
        found = self._records.get(request_id)
        if found is None:
            return None
        expires, _, record = found.partition("\x1f")
        return record if float(expires) >= time.monotonic() else None

    async def first_feedback(self, request_id: str, ttl_s: float) -> bool:
        now = time.monotonic()
        if (self._feedback.get(request_id) or 0.0) > now:
            return False
        self._feedback.put(request_id, now + ttl_s)
        return True

    async def write(self, new: RouteState, expect_version: int) -> None:
        stored = self._states.get(new.route)
        if (stored.version if stored else 0) != expect_version:
            raise VersionConflict(new.route)
        self._set(new)

    async def refresh(self) -> None:
        pass

    def on_change(self, callback: Callable[[RouteState], object]) -> None:
        self._callbacks.append(callback)

    def health(self) -> dict[str, Any]:
        return {"backend": self.backend, "ok": True}

    async def close(self) -> None:
        pass

    def _set(self, state: RouteState) -> None:
        self._states[state.route] = state
        for callback in self._callbacks:
            callback(state)


class Ring(Generic[V]):
    """The newest `size` entries by key: a ring of keys beside a dict, so the oldest leaves in O(1).
    (Trimming a dict oldest-first scans the holes deletions leave; rebuilding it stalls the loop.)"""

    def __init__(self, size: int) -> None:
        self._keys: list[str | None] = [None] * size
        self._values: dict[str, V] = {}
        self._next = 0

    def put(self, key: str, value: V) -> None:
        if key not in self._values:
            oldest = self._keys[self._next]
            if oldest is not None:
                self._values.pop(oldest, None)
            self._keys[self._next] = key
            self._next = (self._next + 1) % len(self._keys)
        self._values[key] = value

    def get(self, key: str) -> V | None:
        return self._values.get(key)

    def __len__(self) -> int:
        return len(self._values)


# KEYS[1]: the route's state; KEYS[2]: the change channel. ARGV: new JSON, expected version, route.
_CAS = """
local stored = redis.call('GET', KEYS[1])
local version = 0
if stored then version = cjson.decode(stored)['version'] end
if version ~= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
"""


# KEYS[1]: the lease. ARGV: owner, ttl in ms. Takes a free lease or renews our own.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
# A statistics batch, applied once: KEYS[1] marks the batch as applied (for ARGV[1] s); ARGV[2] is the
# hashes' TTL; then per hash: its key, its number of increments, and each as field, "i"|"f", amount.
_ADD_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local i = 3
while i <= #ARGV do
  local key, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  for _ = 1, n do
    if ARGV[i + 1] == 'f' then
      redis.call('HINCRBYFLOAT', key, ARGV[i], ARGV[i + 2])
    else
      redis.call('HINCRBY', key, ARGV[i], ARGV[i + 2])
    end
    i = i + 3
  end
  redis.call('EXPIRE', key, ARGV[2])
end
return 1
"""
BATCH_MARK_S = 3600  # how long a batch id is remembered: longer than any retry of it
STATS_TTL_S = 7 * 86400
_COUNTS = (
    "requests", "unattempted", "errors", "invalid", "fallbacks", "tokens", "token_answers",
    "feedback", "negative", "escalated",
)  # fmt: skip
_FLOATS = ("tokens_sq", "cost", "cost_sq")


class RedisState:
    """Shared by every replica: a JSON document per route, written with a compare-and-set script that
    also publishes the change; replicas listen on the channel and poll every second besides."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        prefix: str,
        spawner: Spawner,
        on_sync_error: Callable[[], object] | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._prefix = prefix
        self._channel = f"{prefix}rollout-changes"
        self._spawner = spawner
        self._on_sync_error = on_sync_error
        self._poll_s = poll_s
        self._states: dict[str, RouteState] = {}
        self._routes: dict[str, Route] = {}
        self._callbacks: list[Callable[[RouteState], object]] = []
        self._cas = self._redis.register_script(_CAS)
        self._lease = self._redis.register_script(_LEASE)
        self._resign = self._redis.register_script(_RESIGN)
        self._add_once = self._redis.register_script(_ADD_ONCE)
        self._error: str | None = None
        self._last_sync: float | None = None

    def _key(self, route: str) -> str:
        return f"{self._prefix}rollout:{route}"

    def current(self, route: str) -> RouteState | None:
        return self._states.get(route)

    async def start(self, routes: Iterable[Route]) -> None:
        """Read (or create) every route's state. Redis down at start: serve the policies' own starting
        points and keep trying in the background."""
        await self.adopt(routes)
        self._spawner.spawn(self._listen(), name="state-listen")
        self._spawner.spawn(self._poll(), name="state-poll")

    async def adopt(self, routes: Iterable[Route]) -> None:
        self._routes = {route.name: route for route in routes}
        for name in [n for n in self._states if n not in self._routes]:
            del self._states[name]
        try:
            await self._sync()
        except RedisError as exc:
            self._failed(exc)
            for route in self._routes.values():
                if route.name not in self._states:
                    self._set(initial(route))  # blind start: the policy's own weight until Redis answers

    async def write(self, new: RouteState, expect_version: int) -> None:
        try:
            done = await self._cas(
                keys=[self._key(new.route), self._channel],
                args=[new.to_json(), expect_version, new.route],
            )
        except RedisError as exc:
            self._failed(exc)
            raise StateUnavailable(str(exc), maybe_applied=isinstance(exc, RedisTimeoutError)) from exc
        if not done:
            raise VersionConflict(new.route)
        self._set(new)

    async def add_stats(self, batch: Mapping[StatsKey, ArmWindow], batch_id: str = "") -> None:
        """One script call per flush: HINCRBY into a hash per (route, rollout, interval), applied once per
        batch id (a batch whose write timed out, and is sent again, may have been applied already)."""
        args: list[str | int | float] = [BATCH_MARK_S, STATS_TTL_S]
        for (route, rollout, interval, arm), w in batch.items():
            fields: list[str | int | float] = []
            for name in _COUNTS:
                if value := getattr(w, name):
                    fields += (f"{arm}|{name}", "i", value)
            for name in _FLOATS:
                if value := getattr(w, name):
                    fields += (f"{arm}|{name}", "f", repr(float(value)))
            for kind, hist in (("l", w.latency), ("t", w.ttft)):
                for bucket, count in hist.items():
                    fields += (f"{arm}|{kind}{bucket}", "i", count)
            args += (f"{self._prefix}stats:{route}:{rollout}:{interval}", len(fields) // 3, *fields)
        marker = f"{self._prefix}stats-batch:{batch_id or os.urandom(12).hex()}"
        try:
            await self._add_once(keys=[marker], args=args)
        except RedisError as exc:
            self._failed(exc)
            raise StateUnavailable(str(exc)) from exc

    async def read_stats(self, route: str, rollout: str, intervals: range) -> dict[int, dict[str, ArmWindow]]:
        pipe = self._redis.pipeline(transaction=False)
        for interval in intervals:
            pipe.hgetall(f"{self._prefix}stats:{route}:{rollout}:{interval}")
        try:
            hashes = await pipe.execute()
        except RedisError as exc:
            self._failed(exc)
            raise StateUnavailable(str(exc)) from exc
        out: dict[int, dict[str, ArmWindow]] = {}
        for interval, fields in zip(intervals, hashes, strict=True):
            if fields:
                out[interval] = _windows(fields)
        return out

    async def remember(self, records: Mapping[str, str], ttl_s: float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for request_id, record in records.items():
            pipe.set(f"{self._prefix}request:{request_id}", record, ex=max(1, int(ttl_s)))
        try:
            await pipe.execute()
        except RedisError as exc:
            self._failed(exc)
            raise StateUnavailable(str(exc)) from exc

    async def recall(self, request_id: str) -> str | None:
        try:
            found = await self._redis.get(f"{self._prefix}request:{request_id}")
        except RedisError as exc:
            self._failed(exc)
            raise StateUnavailable(str(exc)) from exc
        if found is None:
            return None
        return found.decode() if isinstance(found, bytes) else str(found)

    async def first_feedback(self, request_id: str, ttl_s: float) -> bool:
        key = f"{self._prefix}feedback:{request_id}"
        try:
            return bool(await self._redis.set(key, b"1", nx=True, ex=max(1, int(ttl_s))))
        except RedisError as exc:
            self._failed(exc)
            raise StateUnavailable(str(exc)) from exc

    async def lead(self, owner: str, ttl_s: float) -> bool:
        try:
            return bool(
                await self._lease(keys=[f"{self._prefix}controller"], args=[owner, int(ttl_s * 1000)])
            )
        except RedisError as exc:
            self._failed(exc)
            return False  # blind: nobody should move a rollout on what it cannot see

    async def resign(self, owner: str) -> None:
        try:
            await self._resign(keys=[f"{self._prefix}controller"], args=[owner])
        except RedisError as exc:
            self._failed(exc)  # it expires with its TTL

    async def refresh(self) -> None:
        try:
            await self._sync()
        except RedisError as exc:
            self._failed(exc)
            raise StateUnavailable(str(exc)) from exc

    def on_change(self, callback: Callable[[RouteState], object]) -> None:
        self._callbacks.append(callback)

    def health(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "ok": self._error is None,
            "error": self._error,
            "last_sync": self._last_sync,
        }

    async def close(self) -> None:
        await self._redis.aclose()

    async def _sync(self) -> None:
        """One round trip for every route; routes with no state (or an older rollout's) get their start."""
        names = list(self._routes)
        if not names:
            return
        stored = await self._redis.mget([self._key(n) for n in names])
        for name, raw in zip(names, stored, strict=True):
            route = self._routes[name]
            state = RouteState.from_json(raw) if raw else None
            if state is not None and order(route, state) != "newer":
                self._set(state)  # ours, or a newer rollout's: this replica serves the base (skewed)
                continue
            known = self._states.get(name)
            if state is None and known is not None and order(route, known) != "newer":
                seed = known  # Redis restarted empty: the rollout this replica knows resumes where it was
            else:
                seed = initial(route, state or known)  # ours starts, superseding what was there
            expected = state.version if state else 0
            version = max(expected, known.version if known is not None else 0) + 1  # never goes back
            try:
                await self.write(replace(seed, version=version), expected)
            except VersionConflict:
                continue  # another replica wrote first: the next sync reads theirs
        self._error = None
        self._last_sync = time.time()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self._sync()
            except RedisError as exc:
                self._failed(exc)

    async def _listen(self) -> None:
        """Changes from other replicas as they happen; reconnects after an outage."""
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._channel)
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        route = message["data"].decode()
                        if route in self._routes:
                            raw = await self._redis.get(self._key(route))
                            if raw:
                                self._set(RouteState.from_json(raw))
            except (RedisError, OSError) as exc:
                self._failed(exc)
                await asyncio.sleep(self._poll_s)

    def _set(self, state: RouteState) -> None:
        known = self._states.get(state.route)
        if known is not None and known.version >= state.version and known.rollout == state.rollout:
            return  # already seen (our own write coming back, or an older read)
        self._states[state.route] = state
        for callback in self._callbacks:
            callback(state)

    def _failed(self, exc: BaseException) -> None:
        if self._error is None:
            log.warning("state store unreachable, serving the last state seen: %s", type(exc).__name__)
        self._error = f"redis unreachable ({type(exc).__name__})"
        if self._on_sync_error is not None:
            self._on_sync_error()


def _windows(fields: Mapping[bytes, bytes]) -> dict[str, ArmWindow]:
    arms: dict[str, ArmWindow] = {}
    for raw_name, raw_value in fields.items():
        arm, _, name = raw_name.decode().partition("|")
        window = arms.setdefault(arm, ArmWindow())
        if name in _FLOATS:
            setattr(window, name, float(raw_value))
        elif name in _COUNTS:
            setattr(window, name, int(raw_value))
        elif name[:1] in ("l", "t"):
            hist = window.latency if name[0] == "l" else window.ttft
            hist[int(name[1:])] = int(raw_value)
    return arms


async def change(
    state: State,
    route: str,
    by: str,
    reason: str,
    basis: RouteState | None = None,
    key: str | None = None,
    **changes: Any,
) -> RouteState:
    """Read-modify-write. Without a basis (an operator's change) it retries on conflict, so it lands on
    the newest state. With one (the state a controller judged), it is written on that version or not at
    all: VersionConflict means the rollout moved since it was judged, and the move is dropped, to be
    judged again on the new state, never re-applied over an operator's word."""
    if basis is not None:
        new = basis.moved(reason=reason, by=by, **changes)
        await state.write(new, basis.version)
        return new
    for _ in range(5):
        current = state.current(route)
        if current is None:
            raise KeyError(route)
        if key is not None and applied(current, key):
            return current  # a retry of a change that was applied (its first answer was lost)
        new = current.moved(reason=reason, by=by, key=key, **changes)
        try:
            await state.write(new, current.version)
            return new
        except VersionConflict:
            await state.refresh()
    raise StateUnavailable(f"route {route}: the state kept changing under this write")


def applied(state: RouteState, key: str) -> bool:
    """Whether the operator's change with this Idempotency-Key is in the state's history."""
    return any(t.key == key for t in state.history)
