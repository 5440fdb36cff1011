"""What can be done to a route's rollout: set the weight, pause, resume, promote, roll back. The admin
API and the CLI call these; every change is a versioned transition with a reason and who made it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from gateway.analysis import (
    SAMPLE_RATIOS,
    UNIT_GROUPS,
    ArmWindow,
    Groups,
    Paired,
    Verdict,
    decide,
    judge,
    sample_ratio,
    units_ratio,
)
from gateway.errors import Conflict, InvalidRequest, ModelNotFound, Unavailable
from gateway.policy import LIVE_ONLY_GATES
from gateway.readiness import ArmReadiness
from gateway.route import Route, RouteArm
from gateway.store import StateUnavailable
from gateway.store.lease import Lease
from gateway.store.rollouts import RolloutStore, RouteState, VersionConflict, applied, change, skewed
from gateway.store.stats import STATS_TTL_S, UNITS, StatsStore, units_interval
from gateway.tracing import Tracing

log = logging.getLogger("gateway.rollout")

MISMATCH = "held: sample ratio mismatch, the arms do not receive what the weight says"
MAX_INTERVALS = 5000  # the analysis window never reads more intervals than this
EMPTY = ArmWindow()  # an arm with nothing in an interval (read only)


# Phases without shadow traffic: nothing is being judged on it (paused, ended).
NO_SHADOWS = frozenset({"preflight", "paused", "promoted", "rolled_back"})
JUDGED = frozenset({"shadow", "progressing"})  # the phases the controller moves; the rest are an operator's
ROLLED_BACK: dict[str, Any] = {"phase": "rolled_back", "weight": 0.0, "mirror": False, "resume_to": None}
OperatorAction = Literal["pause", "resume", "promote", "rollback", "set_weight"]


def operator_change(
    state: RouteState, action: OperatorAction, *, has_candidate: bool, weight: float = 0.0
) -> dict[str, Any]:
    """What an operator's action changes in a rollout's state, or Conflict when it does not apply to it.
    Pure, so that it is decided on the state it is written on: a write that meets a newer state decides
    again on that one (a pause that meets a promotion is refused, not written over it)."""
    name, phase = state.route, state.phase
    if action == "pause":
        if phase in ("paused", "promoted", "rolled_back"):
            raise Conflict(f"route {name!r} is {phase}: there is nothing to pause")
        return {"phase": "paused", "resume_to": phase}
    if action == "resume":
        if phase != "paused":
            raise Conflict(f"route {name!r} is {phase}, not paused")
        return {"phase": state.resume_to or "manual", "resume_to": None}
    if action == "promote":
        if not has_candidate:
            raise Conflict(f"route {name!r} has no candidate arm to promote")
        return {"phase": "promoted", "weight": 100.0, "resume_to": None}
    if action == "rollback":
        return dict(ROLLED_BACK)
    if not has_candidate and weight > 0:
        raise Conflict(f"route {name!r} has no candidate arm: only weight 0 is possible")
    return {"phase": "manual", "weight": weight, "mirror": True, "resume_to": None}


def controller_step(state: RouteState, steps: Sequence[float]) -> tuple[str, dict[str, Any]]:
    """The controller's move when every gate passed: the next step, or promotion after the last. A step
    at 100% is the promotion itself: with no base traffic left, nothing could be compared there (every
    gate compares the arms over the same intervals only)."""
    following = state.step + 1
    if following < len(steps) and steps[following] < 100:
        reason = f"gates passed: step {following + 1} of {len(steps)}, weight {steps[following]:g}%"
        return reason, {"phase": "progressing", "step": following, "weight": steps[following]}
    judged = min(following, len(steps))  # the steps walked: not one at 100%
    return f"gates passed at every step: promoted after {judged} steps", {
        "phase": "promoted",
        "weight": 100.0,
    }


def preflight_change(route: Route, recorded: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Where a pre-flight verdict takes the rollout: passed, to the mirror-only phase (shadow_first) or the
    first step, its analysis window opening then; failed, rolled back (or held, with on_fail: hold);
    undecided, held. The reason is the report's summary."""
    auto = route.automatic
    assert auto is not None
    assert auto.steps
    summary = str(recorded.get("summary") or f"pre-flight {recorded['verdict']}")
    verdict = recorded["verdict"]
    if verdict == "pass":
        now = time.time()
        if auto.shadow_first:
            changes = {"phase": "shadow", "step": -1, "weight": 0.0}
        else:
            changes = {"phase": "progressing", "step": 0, "weight": auto.steps[0]}
        return summary, {**changes, "started_at": now, "step_at": now}
    if verdict == "fail" and auto.on_fail == "rollback":
        return summary, dict(ROLLED_BACK)
    return f"held in pre-flight: {summary}", {}


