"""Every upstream attempt is booked here, once, when what it means is known: primary attempts, fallbacks
and shadow calls alike, into the request counter, the rollout statistics, the candidate's circuit breaker,
the attempt's span and the shadow pairs waiting for it.

When is what an attempt means known? An answer, or a failure no other arm was asked about: when it ends.
A candidate failure that the base was asked about (a fallback), or a shadow call's failure: once the base
has answered the same request, because a failure both arms share is the request's, not the candidate's
(errors.same_way). The proxy and the shadow calls hold such attempts until then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.breaker import CircuitBreaker
from gateway.errors import Outcome, outcome_of
from gateway.stats import Recorder
from gateway.tracing import Tracing

if TYPE_CHECKING:
    from gateway.attempt import Attempt, Request
    from gateway.evaluation.evaluations import Evaluations
    from gateway.traces import Traces


class Ledger:
    def __init__(
        self,
        stats: Recorder,
        tracing: Tracing,
        evaluations: Evaluations | None = None,
        traces: Traces | None = None,
    ) -> None:
        self._stats = stats
        self._tracing = tracing
        self._evaluations = evaluations
        self._traces = traces

    def book(
        self,
        request: Request,
        attempt: Attempt,
        *,
        blamed: bool | None = None,
        breaker: CircuitBreaker | None = None,
        stats_arm: str | None = None,
    ) -> str:
        """Book a finished attempt; returns its outcome. blamed: whether its failure is its arm's, when the
        other arm was asked the same request (None: it was not). breaker: the candidate's, for a candidate's
        primary attempt. stats_arm: the rollout statistics it counts in ("base", "candidate", "shadow")."""
        error = attempt.error
        outcome: Outcome
        if attempt.unfinished is not None:
            outcome = attempt.unfinished
            arms_fault = None  # the client left or the gateway failed: no verdict on the arm
        else:
            outcome = outcome_of(error, blamed)
            if error is not None:
                arms_fault = error.blamed if blamed is None else blamed
            else:  # an answer; it failed, when validation it was released with failed (passthrough streams)
                arms_fault = attempt.invalid and attempt.validation in request.route.fallback_on
        attempt.metrics.outcomes[outcome].inc()
        if stats_arm is not None:
            self._stats.attempt(request, stats_arm, outcome, attempt)
            if request.trace is not None and self._traces is not None and attempt.mode == "primary":
                self._traces.attempt(request.trace, attempt, outcome, stats_arm)
        if breaker is not None:
            if arms_fault is None or (error is not None and not arms_fault):
                breaker.release()  # nothing learnt about the candidate
            else:
                breaker.record(arms_fault)
            request.metrics.circuit.set(breaker.state != "closed")
        if request.pairs and attempt.mode == "primary" and attempt.arm.name == "base":
            observation = attempt.observation()
            for pair in request.pairs:
                pair.record_primary(observation)
        if self._evaluations is not None and stats_arm is not None and outcome == "ok":
            self._evaluations.answer(request, attempt, stats_arm)
        if attempt.span is not None:
            if request.trace is not None and request.trace.index is not None and attempt.mode == "primary":
                attempt.span.set_attribute("canarygate.trace.step", request.trace.index)
            self._tracing.end_client(
                attempt.span,
                attempt.answer,
                attempt.validation,
                error,
                attempt.status,
                outcome=outcome,
                end_ns=attempt.end_ns,
            )
        return outcome
