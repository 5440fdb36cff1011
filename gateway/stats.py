"""Per-arm statistics of routes in automatic rollout: counted per request in this process, per
interval, and flushed to the state store once a second (never a round trip per request)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from typing import TYPE_CHECKING

from gateway.analysis import ArmWindow, bucket_of
from gateway.errors import ERROR_OUTCOMES
from gateway.route import Route
from gateway.store import StateUnavailable
from gateway.store.rollouts import RolloutStore, RouteState
from gateway.store.stats import StatsKey, StatsStore, units_interval

if TYPE_CHECKING:
    from gateway.attempt import Attempt, Request
    from gateway.store.traces import Finished

log = logging.getLogger("gateway.stats")

FLUSH_S = 1.0
MAX_PENDING = 10_000  # windows kept while the store is unreachable; beyond, the oldest batch is dropped
MAX_SEEN = 100_000  # units noted per step, arm and cohort between two flushes
# Counted while the rollout may be judged: by the controller, or by an operator reading `compare`.
LIVE = frozenset({"shadow", "progressing", "paused", "manual"})
UNJUDGED = frozenset({"client_closed", "cancelled", "internal_error"})  # no verdict on the arm
PRIMARY = frozenset({"base", "candidate"})  # the arms a request is assigned to (the sample-ratio check)


def _segmented(route: Route) -> bool:
    return route.rollout.segments is not None and route.cohorts is not None


class Recorder:
    def __init__(self, store: StatsStore, rollouts: RolloutStore) -> None:
        self._store = store
        self._rollouts = rollouts
        self._pending: dict[StatsKey, ArmWindow] = {}
        self._unsent: deque[tuple[str, dict[StatsKey, ArmWindow]]] = deque()  # (batch id, batch)
        self._seen: dict[StatsKey, set[str]] = {}  # units served per step, arm and cohort

    def _live(self, route: Route) -> RouteState | None:
        """The rollout's state while it can be judged, when it is counted: by the controller, or (manual
        mode) by an operator reading `canarygate compare`; not once it is promoted or rolled back
        (statistics would pile up for nobody), and never for a route without a candidate."""
        if route.candidate is None:
            return None
        state = self._rollouts.current(route.name)
        live = state is not None and state.phase in LIVE and state.rollout == route.rollout_key
        return state if live else None

    def _window(self, route: Route, number: int, arm: str) -> ArmWindow:
        window = self._pending.get((route.name, route.rollout_key, number, arm))
        if window is None:
            window = self._pending[(route.name, route.rollout_key, number, arm)] = ArmWindow()
        return window

    def _windows(self, route: Route, arm: str, cohort: str) -> list[ArmWindow]:
        """This interval's windows for the arm, and for the arm in this cohort with rollout.segments."""
        interval = int(time.time() // route.rollout.interval_s)
        return [
            self._window(route, interval, k)
            for k in ((arm, f"{arm}@{cohort}") if _segmented(route) else (arm,))
        ]

    def _unit_window(
        self, route: Route, state: RouteState, arm: str, cohort: str, group: int | None
    ) -> list[ArmWindow]:
        """The current step's window for the arm's unit group in this cohort (analysis.UNIT_GROUPS)."""
        if group is None:
            return []
        return [self._window(route, units_interval(state.step), f"{arm}@{cohort}#{group}")]

    def _seen_unit(
        self, route: Route, state: RouteState, arm: str, cohort: str, unit: str | None, share: float
    ) -> None:
        """A unit served in the current step, for the sample-ratio check of units: only when its arm was
        a draw at the step's weight (not forced, not a cohort left out, not assigned before the step
        began and answered after), and at most MAX_SEEN new ones a flush."""
        if unit is None or not 0 < share < 1 or share != state.weight / 100:
            return
        seen = self._seen.setdefault(
            (route.name, route.rollout_key, units_interval(state.step), f"{arm}@{cohort}"), set()
        )
        if len(seen) < MAX_SEEN:
            seen.add(unit)

    def record(
        self,
        route: Route,
        arm: str,
        outcome: str,
        duration_s: float,
        invalid: bool,
        output_tokens: int | None,
        ttft_s: float | None,
        cost: float | None = None,
        cohort: str = "all",
        group: int | None = None,
        share: float | None = None,
        sign: int = 1,
        unit: str | None = None,
    ) -> None:
        """One attempt. arm: base, candidate, or shadow (the candidate's mirrored calls). With
        rollout.segments, counted for its cohort too (arm "candidate@billing"); group, sign and unit: its
        unit's; share: for a primary attempt, the probability it had of being the candidate's."""
        state = self._live(route)
        if outcome in UNJUDGED or state is None:
            return  # the client left or the gateway failed (no verdict on the arm), or nothing is judged
        windows = self._windows(route, arm, cohort)
        if share is not None:
            self._seen_unit(route, state, arm, cohort, unit, share)
        latency = bucket_of(duration_s)
        ttft = bucket_of(ttft_s) if ttft_s is not None else None
        log_latency = math.log(max(duration_s, 1e-6))
        log_ttft = math.log(max(ttft_s, 1e-6)) if ttft_s is not None else 0.0
        for window in windows:  # histograms per interval only
            window.latency[latency] = window.latency.get(latency, 0) + 1
            if ttft is not None:
                window.ttft[ttft] = window.ttft.get(ttft, 0) + 1
        for window in windows + self._unit_window(route, state, arm, cohort, group):
            window.attempt(
                outcome in ERROR_OUTCOMES, invalid, output_tokens, cost, log_latency,
                log_ttft if ttft_s is not None else None, share, sign,
            )  # fmt: skip

    def attempt(self, request: Request, arm: str, outcome: str, attempt: Attempt) -> None:
        """An upstream attempt, as the ledger books it."""
        self.record(
            request.route,
            arm,
            outcome,
            attempt.duration_s,
            attempt.invalid,
            attempt.output_tokens,
            attempt.ttft_s,
            attempt.cost,
            request.cohort,
            request.unit.group,
            request.share if arm in PRIMARY else None,
            request.unit.sign,
            request.unit.id,
        )

    def fallback(self, request: Request, attempted: bool) -> None:
        """Base answered a request assigned to the candidate (attempted=False: its circuit was open, and the
        request counts as the candidate's, unattempted)."""
        route = request.route
        state = self._live(route)
        if state is None:
            return
        windows = self._windows(route, "candidate", request.cohort)
        unit = request.unit
        for window in windows + self._unit_window(route, state, "candidate", request.cohort, unit.group):
            window.fallbacks += 1
            if not attempted:
                window.requests += 1
                window.unattempted += 1
                window.expected += request.share
                window.expected_sq += request.share * request.share
                window.signed += unit.sign
        if not attempted:
            self._seen_unit(route, state, "candidate", request.cohort, unit.id, request.share)

    def feedback(
        self, route: Route, arm: str, cohort: str, negative: bool, escalated: bool, group: int | None = None
    ) -> None:
        """Feedback on an answer of this rollout, counted in the interval it arrives (and in the answer's
        unit group, when its record has one)."""
        state = self._live(route)
        if state is None:
            return
        windows = self._windows(route, arm, cohort) + self._unit_window(route, state, arm, cohort, group)
        for window in windows:
            window.feedback += 1
            window.negative += negative
            window.escalated += escalated

    def evaluation(
        self,
        route: Route,
        arm: str,
        cohort: str,
        group: int | None,
        results: list[tuple[str, float, bool]],
    ) -> None:
        """Evaluators' results (evaluator, value, flip) on one answer (or a judged pair) of this rollout,
        counted in the interval they arrive, as feedback is. arm: base, candidate, shadow (the candidate's
        shadow answers, and judged pairs), or noise (the noise floor's pairs)."""
        state = self._live(route)
        if state is None:
            return
        windows = self._windows(route, arm, cohort) + self._unit_window(route, state, arm, cohort, group)
        for window in windows:
            for evaluator, value, flip in results:
                window.score(evaluator, value, flip)

    def trace(self, route: Route, arm: str, cohort: str, group: int, sign: int, finished: Finished) -> None:
        """A trace of this rollout that has ended, counted in the interval it ended (and in its unit's
        group): its steps, its cost, and whether any step failed."""
        state = self._live(route)
        if state is None:
            return
        windows = self._windows(route, arm, cohort) + self._unit_window(route, state, arm, cohort, group)
        for window in windows:
            window.trace(int(finished["steps"]), finished["cost"], finished.failed)

    async def flush(self) -> None:
        """Sends the batches not yet sent, oldest first, each as it was first sent and under its id: a
        write that timed out may have been applied, and the store counts a batch id once."""
        seen, self._seen = self._seen, {}
        if seen:
            try:
                await self._store.seen(seen)  # adding a unit again changes nothing: no batch id needed
            except StateUnavailable:
                log.warning("state store unreachable: units seen in the last second not noted")
        batch, self._pending = self._pending, {}
        if batch:
            self._unsent.append((os.urandom(12).hex(), batch))
        while self._unsent:
            batch_id, batch = self._unsent[0]
            try:
                await self._store.add(batch, batch_id)
            except StateUnavailable:
                held = sum(len(b) for _, b in self._unsent)
                while held > MAX_PENDING and len(self._unsent) > 1:
                    held -= len(self._unsent.popleft()[1])
                    log.warning("state store unreachable: dropped the oldest batch of statistics windows")
                return
            self._unsent.popleft()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()
