"""Canary analysis: the candidate against the base over the same window, gate by gate, with statistics
that stay valid when they are looked at every interval.

A plain test repeated at every look rolls back identical candidates far more often than its level
says. Every interval here comes from a confidence sequence instead: the normal-mixture boundary of
Howard, Ramdas, McAuliffe and Sekhon (2021, "Time-uniform, nonparametric, nonasymptotic confidence
sequences", eq. 14 in the asymptotic form of Waudby-Smith et al. 2023), which holds at every sample size
at once. The level is split evenly across the gates (Bonferroni), so a whole rollout of an identical
candidate fails any gate with probability at most 1 - confidence.

Rates (errors, validation failures, fallbacks): the difference candidate - base with its standard error;
fail when the whole interval lies above the allowed increase. Quantiles (p99 latency, p50 TTFT): from
mergeable log-bucket histograms, each side's interval from the binomial ranks around n*q; the ratio's
interval from the two sides' ends. Means (output tokens): the ratio with a delta-method interval.

Concurrent comparisons: the arms are compared only over the same time. Statistics are kept per
interval, and every gate combines per-interval comparisons (strata), so that what changes for both arms
at once (traffic drifting, another load on the machine) cancels: rates by Mantel-Haenszel-weighted
differences, quantiles and means against the base reweighted to the candidate's intervals (each
interval's base samples weighted by how many candidate samples it has per base sample), with the
effective sample size that weighting leaves (Kish). An interval where either arm has no sample says
nothing and is left out; so is a step at 100%, which is why reaching it is the promotion itself.

Sticky units: a user (or tenant) assigned by key stays on its arm, and the requests of one unit are
alike (a tenant whose prompts are hard fails validation more often, whichever arm serves it); counted as
independent requests, the arms then differ by which units each got, far more than the requests'
variance says. Every arm also keeps its statistics per unit group, per step (UNIT_GROUPS groups, by a
hash of the unit key that is independent of the assignment, so each holds units of both arms; each
request also adds its unit's sign, +1 or -1 by hash, a sketch of the units' sizes): the between-group
variation, less the requests' own, says how much units differ, and each gate's variance is multiplied
by its design effect (see design_effects; at least 1). For quantiles the design effect is that of the
mean of the log latency, an approximation (what makes one tenant slow shifts its whole distribution).
With few units (five tenants at 1%), a mean of them is far from normal: each multiplier is then read as
the same tail of a Student t with as many degrees of freedom as units (few_units).

A gate passes when it has min_samples per arm and its estimate is within the threshold; it fails when
its interval lies wholly beyond the threshold; otherwise it waits (not enough data, or not clear yet).

Sample ratio: every counted primary request also adds the probability it had of being the candidate's
(the weight; 0 in a cohort the rollout leaves out; 1 or 0 when forced by the override header). The
candidate's count against that sum over the current step, with the units' sizes in its variance and
a confidence sequence, says whether the arms' observed shares still match the weight: a mismatch (a
broken sticky key, a cohort filter, clients that leave one arm before an answer is counted) makes
every comparison suspect, so the rollout holds and says which cohort and which shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from gateway.policy import Gates, LossGate, ScoreGate

Result = Literal["pass", "fail", "wait"]

# Latency histograms: log buckets 5% wide from 1 ms to ~10 min; bucket i holds (B*(1.05^(i-1)), B*1.05^i].
BUCKET_BASE_S = 0.001
BUCKET_FACTOR = 1.05
BUCKETS = 275
_LOG_FACTOR = math.log(BUCKET_FACTOR)
FEW_UNITS = 1000  # from about this many units on, a mean of them is as good as normal
UNIT_GROUPS = 64  # unit groups per arm: where how much units differ, and how large they are, is read
SAMPLE_RATIO = "sample_ratio"  # the verdict of the sample-ratio check: it holds a rollout, never ends it
SAMPLE_RATIO_UNITS = "sample_ratio_units"  # the same over the distinct units seen in the step
SAMPLE_RATIOS = frozenset({SAMPLE_RATIO, SAMPLE_RATIO_UNITS})
HLL_ERROR = 0.0081  # relative standard error of Redis's HyperLogLog count (12 KB, 16,384 registers)


def bucket_of(seconds: float) -> int:
    if seconds <= BUCKET_BASE_S:
        return 0
    return min(BUCKETS - 1, math.ceil(math.log(seconds / BUCKET_BASE_S) / _LOG_FACTOR - 1e-9))


def bucket_bound(index: int) -> float:
    """The upper bound of a bucket, in seconds."""
    return BUCKET_BASE_S * BUCKET_FACTOR**index


@dataclass
class ArmWindow:
    """One arm's statistics over a window: counts, sums and histograms, mergeable across replicas."""

    requests: int = 0  # units served (for the candidate: assigned to it, its circuit open or not)
    unattempted: int = 0  # of which answered by the base without asking the candidate (circuit open)
    errors: int = 0
    invalid: int = 0  # answers that failed validation
    fallbacks: int = 0
    tokens: int = 0
    tokens_sq: float = 0.0
    token_answers: int = 0  # answers that reported usage
    cost: float = 0.0
    cost_sq: float = 0.0
    feedback: int = 0  # feedback received for this arm's answers (in the interval it arrived)
    negative: int = 0  # of which thumbs down, or a score under 0.5
    escalated: int = 0
    latency: dict[int, int] = field(default_factory=dict)  # bucket -> count
    ttft: dict[int, int] = field(default_factory=dict)
    # For the design effects and the sample-ratio check (see the module's note):
    expected: float = 0.0  # primary requests: the sum of each one's probability of being the candidate's
    expected_sq: float = 0.0  # the sum of its squares (the independent-requests variance of the count)
    signed: int = 0  # requests, each +1 or -1 by its unit's hash: a sketch of the units' sizes
    timed: int = 0  # answers with a latency, and the sums of its log (seconds) and squares
    log_latency: float = 0.0
    log_latency_sq: float = 0.0
    ttfts: int = 0
    log_ttft: float = 0.0
    log_ttft_sq: float = 0.0
    # Finished traces (counted in the interval they end): how many, how many failed, and the sums (and
    # squares) of their steps and cost.
    traces: int = 0
    trace_failures: int = 0
    trace_steps: int = 0
    trace_steps_sq: float = 0.0
    trace_cost: float = 0.0
    trace_cost_sq: float = 0.0
    # Evaluations, per evaluator: [results, sum, sum of squares, order flips]. A score in [0, 1]; a judged
    # pair's value is +1 for a candidate loss, -1 for a win, 0 for a tie (flips: ties the order decided).
    scores: dict[str, list[float]] = field(default_factory=dict)

    def score(self, evaluator: str, value: float, flip: bool = False) -> None:
        kept = self.scores.get(evaluator)
        if kept is None:
            kept = self.scores[evaluator] = [0.0, 0.0, 0.0, 0.0]
        kept[0] += 1
        kept[1] += value
        kept[2] += value * value
        kept[3] += flip

    def attempt(
        self,
        error: bool,
        invalid: bool,
        output_tokens: int | None,
        cost: float | None,
        log_latency: float,
        log_ttft: float | None = None,
        share: float | None = None,
        sign: int = 1,
    ) -> None:
        """One attempt's counts and sums (the histograms are the caller's: they are kept per interval)."""
        self.requests += 1
        self.errors += error
        self.invalid += invalid
        if output_tokens is not None:
            self.tokens += output_tokens
            self.tokens_sq += output_tokens * output_tokens
            self.token_answers += 1
        if cost is not None:
            self.cost += cost
            self.cost_sq += cost * cost
        if share is not None:
            self.expected += share
            self.expected_sq += share * share
        self.signed += sign
        self.timed += 1
        self.log_latency += log_latency
        self.log_latency_sq += log_latency * log_latency
        if log_ttft is not None:
            self.ttfts += 1
            self.log_ttft += log_ttft
            self.log_ttft_sq += log_ttft * log_ttft

    def trace(self, steps: int, cost: float, failed: bool) -> None:
        """One finished trace."""
        self.traces += 1
        self.trace_failures += failed
        self.trace_steps += steps
        self.trace_steps_sq += steps * steps
        self.trace_cost += cost
        self.trace_cost_sq += cost * cost

    def scored(self, evaluator: str) -> tuple[float, float, float]:
        """(sum, sum of squares, results) of an evaluator's values."""
        kept = self.scores.get(evaluator)
        return (kept[1], kept[2], kept[0]) if kept is not None else (0.0, 0.0, 0.0)

    @property
    def attempts(self) -> int:
        """Requests the arm was asked: what its error and validation rates are over (a unit answered by
        the base while the circuit was open says nothing about the candidate, and must not dilute them)."""
        return self.requests - self.unattempted

    def merge(self, other: ArmWindow) -> None:
        self.requests += other.requests
        self.unattempted += other.unattempted
        self.errors += other.errors
        self.invalid += other.invalid
        self.fallbacks += other.fallbacks
        self.tokens += other.tokens
        self.tokens_sq += other.tokens_sq
        self.token_answers += other.token_answers
        self.cost += other.cost
        self.feedback += other.feedback
        self.negative += other.negative
        self.escalated += other.escalated
        self.cost_sq += other.cost_sq
        self.expected += other.expected
        self.expected_sq += other.expected_sq
        self.signed += other.signed
        self.timed += other.timed
        self.log_latency += other.log_latency
        self.log_latency_sq += other.log_latency_sq
        self.ttfts += other.ttfts
        self.log_ttft += other.log_ttft
        self.log_ttft_sq += other.log_ttft_sq
        self.traces += other.traces
        self.trace_failures += other.trace_failures
        self.trace_steps += other.trace_steps
        self.trace_steps_sq += other.trace_steps_sq
        self.trace_cost += other.trace_cost
        self.trace_cost_sq += other.trace_cost_sq
        for mine, theirs in ((self.latency, other.latency), (self.ttft, other.ttft)):
            for bucket, count in theirs.items():
                mine[bucket] = mine.get(bucket, 0) + count
        for evaluator, values in other.scores.items():
            kept = self.scores.setdefault(evaluator, [0.0, 0.0, 0.0, 0.0])
            for i, value in enumerate(values):
                kept[i] += value


