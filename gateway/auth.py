"""Client authentication with gateway API keys (from the environment or a file)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from hashlib import sha256
from pathlib import Path

from gateway.errors import Unauthorized
from gateway.settings import SettingsError, read_keys_file

log = logging.getLogger("gateway.auth")


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class ApiKeys:
    """Keys are kept only as sha256 digests; a lookup on digests leaks nothing about the keys' bytes."""

    def __init__(self, keys: frozenset[str], groups: Mapping[str, str] | None = None) -> None:
        self.replace(keys, groups)

    def replace(self, keys: frozenset[str], groups: Mapping[str, str] | None = None) -> None:
        groups = groups or {}
        self._digests = {sha256(k.encode()).digest(): groups.get(k) for k in keys}

    def __len__(self) -> int:
        return len(self._digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def authenticate(self, token: str | None) -> str | None:
        """Raises Unauthorized for a missing or unknown key; returns the key's group (or None)."""
        if not self._digests:
            return None
        if token is None:
            raise Unauthorized(
                "no API key provided: send it as 'Authorization: Bearer <key>' (the SDK's api_key)",
                code="missing_api_key",
            )
        digest = sha256(token.encode()).digest()
        if digest not in self._digests:
            raise Unauthorized("incorrect API key provided; use a key configured in CANARYGATE_API_KEYS")
        return self._digests[digest]


class KeysFile:
    """CANARYGATE_API_KEYS_FILE, read again on SIGHUP and when it changes (a rotated secret: checked every
    few seconds by its inode, size and modification time). A file that cannot be read or holds no keys
    leaves the keys in force, and says so in the log: authentication never turns off while serving."""

    def __init__(self, path: Path, keys: ApiKeys, fixed: frozenset[str], interval_s: float = 2.0) -> None:
        self.path = path
        self._keys = keys
        self._fixed = fixed  # from CANARYGATE_API_KEYS: always kept
        self._interval_s = interval_s
        self._seen = self._signature()
        self.reloads = 0
        self.last_error: str | None = None  # why the last reading was refused, until one is accepted

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            found = os.stat(self.path)
        except OSError:
            return None
        return found.st_ino, found.st_size, found.st_mtime_ns

    async def reload(self) -> bool:
        try:
            found = await asyncio.to_thread(read_keys_file, self.path)
        except SettingsError as exc:
            self.last_error = str(exc)
            log.error("%s; the %d keys in force are kept", exc, len(self._keys))
            return False
        self.reloads += 1
        self.last_error = None
        keys = self._fixed | frozenset(found)
        self._keys.replace(keys, {k: g for k, g in found.items() if g is not None})
        log.info("API keys read again from %s: %d keys in force", self.path, len(keys))
        return True

    def view(self) -> dict[str, object]:
        return {"file": str(self.path), "reloads": self.reloads, "last_error": self.last_error}

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            signature = self._signature()
            if signature != self._seen:
                self._seen = signature
                await self.reload()
