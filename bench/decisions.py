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

Usage: python bench/decisions.py [--runs 1000] [--seed 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gateway.analysis
from gateway.analysis import BUCKET_BASE_S, BUCKET_FACTOR, BUCKETS, ArmWindow, decide, judge
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
}


def sample(rng: np.random.Generator, arm: Arm, n: int, extra: float = 0.0, factor: float = 1.0) -> ArmWindow:
    window = ArmWindow(requests=n)
    if n == 0:
        return window
    window.errors = int(rng.binomial(n, arm.error_rate))
    window.invalid = int(rng.binomial(n, arm.invalid_rate + extra))
    latency = rng.lognormal(mean=np.log(0.8), sigma=0.5, size=n) * arm.latency_scale * factor
    buckets = np.minimum(np.searchsorted(EDGES, latency), BUCKETS - 1)
    indices, counts = np.unique(buckets, return_counts=True)
    window.latency = dict(zip(indices.tolist(), counts.tolist(), strict=True))
    return window


def fixed_sample_z(n: float, alpha: float, n_star: float) -> float:
    """What a plain one-sided test at the rollout's level (1 - CONFIDENCE) would use at every look,
    for every gate: the normal quantile, blind to the looks and to the number of gates."""
    return statistics.NormalDist().inv_cdf(CONFIDENCE) if n > 0 else float("inf")


def rollout(
    rng: np.random.Generator, scenario: Scenario, concurrent: bool = True, non_inferiority: bool = True
) -> tuple[str, int, int]:
    """(outcome, candidate requests seen when it ended, intervals it took): promoted, rolled_back or
    held. non_inferiority: promotion needs every gate's whole interval within its threshold."""
    strata: list[tuple[ArmWindow, ArmWindow]] = []
    base_total, cand_total = ArmWindow(), ArmWindow()
    state = RouteState("r", "k", "progressing", STEPS[0], True, 0, None, 1, 0.0)
    for t in range(MAX_INTERVALS):
        extra, factor = scenario.drift(t, state.step)
        n_candidate = int(rng.binomial(REQUESTS_PER_INTERVAL, state.weight / 100))
        base = sample(rng, Arm(), REQUESTS_PER_INTERVAL - n_candidate, extra, factor)
        candidate = sample(rng, scenario.candidate, n_candidate, extra, factor)
        strata.append((base, candidate))
        base_total.merge(base)
        cand_total.merge(candidate)
        judged = strata if concurrent else [(base_total, cand_total)]
        verdicts = judge(scenario.gates, judged, confidence=CONFIDENCE, min_samples=MIN_SAMPLES)
        promotes = controller_step(state, STEPS)[1]["phase"] == "promoted"
        decision = decide(verdicts, "rollback", "hold", final=promotes and non_inferiority)
        if decision == "rollback":
            return "rolled_back", cand_total.requests, t + 1
        if decision == "advance":
            reason, changes = controller_step(state, STEPS)
            state = state.moved(reason=reason, by="controller", **changes)
            if state.phase == "promoted":
                return "promoted", cand_total.requests, t + 1
    return "held", cand_total.requests, MAX_INTERVALS


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    results = {}
    for name, scenario in SCENARIOS.items():
        results[name] = [rollout(rng, scenario) for _ in range(args.runs)]
        results[f"{name} (pooled)"] = [  # as before: one window per arm, promotion on the estimate
            rollout(rng, scenario, concurrent=False, non_inferiority=False) for _ in range(args.runs)
        ]
    with mock.patch.object(gateway.analysis, "boundary", fixed_sample_z):
        results["naive"] = [rollout(rng, SCENARIOS["identical"]) for _ in range(args.runs)]

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
        within = 6000 if "6,000" in measured else float("inf")
        intervals = 30 if "30 intervals" in measured else float("inf")
        before = f"{share(pooled, outcome, within, intervals) * 100:.1f}%" if pooled in results else "—"
        print(f"| {label} | {value * 100:.1f}% | {before} | {target} |")
        ok &= low <= value <= high
    for name, runs in results.items():
        outcomes = {o: sum(1 for x, _, _ in runs if x == o) for o in ("promoted", "rolled_back", "held")}
        caught = sorted(n for o, n, _ in runs if o == "rolled_back")
        promoted = sorted(t for o, _, t in runs if o == "promoted")
        median = caught[len(caught) // 2] if caught else 0
        took = promoted[len(promoted) // 2] if promoted else 0
        print(
            f"  {name}: {outcomes}, median candidate requests at rollback {median}, "
            f"median intervals to promotion {took}"
        )
    print(f"targets: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
