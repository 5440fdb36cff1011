"""Pre-flight: the candidate against the base on a held-out set, before any user sees it, through the
same validators, evaluators and judge as live traffic, judged by the rollout's own gates."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from gateway.policy import EXPECTED_SCORES, Gates
from gateway.policy import Preflight as PreflightPolicy
from gateway.preflight import report as reports
from gateway.preflight.run import Runner
from gateway.route import Route


@dataclass(frozen=True)
class Settings:
    gates: Gates
    confidence: float
    min_samples: int
    samples: int = 1
    concurrency: int = 2

    @classmethod
    def of(cls, route: Route, **overrides: Any) -> Settings:
        """The route's rollout.preflight settings (or, without that section, its rollout's gates that a
        held-out set can measure), with what the command line overrides."""
        rollout = route.policy.rollout
        policy = rollout.preflight or PreflightPolicy()
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(
            gates=policy.judged_gates(rollout.gates),
            confidence=given.get("confidence", rollout.confidence),
            min_samples=given.get("min_samples", policy.min_samples),
            samples=given.get("samples", policy.samples),
            concurrency=given.get("concurrency", policy.concurrency),
        )


class Preflight:
    """One run over a held-out set; report() at any moment (a stopped run's report says so)."""

    def __init__(self, runner: Runner, settings: Settings, dataset: str, *, capture: bool = False) -> None:
        self.settings = settings
        self.dataset = dataset
        self.capture = capture
        self.runner = runner
        self._started = time.monotonic()

    async def run(self, timeout_s: float | None = None) -> dict[str, Any]:
        self._started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                await self.runner.run()
        except TimeoutError:
            return self.report(f"timed out after {timeout_s:g} s")
        return self.report()

    def report(self, interrupted: str | None = None) -> dict[str, Any]:
        outcomes = list(self.runner.outcomes)
        if interrupted is None and len(outcomes) < self.runner.total:
            interrupted = f"{len(outcomes)} of {self.runner.total} answered"
        runner = self.runner
        route = runner.route
        assert route.candidate is not None
        evaluators: dict[str, str] = {e.name: e.kind for e in route.policy.evaluation.evaluators}
        for name in EXPECTED_SCORES:
            if any(name in o.base.scores or name in o.candidate.scores for o in outcomes):
                evaluators[name] = "expected"
        s = self.settings
        return reports.build(
            outcomes, route=route.name, models=(route.base.model, route.candidate.model), gates=s.gates,
            evaluators=evaluators, confidence=s.confidence, min_samples=s.min_samples, dataset=self.dataset,
            items=len(runner.items), samples=runner.samples, interrupted=interrupted, capture=self.capture,
            duration_s=time.monotonic() - self._started,
        )  # fmt: skip
