"""The retry budget: fallbacks may add at most a share of a route's requests over a sliding window."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetSettings:
    ratio: float = 0.2  # fallbacks may add at most this share of the route's requests ...
    window_s: float = 10.0  # ... over this sliding window
    min_per_window: int = 5  # but this many are always allowed (a quiet route still falls back)


class RetryBudget:
    """Bounds fallbacks so a failing candidate cannot double the load on base (a fallback storm)."""

    def __init__(self, settings: BudgetSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._buckets: deque[list[float]] = deque()  # [second, requests, fallbacks]
        self._requests = 0.0
        self._spent = 0.0

    def record_request(self) -> None:
        self._bucket()[1] += 1
        self._requests += 1

    def try_spend(self) -> bool:
        bucket = self._bucket()
        allowed = max(self.settings.min_per_window, self.settings.ratio * self._requests)
        if self._spent + 1 > allowed:
            return False
        bucket[2] += 1
        self._spent += 1
        return True

    def refund(self) -> None:
        """A fallback spent on a failure that was not the candidate's (the base failed the same way): the
        budget measures the candidate's failures, and requests that fail everywhere must not spend it."""
        for bucket in reversed(self._buckets):
            if bucket[2] > 0:
                bucket[2] -= 1
                self._spent -= 1
                return

    def _bucket(self) -> list[float]:
        now = self._clock()
        second = float(int(now))
        while self._buckets and self._buckets[0][0] <= now - self.settings.window_s:
            _, requests, spent = self._buckets.popleft()
            self._requests -= requests
            self._spent -= spent
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0.0, 0.0])
        return self._buckets[-1]
