"""What every store shares: the error that says the store cannot be reached, and one Redis client (one
connection pool) with the replica's view of whether Redis answers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("gateway.store")

BATCH_MARK_S = 3600  # how long a batch id is remembered: longer than any retry of it
TIMEOUT_S = 2.0


class StateUnavailable(Exception):
    """The shared store cannot be reached. maybe_applied: a write was sent and its answer never came
    (a timeout), so it may have been applied; otherwise nothing was changed."""

    def __init__(self, message: str, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class Shared:
    """The Redis client of every store, and whether Redis answered last time.

    A command is sent again once, at once, when its connection turned out to be dead (a pooled connection
    that Redis closed when it restarted: the first command on it fails before Redis saw it). A command
    that timed out is never sent again here: Redis may have applied it (the stores make their writes
    idempotent, and report the doubt)."""

    def __init__(self, url: str, prefix: str, on_error: Callable[[], object] | None = None) -> None:
        self.redis = aioredis.Redis.from_url(
            url,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self.prefix = prefix
        self._on_error = on_error
        self.error: str | None = None
        self.last_ok: float | None = None

    def ok(self) -> None:
        if self.error is not None:
            log.warning("state store reachable again")
        self.error = None
        self.last_ok = time.time()

    def failed(self, exc: BaseException) -> None:
        if self.error is None:
            log.warning("state store unreachable, serving the last state seen: %s", type(exc).__name__)
        self.error = f"redis unreachable ({type(exc).__name__})"
        if self._on_error is not None:
            self._on_error()

    def unavailable(self, exc: RedisError, write: bool = False) -> NoReturn:
        """Note the failure and raise StateUnavailable (maybe_applied for a write that timed out)."""
        self.failed(exc)
        raise StateUnavailable(str(exc), maybe_applied=write and isinstance(exc, RedisTimeoutError)) from exc

    def health(self) -> dict[str, Any]:
        return {"backend": "redis", "ok": self.error is None, "error": self.error, "last_sync": self.last_ok}

    async def close(self) -> None:
        await self.redis.aclose()
