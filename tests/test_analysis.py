"""The canary statistics against values worked out by hand, and the one property that matters most:
an interval checked at every look keeps its level."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import numpy as np
import pytest

from gateway.analysis import (
    BUCKET_FACTOR,
    UNIT_GROUPS,
    ArmWindow,
    Verdict,
    boundary,
    bucket_bound,
    bucket_of,
    decide,
    design_effects,
    few_units,
    judge,
    mean_ratio,
    per_interval,
    quantile_ratio,
    rate_increase,
    sample_ratio,
    units_ratio,
)
from gateway.policy import Gates, RateGate, RatioGate


def test_boundary_matches_the_normal_mixture_formula_and_is_wider_than_a_fixed_test() -> None:
    # Worked example: alpha 0.05, n* 1000, n 1000. rho^2 = (-2 ln a + ln(-2 ln a + 1)) / n*
    alpha, n = 0.05, 1000
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / 1000  # (5.9915 + 1.9447) / 1000
    assert rho2 == pytest.approx(0.0079362, rel=1e-4)
    expected = math.sqrt(2 * (n * rho2 + 1) / (n * rho2) * math.log(math.sqrt(n * rho2 + 1) / alpha))
    assert boundary(n, alpha, 1000) == pytest.approx(expected)
    # sqrt(2 * 8.9362 / 7.9362 * ln(sqrt(8.9362) / 0.05)) = sqrt(2.2520 * 4.0908)
    assert boundary(n, alpha, 1000) == pytest.approx(3.0352, abs=1e-3)
    fixed = statistics.NormalDist().inv_cdf(1 - alpha / 2)  # 1.96
    for k in (10, 100, 1000, 10_000, 1_000_000):
        assert boundary(k, alpha, 1000) > fixed
    assert boundary(0, alpha, 1000) == math.inf


def test_checked_at_every_look_the_sequence_keeps_its_level_where_a_plain_test_does_not() -> None:
    """2,000 identical A/A streams, 1% events, looked at every 100 samples per arm up to 20,000."""
    rng = np.random.default_rng(7)
    runs, looks, step, p, alpha = 2000, 200, 100, 0.01, 0.05
    a = rng.binomial(step, p, size=(runs, looks)).cumsum(axis=1)
    b = rng.binomial(step, p, size=(runs, looks)).cumsum(axis=1)
    n = step * np.arange(1, looks + 1)
    pa, pb = (a + 0.5) / (n + 1), (b + 0.5) / (n + 1)
    z = (a / n - b / n) / np.sqrt(pa * (1 - pa) / n + pb * (1 - pb) / n)
    sequential = np.array([boundary(k, 2 * alpha, 4000) for k in n])  # one-sided at alpha
    crossed_sequential = (z > sequential).any(axis=1).mean()
    crossed_plain = (z > statistics.NormalDist().inv_cdf(1 - alpha)).any(axis=1).mean()
    assert crossed_sequential <= alpha
    assert crossed_plain > 3 * alpha  # a plain one-sided 5% test, peeked at 200 times


def test_rate_increase_by_hand() -> None:
    # base 100/10000 = 1%, candidate 300/10000 = 3%: difference 0.02.
    verdict = rate_increase(
        "validation_failure_rate",
        [((100, 10_000), (300, 10_000))],
        0.005,
        alpha=0.01,
        n_star=1000,
        min_samples=500,
    )
    pb, pc = 100.5 / 10_001, 300.5 / 10_001
    se = math.sqrt(pb * (1 - pb) / 10_000 + pc * (1 - pc) / 10_000)
    z = boundary(10_000, 0.02, 1000)
    assert verdict.value == pytest.approx(0.02)
    assert verdict.low == pytest.approx(0.02 - z * se)
    assert verdict.low is not None and verdict.low > 0.005
    assert verdict.result == "fail"
    assert "3.00% vs base 1.00% over the same intervals" in verdict.reason
    # On 1,000 requests each the same rates are not clear yet (the interval reaches below +0.5%).
    unclear = rate_increase("r", [((10, 1000), (30, 1000))], 0.005, alpha=0.01, n_star=1000, min_samples=500)
    assert unclear.result == "wait" and unclear.low is not None and unclear.low < 0.005
    # On 100, too few to judge at all.
    few = rate_increase("r", [((1, 100), (3, 100))], 0.005, alpha=0.01, n_star=1000, min_samples=500)
    assert few.result == "wait"
    # Equal rates, enough data: passes.
    same = rate_increase("r", [((10, 1000), (10, 1000))], 0.005, alpha=0.01, n_star=1000, min_samples=500)
    assert same.result == "pass" and same.value == 0


def test_histogram_buckets_and_quantiles() -> None:
    assert bucket_of(0.001) == 0 and bucket_of(0.0005) == 0
    assert bucket_bound(bucket_of(0.8)) >= 0.8 > bucket_bound(bucket_of(0.8) - 1)
    assert bucket_of(1e6) == bucket_of(1e7)  # the last bucket takes everything beyond
    rng = np.random.default_rng(3)
    base_values = rng.lognormal(math.log(0.5), 0.4, 20_000)
    slow_values = base_values * 1.5
    base: dict[int, int] = {}
    slow: dict[int, int] = {}
    for value, slower in zip(base_values, slow_values, strict=True):
        base[bucket_of(value)] = base.get(bucket_of(value), 0) + 1
        slow[bucket_of(slower)] = slow.get(bucket_of(slower), 0) + 1
    same = quantile_ratio(
        "latency_p99_ratio", [(base, base)], 0.99, 1.2, alpha=0.01, n_star=2000, min_samples=500
    )
    assert same.value == pytest.approx(1.0) and same.result == "pass"
    assert same.low is not None and same.high is not None and same.low < 1 < same.high
    worse = quantile_ratio(
        "latency_p99_ratio", [(base, slow)], 0.99, 1.2, alpha=0.01, n_star=2000, min_samples=500
    )
    assert worse.value == pytest.approx(1.5, rel=0.05) and worse.result == "fail"
    true_p99 = float(np.quantile(base_values, 0.99))
    assert worse.reason.startswith(f"p99 {true_p99 * 1500:.0f}"[:6])


def test_mean_ratio_by_hand() -> None:
    base = (100 * 1000, (100**2 + 20**2) * 1000, 1000)  # sum, sum of squares, answers: mean 100, sd 20
    longer = (150 * 1000, (150**2 + 30**2) * 1000, 1000)
    verdict = mean_ratio(
        "output_tokens_ratio",
        [(base, longer)],
        1.3,
        alpha=0.01,
        n_star=2000,
        min_samples=500,  # type: ignore[arg-type]
    )
    se_log = math.sqrt(400 / (1000 * 100**2) + 900 / (1000 * 150**2))  # cv^2/n per side
    z = boundary(1000, 0.02, 2000)
    assert verdict.value == pytest.approx(1.5)
    assert verdict.low == pytest.approx(1.5 * math.exp(-z * se_log))
    assert verdict.result == "fail"


def verdict(result: str, critical: bool = False, n: int = 1000) -> Verdict:
    return Verdict("g", result, 0.0 if n else None, 0.0, 0.0, 0.1, n, n, critical, "")  # type: ignore[arg-type]


def test_decide() -> None:
    assert decide([verdict("pass"), verdict("pass")], "rollback", "hold") == "advance"
    assert decide([verdict("pass"), verdict("fail")], "rollback", "hold") == "rollback"
    assert decide([verdict("pass"), verdict("fail")], "hold", "hold") == "hold"
    assert decide([verdict("fail", critical=True)], "hold", "hold") == "rollback"  # critical: always
    assert decide([verdict("pass"), verdict("wait")], "rollback", "hold") == "hold"
    assert decide([verdict("pass"), verdict("wait", n=0)], "rollback", "pass") == "advance"  # no data
    assert decide([verdict("pass"), verdict("wait")], "rollback", "pass") == "hold"  # data, unclear
    # Between intervals only critical failures act.
    assert decide([verdict("fail")], "rollback", "hold", critical_only=True) == "hold"
    assert decide([verdict("fail", critical=True)], "rollback", "hold", critical_only=True) == "rollback"
    # The promotion: a pass counts only when its whole interval is within the threshold (0.1 here).
    within, reaching = replace(verdict("pass"), high=0.08), replace(verdict("pass"), high=0.12)
    assert decide([within, reaching], "rollback", "hold") == "advance"  # earlier steps: the estimates
    assert decide([within, reaching], "rollback", "hold", final=True) == "hold"
    assert decide([within, within], "rollback", "hold", final=True) == "advance"


def test_judge_splits_the_level_across_the_configured_gates() -> None:
    gates = Gates(error_rate=RateGate(max_increase=0.01), latency_p99_ratio=RatioGate(max=1.2))
    base = ArmWindow(requests=2000, errors=20, latency={100: 2000})
    candidate = ArmWindow(requests=2000, errors=22, latency={100: 2000})
    verdicts = judge(gates, [(base, candidate)], confidence=0.99, min_samples=500)
    assert [v.gate for v in verdicts] == ["error_rate", "latency_p99_ratio"]
    assert all(v.result == "pass" for v in verdicts)
    # Each gate's interval at 0.005: the error gate's multiplier equals a one-sided 0.005 sequence.
    pb, pc = 20.5 / 2001, 22.5 / 2001
    se = math.sqrt(pb * (1 - pb) / 2000 + pc * (1 - pc) / 2000)
    assert verdicts[0].high == pytest.approx(0.001 + boundary(2000, 0.01, 5000) * se)


def test_what_drifts_for_both_arms_cancels_out() -> None:
    """The candidate's share grows while the rate (or latency) grows for everyone: pooled, the candidate
    looks worse, since its samples lie late; compared interval by interval, it is the same as the base."""
    early_base, early_candidate = (
        ArmWindow(requests=45_000, invalid=450),
        ArmWindow(requests=5000, invalid=50),
    )
    late_base, late_candidate = ArmWindow(requests=5000, invalid=100), ArmWindow(requests=45_000, invalid=900)
    strata = [(early_base, early_candidate), (late_base, late_candidate)]
    gates = Gates(validation_failure_rate=RateGate(max_increase=0.004))
    (concurrent,) = judge(gates, strata, confidence=0.99, min_samples=500)
    assert concurrent.value == pytest.approx(0.0) and concurrent.result == "pass"
    pooled_base, pooled_candidate = ArmWindow(), ArmWindow()
    for b, c in strata:
        pooled_base.merge(b)
        pooled_candidate.merge(c)
    (pooled,) = judge(gates, [(pooled_base, pooled_candidate)], confidence=0.99, min_samples=500)
    assert pooled.value == pytest.approx(0.008) and pooled.result == "fail"  # what one window concluded
    # An interval where one arm has nothing compares nothing: the base alone (a 100% step) changes nothing.
    alone = [*strata, (ArmWindow(), ArmWindow(requests=5000, invalid=500))]
    (same,) = judge(gates, alone, confidence=0.99, min_samples=500)
    assert same.value == concurrent.value and same.n_candidate == 50_000

    rng = np.random.default_rng(5)

    def hist(values: np.ndarray) -> dict[int, int]:
        out: dict[int, int] = {}
        for value in values:
            out[bucket_of(value)] = out.get(bucket_of(value), 0) + 1
        return out

    def latency(n: int, scale: float) -> ArmWindow:
        return ArmWindow(requests=n, latency=hist(rng.lognormal(math.log(0.5), 0.4, n) * scale))

    slow_strata = [(latency(9000, 1.0), latency(1000, 1.0)), (latency(1000, 1.3), latency(9000, 1.3))]
    (p99,) = judge(Gates(latency_p99_ratio=RatioGate(max=1.1)), slow_strata, confidence=0.99, min_samples=500)
    assert p99.value == pytest.approx(1.0, abs=0.05) and p99.result != "fail"


def test_a_waiting_gate_says_what_it_still_needs() -> None:
    gates = Gates(validation_failure_rate=RateGate(max_increase=0.005))

    def verdict(base: ArmWindow, candidate: ArmWindow) -> Verdict:
        (only,) = judge(gates, [(base, candidate)], confidence=0.99, min_samples=500)
        return only

    few = verdict(ArmWindow(requests=120, invalid=1), ArmWindow(requests=40))
    assert few.result == "wait" and few.needs == "min_samples per arm: base 120/500, candidate 40/500"
    unclear = verdict(ArmWindow(requests=1000, invalid=10), ArmWindow(requests=1000, invalid=30))
    assert unclear.result == "wait" and unclear.needs is not None and unclear.needs.startswith("more samples")
    alone = verdict(ArmWindow(), ArmWindow(requests=1000))
    assert alone.needs == "samples of both arms in the same interval"
    settled = verdict(ArmWindow(requests=1000, invalid=10), ArmWindow(requests=1000, invalid=10))
    assert settled.result == "pass" and settled.needs is None
    # Requests that are not streamed have no time to first token: the TTFT gate says so.
    (ttft,) = judge(
        Gates(ttft_p50_ratio=RatioGate(max=1.2)),
        [(ArmWindow(requests=900), ArmWindow(requests=900))],
        confidence=0.99,
        min_samples=500,
    )
    assert ttft.result == "wait" and ttft.needs is not None and "measured on streams only" in ttft.needs


def test_each_gate_shows_its_estimate_per_interval() -> None:
    gates = Gates(
        error_rate=RateGate(max_increase=0.01),
        latency_p99_ratio=RatioGate(max=1.2),
    )
    strata = [
        (
            7,
            ArmWindow(requests=100, errors=1, latency={100: 100}),
            ArmWindow(requests=50, errors=3, latency={110: 50}),
        ),
        (8, ArmWindow(requests=100, errors=2), ArmWindow()),  # the candidate had nothing: compares nothing
        (
            9,
            ArmWindow(requests=10, errors=0, latency={100: 10}),
            ArmWindow(requests=10, errors=1, latency={100: 10}),
        ),
    ]
    shown = per_interval(gates, strata)
    assert set(shown) == {"error_rate", "latency_p99_ratio"}
    assert [(r["interval"], r["n_base"], r["n_candidate"]) for r in shown["error_rate"]] == [
        (7, 100, 50),
        (9, 10, 10),
    ]
    assert [r["value"] for r in shown["error_rate"]] == [pytest.approx(0.05), pytest.approx(0.1)]
    first, last = shown["latency_p99_ratio"]
    assert first["value"] == pytest.approx(BUCKET_FACTOR**10, rel=0.06) and last["value"] == pytest.approx(
        1.0
    )


def _groups_of(
    rng: np.random.Generator, units: int, weight: float, spread: float, requests: int, shortfall: float = 0.0
) -> tuple[list[ArmWindow], list[ArmWindow]]:
    """Sticky units (tenants) of differing volume and validation failure rate, each in a unit group by its
    number, on the candidate when its assignment point is under the weight; shortfall: the share of the
    candidate's requests that are never counted (they fail before it)."""
    volume = rng.lognormal(0, 1.0, units)
    rate = np.clip(rng.lognormal(math.log(0.01), spread, units), 0, 1) if spread else np.full(units, 0.01)
    on_candidate = rng.random(units) < weight
    sign = rng.choice([-1, 1], units)
    counts = rng.multinomial(requests, volume / volume.sum())
    base = [ArmWindow() for _ in range(UNIT_GROUPS)]
    candidate = [ArmWindow() for _ in range(UNIT_GROUPS)]
    for unit in range(units):
        n = int(counts[unit])
        if on_candidate[unit] and shortfall:
            n = int(rng.binomial(n, 1 - shortfall))
        invalid = int(rng.binomial(n, rate[unit]))
        window = (candidate if on_candidate[unit] else base)[unit % UNIT_GROUPS]
        window.merge(
            ArmWindow(
                requests=n,
                invalid=invalid,
                expected=n * weight,
                expected_sq=n * weight * weight,
                signed=n * int(sign[unit]),
            )
        )
    return base, candidate


