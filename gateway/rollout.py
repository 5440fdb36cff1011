"""What can be done to a route's rollout: set the weight, pause, resume, promote, roll back. The admin
API and the CLI call these; every change is a versioned transition with a reason and who made it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gateway.errors import Conflict, InvalidRequest, ModelNotFound, Unavailable
from gateway.route import Route
from gateway.state import RouteState, State, StateUnavailable, change, rollout_id


def effective(route: Route, state: RouteState | None) -> Route:
    """The route as it serves now: the policy's, with the weight (and mirror switch) of its state."""
    if state is None or state.rollout != rollout_id(route):
        return route
    mirror = route.mirror if state.mirror else None
    if state.weight == route.weight and mirror is route.mirror:
        return route
    return replace(route, weight=state.weight, mirror=mirror)


class Rollouts:
    def __init__(self, state: State, policy_route: Callable[[str], Route | None]) -> None:
        self._state = state
        self._policy_route = policy_route  # name -> the route as its policy compiled it (or None)

    def view(self, name: str) -> tuple[Route, RouteState]:
        route = self._policy_route(name)
        state = self._state.current(name) if route is not None else None
        if route is None or state is None:
            raise ModelNotFound(f"no route {name[:100]!r} on this gateway", param="route")
        return route, state

    async def set_weight(self, name: str, weight: float, by: str, reason: str | None) -> RouteState:
        route, _ = self.view(name)
        if not 0 <= weight <= 100:
            raise InvalidRequest(f"weight must be a percent in [0, 100], got {weight:g}", param="weight")
        if route.candidate is None and weight > 0:
            raise Conflict(f"route {name!r} has no candidate arm: only weight 0 is possible")
        return await self._move(
            name, by, reason or f"weight set to {weight:g}", phase="manual", weight=weight, mirror=True
        )

    async def pause(self, name: str, by: str, reason: str | None) -> RouteState:
        _, state = self.view(name)
        if state.phase in ("paused", "promoted", "rolled_back"):
            raise Conflict(f"route {name!r} is {state.phase}: there is nothing to pause")
        return await self._move(name, by, reason or "paused", phase="paused", resume_to=state.phase)

    async def resume(self, name: str, by: str, reason: str | None) -> RouteState:
        _, state = self.view(name)
        if state.phase != "paused":
            raise Conflict(f"route {name!r} is {state.phase}, not paused")
        return await self._move(
            name, by, reason or "resumed", phase=state.resume_to or "manual", resume_to=None
        )

    async def promote(self, name: str, by: str, reason: str | None) -> RouteState:
        route, _ = self.view(name)
        if route.candidate is None:
            raise Conflict(f"route {name!r} has no candidate arm to promote")
        return await self._move(
            name, by, reason or "promoted", phase="promoted", weight=100.0, resume_to=None
        )

    async def rollback(self, name: str, by: str, reason: str | None) -> RouteState:
        self.view(name)
        return await self._move(
            name, by, reason or "rolled back", phase="rolled_back", weight=0.0, mirror=False, resume_to=None
        )

    async def _move(self, name: str, by: str, reason: str, **changes: Any) -> RouteState:
        try:
            state = await change(self._state, name, by, reason, **changes)
        except StateUnavailable as exc:
            raise Unavailable(
                "the rollout state store (Redis) cannot be reached: nothing was changed; "
                "traffic keeps the last state seen"
            ) from exc
        return state
