"""Client authentication with gateway API keys (from the environment or a file)."""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import sha256

from gateway.errors import Unauthorized


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class ApiKeys:
    """Keys are kept only as sha256 digests; a lookup on digests leaks nothing about the keys' bytes."""

    def __init__(self, keys: frozenset[str], groups: Mapping[str, str] | None = None) -> None:
        groups = groups or {}
        self._digests = {sha256(k.encode()).digest(): groups.get(k) for k in keys}

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