def test_design_effects_are_one_for_independent_requests_and_large_for_alike_units() -> None:
    rng = np.random.default_rng(11)

    def independent() -> list[tuple[float, float, float, float]]:
        bad = rng.binomial(1000, 0.01, UNIT_GROUPS)
        signs = rng.binomial(1000, 0.5, UNIT_GROUPS) * 2 - 1000
        return [(float(x), float(x), 1000.0, float(s)) for x, s in zip(bad, signs, strict=True)]

    assert all(1.0 <= d < 1.5 for d in design_effects([independent(), independent()]))  # never below 1
    base, candidate = _groups_of(rng, 500, 0.05, 1.5, 200_000)

    def rows(windows: list[ArmWindow]) -> list[tuple[float, float, float, float]]:
        return [(w.invalid, w.invalid, w.requests, w.signed) for w in windows]

    effect_base, effect_candidate = design_effects([rows(base), rows(candidate)])
    assert effect_base > 5  # a tenant's requests fail together: far fewer independent samples than requests
    # The candidate's 5% of the tenants (about 25, in fewer groups): its own groups could hardly tell how
    # much tenants differ; the base's can, and the candidate's effect follows its own units' sizes.
    assert effect_candidate > 5
    assert design_effects([[(0.0, 0.0, 0.0, 0.0)] * 3, []]) == [1.0, 1.0]


