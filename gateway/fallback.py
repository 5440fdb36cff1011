"""Fallback to base: which candidate failures trigger it, and the guards (breaker, budget) per route.

Guards keeps one circuit breaker and one budget per route, across policy reloads as long as the
candidate and the settings stay the same (a weight change must not close an open circuit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from gateway.breaker import CircuitBreaker
from gateway.budget import BudgetSettings, RetryBudget
from gateway.errors import GatewayError, InvalidOutput, UpstreamError, UpstreamHTTPError, UpstreamTimeout
from gateway.route import Route

Reason = Literal[
    "connect_error", "timeout", "http_5xx", "http_429",
    "json_parse", "json_schema", "tool_unknown", "tool_args_parse", "tool_args_schema", "tool_choice",
]  # fmt: skip
REASONS: tuple[Reason, ...] = (
    "connect_error", "timeout", "http_5xx", "http_429",
    "json_parse", "json_schema", "tool_unknown", "tool_args_parse", "tool_args_schema", "tool_choice",
)  # fmt: skip
CIRCUIT_OPEN = "circuit_open"


def reason_for(error: GatewayError) -> Reason | None:
    """The fallback reason for a candidate failure; None for errors that are the client's (4xx)."""
    if isinstance(error, InvalidOutput):
        return error.kind
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamError):
        return "connect_error"  # refused, reset, or closed before a complete answer
    if isinstance(error, UpstreamHTTPError):
        if error.upstream_status == 429:
            return "http_429"
        if error.upstream_status >= 500:
            return "http_5xx"
    return None


class Guards:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # route name -> (the Route last seen, its identity key, the guard). Routes are immutable and a
        # reload builds new ones, so `is` answers the common case without comparing settings.
        self._breakers: dict[str, tuple[Route, object, CircuitBreaker]] = {}
        self._budgets: dict[str, tuple[Route, BudgetSettings, RetryBudget]] = {}

    def breaker(self, route: Route) -> CircuitBreaker | None:
        current = self._breakers.get(route.name)
        if current is not None and current[0] is route:
            return current[2]
        if route.candidate is None or route.breaker is None:
            self._breakers.pop(route.name, None)
            return None
        key = (route.candidate.url, route.candidate.model, route.breaker)
        if current is None or current[1] != key:
            breaker = CircuitBreaker(f"{route.name}/candidate", route.breaker, self._clock)
        else:
            breaker = current[2]
        self._breakers[route.name] = (route, key, breaker)
        return breaker

    def budget(self, route: Route) -> RetryBudget:
        current = self._budgets.get(route.name)
        if current is not None and current[0] is route:
            return current[2]
        if current is None or current[1] != route.budget:
            budget = RetryBudget(route.budget, self._clock)
        else:
            budget = current[2]
        self._budgets[route.name] = (route, route.budget, budget)
        return budget