Strata = Sequence[tuple[ArmWindow, ArmWindow]]  # (base, candidate) per interval
Groups = tuple[Sequence[ArmWindow], Sequence[ArmWindow]]  # (base, candidate) windows per unit group
# What each kind of gate reads of an arm's window: rates (events, out of), quantiles (q, histogram),
# means per answer (sum, sum of squares; over token_answers). fallback_rate is the candidate's own.
RATES = {
    "error_rate": ("errors", "attempts"),
    "validation_failure_rate": ("invalid", "attempts"),
    "negative_feedback_rate": ("negative", "feedback"),
    "escalation_rate": ("escalated", "feedback"),
    "trace_failure_rate": ("trace_failures", "traces"),
}
QUANTILES = {"latency_p99_ratio": (0.99, "latency"), "ttft_p50_ratio": (0.5, "ttft")}
# Means: (sum, sum of squares, over how many, what is counted), per answer or per finished trace.
MEANS = {
    "output_tokens_ratio": ("tokens", "tokens_sq", "token_answers", "tokens"),
    "cost_per_request_ratio": ("cost", "cost_sq", "token_answers", "cost"),
    "cost_per_trace_ratio": ("trace_cost", "trace_cost_sq", "traces", "cost"),
    "steps_per_trace_ratio": ("trace_steps", "trace_steps_sq", "traces", "steps"),
}
# What a quantile gate's design effect is measured on: the log of the same timing (sum, squares, count).
LOG_TIMINGS = {
    "latency": ("log_latency", "log_latency_sq", "timed"),
    "ttft": ("log_ttft", "log_ttft_sq", "ttfts"),
}
NOTHING_SHARED = "no interval with samples of both arms yet"


