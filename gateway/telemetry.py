"""Prometheus metrics: the catalogue declared once against an injectable registry, bounded labels,
known label sets pre-initialised (dashboards show 0, not gaps), children pre-bound per route for the
hot path. With several workers, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from gateway.analysis import SAMPLE_RATIO, SAMPLE_RATIOS
from gateway.errors import KINDS, OUTCOMES, REASONS
from gateway.evaluation.judge import OUTCOMES as JUDGE_OUTCOMES
from gateway.route import Route
from gateway.store.rollouts import PHASES, RouteState

if TYPE_CHECKING:
    from gateway.analysis import Verdict
    from gateway.rollout import Analysis


ARMS = ("base", "candidate")
MODES = ("primary", "mirror")
FALLBACK_REASONS = (*REASONS, "circuit_open")
MIRROR_OUTCOMES = ("sent", "deferred", "dropped", "cancelled", "error")
MIRROR_CHECKS = ("json_valid", "schema_valid", "tool_name", "tool_args", "finish_reason")
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SCORE_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)
VERDICTS = ("win", "tie", "loss", "flip")
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


PREFLIGHT_VERDICTS = ("running", "pass", "fail", "undecided")
STEP_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50, 100)
TRACE_TOKEN_BUCKETS = (100, 300, 1000, 3000, 10_000, 30_000, 100_000, 300_000, 1_000_000)
TRACE_COST_BUCKETS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
TRACE_ARMS = ("base", "candidate", "mixed")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, enabled: bool = True) -> None:
        # The *_created series would double the series count for nothing a dashboard uses.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.enabled = enabled
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = registry if registry is not None else CollectorRegistry()
        r = None if self.multiprocess else self.registry  # multiprocess values live in files, not here
        per_arm = ["route", "arm", "mode"]
        self.requests = Counter(
            "canarygate_requests",
            "Upstream attempts and rejected requests, by outcome and by the API the client spoke",
            [*per_arm, "outcome", "cohort", "api"],
            registry=r,
        )
        self.duration = Histogram(
            "canarygate_request_duration_seconds",
            "Time of each attempt at the gateway, from its start to its last byte",
            [*per_arm, "cohort"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "canarygate_time_to_first_token_seconds",
            "Streams: from the attempt's start to the upstream's first chunk",
            per_arm,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "canarygate_overhead_seconds",
            "Time spent in the gateway itself: the request's total minus upstream time",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "canarygate_tokens", "Tokens from the upstream's usage report", [*per_arm, "type"], registry=r
        )
        self.cost = Counter(
            "canarygate_cost",
            "What answers cost by the arm's token prices (mode=mirror: shadow calls, never served cost)",
            per_arm,
            registry=r,
        )
        self.usage_missing = Counter(
            "canarygate_usage_missing",
            "Successful answers with no usage report (nothing counted for them)",
            per_arm,
            registry=r,
        )
        self.validation_failures = Counter(
            "canarygate_validation_failures",
            "Answers that failed validation",
            [*per_arm, "kind", "cohort", "api"],
            registry=r,
        )
        self.fallbacks = Counter(
            "canarygate_fallbacks",
            "Requests answered by base instead of the candidate",
            ["route", "reason", "cohort"],
            registry=r,
        )
        self.mirror = Counter(
            "canarygate_mirror", "Shadow calls to the candidate", ["route", "outcome"], registry=r
        )
        self.mirror_agreement = Counter(
            "canarygate_mirror_agreement",
            "Shadow vs primary comparisons",
            ["route", "check", "result"],
            registry=r,
        )
        self.noise_agreement = Counter(
            "canarygate_noise_agreement",
            "Noise floor: base replayed to base, compared like shadow pairs",
            ["route", "check", "result"],
            registry=r,
        )
        self.mirror_latency_ratio = Histogram(
            "canarygate_mirror_latency_ratio",
            "Compared pairs: the shadow call's duration over the primary's (candidate / base)",
            ["route"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.mirror_tokens_ratio = Histogram(
            "canarygate_mirror_output_tokens_ratio",
            "Compared pairs: the shadow answer's output tokens over the primary's (candidate / base)",
            ["route"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.rollout_weight = Gauge(
            "canarygate_rollout_weight",
            "Percent of units served by the candidate",
            ["route"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.policy_skew = Gauge(
            "canarygate_policy_skew",
            "1 while this replica's policy for the route is not the active rollout's (it serves the base)",
            ["route"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.rollout_phase = Gauge(
            "canarygate_rollout_phase",
            "1 for the route's current rollout phase",
            ["route", "phase"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.preflight_verdict = Gauge(
            "canarygate_preflight_verdict",
            "1 for the route's pre-flight: running, or its verdict (pass, fail, undecided) once it ran here",
            ["route", "verdict"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.rollout_step = Gauge(
            "canarygate_rollout_step",
            "Index of the current rollout step (-1: the mirror-only phase; 0 in manual mode)",
            ["route"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.rollout_transitions = Counter(
            "canarygate_rollout_transitions",
            "Rollout state changes seen by this replica, by the phase entered",
            ["route", "phase"],
            registry=r,
        )
        self.gate_value = Gauge(
            "canarygate_gate_value",
            "A rollout gate's measured value (rates: candidate - base; ratios: candidate / base)",
            ["route", "gate"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.gate_threshold = Gauge(
            "canarygate_gate_threshold",
            "A rollout gate's threshold, in the unit of its value",
            ["route", "gate"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.sample_ratio_mismatch = Gauge(
            "canarygate_sample_ratio_mismatch",
            "1 while the candidate's observed share of a rollout's requests does not match the weight "
            "(the rollout holds), else 0",
            ["route", "cohort"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.candidate_share = Gauge(
            "canarygate_candidate_share",
            "The candidate's share of a rollout's counted requests: observed, and expected from the weight",
            ["route", "cohort", "kind"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.feedback_total = Counter(
            "canarygate_feedback",
            "User feedback on answers, credited to the arm and cohort that served them",
            ["route", "arm", "cohort", "value"],
            registry=r,
        )
        self.state_sync_errors = Counter(
            "canarygate_state_sync_errors",
            "Failed reads or writes of the shared rollout state (Redis); the last state seen keeps serving",
            registry=r,
        )
        self.records_dropped = Counter(
            "canarygate_feedback_records_dropped",
            "Request records dropped, oldest first, to keep within CANARYGATE_REDIS_RECORDS or "
            "CANARYGATE_MEMORY_RECORDS: those answers no longer take feedback",
            registry=r,
        )
        self.circuit_open = Gauge(
            "canarygate_circuit_open",
            "1 while the arm's circuit is open or half-open",
            ["route", "arm"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.inflight = Gauge(
            "canarygate_inflight_requests",
            "Upstream attempts in progress",
            ["route", "arm"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.eval_score = Histogram(
            "canarygate_eval_score",
            "Evaluator results, a score in [0, 1] (mode=mirror: the candidate's shadow answers)",
            ["route", "arm", "mode", "evaluator", "cohort"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.eval_verdicts = Counter(
            "canarygate_eval_verdicts",
            "Judged pairs: the candidate's win, tie or loss (kind=noise: base against base, the judge's "
            "calibration); flip: the two orders disagreed (counted as a tie too)",
            ["route", "evaluator", "verdict", "kind"],
            registry=r,
        )
        self.evaluations_skipped = Counter(
            "canarygate_evaluations_skipped",
            "Sampled evaluations not made, by why (the judge's queue full, over its budget, failed, ...)",
            ["route", "evaluator", "reason"],
            registry=r,
        )
        self.judge_calls = Counter(
            "canarygate_judge_calls",
            "Calls to the route's judge, by outcome",
            ["route", "outcome"],
            registry=r,
        )
        self.judge_duration = Histogram(
            "canarygate_judge_duration_seconds",
            "Judge calls that reached the judge, by outcome",
            ["route", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.judge_tokens = Counter(
            "canarygate_judge_tokens",
            "Tokens the judge reported, by outcome",
            ["route", "type", "outcome"],
            registry=r,
        )
        self.judge_cost = Counter(
            "canarygate_judge_cost",
            "What judge calls cost by evaluation.judge.price, by outcome",
            ["route", "outcome"],
            registry=r,
        )
        self.judge_circuit = Gauge(
            "canarygate_judge_circuit_open",
            "1 while the route's judge circuit is open or half-open",
            ["route"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.judge_queue = Gauge(
            "canarygate_judge_pending",
            "Judgings running or waiting for the route's judge",
            ["route"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.policy_reloads = Counter(
            "canarygate_policy_reloads", "Policy reloads, by result", ["result"], registry=r
        )
        per_trace = ["route", "arm", "cohort"]
        self.traces = Counter(
            "canarygate_traces",
            "Finished traces (assignment.trace_keys), by result: failed when any step fell back, failed "
            "validation, failed, or failed an evaluator; arm mixed: steps served by both arms",
            [*per_trace, "result"],
            registry=r,
        )
        self.trace_steps = Histogram(
            "canarygate_trace_steps",
            "Model calls per finished trace",
            per_trace,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.trace_tokens = Histogram(
            "canarygate_trace_tokens",
            "Tokens per finished trace, input and output",
            [*per_trace, "type"],
            buckets=TRACE_TOKEN_BUCKETS,
            registry=r,
        )
        self.trace_cost = Histogram(
            "canarygate_trace_cost",
            "Cost per finished trace, by the arms' prices (arms.*.price)",
            per_trace,
            buckets=TRACE_COST_BUCKETS,
            registry=r,
        )
        self.trace_step_failures = Counter(
            "canarygate_trace_step_failures",
            "Steps that failed (fallback, validation, error), by their index in the trace (1..10, then 10+)",
            ["route", "arm", "step"],
            registry=r,
        )
        self.traces_ended = Counter(
            "canarygate_traces_ended",
            "Traces ended, by why: idle (no step for traces.idle_timeout_s) or evicted (beyond "
            "CANARYGATE_MAX_OPEN_TRACES open traces, the least recently active)",
            ["reason"],
            registry=r,
        )
        self.traces_open = Gauge(
            "canarygate_traces_open",
            "Traces open (in the state store: every replica's)",
            multiprocess_mode="livemax",
            registry=r,
        )
        self._routes: dict[str, tuple[Route, RouteMetrics]] = {}
        self._scores: dict[tuple[str, ...], Any] = {}  # canarygate_eval_score's children, bound once
        for result in ("ok", "rejected"):
            self.policy_reloads.labels(result)
        for reason in ("idle", "evicted"):
            self.traces_ended.labels(reason)

    def route(self, route: Route) -> RouteMetrics:
        """Pre-bound children for a route (identity-cached: routes are immutable, reloads make new ones)."""
        current = self._routes.get(route.name)
        if current is not None and current[0] is route:
            return current[1]
        bound = RouteMetrics(self, route) if self.enabled else NULL_ROUTE
        self._routes[route.name] = (route, bound)
        return bound

    def prepare(self, routes: Iterable[Route]) -> None:
        """Pre-initialise every known label set, and set the per-route gauges."""
        for route in routes:
            self.route(route)

    def rollout(self, state: RouteState, transition: bool = False) -> None:
        """A route's rollout state as this replica serves it."""
        if not self.enabled:
            return
        self.rollout_weight.labels(state.route).set(state.weight)
        self.rollout_step.labels(state.route).set(state.step)
        for phase in PHASES:
            self.rollout_phase.labels(state.route, phase).set(1 if phase == state.phase else 0)
            self.rollout_transitions.labels(state.route, phase)
        if transition:
            self.rollout_transitions.labels(state.route, state.phase).inc()

    def preflight(self, route: str, verdict: str | None) -> None:
        """The pre-flight this replica runs for a route: running, its verdict, or None (it stopped)."""
        if self.enabled:
            for shown in PREFLIGHT_VERDICTS:
                self.preflight_verdict.labels(route, shown).set(1 if shown == verdict else 0)

    def skew(self, route: str, skewed: bool) -> None:
        if self.enabled:
            self.policy_skew.labels(route).set(1 if skewed else 0)

    def gates(self, analysis: Analysis) -> None:
        """The controller's latest judgement of a route (set by the replica that holds the lease)."""
        if not self.enabled:
            return
        mismatch: dict[str, bool] = {}  # cohort -> either sample-ratio check failed
        for verdict in analysis.verdicts:
            if verdict.gate in SAMPLE_RATIOS:
                failed = mismatch.get(verdict.cohort, False) or verdict.result == "fail"
                mismatch[verdict.cohort] = failed
                self.sample_ratio_mismatch.labels(analysis.route, verdict.cohort).set(1 if failed else 0)
                if verdict.gate == SAMPLE_RATIO:
                    self.sample_ratio(analysis.route, verdict)
                continue
            if verdict.cohort != "all":
                continue  # per-cohort verdicts: in compare and the analysis endpoint
            if verdict.value is not None:
                self.gate_value.labels(analysis.route, verdict.gate).set(verdict.value)
            self.gate_threshold.labels(analysis.route, verdict.gate).set(verdict.threshold)

    def sample_ratio(self, route: str, verdict: Verdict) -> None:
        n = verdict.n_base + verdict.n_candidate
        if verdict.value is not None and n:
            observed = verdict.n_candidate / n
            self.candidate_share.labels(route, verdict.cohort, "observed").set(observed)
            self.candidate_share.labels(route, verdict.cohort, "expected").set(observed - verdict.value)

    def feedback(self, route: str, arm: str, cohort: str, negative: bool, escalated: bool) -> None:
        if not self.enabled:
            return
        self.feedback_total.labels(route, arm, cohort, "negative" if negative else "positive").inc()
        if escalated:
            self.feedback_total.labels(route, arm, cohort, "escalated").inc()

    def evaluated(self, route: str, arm: str, mode: str, cohort: str, evaluator: str, score: float) -> None:
        if not self.enabled:
            return
        key = (route, arm, mode, evaluator, cohort)
        child = self._scores.get(key)  # labels() takes a lock and builds a key: once per label set
        if child is None:
            child = self._scores[key] = self.eval_score.labels(*key)
        child.observe(score)

    def verdict(self, route: str, evaluator: str, verdict: str, kind: str) -> None:
        if self.enabled:
            self.eval_verdicts.labels(route, evaluator, verdict, kind).inc()

    def skipped(self, route: str, evaluator: str, reason: str) -> None:
        if self.enabled:
            self.evaluations_skipped.labels(route, evaluator, reason).inc()

    def judge_call(self, route: str, outcome: str, spent: Any | None) -> None:
        """One judge call; spent: its duration, tokens and cost, when it reached the judge."""
        if not self.enabled:
            return
        self.judge_calls.labels(route, outcome).inc()
        if spent is not None:
            self.judge_duration.labels(route, outcome).observe(spent.duration_s)
            self.judge_tokens.labels(route, "input", outcome).inc(spent.input_tokens)
            self.judge_tokens.labels(route, "output", outcome).inc(spent.output_tokens)
            self.judge_cost.labels(route, outcome).inc(spent.cost)

    def judge_state(self, route: str, circuit_open: bool, pending: int) -> None:
        if self.enabled:
            self.judge_circuit.labels(route).set(1 if circuit_open else 0)
            self.judge_queue.labels(route).set(pending)

    def trace(self, route: str, arm: str, cohort: str, finished: Any) -> None:
        """A finished trace (store.traces.Finished)."""
        if not self.enabled:
            return
        self.traces.labels(route, arm, cohort, "failed" if finished.failed else "ok").inc()
        self.trace_steps.labels(route, arm, cohort).observe(finished["steps"])
        self.trace_tokens.labels(route, arm, cohort, "input").observe(finished["input_tokens"])
        self.trace_tokens.labels(route, arm, cohort, "output").observe(finished["output_tokens"])
        if finished["cost"]:
            self.trace_cost.labels(route, arm, cohort).observe(finished["cost"])
        self.traces_ended.labels(finished.ended).inc()

    def step_failed(self, route: str, arm: str, step: int) -> None:
        if self.enabled:
            self.trace_step_failures.labels(route, arm, str(step) if step <= 10 else "10+").inc()

    def rejected(self, route: str, api: str) -> None:
        if self.enabled:
            self.requests.labels(route, "none", "primary", "rejected", "all", api).inc()

    def exposition(self) -> tuple[bytes, str]:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    @staticmethod
    def worker_exited(pid: int) -> None:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class ArmMetrics:
    """One route's children for one arm and mode."""

    __slots__ = (
        "cost",
        "duration",
        "inflight",
        "outcomes",
        "tokens_in",
        "tokens_out",
        "ttft",
        "usage_missing",
        "validation",
    )

    def __init__(self, m: Metrics, route: str, arm: str, mode: str, cohort: str, api: str = "chat") -> None:
        self.outcomes = {o: m.requests.labels(route, arm, mode, o, cohort, api) for o in OUTCOMES}
        self.duration = m.duration.labels(route, arm, mode, cohort)
        self.ttft = m.ttft.labels(route, arm, mode)
        self.tokens_in = m.tokens.labels(route, arm, mode, "input")
        self.tokens_out = m.tokens.labels(route, arm, mode, "output")
        self.cost = m.cost.labels(route, arm, mode)
        self.usage_missing = m.usage_missing.labels(route, arm, mode)
        self.validation = {k: m.validation_failures.labels(route, arm, mode, k, cohort, api) for k in KINDS}
        self.inflight = m.inflight.labels(route, arm)


