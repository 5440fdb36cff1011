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
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.route import Route
from gateway.tasks import Spawner

log = logging.getLogger("gateway.state")

Phase = Literal["shadow", "progressing", "paused", "promoted", "rolled_back", "manual"]
PHASES: tuple[Phase, ...] = ("shadow", "progressing", "paused", "promoted", "rolled_back", "manual")
HISTORY = 50  # transitions kept per route
POLL_S = 1.0


class StateUnavailable(Exception):
    """The shared store cannot be reached: nothing was changed."""


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

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> RouteState:
        raw = orjson.loads(data)
        raw["history"] = tuple(Transition(**t) for t in raw.get("history", ()))
        return cls(**raw)

    def moved(self, *, reason: str, by: str, **changes: Any) -> RouteState:
        """The next version: the changes, stamped and written into the history."""
        now = time.time()
        state = replace(self, **changes, version=self.version + 1, updated_at=now)
        entry = Transition(now, state.phase, state.weight, state.step, reason, by)
        return replace(state, history=(*self.history, entry)[-HISTORY:])


def rollout_id(route: Route) -> str:
    """Changes when the operator deploys something new: another candidate, salt or policy weight.
    Stored state of an older rollout is then replaced by the policy's own starting point."""
    candidate = route.candidate
    text = "|".join(
        (
            candidate.model if candidate else "",
            candidate.url if candidate else "",
            route.salt,
            repr(route.policy.rollout.weight),
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def initial(route: Route) -> RouteState:
    """Where a route starts: the weight its policy gives, changed only by an operator from then on."""
    now = time.time()
    weight = route.policy.rollout.weight if route.candidate is not None else 0.0
    entry = Transition(now, "manual", weight, 0, "policy loaded", "policy")
    return RouteState(
        route=route.name,
        rollout=rollout_id(route),
        phase="manual",
        weight=weight,
        mirror=True,
        step=0,
        resume_to=None,
        version=1,
        updated_at=now,
        history=(entry,),
    )


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

    def on_change(self, callback: Callable[[RouteState], object]) -> None: ...

    def health(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class MemoryState:
    """One process, nothing else needed; state lives as long as the process."""

    backend = "memory"

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
            if state is None or state.rollout != rollout_id(route):
                self._set(initial(route))

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
            raise StateUnavailable(str(exc)) from exc
        if not done:
            raise VersionConflict(new.route)
        self._set(new)

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
            if state is not None and state.rollout == rollout_id(route):
                self._set(state)
                continue
            known = self._states.get(name)
            # Nothing stored for this rollout: ours, when this replica knows it (Redis restarted empty:
            # the rollout resumes where it was), else the policy's starting point.
            seed = known if known is not None and known.rollout == rollout_id(route) else initial(route)
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


async def change(state: State, route: str, by: str, reason: str, **changes: Any) -> RouteState:
    """Read-modify-write with retries on conflict: the operator's change lands on the newest state."""
    for _ in range(5):
        current = state.current(route)
        if current is None:
            raise KeyError(route)
        new = current.moved(reason=reason, by=by, **changes)
        try:
            await state.write(new, current.version)
            return new
        except VersionConflict:
            await state.refresh()
    raise StateUnavailable(f"route {route}: the state kept changing under this write")