@dataclass(frozen=True)
class Verdict:
    gate: str
    result: Result
    value: float | None  # the estimate: a difference (rates) or a ratio (quantiles, means)
    low: float | None  # the interval around it
    high: float | None
    threshold: float
    n_base: int
    n_candidate: int
    critical: bool
    reason: str
    cohort: str = "all"  # a segment's verdict names its cohort
    needs: str | None = None  # while it waits: what is still needed to decide


def needs(verdict: Verdict, min_samples: int) -> str | None:
    """What a waiting verdict still needs to decide, in words."""
    if verdict.result != "wait":
        return None
    if verdict.value is None:
        return "samples of both arms in the same interval"
    short = [
        f"{arm} {n}/{min_samples}"
        for arm, n in (("base", verdict.n_base), ("candidate", verdict.n_candidate))
        if n < min_samples
    ]
    if short:
        return f"min_samples per arm: {', '.join(short)}"
    return "more samples: the estimate is over the threshold, and its interval still reaches below it"


def boundary(n: float, alpha: float, n_star: float) -> float:
    """z multiplier of a two-sided (1 - alpha) confidence sequence after n samples, tightest near n_star.
    Wider than the fixed-sample z (1.96 at alpha 0.05) by what validity at every n at once costs."""
    if n <= 0:
        return math.inf
    log_a = math.log(alpha)
    rho2 = (-2 * log_a + math.log(-2 * log_a + 1)) / n_star
    nr = n * rho2
    return math.sqrt(2 * (nr + 1) / nr * math.log(math.sqrt(nr + 1) / alpha))


def _rate(events: int, n: int) -> float:
    return events / n if n else 0.0


def _se_rate(events: int, n: int) -> float:
    # (x + 1/2) / (n + 1): a zero count must not read as zero uncertainty.
    p = (events + 0.5) / (n + 1)
    return math.sqrt(p * (1 - p) / max(n, 1))


def design_effects(arms: Sequence[Sequence[tuple[float, float, float, float]]]) -> list[float]:
    """How much wider than independent samples' the variance of each arm's mean (or rate) is when
    samples come in units. Per arm, per unit group: (sum, sum of squares, count, the count signed by
    unit; for a rate the sum of squares is the sum).

    A random-effects model: each unit has its own mean (variance tau2 between units), each sample its
    own noise. Within an arm, the groups' squared residuals sum to tau2 * (F2 - n) + s2 * n, where s2 is
    the samples' variance and F2 the sum of the units' squared sample counts (estimated by the signed
    counts, see sample_ratio); tau2 is estimated from both arms at once (the base, with many units,
    tells how much units differ when the candidate has only a few), and each arm's design effect is
    1 + tau2 * (F2 - n) / (s2 * n), at least 1."""
    seen: list[tuple[float, float, float] | None] = []
    excess = spread = 0.0
    for groups in arms:
        used = [g for g in groups if g[2] > 0]
        n = sum(g[2] for g in used)
        if n <= 0:
            seen.append(None)
            continue
        mean = sum(g[0] for g in used) / n
        variance = sum(g[1] for g in used) / n - mean * mean
        sizes = sum(g[3] * g[3] for g in used)
        seen.append((n, variance, sizes))
        if variance > 0:
            excess += sum((g[0] - mean * g[2]) ** 2 for g in used) - variance * n
            spread += sizes - n
    between = max(0.0, excess / spread) if spread > 0 else 0.0
    return [
        1.0 if arm is None or arm[1] <= 0 else max(1.0, 1 + between * (arm[2] - arm[0]) / (arm[1] * arm[0]))
        for arm in seen
    ]


Effects = tuple[float, float, float]  # (base, candidate) design effects, and the fewer arm's effective units


def _effects(groups: Groups | None, total: str, squares: str, count: str) -> Effects:
    """The arms' design effects of the mean of a window's field total (squares: the field of its
    squares; the same as total for a rate) per count, and how many units the arm with fewer has in
    effect (n^2 / F2). A unit's count of this measure is taken as its share of the unit's requests (the
    signed requests scaled to it)."""
    if groups is None:
        return 1.0, 1.0, math.inf

    def row(w: ArmWindow) -> tuple[float, float, float, float]:
        if total.startswith("scores:"):  # an evaluator's results: (sum, squares, results)
            value, value_sq, n = w.scored(total[7:])
        else:
            value, value_sq, n = getattr(w, total), getattr(w, squares), float(getattr(w, count))
        return value, value_sq, n, w.signed * n / w.requests if w.requests else 0.0

    rows = [[row(w) for w in groups[0]], [row(w) for w in groups[1]]]
    base, candidate = design_effects(rows)
    units = math.inf
    for arm in rows:
        n, sizes = sum(r[2] for r in arm), sum(r[3] * r[3] for r in arm)
        if sizes > n > 0:
            units = min(units, n * n / sizes)
    return base, candidate, units


