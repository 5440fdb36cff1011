"""One way to start background work: named, referenced until done, failures logged, cancelled at close."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("gateway.tasks")


class Spawner:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, timeout_s: float = 2.0) -> None:
        """Cancels every task and waits for them, for timeout_s at most: a library that swallows the
        cancellation (redis-py's pub/sub, cancelled while it subscribes) must not hold shutdown for ever."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=timeout_s)
        if stuck:
            names = ", ".join(sorted(task.get_name() for task in stuck))
            log.warning("background tasks did not stop within %gs of being cancelled: %s", timeout_s, names)


class LoopLag:
    """How late the event loop runs a timer, sampled every interval: the time something else held the
    loop (a long computation, a blocking call). The largest over the last minute, and since start."""

    def __init__(self, interval_s: float = 0.25, window: int = 240) -> None:
        self._interval_s = interval_s
        self._recent: deque[float] = deque(maxlen=window)
        self._max_s = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self._interval_s)
            lag = max(0.0, loop.time() - started - self._interval_s)
            self._recent.append(lag)
            self._max_s = max(self._max_s, lag)

    def view(self) -> dict[str, float]:
        recent = max(self._recent, default=0.0)
        return {"recent_max_ms": round(recent * 1000, 1), "max_ms": round(self._max_s * 1000, 1)}
