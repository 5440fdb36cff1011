"""Rollout state per route: which rollout it is, its phase, weight, step and history. Authoritative: every
change is a compare-and-set on its version, and a rollout that was superseded never starts again.

The hot path never waits on the store: each replica serves from the last state it saw (`current`),
refreshed by a pub/sub message when another replica changes something, and by polling every second in
case a message was lost. Redis down: the replica keeps serving with what it saw last, writes fail with
StateUnavailable, and sync resumes by itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol, get_args

import orjson
from redis.exceptions import RedisError

from gateway.route import Route
from gateway.store.shared import Shared, StateUnavailable
from gateway.tasks import Spawner

log = logging.getLogger("gateway.store.rollouts")

Phase = Literal["preflight", "shadow", "progressing", "paused", "promoted", "rolled_back", "manual"]
PHASES: tuple[Phase, ...] = get_args(Phase)
HISTORY = 50  # transitions kept per route
SUPERSEDED = 50  # earlier rollouts remembered per route
POLL_S = 1.0
FORGOTTEN_S = 7 * 86400  # a route no replica serves any more: its state goes this long after


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
    on. Automatic mode: pre-flight (rollout.preflight), the mirror-only phase (shadow_first) or the first
    step. replacing: the route's rollout this one supersedes (remembered, so that no replica starts that
    one again)."""
    now = time.time()
    auto = route.automatic
    phase: Phase = "manual"
    step = 0
    weight = route.policy.rollout.weight if route.candidate is not None else 0.0
    if auto is not None and auto.steps:
        phase, step, weight = ("shadow", -1, 0.0) if auto.shadow_first else ("progressing", 0, auto.steps[0])
        if auto.preflight is not None:
            phase, step, weight = "preflight", -1, 0.0
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


class RolloutStore(Protocol):
    """Where rollout state lives. `current` is the replica's last view (no I/O: the hot path reads it)."""

    def current(self, route: str) -> RouteState | None: ...

    async def start(self, routes: Iterable[Route]) -> None: ...

    async def adopt(self, routes: Iterable[Route]) -> None:
        """Routes loaded or reloaded: start state for new rollouts, keep the rest."""

    async def write(self, new: RouteState, expect_version: int) -> None:
        """Compare-and-set: raises VersionConflict when the stored version is not expect_version."""

    async def refresh(self) -> None:
        """Read the store again now (after a conflict)."""

    def on_change(self, callback: Callable[[RouteState], object]) -> None: ...


class MemoryRolloutStore:
    """One process: the state lives as long as the process."""

    def __init__(self) -> None:
        self._states: dict[str, RouteState] = {}
        self._callbacks: list[Callable[[RouteState], object]] = []

    def current(self, route: str) -> RouteState | None:
        return self._states.get(route)

    async def start(self, routes: Iterable[Route]) -> None:
        await self.adopt(routes)

    async def adopt(self, routes: Iterable[Route]) -> None:
        for route in routes:
            state = self._states.get(route.name)
            if order(route, state) == "newer":
                self._set(initial(route, state))

    async def write(self, new: RouteState, expect_version: int) -> None:
        stored = self._states.get(new.route)
        if (stored.version if stored else 0) != expect_version:
            raise VersionConflict(new.route)
        self._set(new)

    async def refresh(self) -> None:
        pass

    def on_change(self, callback: Callable[[RouteState], object]) -> None:
        self._callbacks.append(callback)

    def _set(self, state: RouteState) -> None:
        self._states[state.route] = state
        for callback in self._callbacks:
            callback(state)


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


# KEYS: the state of each route this replica does not serve. A route no replica serves any more (deleted
# from the policies) is forgotten after ARGV[1] s; a replica that serves it writes it again (SET clears
# the TTL) and resumes it where it was, so a replica with an older policy cannot make one disappear.
_FORGET = """
for _, key in ipairs(KEYS) do
  if redis.call('TTL', key) == -1 then redis.call('EXPIRE', key, ARGV[1]) end
end
return 1
"""


