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

A gate passes when it has min_samples per arm and its estimate is within the threshold; it fails when
its interval lies wholly beyond the threshold; otherwise it waits (not enough data, or not clear yet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from gateway.policy import Gates

Result = Literal["pass", "fail", "wait"]

# Latency histograms: log buckets 5% wide from 1 ms to ~10 min; bucket i holds (B*(1.05^(i-1)), B*1.05^i].
BUCKET_BASE_S = 0.001
BUCKET_FACTOR = 1.05
BUCKETS = 275
_LOG_FACTOR = math.log(BUCKET_FACTOR)


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
        for mine, theirs in ((self.latency, other.latency), (self.ttft, other.ttft)):
            for bucket, count in theirs.items():
                mine[bucket] = mine.get(bucket, 0) + count


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


def rate_increase(
    gate: str,
    base: tuple[int, int],
    candidate: tuple[int, int],
    max_increase: float,
    *,
    alpha: float,
    n_star: float,
    min_samples: int,
    critical: bool = False,
) -> Verdict:
    """candidate rate - base rate <= max_increase. base, candidate: (events, requests)."""
    (xb, nb), (xc, nc) = base, candidate
    diff = _rate(xc, nc) - _rate(xb, nb)
    se = math.hypot(_se_rate(xb, nb), _se_rate(xc, nc))
    z = boundary(min(nb, nc), 2 * alpha, n_star)  # one-sided at alpha
    low, high = diff - z * se, diff + z * se
    result = _decide(low, diff, max_increase, min(nb, nc) >= min_samples)
    reason = f"{_pct(_rate(xc, nc))} vs base {_pct(_rate(xb, nb))}, allowed +{_pct(max_increase)}"
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
) -> Verdict:
    """The candidate's own rate <= maximum (fallbacks happen only on the candidate)."""
    xc, nc = candidate
    rate = _rate(xc, nc)
    z = boundary(nc, 2 * alpha, n_star)
    se = _se_rate(xc, nc)
    low, high = rate - z * se, rate + z * se
    result = _decide(low, rate, maximum, nc >= min_samples)
    return Verdict(
        gate, result, rate, low, high, maximum, n_base, nc, critical, f"{_pct(rate)}, at most {_pct(maximum)}"
    )


def quantile_ratio(
    gate: str,
    base: dict[int, int],
    candidate: dict[int, int],
    q: float,
    maximum: float,
    *,
    alpha: float,
    n_star: float,
    min_samples: int,
    critical: bool = False,
) -> Verdict:
    """candidate's q-quantile / base's <= maximum, from log-bucket histograms."""
    nb, nc = sum(base.values()), sum(candidate.values())
    if nb == 0 or nc == 0:
        return Verdict(gate, "wait", None, None, None, maximum, nb, nc, critical, "no data")
    # Each side at alpha/2: the ratio's interval then holds at alpha (one-sided: the lower end).
    b_est, b_lo, b_hi = _quantile_interval(base, nb, q, alpha, n_star)
    c_est, c_lo, c_hi = _quantile_interval(candidate, nc, q, alpha, n_star)
    ratio, low, high = c_est / b_est, c_lo / b_hi, c_hi / b_lo
    result = _decide(low, ratio, maximum, min(nb, nc) >= min_samples)
    label = f"p{round(q * 100)}"
    reason = (
        f"{label} {c_est * 1000:.0f} ms vs base {b_est * 1000:.0f} ms (x{ratio:.2f}), at most x{maximum:g}"
    )
    return Verdict(gate, result, ratio, low, high, maximum, nb, nc, critical, reason)


def mean_ratio(
    gate: str,
    base: tuple[float, float, int],
    candidate: tuple[float, float, int],
    maximum: float,
    *,
    alpha: float,
    n_star: float,
    min_samples: int,
    critical: bool = False,
    unit: str = "tokens",
) -> Verdict:
    """A mean per answer (output tokens, cost), candidate / base <= maximum, by the delta method on the
    log ratio. base, candidate: (sum, sum of squares, answers)."""
    (sb, qb, nb), (sc, qc, nc) = base, candidate
    if nb == 0 or nc == 0 or sb <= 0 or sc <= 0:
        return Verdict(gate, "wait", None, None, None, maximum, nb, nc, critical, f"no {unit} counted")
    mb, mc = sb / nb, sc / nc
    vb, vc = max(qb / nb - mb * mb, 0.0), max(qc / nc - mc * mc, 0.0)
    se_log = math.sqrt(vb / (nb * mb * mb) + vc / (nc * mc * mc))
    z = boundary(min(nb, nc), 2 * alpha, n_star)
    ratio = mc / mb
    low, high = ratio * math.exp(-z * se_log), ratio * math.exp(z * se_log)
    result = _decide(low, ratio, maximum, min(nb, nc) >= min_samples)
    shown = (f"{mc:.0f}", f"{mb:.0f}") if unit == "tokens" else (f"{mc:.6f}", f"{mb:.6f}")
    reason = f"{shown[0]} {unit} vs base {shown[1]} (x{ratio:.2f}), at most x{maximum:g}"
    return Verdict(gate, result, ratio, low, high, maximum, nb, nc, critical, reason)


def _decide(low: float, estimate: float, threshold: float, enough: bool) -> Result:
    if not enough:
        return "wait"
    if low > threshold:
        return "fail"
    return "pass" if estimate <= threshold else "wait"


