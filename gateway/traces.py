"""Traces: the requests of one agent run or conversation (sharing a trace key, assignment.trace_keys),
summed per trace and compared between the arms when the trace ends.

A request with a trace key begins a step: the store counts it and says its index (in memory at once;
with Redis, one script call that runs while the upstream answers, never in the user's way). What the
step cost and how it failed (tokens, cost, tool calls, fallback, validation, error, and later its
evaluators' failures) is summed here and sent once a second. A trace with no new step for its route's
traces.idle_timeout_s has ended: once a second the store hands the ended ones, each once, to one
replica, which counts it in the metrics and the rollout's statistics (steps, cost and failure per trace,
the trace gates)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.errors import ERROR_OUTCOMES
from gateway.route import Route
from gateway.stats import Recorder
from gateway.store import StateUnavailable
from gateway.store.traces import INFLIGHT, Finished, TraceMeta, TraceStore, trace_id
from gateway.tasks import Spawner
from gateway.telemetry import Metrics

if TYPE_CHECKING:
    from gateway.attempt import Attempt

log = logging.getLogger("gateway.traces")

FLUSH_S = 1.0
MAX_PENDING = 100_000  # traces with sums not yet sent; beyond, a step's sums are dropped (and logged)
SWEEP_BATCH = 1000  # ended traces taken from the store per call
DEFAULT_MAX_OPEN = 100_000
STEP_WAIT_S = 0.5  # how long a request's end waits for its step's index, for its span (after the answer)


class Step:
    """One request of a trace: what it adds to the trace's sums, and its index in the trace."""

    __slots__ = (
        "_task", "_traces", "arm", "failed", "index", "registered", "route", "sums", "tid", "trace",
    )  # fmt: skip

    def __init__(self, traces: Traces, route: Route, trace: str, tid: str, arm: str) -> None:
        self._traces = traces
        self.route = route
        self.trace = trace
        self.tid = tid
        self.arm = arm
        self.index: int | None = None  # 1 for a trace's first step; None until the store has said
        self.registered: bool | None = None  # the store counted its beginning (None: not yet known)
        self.sums: dict[str, float] | None = {}  # None once ended: later counts go straight to pending
        self.failed = False
        self._task: asyncio.Task[Any] | None = None

    def count(self, name: str, amount: float = 1) -> None:
        if not amount:
            return
        if self.sums is not None:
            self.sums[name] = self.sums.get(name, 0) + amount
        else:  # an evaluator's result, after the request ended
            self._traces.pending(self, {name: amount})

    async def known_index(self, timeout_s: float = STEP_WAIT_S) -> int | None:
        """The step's index, waiting for the store a little (its call runs beside the upstream's)."""
        if self.index is None and self._task is not None and not self._task.done():
            await asyncio.wait([self._task], timeout=timeout_s)
        return self.index