def few_units(z: float, units: float) -> float:
    """The multiplier z, for an estimate that rests on few units: a mean of m units of differing
    difficulty is far from normal (one hard tenant among five makes the candidate's rate), so z is read
    as the same tail of a Student t with m - 1 degrees of freedom (Cornish-Fisher, to the second order:
    close from tens of units on, short of the exact t for a handful), as cluster-robust inference with
    few clusters does. Unchanged from about a thousand units on."""
    if not math.isfinite(z) or units >= FEW_UNITS:
        return z
    nu = max(units - 1, 1.0)
    return z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu * nu)


def rate_increase(
    gate: str,
    strata: Sequence[tuple[tuple[int, int], tuple[int, int]]],
    max_increase: float,
    *,
    alpha: float,
    n_star: float,
    min_samples: int,
    critical: bool = False,
    effects: Effects = (1.0, 1.0, math.inf),
) -> Verdict:
    """candidate rate - base rate <= max_increase, over the strata where both arms have samples: each
    stratum's difference weighted by nb*nc/(nb+nc) (Mantel-Haenszel), so a rate that moves for both arms
    together cancels. strata: per interval, ((base events, requests), (candidate events, requests)).
    effects: the arms' design effects (their units' clustering)."""
    used = [((xb, nb), (xc, nc)) for (xb, nb), (xc, nc) in strata if nb > 0 and nc > 0]
    xb, nb = sum(b[0] for b, _ in used), sum(b[1] for b, _ in used)
    xc, nc = sum(c[0] for _, c in used), sum(c[1] for _, c in used)
    if not used:
        return Verdict(gate, "wait", None, None, None, max_increase, nb, nc, critical, NOTHING_SHARED)
    weights = [b[1] * c[1] / (b[1] + c[1]) for b, c in used]
    total = sum(weights)
    diff = sum(w * (c[0] / c[1] - b[0] / b[1]) for w, (b, c) in zip(weights, used, strict=True)) / total
    # Each stratum's variance from the arm's rate over all of them, smoothed: (x + 1/2) / (n + 1), so that
    # a zero count never reads as zero uncertainty.
    pb, pc = (xb + 0.5) / (nb + 1), (xc + 0.5) / (nc + 1)
    db, dc, units = effects
    variance = sum(
        w * w * (db * pb * (1 - pb) / b[1] + dc * pc * (1 - pc) / c[1])
        for w, (b, c) in zip(weights, used, strict=True)
    )
    se = math.sqrt(variance) / total
    z = few_units(boundary(min(nb / db, nc / dc), 2 * alpha, n_star), units)  # one-sided at alpha
    low, high = diff - z * se, diff + z * se
    result = _decide(low, diff, max_increase, min(nb, nc) >= min_samples)
    reason = (
        f"{_pct(_rate(xc, nc))} vs base {_pct(_rate(xc, nc) - diff)} over the same intervals, "
        f"allowed +{_pct(max_increase)}"
    )
    return Verdict(gate, result, diff, low, high, max_increase, nb, nc, critical, reason)


def rate_max(
    gate: str,
    candidate: tuple[int, int],
    maximum: float,
    n_base: int,
    *,
    alpha: float,
    n_star: float,
    min_samples: int,
    critical: bool = False,
    effect: float = 1.0,
    units: float = math.inf,
) -> Verdict:
    """The candidate's own rate <= maximum (fallbacks happen only on the candidate)."""
    xc, nc = candidate
    rate = _rate(xc, nc)
    z = few_units(boundary(nc / effect, 2 * alpha, n_star), units)
    se = _se_rate(xc, nc) * math.sqrt(effect)
    low, high = rate - z * se, rate + z * se
    result = _decide(low, rate, maximum, nc >= min_samples)
    return Verdict(
        gate, result, rate, low, high, maximum, n_base, nc, critical, f"{_pct(rate)}, at most {_pct(maximum)}"
    )


def quantile_ratio(
    gate: str,
    strata: Sequence[tuple[dict[int, int], dict[int, int]]],
    q: float,
    maximum: float,
    *,
    alpha: float,
    n_star: float,
    min_samples: int,
    critical: bool = False,
    effects: Effects = (1.0, 1.0, math.inf),
) -> Verdict:
    """candidate's q-quantile / base's <= maximum, from log-bucket histograms per interval: the base's
    histogram reweighted to the candidate's intervals (see the module's note)."""
    used = [(b, c) for b, c in strata if b and c and sum(b.values()) and sum(c.values())]
    base: dict[int, float] = {}
    candidate: dict[int, float] = {}
    nb = nc = 0
    spread = 0.0  # sum of nc_i^2 / nb_i: what the reweighting costs the base in effective samples
    for b, c in used:
        b_n, c_n = sum(b.values()), sum(c.values())
        nb, nc, spread = nb + b_n, nc + c_n, spread + c_n * c_n / b_n
        for bucket, count in b.items():
            base[bucket] = base.get(bucket, 0.0) + count * c_n / b_n
        for bucket, count in c.items():
            candidate[bucket] = candidate.get(bucket, 0.0) + count
    if not used:
        return Verdict(gate, "wait", None, None, None, maximum, nb, nc, critical, NOTHING_SHARED)
    # Each side at alpha/2: the ratio's interval then holds at alpha (one-sided: the lower end).
    db, dc, units = effects
    b_est, b_lo, b_hi = _quantile_interval(base, nc, q, alpha, n_star, nc * nc / spread / db, units)
    c_est, c_lo, c_hi = _quantile_interval(candidate, nc, q, alpha, n_star, nc / dc, units)
    ratio, low, high = c_est / b_est, c_lo / b_hi, c_hi / b_lo
    result = _decide(low, ratio, maximum, min(nb, nc) >= min_samples)
    label = f"p{round(q * 100)}"
    reason = (
        f"{label} {c_est * 1000:.0f} ms vs base {b_est * 1000:.0f} ms (x{ratio:.2f}), at most x{maximum:g}"
    )
    return Verdict(gate, result, ratio, low, high, maximum, nb, nc, critical, reason)


