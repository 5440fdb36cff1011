"""Decision quality of the canary controller, by simulation: many whole rollouts, no servers.

Each rollout walks the policy's steps as the controller does, judging the gates at the end of every
interval (with gateway.analysis, the controller's own code) on the windows accumulated since the
rollout began. Traffic per interval is fixed; the candidate's share is the current weight. Requests fail,
fail validation and take time at the rates each scenario sets.

Targets (issue 6): an identical candidate is rolled back in <= 1% of whole rollouts; a candidate whose
validation failures go from 1% to 2% is rolled back within 6,000 candidate requests in >= 95% of runs;
a 20% p99 latency regression is caught in >= 90%.

For contrast, the identical candidate is also run with a plain fixed-sample test at every look (the
same gates and levels, the boundary replaced by the normal quantile): what the sequential method buys.

Usage: python bench/decisions.py [--runs 1000] [--seed 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gateway.analysis
from gateway.analysis import BUCKET_BASE_S, BUCKET_FACTOR, BUCKETS, ArmWindow, decide, judge
from gateway.policy import Gates, RateGate, RatioGate

STEPS = (1, 5, 25, 50, 100)
REQUESTS_PER_INTERVAL = 10_000
MAX_INTERVALS = 300
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


SCENARIOS = {
    "identical": Arm(),
    "validation 1% -> 2%": Arm(invalid_rate=0.02),
    "p99 latency +20%": Arm(latency_scale=1.2),
}


def sample(rng: np.random.Generator, arm: Arm, n: int) -> ArmWindow:
    window = ArmWindow(requests=n)
    if n == 0:
        return window
    window.errors = int(rng.binomial(n, arm.error_rate))
    window.invalid = int(rng.binomial(n, arm.invalid_rate))
    latency = rng.lognormal(mean=np.log(0.8), sigma=0.5, size=n) * arm.latency_scale
    buckets = np.minimum(np.searchsorted(EDGES, latency), BUCKETS - 1)
    indices, counts = np.unique(buckets, return_counts=True)
    window.latency = dict(zip(indices.tolist(), counts.tolist(), strict=True))
    return window


def fixed_sample_z(n: float, alpha: float, n_star: float) -> float:
    """What a plain one-sided test at the rollout's level (1 - CONFIDENCE) would use at every look,
    for every gate: the normal quantile, blind to the looks and to the number of gates."""
    return statistics.NormalDist().inv_cdf(CONFIDENCE) if n > 0 else float("inf")


def rollout(rng: np.random.Generator, candidate: Arm) -> tuple[str, int]:
    """(outcome, candidate requests seen when it ended): promoted, rolled_back or held."""
    base_total, cand_total = ArmWindow(), ArmWindow()
    step = 0
    for _ in range(MAX_INTERVALS):
        n_candidate = int(rng.binomial(REQUESTS_PER_INTERVAL, STEPS[step] / 100))
        base_total.merge(sample(rng, Arm(), REQUESTS_PER_INTERVAL - n_candidate))
        cand_total.merge(sample(rng, candidate, n_candidate))
        verdicts = judge(GATES, base_total, cand_total, confidence=CONFIDENCE, min_samples=MIN_SAMPLES)
        decision = decide(verdicts, "rollback", "hold")
        if decision == "rollback":
            return "rolled_back", cand_total.requests
        if decision == "advance":
            if step == len(STEPS) - 1:
                return "promoted", cand_total.requests
            step += 1
    return "held", cand_total.requests


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    results = {name: [rollout(rng, arm) for _ in range(args.runs)] for name, arm in SCENARIOS.items()}
    with mock.patch.object(gateway.analysis, "boundary", fixed_sample_z):
        results["naive"] = [rollout(rng, SCENARIOS["identical"]) for _ in range(args.runs)]

    def share(name: str, outcome: str, within: float = float("inf")) -> float:
        runs = results[name]
        return sum(1 for o, n in runs if o == outcome and n <= within) / len(runs)

    rows = [
        ("identical candidate rolled back", share("identical", "rolled_back"), "<= 1%", 0.0, 0.01),
        (
            "validation 1% -> 2%: rolled back within 6,000 candidate requests",
            share("validation 1% -> 2%", "rolled_back", 6000),
            ">= 95%",
            0.95,
            1.0,
        ),
        ("p99 latency +20%: rolled back", share("p99 latency +20%", "rolled_back"), ">= 90%", 0.9, 1.0),
        (
            "identical, plain test at every look: rolled back",
            share("naive", "rolled_back"),
            "—",
            0,
            1,
        ),
    ]
    print(
        f"{args.runs} rollouts per scenario, steps {list(STEPS)}, {REQUESTS_PER_INTERVAL} requests/interval"
    )
    print("| scenario | measured | target |\n|---|---|---|")
    ok = True
    for label, value, target, low, high in rows:
        print(f"| {label} | {value * 100:.1f}% | {target} |")
        ok &= low <= value <= high
    for name, runs in results.items():
        outcomes = {o: sum(1 for x, _ in runs if x == o) for o in ("promoted", "rolled_back", "held")}
        caught = sorted(n for o, n in runs if o == "rolled_back")
        median = caught[len(caught) // 2] if caught else 0
        print(f"  {name}: {outcomes}, median candidate requests at rollback {median}")
    print(f"targets: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