def test_sticky_tenants_of_differing_difficulty_do_not_fail_an_identical_candidate() -> None:
    """500 tenants, the candidate's 25% of them: counted as independent requests, the arms differ by
    which tenants each got, and an identical candidate fails often; with the design effects, rarely."""
    rng = np.random.default_rng(3)
    gates = Gates(validation_failure_rate=RateGate(max_increase=0.0005, critical=True))
    failed = {"requests": 0, "units": 0}
    for _ in range(60):
        base, candidate = _groups_of(rng, 500, 0.25, 1.5, 100_000)
        strata = [(_total(base), _total(candidate))]
        (naive,) = judge(gates, strata, confidence=0.99, min_samples=500)
        (robust,) = judge(gates, strata, confidence=0.99, min_samples=500, groups=(base, candidate))
        failed["requests"] += naive.result == "fail"
        failed["units"] += robust.result == "fail"
        assert robust.high is not None and naive.high is not None and robust.high >= naive.high
    assert failed["requests"] >= 10, failed  # what the issue measured: 30% of identical candidates
    assert failed["units"] <= 1, failed


def _total(windows: list[ArmWindow]) -> ArmWindow:
    total = ArmWindow()
    for window in windows:
        total.merge(window)
    return total


def test_the_sample_ratio_check_finds_a_shortfall_and_not_heavy_tenants() -> None:
    rng = np.random.default_rng(7)
    kw = {"alpha": 0.01, "n_star": 5000.0, "min_samples": 500}
    # Many small units (users), requests counted as they were assigned: no mismatch.
    fine = sample_ratio(_groups_of(rng, 20_000, 0.25, 0.0, 40_000), **kw)  # type: ignore[arg-type]
    assert fine.result == "pass" and fine.value is not None and abs(fine.value) < 0.01
    # A tenth of the candidate's requests never counted (they fail before it): 22.5% against 25%.
    short = sample_ratio(_groups_of(rng, 20_000, 0.25, 0.0, 40_000, shortfall=0.1), **kw)  # type: ignore[arg-type]
    assert short.result == "fail" and short.value is not None and short.value < -0.015
    assert "expected 25.00%" in short.reason
    # 50 tenants of very different volume: the candidate's share of requests is far from 25% by luck of
    # which tenants it got, which only the cluster-robust variance knows.
    heavy = [sample_ratio(_groups_of(rng, 50, 0.25, 0.0, 40_000), **kw) for _ in range(30)]  # type: ignore[arg-type]
    assert sum(v.result == "fail" for v in heavy) <= 1
    assert max(abs(v.value or 0) for v in heavy) > 0.05  # shares that an independent-requests test rejects
    few = sample_ratio(([ArmWindow(requests=10, expected=2.5, expected_sq=0.625)], [ArmWindow()]), **kw)  # type: ignore[arg-type]
    assert few.result == "wait" and "10/500" in few.reason