class RouteMetrics:
    __slots__ = (
        "agreement",
        "arms",
        "circuit",
        "fallbacks",
        "latency_ratio",
        "mirror",
        "noise",
        "overhead",
        "tokens_ratio",
    )

    def __init__(self, m: Metrics, route: Route) -> None:
        name = route.name
        cohorts = route.cohorts.names if route.cohorts is not None else ("all",)
        # Every API the route serves (all its arms' apis): its series exist from the start, at zero.
        apis = sorted(frozenset.intersection(*(arm.apis for arm in route.arms())))
        self.arms = {
            (arm, mode, cohort, api): ArmMetrics(m, name, arm, mode, cohort, api)
            for arm in ARMS
            for mode in MODES
            for cohort in cohorts
            for api in apis
        }
        self.fallbacks = {
            (reason, cohort): m.fallbacks.labels(name, reason, cohort)
            for reason in FALLBACK_REASONS
            for cohort in cohorts
        }
        self.overhead = m.overhead.labels(name)
        for arm in ARMS:
            for cohort in cohorts:
                for value in ("positive", "negative", "escalated"):
                    m.feedback_total.labels(name, arm, cohort, value)
                if route.trace_sources:
                    for result in ("ok", "failed"):
                        m.traces.labels(name, arm, cohort, result)
                    m.trace_steps.labels(name, arm, cohort)
                    m.trace_cost.labels(name, arm, cohort)
                    for kind in ("input", "output"):
                        m.trace_tokens.labels(name, arm, cohort, kind)
        self.circuit = m.circuit_open.labels(name, "candidate")
        m.circuit_open.labels(name, "base").set(0)
        for api in apis:
            m.requests.labels(name, "none", "primary", "rejected", "all", api)
        self.mirror = {outcome: m.mirror.labels(name, outcome) for outcome in MIRROR_OUTCOMES}
        self.agreement = {
            (check, result): m.mirror_agreement.labels(name, check, result)
            for check in MIRROR_CHECKS
            for result in ("agree", "disagree")
        }
        self.noise = {
            (check, result): m.noise_agreement.labels(name, check, result)
            for check in MIRROR_CHECKS
            for result in ("agree", "disagree")
        }
        self.latency_ratio = m.mirror_latency_ratio.labels(name)
        self.tokens_ratio = m.mirror_tokens_ratio.labels(name)
        evaluation = route.policy.evaluation
        for evaluator in evaluation.evaluators:
            if evaluator.kind == "pairwise":
                for verdict in VERDICTS:
                    for kind in ("candidate", "noise"):
                        m.eval_verdicts.labels(name, evaluator.name, verdict, kind)
        if evaluation.judge is not None:
            for outcome in JUDGE_OUTCOMES:
                m.judge_calls.labels(name, outcome)
            m.judge_circuit.labels(name).set(0)

    def arm(self, arm: str, mode: str = "primary", cohort: str = "all", api: str = "chat") -> ArmMetrics:
        return self.arms[(arm, mode, cohort, api)]