def effective(route: Route, state: RouteState | None) -> Route:
    """The route as it serves now: the policy's, with the weight (and mirror switch) of its state. A
    replica whose policy is not the active rollout's serves the base only: the safe side."""
    if state is None:
        return route
    if skewed(route, state):
        return (
            route if route.weight == 0 and route.mirror is None else replace(route, weight=0.0, mirror=None)
        )
    mirror = route.mirror if state.mirror and state.phase not in NO_SHADOWS else None
    if state.weight == route.weight and mirror is route.mirror:
        return route
    return replace(route, weight=state.weight, mirror=mirror)


class Rollouts:
    def __init__(
        self, store: RolloutStore, policy_route: Callable[[str], Route | None], tracing: Tracing | None = None
    ) -> None:
        self._store = store
        self._tracing = tracing
        self._policy_route = policy_route  # name -> the route as its policy compiled it (or None)

    async def replayed(self, name: str, key: str) -> RouteState | None:
        """The state, when the operator's change with this Idempotency-Key was applied already (its answer
        was lost): read from the store first, since this replica may not have seen the write yet."""
        try:
            await self._store.refresh()
        except StateUnavailable as exc:
            raise Unavailable(
                "the rollout state store (Redis) cannot be reached: nothing was changed"
            ) from exc
        _, state = self.view(name)
        return state if applied(state, key) else None

    def current(self, name: str) -> RouteState | None:
        return self._store.current(name)

    def view(self, name: str) -> tuple[Route, RouteState]:
        route = self._policy_route(name)
        state = self._store.current(name) if route is not None else None
        if route is None or state is None:
            raise ModelNotFound(f"no route {name[:100]!r} on this gateway", param="route")
        return route, state

    async def set_weight(
        self, name: str, weight: float, by: str, reason: str | None, key: str | None = None
    ) -> RouteState:
        if not 0 <= weight <= 100:
            raise InvalidRequest(f"weight must be a percent in [0, 100], got {weight:g}", param="weight")
        return await self._operator(
            name, "set_weight", by, reason or f"weight set to {weight:g}", key, weight
        )

    async def pause(self, name: str, by: str, reason: str | None, key: str | None = None) -> RouteState:
        return await self._operator(name, "pause", by, reason or "paused", key)

    async def resume(self, name: str, by: str, reason: str | None, key: str | None = None) -> RouteState:
        return await self._operator(name, "resume", by, reason or "resumed", key)

    async def promote(self, name: str, by: str, reason: str | None, key: str | None = None) -> RouteState:
        return await self._operator(name, "promote", by, reason or "promoted", key)

    async def _operator(
        self, name: str, action: OperatorAction, by: str, reason: str, key: str | None, weight: float = 0.0
    ) -> RouteState:
        route, state = self.view(name)
        has_candidate = route.candidate is not None
        if key is None or not applied(state, key):
            operator_change(state, action, has_candidate=has_candidate, weight=weight)  # refused early
        return await self.move(
            name,
            by,
            reason,
            key=key,
            decide=lambda newest: operator_change(newest, action, has_candidate=has_candidate, weight=weight),
        )

    async def record_preflight(self, name: str, recorded: dict[str, Any], by: str) -> RouteState:
        """A pre-flight run elsewhere (canarygate preflight --record), for the same base and candidate: the
        rollout waiting in its pre-flight phase moves by its verdict, as if the controller had run it."""
        route, state = self.view(name)
        models = recorded.get("models") or {}
        if route.candidate is None or route.automatic is None or route.automatic.preflight is None:
            raise Conflict(
                f"route {name!r} has no pre-flight phase (rollout.preflight) to record a verdict in"
            )
        wanted = {"base": route.base.model, "candidate": route.candidate.model}
        if models != wanted:
            raise Conflict(
                f"the pre-flight compared base {models.get('base')!r} with candidate "
                f"{models.get('candidate')!r}; route {name!r} rolls out {wanted['candidate']!r} behind "
                f"{wanted['base']!r}"
            )
        reason, changes = preflight_change(route, recorded)

        def decide(newest: RouteState) -> dict[str, Any]:
            if newest.phase != "preflight":
                raise Conflict(
                    f"route {name!r} is {newest.phase}, not in its pre-flight phase: a verdict is recorded "
                    "while the rollout waits there (a new rollout of the route starts there)"
                )
            return changes

        decide(state)
        return await self.move(
            name, by, f"recorded by {by}: {reason}", decide=decide, gates=recorded["gates"]
        )

    async def rollback(
        self,
        name: str,
        by: str,
        reason: str | None,
        gates: list[dict[str, Any]] | None = None,
        basis: RouteState | None = None,
        key: str | None = None,
    ) -> RouteState:
        self.view(name)
        return await self.move(name, by, reason or "rolled back", basis, key=key, gates=gates, **ROLLED_BACK)

    async def move(
        self,
        name: str,
        by: str,
        reason: str,
        basis: RouteState | None = None,
        key: str | None = None,
        decide: Callable[[RouteState], dict[str, Any]] | None = None,
        **changes: Any,
    ) -> RouteState:
        """basis: the state a controller move was judged on; key: an operator's Idempotency-Key; decide:
        the changes, decided on the state they are written on (see store.rollouts.change)."""
        try:
            state = await change(self._store, name, by, reason, basis, key, decide, **changes)
        except StateUnavailable as exc:
            if exc.maybe_applied:
                raise Unavailable(
                    "the rollout state store (Redis) did not answer in time: the change may or may not "
                    "have been applied; check `canarygate status`, or send it again with the same "
                    "Idempotency-Key header, which applies it at most once"
                ) from exc
            raise Unavailable(
                "the rollout state store (Redis) cannot be reached: nothing was changed; "
                "traffic keeps the last state seen"
            ) from exc
        if self._tracing is not None:  # here, where the change is made: one span, not one per replica
            self._tracing.rollout_transition(name, state.version, state.phase, state.weight, reason, by)
        return state