def mean_ratio(
    gate: str,
    strata: Sequence[tuple[tuple[float, float, int], tuple[float, float, int]]],
    maximum: float,
    *,
    alpha: float,
    n_star: float,
    min_samples: int,
    critical: bool = False,
    unit: str = "tokens",
    effects: Effects = (1.0, 1.0, math.inf),
) -> Verdict:
    """A mean per answer (output tokens, cost) or per trace (steps, cost), candidate / base <= maximum,
    by the delta method on the log ratio; the base reweighted to the candidate's intervals. strata: per
    interval, base and candidate as (sum, sum of squares, answers or traces)."""
    used = [(b, c) for b, c in strata if b[2] > 0 and c[2] > 0]
    nb, nc = sum(b[2] for b, _ in used), sum(c[2] for _, c in used)
    sc, qc = sum(c[0] for _, c in used), sum(c[1] for _, c in used)
    sb = sum(b[0] * c[2] / b[2] for b, c in used)  # the base's sums as if it had the candidate's answers
    qb = sum(b[1] * c[2] / b[2] for b, c in used)
    if not used or sb <= 0 or sc <= 0:
        return Verdict(gate, "wait", None, None, None, maximum, nb, nc, critical, f"no {unit} counted")
    db, dc, units = effects
    effective = nc * nc / sum(c[2] * c[2] / b[2] for b, c in used) / db
    mb, mc = sb / nc, sc / nc
    vb, vc = max(qb / nc - mb * mb, 0.0), max(qc / nc - mc * mc, 0.0)
    se_log = math.sqrt(vb / (effective * mb * mb) + dc * vc / (nc * mc * mc))
    z = few_units(boundary(min(nb / db, nc / dc), 2 * alpha, n_star), units)
    ratio = mc / mb
    low, high = ratio * math.exp(-z * se_log), ratio * math.exp(z * se_log)
    result = _decide(low, ratio, maximum, min(nb, nc) >= min_samples)
    shown = {"tokens": (f"{mc:.0f}", f"{mb:.0f}"), "steps": (f"{mc:.2f}", f"{mb:.2f}")}.get(
        unit, (f"{mc:.6f}", f"{mb:.6f}")
    )
    reason = f"{shown[0]} {unit} vs base {shown[1]} (x{ratio:.2f}), at most x{maximum:g}"
    return Verdict(gate, result, ratio, low, high, maximum, nb, nc, critical, reason)


def _score_variance(total: float, squares: float, n: float) -> float:
    """The variance of one result, from the sums, with a quarter of a pseudo-result's worth added: results
    that all agree must not read as certainty."""
    return max(squares - total * total / n, 0.0) / (n + 1) + 0.25 / (n + 1) if n > 0 else 0.25


def score_decrease(
    gate: str,
    strata: Sequence[tuple[tuple[float, float, float], tuple[float, float, float]]],
    max_decrease: float,
    *,
    alpha: float,
    n_star: float,
    min_samples: int,
    critical: bool = False,
    effects: Effects = (1.0, 1.0, math.inf),
) -> Verdict:
    """base mean score - candidate mean score <= max_decrease, over the strata where both arms have results,
    Mantel-Haenszel-weighted as rates are. strata: per interval, (sum, sum of squares, results) per arm."""
    used = [(b, c) for b, c in strata if b[2] > 0 and c[2] > 0]
    nb, nc = sum(b[2] for b, _ in used), sum(c[2] for _, c in used)
    if not used:
        return Verdict(
            gate, "wait", None, None, None, max_decrease, int(nb), int(nc), critical, NOTHING_SHARED
        )
    weights = [b[2] * c[2] / (b[2] + c[2]) for b, c in used]
    total = sum(weights)
    diff = sum(w * (b[0] / b[2] - c[0] / c[2]) for w, (b, c) in zip(weights, used, strict=True)) / total
    vb = _score_variance(sum(b[0] for b, _ in used), sum(b[1] for b, _ in used), nb)
    vc = _score_variance(sum(c[0] for _, c in used), sum(c[1] for _, c in used), nc)
    db, dc, units = effects
    variance = sum(w * w * (db * vb / b[2] + dc * vc / c[2]) for w, (b, c) in zip(weights, used, strict=True))
    se = math.sqrt(variance) / total
    z = few_units(boundary(min(nb / db, nc / dc), 2 * alpha, n_star), units)
    low, high = diff - z * se, diff + z * se
    result = _decide(low, diff, max_decrease, min(nb, nc) >= min_samples)
    mean_c = sum(c[0] for _, c in used) / nc
    reason = (
        f"mean score {mean_c:.3f} vs base {mean_c + diff:.3f} over the same intervals, "
        f"allowed -{max_decrease:g}"
    )
    return Verdict(gate, result, diff, low, high, max_decrease, int(nb), int(nc), critical, reason)


