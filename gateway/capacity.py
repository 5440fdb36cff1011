"""Shadow calls yield to users. An arm may declare how many requests its server runs at once
(`arms.<arm>.max_concurrency`; a llama.cpp server with one slot runs one, and by default stops a running
generation when another request arrives). Users' requests always go; a shadow call (or noise-floor
replay) starts only into a spare slot, and a user's request that finds the arm full cancels a running
shadow call to make room. An arm that declares nothing takes shadow calls as they come.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from gateway.errors import GatewayError
from gateway.route import RouteArm

T = TypeVar("T")


class Preempted(Exception):
    """The shadow call was cancelled to make room for a user's request (no verdict on the arm)."""


class Slots:
    __slots__ = ("_changed", "limit", "primaries", "shadows", "started")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.primaries = 0
        self.started = 0  # users' requests ever started here
        self.shadows: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    @property
    def spare(self) -> bool:
        return self.primaries + len(self.shadows) < self.limit

    def primary_started(self) -> None:
        self.primaries += 1
        self.started += 1
        while self.shadows and self.primaries + len(self.shadows) > self.limit:
            self.shadows.pop().cancel()  # the user's request goes first

    def primary_ended(self) -> None:
        self.primaries -= 1
        self._wake()

    async def wait_for_spare(self) -> None:
        while not self.spare:
            self._changed.clear()
            await self._changed.wait()

    async def run_shadow(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a shadow call in a slot of its own (the caller waited for a spare one); raises Preempted
        when a user's request needs the slot first."""
        task = asyncio.ensure_future(work)
        self.shadows.add(task)
        started = self.started
        try:
            return await asyncio.shield(task)
        except GatewayError:
            # A user's request started while it ran: a one-slot server may have cut it short for that
            # user (its cancellation races the request to the server). Not evidence against the arm.
            if self.started != started:
                raise Preempted from None
            raise
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                raise Preempted from None
            task.cancel()  # the caller itself is being cancelled (shadow traffic off, shutdown)
            raise
        finally:
            self.shadows.discard(task)
            self._wake()

    def _wake(self) -> None:
        self._changed.set()


class Capacity:
    """The slots of every server an arm declares max_concurrency for. Arms on one server (the same
    scheme://host:port, e.g. a vLLM serving the base and the tuned adapter, or one llama.cpp behind two
    routes) share its slots, so one route's shadow calls yield to another route's users too."""

    def __init__(self) -> None:
        self._slots: dict[tuple[str, int], Slots] = {}

    def slots(self, arm: RouteArm) -> Slots | None:
        if arm.max_concurrency is None:
            return None
        key = (arm.bulkhead.origin, arm.max_concurrency)
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = Slots(arm.max_concurrency)
        return slots
