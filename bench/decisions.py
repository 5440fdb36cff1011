"""Decision quality of the canary controller, by simulation: many whole rollouts, no servers.

Each rollout walks the policy's steps as the controller does (controller_step: reaching 100% is the
promotion), judging the gates at the end of every interval with gateway.analysis, the controller's own
code, on the statistics kept per interval since the rollout began: compared interval by interval
("concurrent", what the controller does), and, for contrast, pooled into one window per arm (what it
did before). Traffic per interval is fixed; the candidate's share is the current weight. Requests fail,
fail validation and take time at the rates each scenario sets, which may drift for both arms at once.

Targets (issue 6): an identical candidate is rolled back in <= 1% of whole rollouts; a candidate whose
validation failures go from 1% to 2% is rolled back within 6,000 candidate requests in >= 95% of runs;
a 20% p99 latency regression is caught in >= 90%.

For contrast, the identical candidate is also run with a plain fixed-sample test at every look (the
same gates and levels, the boundary replaced by the normal quantile): what the sequential method buys.

Drift scenarios (issue 20): validation failures of both arms 1% -> 2% over the first 10 intervals;
1% -> 1.5% for both once the candidate reaches the last step; latency x1.3 for both at the last step.
Promotion needs every gate non-inferior (its whole interval within the threshold); "pooled" also
promotes on the estimates, as before.

Sticky units (issue 20): every arm also keeps its windows per unit group (analysis.UNIT_GROUPS) over the
rollout, and the gates widen by their design effects; "tenants" assigns 500 tenants of lognormal volume,
validation failure rate and latency to the arms by their hash point (a tenant moves to the candidate as
the weight grows past its point), as `assignment: {sticky: [header:x-tenant]}` does. The sample-ratio
check runs in every scenario (a false mismatch holds an identical candidate); "shortfall" drops 10% of
the candidate's requests before they are counted, from the start or once the rollout reaches 25%.

Usage: python bench/decisions.py [--runs 1000] [--seed 1] [--jobs N] [--curve]

--curve adds the promotion probability against the size of a validation regression (the default
+0.2-point threshold): what non-inferiority buys, and what it costs a candidate just within it.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gateway.analysis
from gateway.analysis import (
    BUCKET_BASE_S,
    BUCKET_FACTOR,
    BUCKETS,
    SAMPLE_RATIO,
    UNIT_GROUPS,
    ArmWindow,
    decide,
    judge,
    sample_ratio,
)
from gateway.policy import Gates, RateGate, RatioGate
from gateway.rollout import controller_step
from gateway.store.rollouts import RouteState

STEPS = (1, 5, 25, 50, 100)
REQUESTS_PER_INTERVAL = 10_000
MAX_INTERVALS = 150
MIN_SAMPLES = 500
CONFIDENCE = 0.99
GATES = Gates(
    error_rate=RateGate(max_increase=0.005, critical=True),
    validation_failure_rate=RateGate(max_increase=0.0005, critical=True),
    latency_p99_ratio=RatioGate(max=1.1),
)
EDGES = BUCKET_BASE_S * BUCKET_FACTOR ** np.arange(BUCKETS)


@dataclass(frozen=True)
class Arm:
    error_rate: float = 0.005
    invalid_rate: float = 0.01
    latency_scale: float = 1.0  # multiplies every latency: the p99 ratio to an unscaled arm


DEFAULT_THRESHOLDS = Gates(  # the policy's defaults for the rates: validation +0.2 points
    error_rate=RateGate(max_increase=0.005, critical=True),
    validation_failure_rate=RateGate(max_increase=0.002, critical=True),
    latency_p99_ratio=RatioGate(max=1.1),
)


@dataclass(frozen=True)
class Scenario:
    candidate: Arm
    # What happens to both arms at interval t with the candidate at step index s: (invalid rate added,
    # latency factor).
    drift: Callable[[int, int], tuple[float, float]] = lambda t, s: (0.0, 1.0)
    gates: Gates = DEFAULT_THRESHOLDS
    tenants: int = 0  # sticky tenants of differing difficulty (0: every request is a unit of its own)
    # The share of the candidate's requests never counted, at step index s (a sample-ratio mismatch).
    shortfall: Callable[[int], float] = lambda s: 0.0


TOP = len([s for s in STEPS if s < 100]) - 1  # the last step walked: after it, promotion
# The identical and the slightly worse candidate are judged with the policy's default rate thresholds;
# the regressions and the drifts with the tight ones above (what catching a doubled validation failure
# rate within 6,000 requests takes, and the setting the drift figures were measured with).
SCENARIOS = {
    "identical": Scenario(Arm()),
    "validation 1% -> 1.3% against +0.2 points": Scenario(Arm(invalid_rate=0.013)),
    "validation 1% -> 2%": Scenario(Arm(invalid_rate=0.02), gates=GATES),
    "p99 latency +20%": Scenario(Arm(latency_scale=1.2), gates=GATES),
    "identical, both drift 1% -> 2% over 10 intervals": Scenario(
        Arm(), lambda t, s: (0.01 * min(t, 10) / 10, 1.0), GATES
    ),
    "identical, both 1% -> 1.5% at the last step": Scenario(
        Arm(), lambda t, s: (0.005 if s == TOP else 0.0, 1.0), GATES
    ),
    "identical, both latency x1.3 at the last step": Scenario(
        Arm(), lambda t, s: (0.0, 1.3 if s == TOP else 1.0), GATES
    ),
    "identical, 500 sticky tenants": Scenario(Arm(), tenants=500),
    "identical, 500 sticky tenants, tight gates": Scenario(Arm(), gates=GATES, tenants=500),
    "identical, 10% of the candidate's requests uncounted": Scenario(Arm(), shortfall=lambda s: 0.1),
    "identical, 10% uncounted from the 25% step": Scenario(
        Arm(), shortfall=lambda s: 0.1 if STEPS[s] >= 25 else 0.0
    ),
}
SRM_SCENARIOS = {name for name, scenario in SCENARIOS.items() if scenario.shortfall(TOP)}


@dataclass
class Tenants:
    """Sticky units of differing volume and difficulty, each with its point in [0, 1) and unit group."""

    volume: np.ndarray
    invalid: np.ndarray  # validation failure rate of each
    latency: np.ndarray  # latency factor of each
    point: np.ndarray
    group: np.ndarray
    sign: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int) -> Tenants:
        volume = rng.lognormal(0, 1.0, n)
        return cls(
            volume / volume.sum(),
            np.clip(rng.lognormal(np.log(0.01), 1.0, n), 0, 0.5),
            rng.lognormal(0, 0.3, n),
            rng.random(n),
            rng.integers(0, UNIT_GROUPS, n),
            rng.choice([-1, 1], n),
        )


def sample(
    rng: np.random.Generator,
    arm: Arm,
    n: int,
    extra: float,
    factor: float,
    groups: tuple[list[ArmWindow], ...],
    share: float,
    tenants: tuple[np.ndarray, Tenants] | None = None,
) -> ArmWindow:
    """One arm's interval: n requests (or the tenants' counts), added to its unit groups too (the
    rollout's and the step's). share: each request's probability of being the candidate's (the weight)."""
    if tenants is not None:
        counts, population = tenants
        n = int(counts.sum())
    window = ArmWindow(requests=n)
    if n == 0:
        return window
    window.errors = int(rng.binomial(n, arm.error_rate))
    if tenants is None:
        group = rng.integers(0, UNIT_GROUPS, n)
        sign = rng.choice([-1, 1], n)
        invalid = rng.random(n) < arm.invalid_rate + extra
        latency = rng.lognormal(mean=np.log(0.8), sigma=0.5, size=n) * arm.latency_scale * factor
    else:
        group = np.repeat(population.group, counts)
        sign = np.repeat(population.sign, counts)
        rates = np.repeat(population.invalid, counts) * (arm.invalid_rate / 0.01) + extra
        invalid = rng.random(n) < rates
        scale = np.repeat(population.latency, counts) * arm.latency_scale * factor
        latency = rng.lognormal(mean=np.log(0.8), sigma=0.5, size=n) * scale
    window.invalid = int(invalid.sum())
    buckets = np.minimum(np.searchsorted(EDGES, latency), BUCKETS - 1)
    indices, bucket_counts = np.unique(buckets, return_counts=True)
    window.latency = dict(zip(indices.tolist(), bucket_counts.tolist(), strict=True))
    logs = np.log(latency)
    per_group = np.bincount(group, minlength=UNIT_GROUPS)
    bad = np.bincount(group, weights=invalid, minlength=UNIT_GROUPS)
    log_sum = np.bincount(group, weights=logs, minlength=UNIT_GROUPS)
    log_sq = np.bincount(group, weights=logs * logs, minlength=UNIT_GROUPS)
    signed = np.bincount(group, weights=sign, minlength=UNIT_GROUPS)
    for g in np.flatnonzero(per_group):
        k = int(per_group[g])
        for unit in (kept[g] for kept in groups):  # errors are independent of the unit here
            unit.requests += k
            unit.invalid += int(bad[g])
            unit.expected += k * share
            unit.expected_sq += k * share * share
            unit.signed += int(signed[g])
            unit.timed += k
            unit.log_latency += float(log_sum[g])
            unit.log_latency_sq += float(log_sq[g])
    return window


def fixed_sample_z(n: float, alpha: float, n_star: float) -> float:
    """What a plain one-sided test at the rollout's level (1 - CONFIDENCE) would use at every look,
    for every gate: the normal quantile, blind to the looks and to the number of gates."""
    return statistics.NormalDist().inv_cdf(CONFIDENCE) if n > 0 else float("inf")


def rollout(
    rng: np.random.Generator,
    scenario: Scenario,
    concurrent: bool = True,
    non_inferiority: bool = True,
    began: list[int] | None = None,
) -> tuple[str, int, int]:
    """(outcome, candidate requests seen when it ended, intervals it took): promoted, rolled_back, held,
    or mismatch (held by the sample-ratio check). non_inferiority: promotion needs every gate's whole
    interval within its threshold. Not concurrent (as before issue 20): one window per arm, requests
    independent, no sample-ratio check. began: set to the first interval with a shortfall."""
    began = [-1] if began is None else began
    strata: list[tuple[ArmWindow, ArmWindow]] = []
    base_total, cand_total = ArmWindow(), ArmWindow()
    groups = ([ArmWindow() for _ in range(UNIT_GROUPS)], [ArmWindow() for _ in range(UNIT_GROUPS)])
    step = ([ArmWindow() for _ in range(UNIT_GROUPS)], [ArmWindow() for _ in range(UNIT_GROUPS)])
    population = Tenants.draw(rng, scenario.tenants) if scenario.tenants else None
    state = RouteState("r", "k", "progressing", STEPS[0], True, 0, None, 1, 0.0)
    for t in range(MAX_INTERVALS):
        if scenario.shortfall(state.step) and began[0] < 0:
            began[0] = t
        extra, factor = scenario.drift(t, state.step)
        share = state.weight / 100
        if population is None:
            n_candidate = int(rng.binomial(REQUESTS_PER_INTERVAL, share))
            n_base, by_base, by_candidate = REQUESTS_PER_INTERVAL - n_candidate, None, None
        else:
            counts = rng.multinomial(REQUESTS_PER_INTERVAL, population.volume)
            on_candidate = population.point < share
            by_base = (np.where(on_candidate, 0, counts), population)
            by_candidate = (np.where(on_candidate, counts, 0), population)
            n_base = n_candidate = 0
        uncounted = scenario.shortfall(state.step)
        if uncounted and by_candidate is None:
            n_candidate = int(rng.binomial(n_candidate, 1 - uncounted))
        elif uncounted and by_candidate is not None:
            by_candidate = (rng.binomial(by_candidate[0], 1 - uncounted), population)  # type: ignore[arg-type]
        base = sample(rng, Arm(), n_base, extra, factor, (groups[0], step[0]), share, by_base)
        candidate = sample(
            rng, scenario.candidate, n_candidate, extra, factor, (groups[1], step[1]), share, by_candidate
        )
        strata.append((base, candidate))
        base_total.merge(base)
        cand_total.merge(candidate)
        if concurrent:
            verdicts = judge(
                scenario.gates, strata, confidence=CONFIDENCE, min_samples=MIN_SAMPLES, groups=groups
            )
            verdicts.append(
                sample_ratio(step, alpha=1 - CONFIDENCE, n_star=10.0 * MIN_SAMPLES, min_samples=MIN_SAMPLES)
            )
        else:
            verdicts = judge(
                scenario.gates, [(base_total, cand_total)], confidence=CONFIDENCE, min_samples=MIN_SAMPLES
            )
        promotes = controller_step(state, STEPS)[1]["phase"] == "promoted"
        decision = decide(verdicts, "rollback", "hold", final=promotes and non_inferiority)
        if decision == "rollback":
            return "rolled_back", cand_total.requests, t + 1
        if any(v.gate == SAMPLE_RATIO and v.result == "fail" for v in verdicts):
            return "mismatch", cand_total.requests, t + 1  # it holds from here: what the run measures
        if decision == "advance":
            reason, changes = controller_step(state, STEPS)
            state = state.moved(reason=reason, by="controller", **changes)
            step = ([ArmWindow() for _ in range(UNIT_GROUPS)], [ArmWindow() for _ in range(UNIT_GROUPS)])
            if state.phase == "promoted":
                return "promoted", cand_total.requests, t + 1
    return "held", cand_total.requests, MAX_INTERVALS


CURVE = (0.0, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.006)  # validation failures added (fractions)


def _runs(task: tuple[str, str, int, int, int]) -> tuple[str, list[tuple[str, int, int]], list[int]]:
    """One chunk of runs of one scenario (a worker's share): (result name, outcomes, intervals from a
    shortfall's start to the mismatch found)."""
    name, how, runs, seed, chunk = task
    rng = np.random.default_rng([seed, chunk, zlib.crc32(f"{name}|{how}".encode())])
    if name.startswith("curve "):
        scenario = Scenario(Arm(invalid_rate=0.01 + float(name.split()[1])))
    else:
        scenario = SCENARIOS[name]
    outcomes, found = [], []
    with contextlib.ExitStack() as stack:
        if how == "naive":
            stack.enter_context(mock.patch.object(gateway.analysis, "boundary", fixed_sample_z))
        for _ in range(runs):
            began = [-1]
            if how == "pooled":  # as before: one window per arm, promotion on the estimate
                outcomes.append(rollout(rng, scenario, concurrent=False, non_inferiority=False))
            else:
                outcomes.append(rollout(rng, scenario, began=began))
            if outcomes[-1][0] == "mismatch" and began[0] >= 0:
                found.append(outcomes[-1][2] - began[0])
    label = {"now": name, "pooled": f"{name} (pooled)", "naive": "naive"}[how]
    return label, outcomes, found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument(
        "--curve", action="store_true", help="also the promotion probability against the regression's size"
    )
    args = parser.parse_args()
    tasks = [(name, "now") for name in SCENARIOS]
    tasks += [(name, "pooled") for name in SCENARIOS if name not in SRM_SCENARIOS]  # pooled saw no shares
    tasks.append(("identical", "naive"))
    if args.curve:
        tasks += [(f"curve {added}", "now") for added in CURVE]
    chunks = max(1, args.jobs * 4)
    work = [
        (name, how, args.runs // chunks + (chunk < args.runs % chunks), args.seed, chunk)
        for name, how in tasks
        for chunk in range(chunks)
    ]
    results: dict[str, list[tuple[str, int, int]]] = {}
    detected: dict[str, list[int]] = {}  # intervals from the shortfall's start to the mismatch found
    with multiprocessing.Pool(args.jobs) as pool:
        for label, outcomes, found in pool.imap_unordered(_runs, work):
            results.setdefault(label, []).extend(outcomes)
            detected.setdefault(label, []).extend(found)

    def share(
        name: str, outcome: str, within: float = float("inf"), intervals: float = float("inf")
    ) -> float:
        runs = results[name]
        return sum(1 for o, n, t in runs if o == outcome and n <= within and t <= intervals) / len(runs)

    identical = [name for name in SCENARIOS if name.startswith("identical")]
    rows = [
        *((f"{name}: rolled back", share(name, "rolled_back"), "<= 1%", 0.0, 0.01) for name in identical),
        (
            "validation 1% -> 2%: rolled back within 6,000 candidate requests",
            share("validation 1% -> 2%", "rolled_back", 6000),
            ">= 95%",
            0.95,
            1.0,
        ),
        ("p99 latency +20%: rolled back", share("p99 latency +20%", "rolled_back"), ">= 90%", 0.9, 1.0),
        (
            "validation 1% -> 1.3% against +0.2 points: promoted",
            share("validation 1% -> 1.3% against +0.2 points", "promoted"),
            "<= 2%",
            0.0,
            0.02,
        ),
        (
            "identical: promoted within 30 intervals",
            share("identical", "promoted", intervals=30),
            ">= 90%",
            0.9,
            1.0,
        ),
        ("identical, plain test at every look: rolled back", share("naive", "rolled_back"), "—", 0, 1),
        *(
            (f"{name}: held by a false sample-ratio mismatch", share(name, "mismatch"), "<= 1%", 0.0, 0.01)
            for name in identical
            if name not in SRM_SCENARIOS
        ),
        *(
            (
                f"{name}: mismatch found within 5 intervals of its start",
                sum(1 for d in detected.get(name, []) if d <= 5) / args.runs,
                ">= 95%" if "25%" in name else "—",
                0.95 if "25%" in name else 0.0,
                1.0,
            )
            for name in sorted(SRM_SCENARIOS)
        ),
    ]
    print(
        f"{args.runs} rollouts per scenario, steps {list(STEPS)}, {REQUESTS_PER_INTERVAL} requests/interval"
    )
    print("| scenario | concurrent (now) | pooled (before) | target |\n|---|---|---|---|")
    ok = True
    for label, value, target, low, high in rows:
        name, _, measured = label.partition(": ")
        pooled = f"{name} (pooled)"
        outcome = "promoted" if measured.startswith("promoted") else "rolled_back"
        if "mismatch" in measured:
            outcome, pooled = "mismatch", ""  # nothing looked at the shares before
        within = 6000 if "6,000" in measured else float("inf")
        intervals = 30 if "30 intervals" in measured else float("inf")
        before = f"{share(pooled, outcome, within, intervals) * 100:.1f}%" if pooled in results else "—"
        print(f"| {label} | {value * 100:.1f}% | {before} | {target} |")
        ok &= low <= value <= high
    for name, runs in sorted(results.items()):
        outcomes = {
            o: sum(1 for x, _, _ in runs if x == o) for o in ("promoted", "rolled_back", "held", "mismatch")
        }
        caught = sorted(n for o, n, _ in runs if o == "rolled_back")
        promoted = sorted(t for o, _, t in runs if o == "promoted")
        median = caught[len(caught) // 2] if caught else 0
        took = promoted[len(promoted) // 2] if promoted else 0
        found = sorted(detected.get(name, []))
        print(
            f"  {name}: {outcomes}, median candidate requests at rollback {median}, "
            f"median intervals to promotion {took}"
            + (f", median intervals to find the mismatch {found[len(found) // 2]}" if found else "")
        )
    if args.curve:
        print("\nvalidation failures 1% -> 1% + x against +0.2 points (default gates): outcome shares")
        print("| x (points) | promoted | rolled back | held (150 intervals) |\n|---|---|---|---|")
        for added in CURVE:
            name = f"curve {added}"
            cells = " | ".join(f"{share(name, o) * 100:.1f}%" for o in ("promoted", "rolled_back", "held"))
            print(f"| +{added * 100:.2f} | {cells} |")
    print(f"targets: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