def loss_rate(
    gate: str,
    pairs: tuple[float, float, float],
    maximum: float,
    *,
    alpha: float,
    n_star: float,
    min_samples: int,
    critical: bool = False,
    effect: float = 1.0,
    units: float = math.inf,
) -> Verdict:
    """Judged pairs: the candidate's share of losses minus its share of wins <= maximum. Each pair is +1
    (a loss), -1 (a win) or 0 (a tie); pairs: (sum, sum of squares, pairs). A pair is already a comparison
    at one moment, so there is nothing to stratify; units still make pairs alike (the design effect)."""
    total, squares, n = pairs
    if n <= 0:
        return Verdict(gate, "wait", None, None, None, maximum, 0, 0, critical, "no judged pair yet")
    mean = total / n
    se = math.sqrt(effect * _score_variance(total, squares, n) / n)
    z = few_units(boundary(n / effect, 2 * alpha, n_star), units)
    low, high = mean - z * se, mean + z * se
    result = _decide(low, mean, maximum, n >= min_samples)
    losses, wins = (squares + total) / 2, (squares - total) / 2
    reason = (
        f"{losses:.0f} losses, {wins:.0f} wins, {n - squares:.0f} ties in {n:.0f} judged pairs "
        f"(losses - wins {_pct(mean)}), at most {_pct(maximum)}"
    )
    return Verdict(gate, result, mean, low, high, maximum, int(n), int(n), critical, reason)


def _decide(low: float, estimate: float, threshold: float, enough: bool) -> Result:
    if not enough:
        return "wait"
    if low > threshold:
        return "fail"
    return "pass" if estimate <= threshold else "wait"


def _quantile_interval(
    hist: dict[int, float],
    n: float,
    q: float,
    alpha: float,
    n_star: float,
    effective: float | None = None,
    units: float = math.inf,
) -> tuple[float, float, float]:
    """(estimate, low, high) of the q-quantile: the ranks n*q -+ z*sqrt(n*q*(1-q)) read off the buckets.
    effective: the sample size behind a reweighted histogram of total weight n (the ranks' spread is
    that of `effective` samples, scaled to n)."""
    m = n if effective is None else effective
    z = few_units(boundary(m, alpha, n_star), units)  # two-sided at alpha: alpha/2 per end
    spread = z * math.sqrt(m * q * (1 - q)) * n / m
    ordered = sorted(hist.items())
    return (
        _value_at_rank(ordered, q * n),
        _value_at_rank(ordered, q * n - spread, lower=True),
        _value_at_rank(ordered, q * n + spread),
    )


def _value_at_rank(ordered: Sequence[tuple[int, float]], rank: float, lower: bool = False) -> float:
    """The value of the sample at this rank (1-based), interpolated geometrically inside its bucket.
    Ranks beyond the data clamp to its ends (the interval is then as wide as the data allows)."""
    if rank <= 0:
        index = ordered[0][0]
        return bucket_bound(index - 1) if lower else bucket_bound(index)
    seen = 0.0
    for index, count in ordered:
        if seen + count >= rank:
            share = (rank - seen) / count
            low = bucket_bound(index - 1) if index > 0 else BUCKET_BASE_S / BUCKET_FACTOR
            return float(low * (bucket_bound(index) / low) ** share)
        seen += count
    return bucket_bound(ordered[-1][0])


def _pct(rate: float) -> str:
    return f"{rate * 100:.2f}%"


@dataclass(frozen=True)
class Paired:
    """Where the results on shadow pairs are counted: per interval (base, shadow) windows (a pair's verdict
    and the candidate's tool agreement on the shadow side, the base's agreement with itself on the noise
    floor's pairs on the base side), the same per unit group, and which evaluators are judged on pairs."""

    strata: Strata
    groups: Groups | None
    evaluators: frozenset[str]


