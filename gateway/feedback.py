"""User feedback on answers, attributed to the route, arm and cohort that served them.

Every answered request leaves an assignment record (request id -> route, arm, cohort, rollout), written
to the state store in batches once a second with a TTL. POST /v1/feedback names a request id; the
record says whom to credit. Feedback counts once per request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from gateway.errors import NotFound, Unavailable
from gateway.route import Route
from gateway.routing import bounded_key
from gateway.stats import Recorder
from gateway.store import StateUnavailable
from gateway.store.records import RecordStore
from gateway.store.traces import trace_id
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


TRACE_RECORD = "t\x1e"  # a trace's record key: this, then its store id (request ids hold no control bytes)


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(
        default=None, pattern=r"^[\x21-\x7e]{1,128}$", description="x-request-id of the answer"
    )
    trace_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Or a whole trace (a conversation, an agent run): its trace key as sent "
        "(assignment.trace_keys); counts once per route it went through, for the arm that served it",
    )
    route: str | None = Field(default=None, max_length=128, description="With trace_id: only this route")
    score: Literal["up", "down"] | Annotated[float, Field(ge=0, le=1)] = Field(
        description='"up", "down", or a number in [0, 1] (under 0.5 counts as negative)'
    )
    escalated: bool = False
    comment: str | None = Field(default=None, max_length=2000)

    @model_validator(mode="after")
    def _one_subject(self) -> FeedbackIn:
        if (self.request_id is None) == (self.trace_id is None):
            raise PydanticCustomError(
                "one_subject",
                "send either request_id (one answer) or trace_id (a whole trace), not both",
                {"param": "request_id"},
            )
        if self.route is not None and self.trace_id is None:
            raise PydanticCustomError(
                "route_without_trace",
                "route narrows a trace_id; a request_id already names its route",
                {"param": "route"},
            )
        return self

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
        """An answered request (cheap: serialised at the next flush, not on the request's path). A trace's
        steps are remembered under the trace's record key (trace_record) too, the last one's arm kept."""
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


def trace_record(route: str, trace: str, scope: str | None = None) -> str:
    """The record key of a trace on a route, of the client with this API key (store.traces.trace_id)."""
    return TRACE_RECORD + trace_id(route, trace, scope)


class Feedback:
    def __init__(
        self,
        assignments: Assignments,
        backend: str,
        metrics: Metrics,
        stats: Recorder,
        routes: Callable[[str], Route | None],
        every_route: Callable[[], Iterable[Route]] = tuple,
    ) -> None:
        self._assignments = assignments
        self._backend = backend
        self._metrics = metrics
        self._stats = stats
        self._routes = routes
        self._every_route = every_route

    async def _recall(self, keys: list[str]) -> dict[str, dict[str, str]]:
        """The records found of these keys; with a shared store, looked for again for a flush window and
        a half while none is found (another replica may not have flushed yet)."""
        found = {key: r for key in keys if (r := await self._assignments.recall(key)) is not None}
        if self._backend == "memory":
            return found  # every record is this process's own
        deadline = time.monotonic() + WAIT_FOR_FLUSH_S
        while not found and time.monotonic() < deadline:
            await asyncio.sleep(LOOK_AGAIN_S)
            found = {key: r for key in keys if (r := await self._assignments.recall(key)) is not None}
        return found

    async def record(self, given: FeedbackIn, scope: str | None = None) -> dict[str, object]:
        """scope: the caller's API key; a trace is looked for among that key's own."""
        if given.trace_id is not None:
            return await self._trace(given, given.trace_id, scope)
        assert given.request_id is not None
        try:
            found = (await self._recall([given.request_id])).get(given.request_id)
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
        if first:
            self._count(given, found, f"request_id={given.request_id}")
        return {
            "object": "feedback",
            "request_id": given.request_id,
            "route": found["route"],
            "arm": found["arm"],
            "cohort": found["cohort"],
            "recorded": first,  # False: feedback for this request id was already counted
        }

    async def _trace(self, given: FeedbackIn, trace: str, scope: str | None) -> dict[str, object]:
        """Feedback on a whole trace: counted once per route it went through, for the arm that served it
        (its last step's), as one answer's feedback is."""
        routes = [r.name for r in self._every_route() if r.trace_sources]
        if given.route is not None:
            routes = [given.route] if given.route in routes else []
        key = bounded_key(trace)  # as the requests' trace key was kept (routing.trace_key)
        keys = {trace_record(name, key, scope): name for name in routes}
        try:
            found = await self._recall(list(keys))
            if not found:
                hours = self._assignments.ttl_s / 3600
                where = f"route {given.route!r}" if given.route is not None else "any route with trace keys"
                raise NotFound(
                    f"no trace {trace[:200]!r} answered on {where} in the last {hours:g} h: send the trace "
                    "key the requests carried (assignment.trace_keys, e.g. the x-conversation-id header)",
                    code="trace_not_found",
                    param="trace_id",
                )
            counted = []
            for record_key, record in found.items():
                first = await self._assignments.first_feedback(record_key)
                if first:
                    self._count(given, record, f"trace_id={trace[:200]!r}")
                counted.append(
                    {
                        "route": record["route"],
                        "arm": record["arm"],
                        "cohort": record["cohort"],
                        "recorded": first,  # False: this trace's feedback was already counted here
                    }
                )
        except StateUnavailable as exc:
            raise Unavailable("the state store (Redis) cannot be reached: feedback was not recorded") from exc
        return {
            "object": "feedback",
            "trace_id": trace,
            "recorded": any(c["recorded"] for c in counted),
            "routes": counted,
        }

    def _count(self, given: FeedbackIn, found: dict[str, str], subject: str) -> None:
        route, arm, cohort = found["route"], found["arm"], found["cohort"]
        negative = given.negative()
        self._metrics.feedback(route, arm, cohort, negative, given.escalated)
        current = self._routes(route)
        if current is not None and current.rollout_key == found.get("rollout"):
            group = found.get("group")
            self._stats.feedback(
                current, arm, cohort, negative, given.escalated, int(group) if group else None
            )
        log.info(
            "%s route=%s arm=%s cohort=%s feedback %s%s%s",
            subject,
            route,
            arm,
            cohort,
            "negative" if negative else "positive",
            ", escalated" if given.escalated else "",
            f": {given.comment[:500]!r}" if given.comment else "",
        )
