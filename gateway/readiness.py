"""Can each arm answer? GET {url}/models with the arm's own credentials: reachable, authorized, and serving
the model the policy names. A candidate whose model name is misspelled or whose key is wrong answers
every request with a 404 or a 401; this is where that is seen before any user's request is.

Results are kept CACHE_S and shared by concurrent callers, so readiness probes (one per replica every few
seconds) and the controller never fan out to the model servers per call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.errors import GatewayError
from gateway.route import RouteArm
from gateway.upstream import Upstream

CACHE_S = 10.0
MAX_ENTRIES = 4096  # arms of every route, across reloads; the oldest results go first

Status = Literal["ok", "unlisted", "unauthorized", "model_not_listed", "error", "unreachable"]


@dataclass(frozen=True, slots=True)
class ArmReadiness:
    status: Status  # unlisted: the server lists no models (GET /models 404 or not a list): not checked
    detail: str
    http_status: int | None = None
    latency_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "unlisted")

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "status": self.status, "detail": self.detail}
        if self.http_status is not None:
            out["http_status"] = self.http_status
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        return out


class Readiness:
    def __init__(
        self,
        upstream: Upstream,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        ttl_s: float = CACHE_S,
    ) -> None:
        self._upstream = upstream
        self._timeout_s = timeout_s
        self._clock = clock
        self._ttl_s = ttl_s
        self._results: dict[Hashable, tuple[float, ArmReadiness]] = {}
        self._running: dict[Hashable, asyncio.Future[ArmReadiness]] = {}

    async def check(self, arm: RouteArm) -> ArmReadiness:
        key = (arm.bulkhead, arm.model, tuple(sorted(arm.headers.items())))
        kept = self._results.get(key)
        if kept is not None and self._clock() - kept[0] < self._ttl_s:
            return kept[1]
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(self._probe(arm))
            running.add_done_callback(lambda done: self._keep(key, done))
        return await asyncio.shield(running)  # a caller that gives up does not cancel the others' probe

    def _keep(self, key: Hashable, done: asyncio.Future[ArmReadiness]) -> None:
        del self._running[key]
        if done.cancelled() or done.exception() is not None:
            return
        self._results[key] = (self._clock(), done.result())
        while len(self._results) > MAX_ENTRIES:
            del self._results[next(iter(self._results))]

    async def _probe(self, arm: RouteArm) -> ArmReadiness:
        started = time.perf_counter()
        try:
            status, body = await self._upstream.probe(arm, self._timeout_s)
        except GatewayError as exc:
            return ArmReadiness("unreachable", exc.message)
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        who = f"the {arm.name} upstream"
        if status in (401, 403):
            return ArmReadiness(
                "unauthorized",
                f"{who} refused the arm's credentials (HTTP {status}): check arms.{arm.name}.api_key_env",
                status,
                latency_ms,
            )
        if status == 404:
            return ArmReadiness(
                "unlisted", f"{who} has no GET /models: its model is not checked", status, latency_ms
            )
        if status >= 400:
            return ArmReadiness("error", f"{who} answered GET /models with HTTP {status}", status, latency_ms)
        listed = _model_ids(body)
        if listed is None:
            return ArmReadiness(
                "unlisted",
                f"{who}'s GET /models is not a model list: its model is not checked",
                status,
                latency_ms,
            )
        if arm.model not in listed:
            shown = ", ".join(sorted(listed)[:10]) or "none"
            return ArmReadiness(
                "model_not_listed",
                f"{who} does not serve the model {arm.model!r} (arms.{arm.name}.model); it lists: {shown}",
                status,
                latency_ms,
            )
        return ArmReadiness("ok", f"{who} serves {arm.model!r}", status, latency_ms)


def _model_ids(body: bytes) -> set[str] | None:
    """The ids of an OpenAI model list ({"data": [{"id": ...}, ...]}), or None when it is not one."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    data = parsed.get("data") if isinstance(parsed, dict) else None
    if not isinstance(data, list):
        return None
    return {item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)}