def _quantile_interval(
    hist: dict[int, int], n: int, q: float, alpha: float, n_star: float
) -> tuple[float, float, float]:
    """(estimate, low, high) of the q-quantile: the ranks n*q -+ z*sqrt(n*q*(1-q)) read off the buckets."""
    z = boundary(n, alpha, n_star)  # two-sided at alpha: alpha/2 per end
    spread = z * math.sqrt(n * q * (1 - q))
    ordered = sorted(hist.items())
    return (
        _value_at_rank(ordered, q * n),
        _value_at_rank(ordered, q * n - spread, lower=True),
        _value_at_rank(ordered, q * n + spread),
    )


def _value_at_rank(ordered: Sequence[tuple[int, int]], rank: float, lower: bool = False) -> float:
    """The value of the sample at this rank (1-based), interpolated geometrically inside its bucket.
    Ranks beyond the data clamp to its ends (the interval is then as wide as the data allows)."""
    if rank <= 0:
        index = ordered[0][0]
        return bucket_bound(index - 1) if lower else bucket_bound(index)
    seen = 0
    for index, count in ordered:
        if seen + count >= rank:
            share = (rank - seen) / count
            low = bucket_bound(index - 1) if index > 0 else BUCKET_BASE_S / BUCKET_FACTOR
            return float(low * (bucket_bound(index) / low) ** share)
        seen += count
    return bucket_bound(ordered[-1][0])


def _pct(rate: float) -> str:
    return f"{rate * 100:.2f}%"


def judge(
    gates: Gates, base: ArmWindow, candidate: ArmWindow, *, confidence: float, min_samples: int
) -> list[Verdict]:
    """Every configured gate, each at an equal share of the rollout's error budget (1 - confidence)."""
    configured = [(name, gate) for name, gate in gates if gate is not None]
    alpha = (1 - confidence) / max(len(configured), 1)
    n_star = 10.0 * min_samples  # the boundary is tightest around a few times the minimum sample
    b, c = base, candidate
    verdicts = []
    for name, gate in configured:
        crit = gate.critical
        if name == "error_rate":
            verdict = rate_increase(
                name, (b.errors, b.attempts), (c.errors, c.attempts), gate.max_increase,
                alpha=alpha, n_star=n_star, min_samples=min_samples, critical=crit,
            )  # fmt: skip
        elif name == "validation_failure_rate":
            verdict = rate_increase(
                name, (b.invalid, b.attempts), (c.invalid, c.attempts), gate.max_increase,
                alpha=alpha, n_star=n_star, min_samples=min_samples, critical=crit,
            )  # fmt: skip
        elif name in ("negative_feedback_rate", "escalation_rate"):
            events = (
                (b.negative, c.negative) if name == "negative_feedback_rate" else (b.escalated, c.escalated)
            )
            verdict = rate_increase(
                name, (events[0], b.feedback), (events[1], c.feedback), gate.max_increase,
                alpha=alpha, n_star=n_star, min_samples=min_samples, critical=crit,
            )  # fmt: skip
        elif name == "fallback_rate":
            verdict = rate_max(
                name, (c.fallbacks, c.requests), gate.max, b.requests,
                alpha=alpha, n_star=n_star, min_samples=min_samples, critical=crit,
            )  # fmt: skip
        elif name in ("latency_p99_ratio", "ttft_p50_ratio"):
            q, hb, hc = (0.99, b.latency, c.latency) if name == "latency_p99_ratio" else (0.5, b.ttft, c.ttft)
            verdict = quantile_ratio(
                name, hb, hc, q, gate.max, alpha=alpha, n_star=n_star, min_samples=min_samples, critical=crit
            )
        elif name == "output_tokens_ratio":
            verdict = mean_ratio(
                name, (b.tokens, b.tokens_sq, b.token_answers), (c.tokens, c.tokens_sq, c.token_answers),
                gate.max, alpha=alpha, n_star=n_star, min_samples=min_samples, critical=crit,
            )  # fmt: skip
        else:  # cost_per_request_ratio
            verdict = mean_ratio(
                name, (b.cost, b.cost_sq, b.token_answers), (c.cost, c.cost_sq, c.token_answers),
                gate.max, alpha=alpha, n_star=n_star, min_samples=min_samples, critical=crit, unit="cost",
            )  # fmt: skip
        verdicts.append(verdict)
    return verdicts


Decision = Literal["advance", "rollback", "hold"]


def decide(
    verdicts: Sequence[Verdict], on_fail: str, on_no_data: str, *, critical_only: bool = False
) -> Decision:
    """At an interval's end: any failure -> on_fail; all passed -> advance; otherwise hold (gates
    without enough data count as passed when on_no_data is "pass"). Between intervals
    (critical_only): a failing critical gate rolls back, anything else holds."""
    failed = [v for v in verdicts if v.result == "fail" and (v.critical or not critical_only)]
    if failed:
        return "rollback" if on_fail == "rollback" or any(v.critical for v in failed) else "hold"
    if critical_only:
        return "hold"
    waiting = [v for v in verdicts if v.result == "wait"]
    if not waiting:
        return "advance"
    no_data = all(min(v.n_base, v.n_candidate) == 0 or v.value is None for v in waiting)
    return "advance" if on_no_data == "pass" and no_data else "hold"
