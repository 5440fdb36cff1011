"""The CLI's client of a running gateway's admin API: where the gateway is, one call, errors in words."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8080"


class AdminError(Exception):
    pass


def gateway_root(url: str) -> str:
    """The gateway's root from what a user gives: with or without a trailing /v1 (users copy their
    clients' base_url) and trailing slashes. AdminError when it is not an http(s) URL."""
    given = url.strip()
    parts = urlsplit(given)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise AdminError(
            f"{given!r} is not a gateway URL: give one like http://gateway:8080 (env CANARYGATE_URL)"
        )
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1").rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path}"


def call(url: str, method: str, path: str, **kwargs: Any) -> Any:
    """One admin API call to the gateway at url (root or base_url); its response when it answers 200,
    else AdminError with the gateway's message, or why it could not be asked."""
    import httpx

    token = os.environ.get("CANARYGATE_ADMIN_TOKEN")
    if not token:
        raise AdminError("set CANARYGATE_ADMIN_TOKEN to the gateway's admin token")
    root = gateway_root(url)
    try:
        response = httpx.request(
            method, f"{root}{path}", timeout=30, headers={"Authorization": f"Bearer {token}"}, **kwargs
        )
    except httpx.TransportError as exc:
        raise AdminError(f"cannot reach {root}: {exc or type(exc).__name__}") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise AdminError(f"{response.status_code}: {message}")
    return response