def judge(
    gates: Gates,
    strata: Strata,
    *,
    confidence: float,
    min_samples: int,
    groups: Groups | None = None,
    paired: Paired | None = None,
) -> list[Verdict]:
    """Every configured gate over the strata (per interval: base, candidate), each at an equal share of
    the rollout's error budget (1 - confidence). groups: the arms' windows per unit group over the same
    rollout, for the design effects (None: requests are independent). paired: the shadow pairs' windows,
    for the quality gates of evaluators judged on pairs."""
    configured = gates.configured()
    alpha = (1 - confidence) / max(len(configured), 1)
    verdicts = []
    for name, typed in configured:
        gate: Any = typed  # each kind of gate reads its own fields below
        crit = gate.critical
        least = getattr(gate, "min_samples", None) or min_samples
        n_star = 10.0 * least  # the boundary is tightest around a few times the minimum sample
        kw: dict[str, Any] = {"alpha": alpha, "n_star": n_star, "min_samples": least}
        kind, _, evaluator = name.partition(":")
        on_pairs = paired is not None and evaluator in paired.evaluators
        if kind == "pairwise_loss_rate" or (kind == "eval_score_decrease" and on_pairs):
            where, unit_groups = (paired.strata, paired.groups) if paired is not None else ((), None)
        else:
            where, unit_groups = strata, groups
        if isinstance(gate, LossGate):
            scored = [c.scored(evaluator) for _, c in where]
            pairs = (sum(x[0] for x in scored), sum(x[1] for x in scored), sum(x[2] for x in scored))
            effects = _effects(unit_groups, f"scores:{evaluator}", "", "")
            verdict = loss_rate(
                name, pairs, gate.max, critical=crit, effect=effects[1], units=effects[2], **kw
            )
        elif isinstance(gate, ScoreGate):
            sums = [(b.scored(evaluator), c.scored(evaluator)) for b, c in where]
            effects = _effects(unit_groups, f"scores:{evaluator}", "", "")
            verdict = score_decrease(name, sums, gate.max_decrease, critical=crit, effects=effects, **kw)
        elif name in RATES:
            events, out_of = RATES[name]
            rates = [
                ((getattr(b, events), getattr(b, out_of)), (getattr(c, events), getattr(c, out_of)))
                for b, c in strata
            ]
            effects = _effects(groups, events, events, out_of)
            verdict = rate_increase(name, rates, gate.max_increase, critical=crit, effects=effects, **kw)
        elif name == "fallback_rate":  # the candidate's own: nothing to compare with
            fallback_effects = _effects(groups, "fallbacks", "fallbacks", "requests")
            verdict = rate_max(
                name,
                (sum(c.fallbacks for _, c in strata), sum(c.requests for _, c in strata)),
                gate.max,
                sum(b.requests for b, _ in strata),
                critical=crit,
                effect=fallback_effects[1],
                units=fallback_effects[2],
                **kw,
            )
        elif name in QUANTILES:
            q, hist = QUANTILES[name]
            hists = [(getattr(b, hist), getattr(c, hist)) for b, c in strata]
            effects = _effects(groups, *LOG_TIMINGS[hist])
            verdict = quantile_ratio(name, hists, q, gate.max, critical=crit, effects=effects, **kw)
        else:
            total, squares, count, unit = MEANS[name]
            means = [
                (
                    (getattr(b, total), getattr(b, squares), getattr(b, count)),
                    (getattr(c, total), getattr(c, squares), getattr(c, count)),
                )
                for b, c in strata
            ]
            effects = _effects(groups, total, squares, count)
            verdict = mean_ratio(name, means, gate.max, critical=crit, unit=unit, effects=effects, **kw)
        wanted = needs(verdict, least)
        if name == "ttft_p50_ratio" and verdict.value is None:  # a time to first token is a stream's only
            wanted = "streamed answers of both arms in the same interval (TTFT is measured on streams only)"
        verdicts.append(replace(verdict, needs=wanted))
    return verdicts


def sample_ratio(groups: Groups, *, alpha: float, n_star: float, min_samples: int) -> Verdict:
    """Do the arms' observed shares of the counted primary requests match the weight? The candidate's
    count against the sum of each request's probability of being the candidate's, at every look by a
    confidence sequence. Two-sided: a shortfall and an excess both say that the comparison is not
    between like and like. "fail" is a mismatch (it holds the rollout). groups: one step's (a weight
    that does not change).

    Sticky units: a unit's requests all go one way, so the count varies as sum over units of p(1-p)
    times the unit's requests squared, not per request: a few heavy tenants on the base are luck, not a
    mismatch. That sum of squares (the second frequency moment) is estimated without keeping any unit:
    each request adds its unit's sign (+1 or -1, by a hash) to its unit group, and the sum over groups
    of each group's total squared estimates it without bias (the count-sketch estimator of Charikar,
    Chen and Farach-Colton, 2002); the variance is the independent-requests one times that over the
    number of requests (at least 1)."""
    base, candidate = groups
    n = sum(b.requests + c.requests for b, c in zip(base, candidate, strict=True))
    observed = sum(c.requests for c in candidate)
    expected = sum(b.expected + c.expected for b, c in zip(base, candidate, strict=True))
    iid = expected - sum(b.expected_sq + c.expected_sq for b, c in zip(base, candidate, strict=True))
    n_base = n - observed
    if n < min_samples or iid <= 0:
        why = "no request had a chance of either arm" if n and iid <= 0 else f"{n}/{min_samples} requests"
        return Verdict(SAMPLE_RATIO, "wait", None, None, None, 0.0, n_base, observed, False, why)
    sizes = sum((b.signed + c.signed) ** 2 for b, c in zip(base, candidate, strict=True))
    effect = max(1.0, sizes / n)
    variance = iid * effect
    z = boundary(n / effect, alpha, n_star)
    gap = observed - expected
    margin = z * math.sqrt(variance)
    share, wanted = observed / n, expected / n
    low, high = (gap - margin) / n, (gap + margin) / n
    mismatch = abs(gap) > margin
    reason = f"candidate {_pct(share)} of {n} requests, expected {_pct(wanted)} from the weight" + (
        ": the arms no longer receive what the weight says" if mismatch else ""
    )
    result: Result = "fail" if mismatch else "pass"
    return Verdict(SAMPLE_RATIO, result, share - wanted, low, high, 0.0, n_base, observed, False, reason)