@dataclass(frozen=True)
class Analysis:
    """The gates over the rollout's window so far, and the raw numbers of its last interval."""

    route: str
    phase: str
    candidate_arm: str  # "candidate", or "shadow" when the candidate is judged on its shadow calls
    verdicts: list[Verdict]
    window: tuple[ArmWindow, ArmWindow]  # (base, candidate) since the rollout began
    last: tuple[ArmWindow, ArmWindow]  # the same for the last complete interval
    interval_s: float
    fresh: int  # candidate requests since the current step began: a step is never passed unseen
    truncated: str | None = None  # why the window no longer covers the whole rollout: the rollout holds
    strata: list[tuple[int, ArmWindow, ArmWindow]] = field(default_factory=list)  # (interval, base, cand.)
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)  # per evaluator: see evaluated()


def measured_arm(current: RouteState) -> str:
    """What the candidate is judged on: its shadow calls while no user is served by it (the mirror-only
    phase, a pause or an end reached from it, manual mode at weight 0), its own answers otherwise."""
    phase = current.phase
    if phase == "paused":
        phase = current.resume_to or "manual"
    if phase in ("rolled_back", "promoted") and len(current.history) >= 2:
        before = current.history[-2]  # where the rollout stood when it ended
        phase = "shadow" if before.phase == "shadow" or before.weight == 0 else "progressing"
    if phase == "shadow" or (phase == "manual" and current.weight == 0):
        return "shadow"
    return "candidate"