def test_a_sample_ratio_mismatch_holds_and_only_a_critical_failure_still_rolls_back() -> None:
    def verdict(gate: str, result: str, critical: bool = False) -> Verdict:
        return Verdict(gate, result, 0.0, 0.0, 0.0, 0.01, 1000, 1000, critical, "")  # type: ignore[arg-type]

    mismatch = verdict("sample_ratio", "fail")
    passing = [verdict("error_rate", "pass", critical=True), verdict("latency_p99_ratio", "pass")]
    assert decide([*passing], "rollback", "hold") == "advance"
    assert decide([*passing, mismatch], "rollback", "hold") == "hold"
    assert decide([verdict("latency_p99_ratio", "fail"), mismatch], "rollback", "hold") == "hold"
    assert decide([verdict("error_rate", "fail", critical=True), mismatch], "rollback", "hold") == "rollback"
    assert decide([*passing, verdict("sample_ratio", "pass")], "rollback", "hold") == "advance"


def test_the_units_check_is_a_binomial_test_that_allows_for_the_counts_error() -> None:
    kw = {"alpha": 0.01, "n_star": 5000.0, "min_samples": 500}
    rng = np.random.default_rng(9)
    # Units assigned by their hash: the candidate's count is Binomial(U, w); looked at every "interval".
    false = 0
    for _ in range(200):
        total = 0
        candidate = 0
        for _ in range(10):
            total += 2000
            candidate += int(rng.binomial(2000, 0.25))
            if units_ratio(total - candidate, candidate, 0.25, **kw).result == "fail":  # type: ignore[arg-type]
                false += 1
                break
    assert false <= 4  # 1% at every look at once, 200 rollouts: about 2 at most
    short = units_ratio(15_500, 4_500, 0.25, **kw)  # type: ignore[arg-type]  # 22.5% against 25%
    assert short.result == "fail" and "of 20000 units seen in the step, expected 25.00%" in short.reason
    # Millions of units: a HyperLogLog's 0.81% error is larger than the binomial's; 0.5% off is no mismatch.
    many = units_ratio(7_462_500, 2_537_500, 0.25, **kw)  # type: ignore[arg-type]  # 25.4%
    assert many.result == "pass"
    assert units_ratio(10, 3, 0.25, **kw).result == "wait"  # type: ignore[arg-type]
    assert units_ratio(900, 0, 0.0, **kw).result == "wait"  # type: ignore[arg-type]  # nothing to expect


def test_an_estimate_that_rests_on_few_units_is_read_as_a_student_t() -> None:
    assert few_units(3.0, math.inf) == 3.0 and few_units(3.0, 5000) == 3.0  # many units: normal
    assert few_units(math.inf, 3) == math.inf
    widened = [few_units(3.0, m) for m in (500, 50, 5)]
    assert 3.0 < widened[0] < widened[1] < widened[2]
    # The t quantile of the same tail (one-sided 99.865%, z = 3.0) is about 3.16 at 49 degrees of freedom;
    # at 4 the expansion (5.95) is twice the normal's, if short of the exact t's.
    assert widened[1] == pytest.approx(3.16, abs=0.05) and widened[2] > 5.5
    base, candidate = _groups_of(np.random.default_rng(4), 500, 0.01, 1.5, 100_000)  # about 5 tenants
    gates = Gates(validation_failure_rate=RateGate(max_increase=0.0005, critical=True))
    strata = [(_total(base), _total(candidate))]
    (verdict,) = judge(gates, strata, confidence=0.99, min_samples=500, groups=(base, candidate))
    assert verdict.high is not None and verdict.low is not None and verdict.high - verdict.low > 0.02
