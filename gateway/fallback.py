"""Fallback to base: the guards (breaker, budget) per route. Which failures fall back is each error's own
reason (errors.py) and the route's fallback.on.

Guards keeps one circuit breaker and one budget per route, across policy reloads as long as the
candidate and the settings stay the same (a weight change must not close an open circuit).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.breaker import BreakerSettings, CircuitBreaker
from gateway.budget import RetryBudget
from gateway.route import PerRoute, Route

CIRCUIT_OPEN = "circuit_open"


class Guards:
    """A circuit breaker (on the candidate) and a retry budget per route, kept across reloads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        def new_breaker(route: Route) -> CircuitBreaker:
            assert route.breaker is not None  # PerRoute builds only when the settings key exists
            return CircuitBreaker(f"{route.name}/candidate", route.breaker, clock)

        self._breakers = PerRoute(_breaker_key, new_breaker)
        self._budgets = PerRoute(lambda route: route.budget, lambda route: RetryBudget(route.budget, clock))

    def breaker(self, route: Route) -> CircuitBreaker | None:
        return self._breakers.get(route)

    def budget(self, route: Route) -> RetryBudget:
        budget = self._budgets.get(route)
        assert budget is not None  # every route has budget settings
        return budget


def _breaker_key(route: Route) -> tuple[str, str, BreakerSettings] | None:
    """A new candidate, or new breaker settings, start a new breaker."""
    if route.candidate is None or route.breaker is None:
        return None
    return route.candidate.url, route.candidate.model, route.breaker
