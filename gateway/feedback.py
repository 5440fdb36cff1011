"""User feedback on answers, attributed to the route, arm and cohort that served them.

Every answered request leaves an assignment record (request id -> route, arm, cohort, rollout), written
to the state store in batches once a second with a TTL. POST /v1/feedback names a request id; the
record says whom to credit. Feedback counts once per request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import NotFound, Unavailable
from gateway.route import Route
from gateway.stats import Recorder
from gateway.store import StateUnavailable
from gateway.store.records import RecordStore
from gateway.telemetry import Metrics

log = logging.getLogger("gateway.feedback")

FLUSH_S = 1.0
# Feedback may name an answer another replica gave a moment ago and has not flushed yet: with a shared
# store, an id not found is looked for again (every LOOK_AGAIN_S) for up to one flush window and a half
# before the 404. Writing every record through instead would put a Redis round trip on every request.
LOOK_AGAIN_S = 0.25
WAIT_FOR_FLUSH_S = FLUSH_S + 0.5
SEPARATOR = "\x1f"
MAX_PENDING = 100_000


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=r"^[\x21-\x7e]{1,128}$", description="x-request-id of the answer")
    score: Literal["up", "down"] | Annotated[float, Field(ge=0, le=1)] = Field(
        description='"up", "down", or a number in [0, 1] (under 0.5 counts as negative)'
    )
    escalated: bool = False
    comment: str | None = Field(default=None, max_length=2000)

    def negative(self) -> bool:
        if isinstance(self.score, str):
            return self.score == "down"
        return self.score < 0.5


class Assignments:
    def __init__(self, store: RecordStore, on_dropped: Callable[[float], object] | None = None) -> None:
        self._store = store
        self.ttl_s = store.ttl_s
        self._on_dropped = on_dropped  # older records dropped to stay within the store's bound
        self._pending: dict[str, tuple[str, ...]] = {}

    def remember(self, request_id: str, route: str, arm: str, cohort: str, rollout: str, group: int) -> None:
        """An answered request (cheap: serialised at the next flush, not on the request's path)."""
        if len(self._pending) < MAX_PENDING:
            self._pending[request_id] = (route, arm, cohort, rollout, str(group))

    async def recall(self, request_id: str) -> dict[str, str] | None:
        pending = self._pending.get(request_id)
        if pending is not None:
            return _record(pending)
        raw = await self._store.recall(request_id)
        if raw is None:
            return None
        return _record(tuple(raw.split(SEPARATOR)))

    async def first_feedback(self, request_id: str) -> bool:
        return await self._store.first_feedback(request_id)

    async def flush(self) -> None:
        batch, self._pending = self._pending, {}
        if not batch:
            return
        records = {rid: SEPARATOR.join(r) for rid, r in batch.items()}  # names cannot hold \x1f
        try:
            dropped = await self._store.remember(records)
        except StateUnavailable:
            if len(batch) + len(self._pending) <= MAX_PENDING:
                self._pending = {**batch, **self._pending}
            else:
                log.warning("state store unreachable: %d answers will not take feedback", len(batch))
            return
        if dropped and self._on_dropped is not None:
            self._on_dropped(dropped)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()


def _record(values: tuple[str, ...]) -> dict[str, str]:
    """route, arm, cohort, rollout and the unit group (absent from records written before it was kept)."""
    return dict(zip(("route", "arm", "cohort", "rollout", "group"), values, strict=False))


class Feedback:
    def __init__(
        self,
        assignments: Assignments,
        backend: str,
        metrics: Metrics,
        stats: Recorder,
        routes: Callable[[str], Route | None],
    ) -> None:
        self._assignments = assignments
        self._backend = backend
        self._metrics = metrics
        self._stats = stats
        self._routes = routes

    async def _recall(self, request_id: str) -> dict[str, str] | None:
        found = await self._assignments.recall(request_id)
        if self._backend == "memory":
            return found  # every record is this process's own
        deadline = time.monotonic() + WAIT_FOR_FLUSH_S
        while found is None and time.monotonic() < deadline:
            await asyncio.sleep(LOOK_AGAIN_S)
            found = await self._assignments.recall(request_id)
        return found

    async def record(self, given: FeedbackIn) -> dict[str, object]:
        try:
            found = await self._recall(given.request_id)
            if found is None:
                hours = self._assignments.ttl_s / 3600
                raise NotFound(
                    f"no answer with request id {given.request_id!r} in the last {hours:g} h (looked for "
                    f"{WAIT_FOR_FLUSH_S:g} s, for answers other replicas have just given): send the "
                    "x-request-id header of a response this gateway gave (CANARYGATE_FEEDBACK_TTL_S)",
                    code="request_not_found",
                    param="request_id",
                )
            first = await self._assignments.first_feedback(given.request_id)
        except StateUnavailable as exc:
            raise Unavailable("the state store (Redis) cannot be reached: feedback was not recorded") from exc
        route, arm, cohort = found["route"], found["arm"], found["cohort"]
        if first:
            negative = given.negative()
            self._metrics.feedback(route, arm, cohort, negative, given.escalated)
            current = self._routes(route)
            if current is not None and current.rollout_key == found.get("rollout"):
                group = found.get("group")
                self._stats.feedback(
                    current, arm, cohort, negative, given.escalated, int(group) if group else None
                )
            log.info(
                "request_id=%s route=%s arm=%s cohort=%s feedback %s%s%s",
                given.request_id,
                route,
                arm,
                cohort,
                "negative" if negative else "positive",
                ", escalated" if given.escalated else "",
                f": {given.comment[:500]!r}" if given.comment else "",
            )
        return {
            "object": "feedback",
            "request_id": given.request_id,
            "route": route,
            "arm": arm,
            "cohort": cohort,
            "recorded": first,  # False: feedback for this request id was already counted
        }