async def analyse(stats: StatsStore, route: Route, current: RouteState, now: float | None = None) -> Analysis:
    """The gates of the route's rollout section over the rollout so far (automatic and manual mode)."""
    auto = route.rollout
    arm = measured_arm(current)
    now_s = time.time() if now is None else now
    now_interval = int(now_s // auto.interval_s)
    start = int(current.started_at // auto.interval_s)
    first = max(start, now_interval - MAX_INTERVALS)
    truncated = None
    if first > start or now_s - current.started_at > STATS_TTL_S:  # the window would slide: not a test
        truncated = (
            f"held: the rollout has run longer than its statistics are kept ({MAX_INTERVALS} intervals, "
            f"{STATS_TTL_S // 86400} days): promote or roll back by hand, or start it again"
        )
    last_step = max(len(auto.steps or []) - 1, 0)  # manual mode: step 0
    by_step = await stats.read(route.name, route.rollout_key, range(units_interval(last_step), UNITS + 1))
    units: dict[str, ArmWindow] = {}  # the whole rollout's, for the design effects
    for windows in by_step.values():
        for name, window in windows.items():
            units.setdefault(name, ArmWindow()).merge(window)
    stored = await stats.read(route.name, route.rollout_key, range(first, now_interval + 1))
    base, candidate = ArmWindow(), ArmWindow()
    for arms in stored.values():
        base.merge(arms.get("base", ArmWindow()))
        candidate.merge(arms.get(arm, ArmWindow()))
    step_interval = int(current.step_at // auto.interval_s)
    fresh = sum(arms.get(arm, ArmWindow()).requests for i, arms in stored.items() if i >= step_interval)
    previous = stored.get(now_interval - 1, {})
    last = (previous.get("base", ArmWindow()), previous.get(arm, ArmWindow()))
    segments = auto.segments if route.cohorts is not None else None
    cohorts = route.cohorts.names if route.cohorts is not None and segments is not None else ()
    # The error budget is shared by the aggregate and every cohort that may be judged alone.
    confidence = 1 - (1 - auto.confidence) / (1 + len(cohorts))
    labelled = [(i, arms.get("base", EMPTY), arms.get(arm, EMPTY)) for i, arms in sorted(stored.items())]
    strata = [(b, c) for _, b, c in labelled]
    kw: dict[str, Any] = {"confidence": confidence, "min_samples": auto.min_samples}
    on_pairs = frozenset(e.name for e in route.policy.evaluation.evaluators if e.on_pairs)

    def paired(cohort: str | None = None) -> Paired:
        """The shadow pairs' windows (base, shadow) per interval, for the quality gates judged on pairs."""
        at = f"@{cohort}" if cohort else ""
        windows = [(arms.get(f"base{at}", EMPTY), arms.get(f"shadow{at}", EMPTY)) for arms in stored.values()]
        return Paired(windows, unit_groups(units, "shadow", cohort), on_pairs)

    gates = auto.gates
    if arm == "shadow":  # shadow calls get no feedback and make no trace: those gates wait for users
        gates = gates.model_copy(update=dict.fromkeys(LIVE_ONLY_GATES))
    verdicts = judge(gates, strata, groups=unit_groups(units, arm), paired=paired(), **kw)
    total = base.requests + candidate.requests
    for cohort in cohorts:
        pairs = [
            (arms.get(f"base@{cohort}", EMPTY), arms.get(f"{arm}@{cohort}", EMPTY))
            for arms in stored.values()
        ]
        served = sum(b.requests + c.requests for b, c in pairs)
        assert segments is not None
        if total and served / total >= segments.min_share:
            judged = judge(gates, pairs, groups=unit_groups(units, arm, cohort), paired=paired(cohort), **kw)
            verdicts.extend(replace(v, cohort=cohort) for v in judged)
    if arm == "candidate":
        step = by_step.get(units_interval(current.step), {})  # the weight the check expects is the step's
        if not (route.by_trace and any(window.traces for window in step.values())):
            # Assigned by trace, an arm's share of requests is its share of traces times its steps per
            # trace, which a candidate changes by design: only the units' share (traces seen) can tell.
            verdicts.extend(sample_ratios(step, route, auto.confidence, auto.min_samples))
        verdicts.extend(await units_ratios(stats, route, current, auto.confidence, auto.min_samples))
    return Analysis(
        route.name, current.phase, arm, verdicts, (base, candidate), last, auto.interval_s, fresh, truncated,
        labelled, evaluated(route, stored),
    )  # fmt: skip


def evaluated(route: Route, stored: dict[int, dict[str, ArmWindow]]) -> dict[str, dict[str, Any]]:
    """Each evaluator's results over the rollout so far: for a score, each arm's mean and count (shadow: the
    candidate's shadow answers and, for a tool choice, its agreement with the base; the base's agreement
    with itself on the noise floor); for a pairwise judge, the candidate's wins, ties, losses and flips,
    and the same for the noise floor's base-against-base pairs (how the judge behaves with no difference)."""
    merged: dict[str, ArmWindow] = {}
    for arms in stored.values():
        for name in ("base", "candidate", "shadow", "noise"):
            if name in arms:
                merged.setdefault(name, ArmWindow()).merge(arms[name])
    out: dict[str, dict[str, Any]] = {}
    for evaluator in route.policy.evaluation.evaluators:
        rows: dict[str, Any] = {}
        for arm, window in merged.items():
            kept = window.scores.get(evaluator.name)
            if not kept or not kept[0]:
                continue
            n, total, squares, flips = kept
            if evaluator.kind == "pairwise":
                rows[arm] = {
                    "pairs": int(n),
                    "wins": round((squares - total) / 2),
                    "losses": round((squares + total) / 2),
                    "ties": round(n - squares),
                    "flips": int(flips),
                }
            else:
                rows[arm] = {"results": int(n), "mean": total / n}
        out[evaluator.name] = {"kind": evaluator.kind, "sample": evaluator.sample, **rows}
    return out


def unit_groups(units: dict[str, ArmWindow], arm: str, cohort: str | None = None) -> Groups | None:
    """The (base, candidate) windows per unit group over the rollout, in one cohort or all of them; None
    when nothing was counted by group."""
    if not units:
        return None
    base = [ArmWindow() for _ in range(UNIT_GROUPS)]
    candidate = [ArmWindow() for _ in range(UNIT_GROUPS)]
    for name, window in units.items():
        who, _, group = name.rpartition("#")
        side, _, in_cohort = who.partition("@")
        if (cohort is None or in_cohort == cohort) and side in ("base", arm) and group.isdigit():
            number = int(group)
            if number < UNIT_GROUPS:
                (base if side == "base" else candidate)[number].merge(window)
    return base, candidate


def sample_ratios(
    units: dict[str, ArmWindow], route: Route, confidence: float, min_samples: int
) -> list[Verdict]:
    """The sample-ratio check over the current step, and per cohort when the route has cohorts: the level
    (1 - confidence) shared among them, apart from the gates' (a mismatch holds; it never rolls back)."""
    cohorts = route.cohorts.names if route.cohorts is not None else ()
    alpha = (1 - confidence) / (1 + len(cohorts))
    n_star = 10.0 * min_samples
    checks = []
    for cohort in (None, *cohorts):
        groups = unit_groups(units, "candidate", cohort)
        if groups is not None:
            verdict = sample_ratio(groups, alpha=alpha, n_star=n_star, min_samples=min_samples)
            checks.append(replace(verdict, cohort=cohort or "all"))
    return checks


async def units_ratios(
    stats: StatsStore, route: Route, current: RouteState, confidence: float, min_samples: int
) -> list[Verdict]:
    """The sample-ratio check of the distinct units each arm served in the current step, per cohort (a
    unit may be in several cohorts, so there is no sum over them): only while the controller walks the
    steps, where the weight is the step's (an operator may change a manual weight at any moment)."""
    phase = current.resume_to if current.phase == "paused" else current.phase
    if phase != "progressing" or current.step < 0:
        return []
    cohorts = route.cohorts
    names = [c for c in cohorts.names if c in cohorts.candidate_may_serve] if cohorts is not None else ["all"]
    arms = [f"{arm}@{cohort}" for cohort in names for arm in ("base", "candidate")]
    counts = await stats.units(route.name, route.rollout_key, units_interval(current.step), arms)
    alpha = (1 - confidence) / max(len(names), 1)
    checks = []
    for cohort in names:
        verdict = units_ratio(
            counts[f"base@{cohort}"],
            counts[f"candidate@{cohort}"],
            current.weight / 100,
            alpha=alpha,
            n_star=10.0 * min_samples,
            min_samples=min_samples,
        )
        checks.append(replace(verdict, cohort=cohort))
    return checks


class Controller:
    """Walks automatic rollouts step by step. One replica at a time holds the lease (without Redis: this
    process); the others serve what it decides. Critical gates are checked every tick; every gate at
    the end of each interval."""

    LEASE_S = 10.0

    def __init__(
        self,
        lease: Lease,
        stats: StatsStore,
        rollouts: Rollouts,
        routes: Callable[[], list[Route]],
        on_analysis: Callable[[Analysis], object] | None = None,
        tick_s: float = 1.0,
        ready: Callable[[RouteArm], Awaitable[ArmReadiness]] | None = None,
        clock: Callable[[], float] = time.time,
        preflight: Callable[[Route], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self._lease = lease
        self._stats = stats
        self._ready = ready
        self._clock = clock
        self._rollouts = rollouts
        self._routes = routes
        self._on_analysis = on_analysis
        self._tick_s = tick_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._judged: dict[str, tuple[int, float]] = {}  # route -> (state version, when judged)
        self.leading = False
        self._preflight = preflight  # runs a route's pre-flight, returns what its report records
        # route -> (the pre-flight phase it runs for: rollout and when the phase began, its run)
        self._preflights: dict[str, tuple[tuple[str, float], asyncio.Task[dict[str, Any]] | None]] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            leading = await self._lease.lead(self.owner, self.LEASE_S)
            if leading != self.leading:
                log.info("controller lease %s by %s", "taken" if leading else "lost", self.owner)
                self.leading = leading
            if not leading:
                continue
            for route in self._routes():
                try:
                    await self.consider(route)
                except (StateUnavailable, Unavailable):
                    log.warning("route=%s controller holds: the state store cannot be reached", route.name)
                except VersionConflict:  # an operator (or another leader) moved it since it was judged
                    log.info(
                        "route=%s controller move dropped: the rollout changed since it was judged",
                        route.name,
                    )
                except Exception:
                    log.exception("route=%s controller failed to judge the rollout", route.name)

    async def resign(self) -> None:
        """At shutdown: give the lease up, so that another replica leads at its next tick, not after the
        lease's TTL."""
        if self.leading:
            self.leading = False
            await self._lease.resign(self.owner)
            log.info("controller lease given up by %s", self.owner)

    async def consider(self, route: Route) -> None:
        auto = route.automatic
        current = self._rollouts.current(route.name)
        if auto is None or current is None or current.rollout != route.rollout_key:
            return
        if current.phase == "preflight":
            await self._preflight_phase(route, current)
            return
        self._forget_preflight(route.name)
        if current.phase not in JUDGED:
            return
        now = self._clock()
        analysis = await analyse(self._stats, route, current, now)
        if self._on_analysis is not None:
            self._on_analysis(analysis)
        if analysis.truncated is not None:
            if current.history[-1].reason != analysis.truncated:
                await self._rollouts.move(route.name, "controller", analysis.truncated, current)
            return
        version, judged = self._judged.get(route.name, (current.version, current.step_at))
        if version != current.version:
            judged = current.step_at  # someone moved the rollout: its interval starts again
        interval_end = now - judged >= auto.interval_s
        promotes = (
            current.phase == "progressing"
            and controller_step(current, auto.steps or [])[1]["phase"] == "promoted"
        )
        decision = decide(
            analysis.verdicts, auto.on_fail, auto.on_no_data, critical_only=not interval_end, final=promotes
        )
        self._judged[route.name] = (current.version, now if interval_end else judged)
        gates = [asdict(v) for v in analysis.verdicts]
        mismatch = [v for v in analysis.verdicts if v.gate in SAMPLE_RATIOS and v.result == "fail"]
        if mismatch and decision == "hold" and not current.history[-1].reason.startswith(MISMATCH):
            where = "; ".join(f"cohort {v.cohort}: {v.reason}" for v in mismatch)
            await self._rollouts.move(route.name, "controller", f"{MISMATCH} ({where})", current, gates=gates)
            return
        if decision == "rollback":
            failed = [v for v in analysis.verdicts if v.result == "fail" and v.gate not in SAMPLE_RATIOS]
            reason = "; ".join(
                f"{v.gate}{'' if v.cohort == 'all' else f' [cohort {v.cohort}]'} {v.reason}" for v in failed
            )
            await self._rollouts.rollback(route.name, "controller", f"gate failed: {reason}", gates, current)
        elif decision == "advance" and analysis.fresh > 0:
            if current.phase == "shadow" and not await self._candidate_ready(route, current):
                return
            await self._advance(route, current, auto.steps or [], gates)

    async def _preflight_phase(self, route: Route, current: RouteState) -> None:
        """Runs the route's pre-flight once per phase (in the background: the controller goes on judging
        the other routes), then moves the rollout by its verdict. Without a dataset, or without a runner,
        the phase waits for a recorded one."""
        phase = (current.rollout, current.step_at)
        kept = self._preflights.get(route.name)
        policy = route.automatic.preflight if route.automatic is not None else None
        if kept is None or kept[0] != phase:
            self._forget_preflight(route.name)
            if policy is None or policy.dataset is None or self._preflight is None:
                waiting = "held in pre-flight: waiting for a recorded one (canarygate preflight --record)"
                self._preflights[route.name] = (phase, None)
                if current.history[-1].reason != waiting:
                    await self._rollouts.move(route.name, "controller", waiting, current)
                return
            run = asyncio.ensure_future(self._preflight(route))
            self._preflights[route.name] = (phase, run)
            log.info("route=%s pre-flight started on %s", route.name, policy.dataset)
            return
        running = kept[1]
        if running is None or not running.done():
            return
        try:
            recorded = running.result()
        except asyncio.CancelledError:
            self._preflights[route.name] = (phase, None)
            return
        except Exception as exc:  # a set that cannot be read, a judge that cannot be asked: hold, say why
            log.warning("route=%s pre-flight could not run: %s", route.name, exc)
            await self._rollouts.move(
                route.name, "controller", f"held in pre-flight: it could not run: {exc}", current
            )
        else:
            reason, changes = preflight_change(route, recorded)
            log.info("route=%s %s", route.name, reason)
            if changes.get("phase") == "rolled_back":
                await self._rollouts.rollback(route.name, "controller", reason, recorded["gates"], current)
            else:
                await self._rollouts.move(
                    route.name, "controller", reason, current, gates=recorded["gates"], **changes
                )
        # Decided once the move is written: a move the store refused is tried again at the next tick.
        self._preflights[route.name] = (phase, None)

    def _forget_preflight(self, name: str) -> None:
        """The rollout left its pre-flight phase (an operator, a recorded verdict): a run under way stops."""
        kept = self._preflights.pop(name, None)
        if kept is not None and kept[1] is not None:
            kept[1].cancel()

    async def close(self) -> None:
        for name in list(self._preflights):
            self._forget_preflight(name)

    async def _candidate_ready(self, route: Route, current: RouteState) -> bool:
        """Users are served by the candidate only once it answers /models with its model listed; until
        then the rollout holds in the mirror-only phase, and its history says why (once)."""
        if self._ready is None or route.candidate is None:
            return True
        readiness = await self._ready(route.candidate)
        if readiness.ok:
            return True
        reason = f"held in shadow: the candidate is not ready ({readiness.status}): {readiness.detail}"
        if current.history[-1].reason != reason:
            await self._rollouts.move(route.name, "controller", reason, current)
        return False

    async def _advance(
        self, route: Route, current: RouteState, steps: list[float], gates: list[dict[str, Any]]
    ) -> None:
        reason, changes = controller_step(current, steps)
        await self._rollouts.move(route.name, "controller", reason, current, gates=gates, **changes)
