"""Which replica runs the controller: a lease with a TTL, renewed by its holder, given up at shutdown."""

from __future__ import annotations

from typing import Protocol

from redis.exceptions import RedisError

from gateway.store.shared import Shared


class Lease(Protocol):
    async def lead(self, owner: str, ttl_s: float) -> bool:
        """Take or renew the controller lease; True while owner holds it."""

    async def resign(self, owner: str) -> None:
        """Give the lease up (at shutdown), if owner holds it: another replica takes it at its next tick."""


class MemoryLease:
    async def lead(self, owner: str, ttl_s: float) -> bool:
        return True  # one process: it is the controller

    async def resign(self, owner: str) -> None:
        pass


# KEYS[1]: the lease. ARGV: owner, ttl in ms. Takes a free lease or renews our own.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class RedisLease:
    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._key = f"{shared.prefix}controller"
        self._lease = shared.redis.register_script(_LEASE)
        self._resign = shared.redis.register_script(_RESIGN)

    async def lead(self, owner: str, ttl_s: float) -> bool:
        try:
            return bool(await self._lease(keys=[self._key], args=[owner, int(ttl_s * 1000)]))
        except RedisError as exc:
            self._shared.failed(exc)
            return False  # blind: nobody should move a rollout on what it cannot see

    async def resign(self, owner: str) -> None:
        try:
            await self._resign(keys=[self._key], args=[owner])
        except RedisError as exc:
            self._shared.failed(exc)  # it expires with its TTL