class _Null:
    """A child that records nothing: metrics switched off (CANARYGATE_METRICS=false)."""

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


class _NullArm:
    def __init__(self) -> None:
        null: Any = _Null()
        self.outcomes = {o: null for o in OUTCOMES}
        self.validation = {k: null for k in KINDS}
        self.duration = self.ttft = self.tokens_in = self.tokens_out = self.usage_missing = null
        self.inflight = self.cost = null


class _NullRoute:
    def __init__(self) -> None:
        null: Any = _Null()
        self.arms: dict[tuple[str, str], Any] = {(arm, mode): _NullArm() for arm in ARMS for mode in MODES}
        self.fallbacks: Any = _AnyKey(null)
        self.mirror = {outcome: null for outcome in MIRROR_OUTCOMES}
        self.agreement = {(c, r): null for c in MIRROR_CHECKS for r in ("agree", "disagree")}
        self.noise = dict(self.agreement)
        self.overhead = self.circuit = self.latency_ratio = self.tokens_ratio = null

    def arm(self, arm: str, mode: str = "primary", cohort: str = "all", api: str = "chat") -> Any:
        return self.arms[(arm, mode)]


class _AnyKey(dict[Any, Any]):
    """Every key holds the same null child."""

    def __init__(self, null: Any) -> None:
        super().__init__()
        self._null = null

    def __missing__(self, key: Any) -> Any:
        return self._null


NULL_ROUTE: Any = _NullRoute()
