"""canarygate plan: how long a route's automatic rollout will take, and what it will catch, before it
starts. The rollout is walked as the controller walks it (controller_step, judge, decide: the same code)
on the traffic a user describes, each interval's statistics being their expected values rather than a
random draw: the typical course of a rollout, about its median. bench/decisions.py measures the spread
around it by simulation.

For an identical candidate: how many intervals until promotion (the last step needs every gate's whole
interval within its threshold, which is what takes time), and which gate holds it longest. For a
candidate worse on one gate by a given amount: whether it is rolled back, held or promoted, after how
many intervals and candidate requests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from gateway.analysis import BUCKETS, ArmWindow, Verdict, bucket_bound, decide, judge
from gateway.policy import LIVE_ONLY_GATES, QUALITY_GATES, Gates, Rollout
from gateway.rollout import controller_step
from gateway.store.rollouts import RouteState

Outcome = Literal["promoted", "rolled_back", "held"]
MAX_INTERVALS = 2000


@dataclass(frozen=True)
class Traffic:
    """What the route's traffic looks like on the base (the candidate the same, unless worse)."""

    requests_per_interval: float
    error_rate: float = 0.005
    validation_failure_rate: float = 0.01
    latency_p50_s: float = 0.8
    latency_sigma: float = 0.5  # log-normal spread of latency and TTFT
    ttft_p50_s: float = 0.2
    output_tokens: float = 200.0  # mean per answer, and its coefficient of variation
    tokens_cv: float = 0.6
    cost_per_request: float = 0.001
    feedback_share: float = 0.05  # answers that get feedback
    negative_feedback_rate: float = 0.1
    escalation_rate: float = 0.02
    fallback_rate: float = 0.0  # the candidate's own
    steps_per_trace: float = 4.0  # model calls per trace (an agent run), when the route has traces
    steps_cv: float = 0.5  # their coefficient of variation
    trace_failure_rate: float = 0.02  # traces with a failed step
    mirror_percent: float = 0.0  # shadow calls per base request in a mirror-only phase (percent)


@dataclass(frozen=True)
class Course:
    outcome: Outcome
    intervals: int
    candidate_requests: int
    reason: str
    holding: dict[str, int] = field(default_factory=dict)  # gate -> intervals it held the rollout


def regression_of(gates: Gates, gate: str) -> float:
    """A default regression to plan for: twice the allowed margin (rates: 2 x max_increase; ratios:
    1 + 2 x (max - 1); the fallback ceiling: 2 x max)."""
    configured = getattr(gates, gate)
    if configured is None:
        raise ValueError(f"gate {gate} is not configured on this route")
    if hasattr(configured, "max_increase"):
        return 2 * float(configured.max_increase)
    if gate == "fallback_rate":
        return 2 * float(configured.max)
    return 1 + 2 * (float(configured.max) - 1)


def walk(rollout: Rollout, traffic: Traffic, worse: Mapping[str, float] | None = None) -> Course:
    """The rollout's expected course. worse: gate -> how much worse the candidate is (rates: points
    added, as a fraction; ratios: the factor; fallback_rate: its rate)."""
    worse = dict(worse or {})
    steps = list(rollout.steps or [])
    # The quality gates' results come from a judge: nothing here can predict them, so they are left out.
    gates = rollout.gates.model_copy(update={key: {} for key in QUALITY_GATES})
    if not steps:
        raise ValueError("plan needs an automatic rollout (rollout.steps)")
    shadow = rollout.shadow_first
    state = RouteState("plan", "plan", "shadow" if shadow else "progressing", 0.0 if shadow else steps[0],
                       True, -1 if shadow else 0, None, 1, 0.0)  # fmt: skip
    strata: list[tuple[ArmWindow, ArmWindow]] = []
    seen = 0.0
    stratum: tuple[str, int] | None = None
    holding: dict[str, int] = {}
    for t in range(1, MAX_INTERVALS + 1):
        n = traffic.requests_per_interval
        if state.phase == "shadow":  # the candidate's shadow calls against every base request
            n_base, n_candidate = n, n * traffic.mirror_percent / 100
        else:
            n_candidate = n * state.weight / 100
            n_base = n - n_candidate
        seen += n_candidate
        base, candidate = _expected(traffic, n_base, {}), _expected(traffic, n_candidate, worse)
        if strata and stratum == (state.phase, state.step):
            # Intervals of one step are alike (expected values): merged, they compare exactly as they
            # would one by one (the same shares per interval), and a long plan costs no more per interval.
            strata[-1][0].merge(base)
            strata[-1][1].merge(candidate)
        else:
            strata.append((base, candidate))
            stratum = (state.phase, state.step)
        judged = gates  # a mirror-only phase is judged without what only users' traffic measures
        if state.phase == "shadow":
            judged = gates.model_copy(update=dict.fromkeys(LIVE_ONLY_GATES))
        verdicts = judge(judged, strata, confidence=rollout.confidence, min_samples=rollout.min_samples)
        promotes = state.phase == "progressing" and controller_step(state, steps)[1]["phase"] == "promoted"
        decision = decide(verdicts, rollout.on_fail, rollout.on_no_data, final=promotes)
        if decision == "rollback":
            failed = [v for v in verdicts if v.result == "fail"]
            return Course("rolled_back", t, round(seen), _named(failed), holding)
        if decision == "advance":
            reason, changes = controller_step(state, steps)  # from the mirror-only phase (step -1): step 0
            state = replace(state, **changes)
            if state.phase == "promoted":
                return Course("promoted", t, round(seen), reason, holding)
            continue
        for verdict in verdicts:
            if verdict.result != "pass" or (
                promotes and verdict.high is not None and verdict.high > verdict.threshold
            ):
                holding[verdict.gate] = holding.get(verdict.gate, 0) + 1
    return Course("held", MAX_INTERVALS, round(seen), f"still held after {MAX_INTERVALS} intervals", holding)


