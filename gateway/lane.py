"""Bounded background work (shadow calls, judge calls): at most max_concurrency at once and max_queue
waiting, within a budget of tokens and requests per minute; beyond that new work is refused, and the
caller counts it. Nothing here is ever on a user's path."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from gateway.tasks import Spawner

log = logging.getLogger("gateway.lane")

Work = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrency: int
    max_queue: int
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None


class Lane:
    def __init__(
        self, name: str, limits: Limits, spawner: Spawner, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.limits = limits
        self._spawner = spawner
        self._clock = clock
        self._task_name = name
        self._queue: deque[Work] = deque()
        self._runners: set[asyncio.Task[Any]] = set()  # each works through the queue until it is empty
        self._stopped = False
        self.pending = 0  # running or waiting for a runner
        self._spent: deque[tuple[float, int]] = deque()  # (when, tokens) over the last minute
        self._spent_total = 0
        self._started: deque[float] = deque()  # when each of the last minute's admitted items was

    def refusal(self) -> str | None:
        """Why new work would be refused now (queue, token budget, request rate), or None."""
        limits = self.limits
        if self._stopped:
            return "stopped"
        if self.pending >= limits.max_concurrency + limits.max_queue:
            return "queue_full"
        if limits.tokens_per_minute is not None and self._tokens_last_minute() >= limits.tokens_per_minute:
            return "token_budget"
        if limits.requests_per_minute is not None:
            horizon = self._clock() - 60
            while self._started and self._started[0] < horizon:
                self._started.popleft()
            if len(self._started) >= limits.requests_per_minute:
                return "rate_limited"
        return None

    def submit(self, work: Work, requests: int = 1) -> bool:
        """Queue work that makes `requests` requests (what requests_per_minute counts)."""
        if self.refusal() is not None:
            return False
        if self.limits.requests_per_minute is not None:
            self._started.extend([self._clock()] * requests)
        self.pending += 1
        if len(self._runners) < self.limits.max_concurrency:
            runner = self._spawner.spawn(self._run(work), name=self._task_name)
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        else:
            self._queue.append(work)
        return True

    def stop(self) -> None:
        """What waits is dropped, what runs is cancelled, nothing more is admitted."""
        self._stopped = True
        dropped = len(self._queue)
        self._queue.clear()
        for runner in list(self._runners):
            runner.cancel()
        if dropped or self._runners:
            log.info(
                "%s stopped: %d queued calls dropped, %d running cancelled",
                *(self.name, dropped, len(self._runners)),
            )

    async def _run(self, work: Work | None) -> None:
        while work is not None:
            try:
                await work()
            finally:
                self.pending -= 1
            work = self._queue.popleft() if self._queue else None

    def spend(self, tokens: int) -> None:
        if self.limits.tokens_per_minute is None:
            return  # no budget: nothing to keep (the log would only grow)
        self._spent.append((self._clock(), tokens))
        self._spent_total += tokens
        self._tokens_last_minute()  # trims what fell out of the minute

    def _tokens_last_minute(self) -> int:
        horizon = self._clock() - 60
        while self._spent and self._spent[0][0] < horizon:
            self._spent_total -= self._spent.popleft()[1]
        return self._spent_total
