"""Per-arm statistics of routes in automatic rollout: counted per request in this process, per
interval, and flushed to the state store once a second (never a round trip per request)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from gateway.analysis import ArmWindow, bucket_of
from gateway.route import Route
from gateway.state import State, StateUnavailable, StatsKey

if TYPE_CHECKING:
    from gateway.attempt import Attempt

log = logging.getLogger("gateway.stats")

FLUSH_S = 1.0
MAX_PENDING = 10_000  # windows kept while the store is unreachable; beyond, the oldest batch is dropped
ERRORS = frozenset({"upstream_error", "timeout"})
LIVE = frozenset({"shadow", "progressing", "paused"})


def _segmented(route: Route) -> bool:
    return route.automatic is not None and route.automatic.segments is not None and route.cohorts is not None


class Recorder:
    def __init__(self, state: State) -> None:
        self._state = state
        self._pending: dict[StatsKey, ArmWindow] = {}

    def _live(self, route: Route) -> bool:
        """Counted only while the controller may judge the rollout: not once it is promoted, rolled
        back or taken over by hand (statistics would pile up for nobody)."""
        if route.automatic is None:
            return False
        state = self._state.current(route.name)
        return state is not None and state.phase in LIVE and state.rollout == route.rollout_key

    def _windows(self, route: Route, arm: str, cohort: str) -> list[ArmWindow]:
        """This interval's windows for the arm, and for the arm in this cohort with rollout.segments."""
        auto = route.automatic
        assert auto is not None  # only live rollouts are counted
        interval = int(time.time() // auto.interval_s)
        windows = []
        for key in (arm, f"{arm}@{cohort}") if _segmented(route) else (arm,):
            window = self._pending.get((route.name, route.rollout_key, interval, key))
            if window is None:
                window = self._pending[(route.name, route.rollout_key, interval, key)] = ArmWindow()
            windows.append(window)
        return windows

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
    ) -> None:
        """One attempt. arm: base, candidate, or shadow (the candidate's mirrored calls). With
        rollout.segments, counted for its cohort too (arm "candidate@billing")."""
        if outcome == "client_closed" or not self._live(route):
            return  # the client left (no verdict on the arm), or nothing is being judged
        latency = bucket_of(duration_s)
        ttft = bucket_of(ttft_s) if ttft_s is not None else None
        for window in self._windows(route, arm, cohort):
            window.requests += 1
            if outcome in ERRORS:
                window.errors += 1
            if invalid:
                window.invalid += 1
            if output_tokens is not None:
                window.tokens += output_tokens
                window.tokens_sq += output_tokens * output_tokens
                window.token_answers += 1
            if cost is not None:
                window.cost += cost
                window.cost_sq += cost * cost
            window.latency[latency] = window.latency.get(latency, 0) + 1
            if ttft is not None:
                window.ttft[ttft] = window.ttft.get(ttft, 0) + 1

    def attempt(
        self, route: Route, arm: str, outcome: str, duration_s: float, attempt: Attempt, cohort: str
    ) -> None:
        """An upstream attempt as the proxy and the shadow calls finish it."""
        self.record(
            route,
            arm,
            outcome,
            duration_s,
            attempt.invalid,
            attempt.output_tokens,
            attempt.ttft_s,
            attempt.cost,
            cohort,
        )

    def fallback(self, route: Route, attempted: bool, cohort: str = "all") -> None:
        """Base answered a request assigned to the candidate (attempted=False: its circuit was open)."""
        if not self._live(route):
            return
        for window in self._windows(route, "candidate", cohort):
            window.fallbacks += 1
            if not attempted:
                window.requests += 1

    def feedback(self, route: Route, arm: str, cohort: str, negative: bool, escalated: bool) -> None:
        """Feedback on an answer of this rollout, counted in the interval it arrives."""
        if not self._live(route):
            return
        for window in self._windows(route, arm, cohort):
            window.feedback += 1
            window.negative += negative
            window.escalated += escalated

    async def flush(self) -> None:
        batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            await self._state.add_stats(batch)
        except StateUnavailable:
            if len(batch) + len(self._pending) <= MAX_PENDING:
                for key, window in batch.items():  # kept for the next flush
                    self._pending.setdefault(key, ArmWindow()).merge(window)
            else:
                log.warning("state store unreachable: dropped %d statistics windows", len(batch))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()