class Traces:
    def __init__(
        self,
        store: TraceStore,
        recorder: Recorder,
        metrics: Metrics,
        routes: Callable[[str], Route | None],
        spawner: Spawner,
        *,
        max_open: int = DEFAULT_MAX_OPEN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._recorder = recorder
        self._metrics = metrics
        self._routes = routes
        self._spawner = spawner
        self.max_open = max_open
        self._clock = clock
        self._pending: dict[str, tuple[float, dict[str, float]]] = {}
        self.dropped = 0  # steps whose sums were dropped (the store unreachable, pending full)

    def begin(
        self,
        route: Route,
        trace: str,
        arm: str,
        cohort: str,
        group: int,
        sign: int,
        unit: str | None,
        scope: str | None = None,
    ) -> Step:
        """A request with a trace key, assigned to arm; scope: the client's API key (store.trace_id)."""
        now = self._clock()
        step = Step(self, route, trace, trace_id(route.name, trace, scope), arm)
        meta = TraceMeta(route.name, trace, route.rollout_key, arm, cohort, group, sign, unit or "")
        deadline = now + route.trace_idle_s
        if self._store.local:
            step.index = self._store.step_now(step.tid, meta, now, deadline, self.max_open)  # type: ignore[attr-defined]
            step.registered = True
        else:
            step._task = self._spawner.spawn(self._step(step, meta, now, deadline), "trace step")
        return step

    async def _step(self, step: Step, meta: TraceMeta, now: float, deadline: float) -> None:
        try:
            step.index = await self._store.step(step.tid, meta, now, deadline, self.max_open)
            step.registered = True
        except StateUnavailable:
            log.warning(
                "state store unreachable: a step of trace %s on %s is not counted", step.trace, meta.route
            )
            step.registered = False
            self.dropped += 1

    def attempt(self, step: Step, attempt: Attempt, outcome: str, stats_arm: str) -> None:
        """An attempt the ledger booked for this request (its primary, or the base's after a fallback)."""
        if stats_arm not in ("base", "candidate", "fallback"):
            return
        answer = attempt.answer if attempt.accumulated is None else attempt.accumulated
        usage = answer.get("usage") if isinstance(answer, dict) else None
        if attempt.answer is not None and not isinstance(usage, dict):
            last = attempt.answer.get("usage")  # a stream's usage comes in its last chunk
            usage = last if isinstance(last, dict) else None
        if isinstance(usage, dict):
            step.count("input_tokens", _int(usage.get("prompt_tokens")))
            step.count("output_tokens", _int(usage.get("completion_tokens")))
            step.count("cached_tokens", _int(_detail(usage, "prompt_tokens_details", "cached_tokens")))
            step.count(
                "reasoning_tokens", _int(_detail(usage, "completion_tokens_details", "reasoning_tokens"))
            )
        if attempt.cost:
            step.count("cost", attempt.cost)
        if isinstance(answer, dict):
            step.count("tool_calls", _tool_calls(answer))
        # A failure the request caused (rejected by both arms) or no verdict on the arm is no step's.
        if outcome == "invalid_output" or (outcome == "ok" and attempt.invalid):
            step.count("invalid")
            step.failed = True
        elif outcome in ERROR_OUTCOMES:
            step.count("errors")
            step.failed = True

    def fallback(self, step: Step) -> None:
        step.count("fallbacks")
        step.failed = True

    def end(self, step: Step) -> None:
        """The request is over: its sums join the trace's, sent at the next flush, and it is no longer in
        flight (the trace's idle time counts from now)."""
        sums, step.sums = step.sums, None
        assert sums is not None
        if step.failed and step.index is not None:
            self._metrics.step_failed(step.route.name, step.arm, step.index)
        if step.registered is not False:  # its beginning was counted (or will be, by the call under way)
            sums[INFLIGHT] = -1
        if sums:
            self.pending(step, sums)

    def pending(self, step: Step, sums: dict[str, float]) -> None:
        """Sums for the step's trace, sent at the next flush; its deadline an idle timeout from now."""
        self._hold(step.tid, self._clock() + step.route.trace_idle_s, sums)

    def _hold(self, tid: str, deadline: float, sums: dict[str, float]) -> None:
        held = self._pending.get(tid)
        if held is None:
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                return
            self._pending[tid] = (deadline, dict(sums))
            return
        kept = held[1]
        for name, amount in sums.items():
            kept[name] = kept.get(name, 0) + amount
        self._pending[tid] = (max(held[0], deadline), kept)

    async def flush(self) -> None:
        batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            gone = await self._store.add(batch, self._clock())
        except StateUnavailable:
            for tid, (deadline, sums) in batch.items():  # kept for the next flush, within the bound
                self._hold(tid, deadline, sums)
            log.warning("state store unreachable: sums of %d traces held for the next flush", len(batch))
            return
        if gone:
            log.info("sums of %d steps came after their trace had ended (traces.idle_timeout_s)", gone)

    async def sweep(self) -> int:
        """Count the traces that have ended; returns how many."""
        ended = 0
        while True:
            try:
                finished = await self._store.finished(self._clock(), SWEEP_BATCH, self.max_open)
            except StateUnavailable:
                return ended
            for trace in finished:
                self._finish(trace)
            ended += len(finished)
            if len(finished) < SWEEP_BATCH:
                break
        with contextlib.suppress(StateUnavailable):
            self._metrics.traces_open.set(await self._store.open_count())
        return ended

    def _finish(self, trace: Finished) -> None:
        meta = trace.meta
        self._metrics.trace(meta.route, meta.arm, meta.cohort, trace)
        route = self._routes(meta.route)
        if route is not None and route.rollout_key == meta.rollout and meta.arm in ("base", "candidate"):
            self._recorder.trace(route, meta.arm, meta.cohort, meta.group, meta.sign, trace)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()
            await self.sweep()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _detail(usage: dict[str, Any], details: str, name: str) -> Any:
    found = usage.get(details)
    return found.get(name) if isinstance(found, dict) else None


def _tool_calls(answer: dict[str, Any]) -> int:
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return 0
    message = choices[0].get("message") or choices[0].get("delta")
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    return len(calls) if isinstance(calls, list) else 0