def _named(verdicts: list[Verdict]) -> str:
    return "; ".join(f"{v.gate}: {v.reason}" for v in verdicts)


def _expected(traffic: Traffic, n: float, worse: Mapping[str, float]) -> ArmWindow:
    """An arm's interval at its expected values (counts rounded; histograms of the log-normal)."""
    requests = round(n)
    if requests == 0:
        return ArmWindow()
    error = min(1.0, traffic.error_rate + worse.get("error_rate", 0.0))
    invalid = min(1.0, traffic.validation_failure_rate + worse.get("validation_failure_rate", 0.0))
    feedback = round(requests * traffic.feedback_share)
    negative = min(1.0, traffic.negative_feedback_rate + worse.get("negative_feedback_rate", 0.0))
    escalated = min(1.0, traffic.escalation_rate + worse.get("escalation_rate", 0.0))
    tokens = traffic.output_tokens * worse.get("output_tokens_ratio", 1.0)
    cost = traffic.cost_per_request * worse.get("cost_per_request_ratio", 1.0)
    window = ArmWindow(
        requests=requests,
        errors=round(requests * error),
        invalid=round(requests * invalid),
        fallbacks=round(requests * worse.get("fallback_rate", traffic.fallback_rate)),
        tokens=round(requests * tokens),
        tokens_sq=requests * tokens * tokens * (1 + traffic.tokens_cv**2),
        token_answers=requests,
        cost=requests * cost,
        cost_sq=requests * cost * cost * (1 + traffic.tokens_cv**2),
        feedback=feedback,
        negative=round(feedback * negative),
        escalated=round(feedback * escalated),
    )
    # Traces end with their last step: as many per interval as start, at the expected steps each.
    traces = round(requests / traffic.steps_per_trace)
    if traces:
        steps = traffic.steps_per_trace * worse.get("steps_per_trace_ratio", 1.0)
        per_trace = cost * traffic.steps_per_trace * worse.get("cost_per_trace_ratio", 1.0)
        spread = 1 + traffic.steps_cv**2
        failed = min(1.0, traffic.trace_failure_rate + worse.get("trace_failure_rate", 0.0))
        window.traces = traces
        window.trace_failures = round(traces * failed)
        window.trace_steps = round(traces * steps)
        window.trace_steps_sq = traces * steps * steps * spread
        window.trace_cost = traces * per_trace
        window.trace_cost_sq = traces * per_trace * per_trace * spread
    # The p99 ratio scales the whole distribution: a factor on every latency.
    window.latency = _histogram(
        requests, traffic.latency_p50_s * worse.get("latency_p99_ratio", 1.0), traffic.latency_sigma
    )
    window.ttft = _histogram(
        requests, traffic.ttft_p50_s * worse.get("ttft_p50_ratio", 1.0), traffic.latency_sigma
    )
    return window


def _histogram(n: int, median_s: float, sigma: float) -> dict[int, int]:
    """n log-normal samples at their expected bucket counts (rounded, the total kept)."""
    out: dict[int, int] = {}
    placed = 0
    for index in range(BUCKETS):
        upper = _cdf(bucket_bound(index), median_s, sigma) if index < BUCKETS - 1 else 1.0
        count = round(n * upper) - placed
        if count > 0:
            out[index] = count
            placed += count
    return out


def _cdf(x: float, median: float, sigma: float) -> float:
    return 0.5 * (1 + math.erf(math.log(x / median) / (sigma * math.sqrt(2))))