class RedisRolloutStore:
    """Shared by every replica: a JSON document per route, written with a compare-and-set script that
    also publishes the change; replicas listen on the channel and poll every second besides."""

    def __init__(self, shared: Shared, spawner: Spawner, poll_s: float = POLL_S) -> None:
        self._shared = shared
        self._redis = shared.redis
        self._prefix = shared.prefix
        self._channel = f"{shared.prefix}rollout-changes"
        self._spawner = spawner
        self._poll_s = poll_s
        self._states: dict[str, RouteState] = {}
        self._routes: dict[str, Route] = {}
        self._callbacks: list[Callable[[RouteState], object]] = []
        self._cas = self._redis.register_script(_CAS)
        self._forget = self._redis.register_script(_FORGET)

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
            await self._forget_unserved()
        except RedisError as exc:
            self._shared.failed(exc)
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
            self._shared.unavailable(exc, write=True)
        if not done:
            raise VersionConflict(new.route)
        self._set(new)

    async def refresh(self) -> None:
        try:
            await self._sync()
        except RedisError as exc:
            self._shared.unavailable(exc)

    def on_change(self, callback: Callable[[RouteState], object]) -> None:
        self._callbacks.append(callback)

    async def _sync(self) -> None:
        """One round trip for every route; routes with no state (or an older rollout's) get their start."""
        names = list(self._routes)
        stored = await self._redis.mget([self._key(n) for n in names]) if names else []
        for name, raw in zip(names, stored, strict=True):
            route = self._routes[name]
            state = RouteState.from_json(raw) if raw else None
            if state is not None and order(route, state) != "newer":
                self._set(state)  # ours, or a newer rollout's: this replica serves the base (skewed)
                continue
            known = self._states.get(name)
            if state is None and known is not None and order(route, known) != "newer":
                seed = known  # Redis restarted empty (or forgot it): the rollout resumes where it was
            else:
                seed = initial(route, state or known)  # ours starts, superseding what was there
            expected = state.version if state else 0
            version = max(expected, known.version if known is not None else 0) + 1  # never goes back
            try:
                await self.write(replace(seed, version=version), expected)
            except VersionConflict:
                continue  # another replica wrote first: the next sync reads theirs
        self._shared.ok()

    async def _forget_unserved(self) -> None:
        """Routes in the store that this replica's policies no longer have start to expire (see _FORGET)."""
        unserved = []
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self._prefix) + "rollout:*"  # the prefix, literally
        async for raw in self._redis.scan_iter(match=pattern, count=1000):
            key = raw.decode()
            if key[len(self._prefix) + len("rollout:") :] not in self._routes:
                unserved.append(key)
        for i in range(0, len(unserved), 500):
            await self._forget(keys=unserved[i : i + 500], args=[FORGOTTEN_S])

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self._sync()
            except RedisError as exc:
                self._shared.failed(exc)

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
                self._shared.failed(exc)
                await asyncio.sleep(self._poll_s)

    def _set(self, state: RouteState) -> None:
        known = self._states.get(state.route)
        if known is not None and known.version >= state.version and known.rollout == state.rollout:
            return  # already seen (our own write coming back, or an older read)
        self._states[state.route] = state
        for callback in self._callbacks:
            callback(state)


async def change(
    rollouts: RolloutStore,
    route: str,
    by: str,
    reason: str,
    basis: RouteState | None = None,
    key: str | None = None,
    decide: Callable[[RouteState], dict[str, Any]] | None = None,
    **changes: Any,
) -> RouteState:
    """Read-modify-write. Without a basis (an operator's change) it retries on conflict, so it lands on
    the newest state, and decide(newest) says what changes there (it may refuse: Conflict). With one (the
    state a controller judged), it is written on that version or not at all: VersionConflict means the
    rollout moved since it was judged, and the move is dropped, to be judged again on the new state,
    never re-applied over an operator's word."""
    if basis is not None:
        new = basis.moved(reason=reason, by=by, **changes)
        await rollouts.write(new, basis.version)
        return new
    for _ in range(5):
        current = rollouts.current(route)
        if current is None:
            raise KeyError(route)
        if key is not None and applied(current, key):
            return current  # a retry of a change that was applied (its first answer was lost)
        new = current.moved(reason=reason, by=by, key=key, **(decide(current) if decide else changes))
        try:
            await rollouts.write(new, current.version)
            return new
        except VersionConflict:
            await rollouts.refresh()
    raise StateUnavailable(f"route {route}: the state kept changing under this write")


def applied(state: RouteState, key: str) -> bool:
    """Whether the operator's change with this Idempotency-Key is in the state's history."""
    return any(t.key == key for t in state.history)