def units_ratio(
    base: int, candidate: int, weight: float, *, alpha: float, n_star: float, min_samples: int
) -> Verdict:
    """Do the arms' shares of the distinct units seen in a step match its weight? Each unit's arm is its
    hash point against the weight, so the candidate's count of U units is Binomial(U, weight) whatever
    the units send; the counts come from HyperLogLogs (HLL_ERROR each, added to the variance). Unlike
    the requests' share, a candidate that changes how much its users send does not move it."""
    n = base + candidate
    if n < min_samples or not 0 < weight < 1:
        why = f"{n}/{min_samples} units" if 0 < weight < 1 else "no unit had a chance of either arm"
        return Verdict(SAMPLE_RATIO_UNITS, "wait", None, None, None, 0.0, base, candidate, False, why)
    gap = candidate - weight * n  # = (1 - w) C - w B
    variance = n * weight * (1 - weight)
    variance += ((1 - weight) * HLL_ERROR * candidate) ** 2 + (weight * HLL_ERROR * base) ** 2
    margin = boundary(n, alpha, n_star) * math.sqrt(variance)
    mismatch = abs(gap) > margin
    reason = f"candidate {_pct(candidate / n)} of {n} units seen in the step, expected {_pct(weight)}" + (
        ": the arms no longer receive what the weight says" if mismatch else ""
    )
    result: Result = "fail" if mismatch else "pass"
    low, high = (gap - margin) / n, (gap + margin) / n
    return Verdict(
        SAMPLE_RATIO_UNITS, result, candidate / n - weight, low, high, 0.0, base, candidate, False, reason
    )


def per_interval(
    gates: Gates, strata: Sequence[tuple[int, ArmWindow, ArmWindow]]
) -> dict[str, list[dict[str, Any]]]:
    """Each configured gate's estimate in each interval where it compares something: what the combined
    estimate is made of (a rate's difference, a quantile's or a mean's ratio; the fallback rate is the
    candidate's own). strata: (interval number, base, candidate)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, _ in gates.configured():
        rows = []
        for interval, b, c in strata:
            estimate = _interval_estimate(name, b, c)
            if estimate is not None:
                n_base, n_candidate, value = estimate
                rows.append(
                    {"interval": interval, "n_base": n_base, "n_candidate": n_candidate, "value": value}
                )
        out[name] = rows
    return out


def _interval_estimate(name: str, b: ArmWindow, c: ArmWindow) -> tuple[int, int, float] | None:
    kind, _, evaluator = name.partition(":")
    if kind == "eval_score_decrease":
        (sb, _, nb), (sc, _, nc) = b.scored(evaluator), c.scored(evaluator)
        if nb and nc:
            return int(nb), int(nc), sb / nb - sc / nc
    elif kind == "pairwise_loss_rate":
        verdicts, _, n = c.scored(evaluator)
        if n:
            return int(n), int(n), verdicts / n
    elif name in RATES:
        events, out_of = RATES[name]
        nb, nc = getattr(b, out_of), getattr(c, out_of)
        if nb and nc:
            return nb, nc, getattr(c, events) / nc - getattr(b, events) / nb
    elif name == "fallback_rate":
        if c.requests:
            return b.requests, c.requests, c.fallbacks / c.requests
    elif name in QUANTILES:
        q, hist = QUANTILES[name]
        hb, hc = getattr(b, hist), getattr(c, hist)
        nb, nc = sum(hb.values()), sum(hc.values())
        if nb and nc:
            ratio = _value_at_rank(sorted(hc.items()), q * nc) / _value_at_rank(sorted(hb.items()), q * nb)
            return nb, nc, ratio
    else:
        total, _, count, _ = MEANS[name]
        nb, nc = getattr(b, count), getattr(c, count)
        if nb and nc and getattr(b, total) > 0:
            return nb, nc, getattr(c, total) / nc / (getattr(b, total) / nb)
    return None


Decision = Literal["advance", "rollback", "hold"]


def non_inferior(verdict: Verdict) -> bool:
    """The whole interval within the threshold: not worse by more than it allows, at the rollout's level
    (a pass on the estimate alone lets a slightly worse candidate through about half the time)."""
    return verdict.high is not None and verdict.high <= verdict.threshold


def decide(
    verdicts: Sequence[Verdict],
    on_fail: str,
    on_no_data: str,
    *,
    critical_only: bool = False,
    final: bool = False,
) -> Decision:
    """At an interval's end: any failure -> on_fail; all passed -> advance; otherwise hold (gates
    without enough data count as passed when on_no_data is "pass"). Between intervals
    (critical_only): a failing critical gate rolls back, anything else holds. final: the advance would
    promote, and a gate passes only when non_inferior; earlier steps advance on the estimate (fail-fast
    still applies to every step). A sample-ratio mismatch holds: with the arms' shares not what the
    weight says, no gate's comparison can be trusted, and the rollout neither advances nor rolls back on
    a non-critical gate (a failing critical gate still rolls back: the safe direction)."""
    mismatch = any(v.gate in SAMPLE_RATIOS and v.result == "fail" for v in verdicts)
    verdicts = [v for v in verdicts if v.gate not in SAMPLE_RATIOS]
    failed = [v for v in verdicts if v.result == "fail" and (v.critical or not critical_only or mismatch)]
    if mismatch:  # the comparison itself is in doubt: only a critical failure still rolls back
        return "rollback" if any(v.critical for v in failed) else "hold"
    if failed:
        return "rollback" if on_fail == "rollback" or any(v.critical for v in failed) else "hold"
    if critical_only:
        return "hold"
    if final and any(v.result == "pass" and not non_inferior(v) for v in verdicts):
        return "hold"
    waiting = [v for v in verdicts if v.result == "wait"]
    if not waiting:
        return "advance"
    no_data = all(min(v.n_base, v.n_candidate) == 0 or v.value is None for v in waiting)
    return "advance" if on_no_data == "pass" and no_data else "hold"
