"""Circuit breaker on a candidate arm: closed -> open on a high failure rate -> half-open probes -> closed."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("gateway.breaker")

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class BreakerSettings:
    window: int = 100  # the last N candidate outcomes
    min_requests: int = 20  # no verdict on fewer outcomes than this
    failure_rate: float = 0.5  # open at or above this share of failures
    open_s: float = 30.0  # stay open this long, then probe
    half_open_requests: int = 5  # probes let through; all must succeed to close


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        clock: Callable[[], float] = time.monotonic,
        *,
        calls: str = "candidate requests",
        while_open: str = "base serves every unit",
    ) -> None:
        self.name = name
        self._calls = calls  # what it counts, and what an open circuit means, in its log lines
        self._while_open = while_open
        self.settings = settings
        self._clock = clock
        self._outcomes: deque[bool] = deque(maxlen=settings.window)  # True: a failure
        self._failures = 0
        self.state: State = "closed"
        self._opened_at = 0.0
        self._probes_started = 0
        self._probes_ok = 0

    def allow(self) -> bool:
        """May the next request go to the candidate? (In half-open state, True takes a probe slot.)"""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self._clock() - self._opened_at < self.settings.open_s:
                return False
            self._probes_started = self._probes_ok = 0
            self._move(
                "half_open",
                f"{self.settings.open_s:g}s passed; letting "
                f"{self.settings.half_open_requests} probe request(s) through",
            )
        if self._probes_started < self.settings.half_open_requests:
            self._probes_started += 1
            return True
        return False

    def record(self, failed: bool) -> None:
        if self.state == "half_open":
            if failed:
                self._open("a half-open probe failed")
                return
            self._probes_ok += 1
            if self._probes_ok >= self.settings.half_open_requests:
                self._reset()
                self._move("closed", f"{self._probes_ok} probe request(s) succeeded")
            return
        if self.state == "open":
            return  # a late answer to a request let through before the circuit opened
        if len(self._outcomes) == self._outcomes.maxlen and self._outcomes[0]:
            self._failures -= 1
        self._outcomes.append(failed)
        self._failures += failed
        count = len(self._outcomes)
        if count >= self.settings.min_requests and self._failures / count >= self.settings.failure_rate:
            self._open(
                f"{self._failures} of the last {count} {self._calls} failed "
                f"({self._failures / count:.0%} >= {self.settings.failure_rate:.0%})"
            )

    def trip(self, reason: str) -> None:
        """Open now, whatever the failure count (the fallback budget is spent: taking the candidate out of
        the path is how the base is protected, not failing users)."""
        if self.state != "open":
            self._open(reason)

    def release(self) -> None:
        """A request let through ended without a verdict (the client left): free its probe slot."""
        if self.state == "half_open" and self._probes_started > self._probes_ok:
            self._probes_started -= 1

    def _open(self, reason: str) -> None:
        self._reset()
        self._opened_at = self._clock()
        self._move("open", f"{reason}; {self._while_open} for {self.settings.open_s:g}s")

    def _reset(self) -> None:
        self._outcomes.clear()
        self._failures = 0

    def _move(self, state: State, reason: str) -> None:
        log.warning("circuit %s: %s -> %s: %s", self.name, self.state, state, reason)
        self.state = state
