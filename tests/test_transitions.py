"""The rollout's transition table, whole, as pure functions: every operator action from every phase,
and the controller's moves; then what makes it hold across replicas: an operator's action is decided on
the state it is written on (real Redis), not on the view the replica had when it was asked."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import Conflict
from gateway.rollout import JUDGED, Rollouts, controller_step, operator_change
from gateway.route import Route
from gateway.store import Store
from gateway.store.rollouts import PHASES, Phase, RedisRolloutStore, RouteState, change
from gateway.store.shared import Shared
from gateway.store.stats import units_interval
from gateway.tasks import Spawner
from tests.conftest import REDIS_URL
from tests.test_state import canary_text, routes_of


def state(phase: Phase, step: int = 1, resume_to: Phase | None = None, weight: float = 20.0) -> RouteState:
    now = time.time()
    return RouteState("chat", "r1", phase, weight, True, step, resume_to, 7, now, (), now, now)


REFUSED = "refused"
# (phase before, action) -> the phase after (or REFUSED), for a route with a candidate.
TABLE: dict[tuple[Phase, str], Phase | str] = {
    **{(p, "pause"): "paused" for p in ("shadow", "progressing", "manual")},
    **{(p, "pause"): REFUSED for p in ("paused", "promoted", "rolled_back")},
    **{(p, "resume"): REFUSED for p in PHASES if p != "paused"},
    ("paused", "resume"): "progressing",  # where it was paused from (resume_to)
    **{(p, "promote"): "promoted" for p in PHASES},
    **{(p, "rollback"): "rolled_back" for p in PHASES},
    **{(p, "set_weight"): "manual" for p in PHASES},
}


@pytest.mark.parametrize(("phase", "action"), sorted(TABLE))
def test_every_operator_action_from_every_phase(phase: Phase, action: Any) -> None:
    before = state(phase, resume_to="progressing" if phase == "paused" else None)
    expected = TABLE[(phase, action)]
    if expected == REFUSED:
        with pytest.raises(Conflict):
            operator_change(before, action, has_candidate=True, weight=30.0)
        return
    changes = operator_change(before, action, has_candidate=True, weight=30.0)
    after = before.moved(reason="test", by="admin", **changes)
    assert after.phase == expected and after.version == before.version + 1
    assert after.resume_to == (phase if action == "pause" else None)
    assert after.weight == {"promote": 100.0, "rollback": 0.0, "set_weight": 30.0}.get(action, before.weight)
    assert after.mirror is (action != "rollback")  # a rollback turns shadow traffic off too


def test_without_a_candidate_only_a_weight_of_zero_rollback_and_pause_apply() -> None:
    for phase in PHASES:
        before = state(phase, resume_to="manual" if phase == "paused" else None)
        with pytest.raises(Conflict):
            operator_change(before, "promote", has_candidate=False)
        with pytest.raises(Conflict):
            operator_change(before, "set_weight", has_candidate=False, weight=1.0)
        assert operator_change(before, "set_weight", has_candidate=False, weight=0.0)["weight"] == 0.0
        assert operator_change(before, "rollback", has_candidate=False)["phase"] == "rolled_back"


def test_a_paused_rollout_resumes_where_it_was_or_in_manual_mode() -> None:
    for resume_to in ("shadow", "progressing", "manual", None):
        changes = operator_change(state("paused", resume_to=resume_to), "resume", has_candidate=True)
        assert changes["phase"] == (resume_to or "manual") and changes["resume_to"] is None


def test_the_controller_walks_the_steps_then_promotes_and_moves_only_judged_phases() -> None:
    steps = [5.0, 20.0, 50.0]
    walked = []
    current = state("shadow", step=-1, weight=0.0)
    while current.phase != "promoted":
        reason, changes = controller_step(current, steps)
        current = current.moved(reason=reason, by="controller", **changes)
        walked.append((current.phase, current.weight, current.step))
    assert walked == [
        ("progressing", 5.0, 0),
        ("progressing", 20.0, 1),
        ("progressing", 50.0, 2),
        ("promoted", 100.0, 2),
    ]
    assert current.history[-1].reason == "gates passed at every step: promoted after 3 steps"
    # An operator's only; pre-flight moves by its run's verdict (the controller's, or one recorded).
    assert set(PHASES) - JUDGED == {"preflight", "paused", "promoted", "rolled_back", "manual"}


def test_an_operator_s_action_is_decided_again_on_the_state_it_meets(
    tmp_path: Path, redis_prefix: str
) -> None:
    (route,) = routes_of(tmp_path, canary_text(weight=30))

    async def run() -> None:
        spawner = Spawner()
        shared = [Shared(REDIS_URL, redis_prefix), Shared(REDIS_URL, redis_prefix)]
        stale, fresh = (RedisRolloutStore(s, spawner, poll_s=30) for s in shared)
        try:
            await stale.adopt([route])  # no listener: this replica's view stays where it was
            await fresh.adopt([route])
            await change(fresh, "chat", "admin", "promoted", phase="promoted", weight=100.0)  # elsewhere
            seen = stale.current("chat")
            assert seen is not None and seen.phase == "manual"  # what the asked replica still believes
            with pytest.raises(Conflict, match="promoted: there is nothing to pause"):
                await Rollouts(stale, lambda name: route).pause("chat", "admin", None)
            await fresh.refresh()
            stored = fresh.current("chat")
            assert stored is not None and stored.phase == "promoted"  # not paused over the promotion
        finally:
            await spawner.close()
            for s in shared:
                await s.close()

    asyncio.run(run())


def test_a_rollout_older_than_its_statistics_holds_and_says_why(tmp_path: Path) -> None:
    from gateway.rollout import Controller
    from gateway.store import Store
    from gateway.store.stats import STATS_TTL_S
    from tests.test_state import AUTOMATIC

    text = canary_text().replace("rollout:\n  weight: 10\n", "") + AUTOMATIC.format(min_samples=10)
    (route,) = routes_of(tmp_path, text)
    later = [time.time() + STATS_TTL_S + 60]  # the rollout began more than the statistics' TTL ago

    async def run() -> None:
        store = Store.memory()
        await store.start([route])
        rollouts = Rollouts(store.rollouts, lambda name: route)
        controller = Controller(store.lease, store.stats, rollouts, lambda: [route], clock=lambda: later[0])
        for _ in range(2):
            await controller.consider(route)
        current = store.rollouts.current("chat")
        assert current is not None and current.phase == "progressing"  # neither promoted nor rolled back
        held = [t.reason for t in current.history if t.reason.startswith("held: the rollout has run longer")]
        assert len(held) == 1 and "7 days" in held[0]  # said once

    asyncio.run(run())


def test_the_promotion_waits_until_the_candidate_is_shown_not_worse(tmp_path: Path) -> None:
    """At the last step, a gate whose estimate is within its threshold but whose interval still reaches
    past it holds the promotion (at earlier steps the estimate advances); enough data then promotes."""
    from gateway.analysis import ArmWindow
    from gateway.rollout import Controller
    from gateway.store import Store
    from tests.test_state import AUTOMATIC

    text = canary_text().replace("rollout:\n  weight: 10\n", "") + AUTOMATIC.format(min_samples=10)
    (route,) = routes_of(tmp_path, text)
    now = [time.time() + 5]

    def window(requests: int, errors: int) -> ArmWindow:
        return ArmWindow(requests=requests, errors=errors, latency={100: requests})

    async def run() -> None:
        store = Store.memory()
        await store.start([route])
        rollouts = Rollouts(store.rollouts, lambda name: route)
        await rollouts.move("chat", "test", "to the last step", phase="progressing", step=1, weight=50.0)
        controller = Controller(store.lease, store.stats, rollouts, lambda: [route], clock=lambda: now[0])

        async def add(base: ArmWindow, candidate: ArmWindow) -> None:
            interval = int(now[0] // route.rollout.interval_s)
            key = (route.name, route.rollout_key, interval)
            await store.stats.add({(*key, "base"): base, (*key, "candidate"): candidate}, "b")

        await add(window(100, 1), window(100, 2))  # +1 point against +2 allowed: within, on the estimate
        await controller.consider(route)
        current = store.rollouts.current("chat")
        assert current is not None and (current.phase, current.weight) == ("progressing", 50.0)
        now[0] += 2
        await add(window(20_000, 200), window(20_000, 200))
        await controller.consider(route)
        current = store.rollouts.current("chat")
        assert current is not None and current.phase == "promoted"

    asyncio.run(run())


def test_a_sample_ratio_mismatch_holds_the_rollout_and_says_which_cohort_and_shares(
    tmp_path: Path, redis_prefix: str
) -> None:
    """The statistics go through the Recorder and Redis as in production: clients of the candidate that
    leave before an answer (not counted) leave it 1 in 3 of its requests short at 50%. The gates pass on
    what is counted; the rollout holds and says why, once, and the metrics say so."""
    from gateway.rollout import MISMATCH, Controller, analyse
    from gateway.stats import Recorder
    from gateway.telemetry import Metrics

    route = _automatic(tmp_path)

    async def run(store: Store) -> None:
        rollouts = Rollouts(store.rollouts, lambda name: route)
        await rollouts.move("chat", "test", "to 50%", phase="progressing", step=1, weight=50.0)
        recorder = Recorder(store.stats, store.rollouts)
        metrics = Metrics(enabled=True)
        now = [time.time()]
        controller = Controller(
            store.lease, store.stats, rollouts, lambda: [route], metrics.gates, clock=lambda: now[0]
        )
        for n in range(3000):  # half the units are the candidate's; a third of those leave first
            arm = "candidate" if n % 2 else "base"
            outcome = "client_closed" if arm == "candidate" and n % 3 == 0 else "ok"
            group = n // 2 % 64  # a group holds units of both arms (its hash is not the assignment's)
            sign = 1 if n // 128 % 2 else -1
            recorder.record(route, arm, outcome, 0.05, False, 10, None, group=group, share=0.5, sign=sign)
        await recorder.flush()
        await controller.consider(route)
        current = store.rollouts.current("chat")
        assert current is not None and (current.phase, current.weight) == ("progressing", 50.0)
        reason = current.history[-1].reason
        assert reason.startswith(MISMATCH) and "cohort all" in reason, reason
        assert "candidate 40.00% of 2500 requests, expected 50.00%" in reason, reason
        analysis = await analyse(store.stats, route, current, now[0])
        assert all(v.result == "pass" for v in analysis.verdicts if not v.gate.startswith("sample_ratio"))
        exposition = metrics.exposition()[0].decode()
        assert 'canarygate_sample_ratio_mismatch{cohort="all",route="chat"} 1.0' in exposition
        assert 'canarygate_candidate_share{cohort="all",kind="observed",route="chat"} 0.4' in exposition
        now[0] += 2  # the next interval: held again, not said again
        await controller.consider(route)
        current = store.rollouts.current("chat")
        assert current is not None and current.phase == "progressing"
        assert sum(t.reason.startswith(MISMATCH) for t in current.history) == 1

    _with_redis_store(redis_prefix, route, run)


def test_units_seen_count_in_a_hyperloglog_and_a_shortfall_of_candidate_units_holds(
    tmp_path: Path, redis_prefix: str
) -> None:
    """Units, not requests: 4,000 users at 50%, each sending 1 to 5 requests; a quarter of the candidate's
    users leave before any answer. Redis's HyperLogLog counts them within its error; the check of units
    finds the shortfall (and the one of requests as well)."""
    from gateway.rollout import MISMATCH, Controller, analyse
    from gateway.routing import unit_of
    from gateway.stats import Recorder

    route = _automatic(tmp_path)

    async def run(store: Store) -> None:
        rollouts = Rollouts(store.rollouts, lambda name: route)
        await rollouts.move("chat", "test", "to 50%", phase="progressing", step=1, weight=50.0)
        recorder = Recorder(store.stats, store.rollouts)
        now = [time.time()]
        controller = Controller(store.lease, store.stats, rollouts, lambda: [route], clock=lambda: now[0])
        served = {"base": 0, "candidate": 0}
        for n in range(4000):
            arm = "candidate" if n % 2 else "base"
            unit = unit_of("chat", f"user-{n}")
            left = arm == "candidate" and n % 8 == 1  # a quarter of the candidate's users
            served[arm] += not left
            for _ in range(1 + n % 5):
                outcome = "client_closed" if left else "ok"
                recorder.record(
                    route, arm, outcome, 0.05, False, 10, None,
                    group=unit.group, share=0.5, sign=unit.sign, unit=unit.id,
                )  # fmt: skip
        late = unit_of("chat", "assigned-before-the-step")  # at the previous step's weight: not the step's
        recorder.record(route, "base", "ok", 0.05, False, 10, None, group=late.group, share=0.2, unit=late.id)
        await recorder.flush()
        arms = ["base@all", "candidate@all"]
        counts = await store.stats.units("chat", route.rollout_key, units_interval(1), arms)
        assert abs(counts["base@all"] - served["base"]) <= 0.03 * served["base"]
        assert abs(counts["candidate@all"] - served["candidate"]) <= 0.03 * served["candidate"]
        current = store.rollouts.current("chat")
        assert current is not None
        verdicts = {v.gate: v for v in (await analyse(store.stats, route, current, now[0])).verdicts}
        assert verdicts["sample_ratio_units"].result == "fail", verdicts["sample_ratio_units"]
        assert "units seen in the step, expected 50.00%" in verdicts["sample_ratio_units"].reason
        await controller.consider(route)
        current = store.rollouts.current("chat")
        assert current is not None and current.history[-1].reason.startswith(MISMATCH)
        assert "units seen in the step" in current.history[-1].reason

    _with_redis_store(redis_prefix, route, run)


def test_unit_groups_and_the_sample_ratio_sums_survive_redis(redis_prefix: str, tmp_path: Path) -> None:
    """What the Recorder counts per unit group (under the step's negative interval number, no histograms)
    and the new sums of every window come back from Redis as they were counted."""
    from gateway.stats import Recorder

    route = _automatic(tmp_path)

    async def run(store: Store) -> None:
        recorder = Recorder(store.stats, store.rollouts)
        recorder.record(route, "candidate", "ok", 0.5, True, 7, 0.25, group=5, share=0.2, sign=-1)
        recorder.record(route, "candidate", "ok", 2.0, False, 3, None, group=5, share=0.2, sign=-1)
        recorder.evaluation(route, "shadow", "all", 5, [("adherence", 0.75, False), ("pref", 1.0, True)])
        recorder.evaluation(route, "shadow", "all", 5, [("adherence", 0.25, False), ("pref", -1.0, False)])
        await recorder.flush()
        step = units_interval(0)  # the first step's
        units = (await store.stats.read("chat", route.rollout_key, range(step, step + 1)))[step]
        group = units["candidate@all#5"]
        assert (group.requests, group.invalid, group.tokens, group.timed, group.ttfts) == (2, 1, 10, 2, 1)
        assert group.latency == {} and group.ttft == {}  # histograms per interval only
        assert group.expected == pytest.approx(0.4) and group.expected_sq == pytest.approx(0.08)
        assert group.signed == -2
        assert group.log_latency == pytest.approx(math.log(0.5) + math.log(2.0))
        assert group.log_ttft_sq == pytest.approx(math.log(0.25) ** 2)
        shadow = units["shadow@all#5"]  # evaluators' results: (results, sum, squares, flips) each
        assert shadow.scores == {"adherence": [2, 1.0, 0.625, 0], "pref": [2, 0.0, 2.0, 1]}
        now = int(time.time() // route.rollout.interval_s)
        intervals = await store.stats.read("chat", route.rollout_key, range(now - 2, now + 1))
        (window,) = [arms["candidate"] for arms in intervals.values()]
        (judged,) = [arms["shadow"] for arms in intervals.values()]
        assert judged.scored("pref") == (0.0, 2.0, 2.0)
        assert (
            window.requests == 2
            and sum(window.latency.values()) == 2
            and window.expected == pytest.approx(0.4)
        )

    _with_redis_store(redis_prefix, route, run)


def _automatic(tmp_path: Path) -> Route:
    from tests.test_state import AUTOMATIC

    text = canary_text().replace("rollout:\n  weight: 10\n", "") + AUTOMATIC.format(min_samples=50)
    (route,) = routes_of(tmp_path, text)
    return route


def _with_redis_store(redis_prefix: str, route: Route, body: Callable[[Store], Awaitable[None]]) -> None:
    """body(store) with a started store on the machine's Redis, under the test's own prefix."""

    async def run() -> None:
        spawner = Spawner()
        store = Store.redis(REDIS_URL, redis_prefix, spawner)
        try:
            await store.start([route])
            await body(store)
        finally:
            await spawner.close()
            await store.close()

    asyncio.run(run())


def test_a_unit_is_noted_for_a_step_only_when_assigned_at_its_weight(tmp_path: Path) -> None:
    from gateway.routing import unit_of
    from gateway.stats import Recorder

    route = _automatic(tmp_path)

    async def run() -> None:
        store = Store.memory()
        await store.start([route])
        rollouts = Rollouts(store.rollouts, lambda name: route)
        await rollouts.move("chat", "test", "to 50%", phase="progressing", step=1, weight=50.0)
        recorder = Recorder(store.stats, store.rollouts)
        for name, share in (("in flight from 20%", 0.2), ("forced", 1.0), ("at 50%", 0.5), ("keyless", 0.5)):
            unit = unit_of("chat", None if name == "keyless" else name)
            recorder.record(
                route, "base", "ok", 0.05, False, 10, None, group=unit.group, share=share, unit=unit.id
            )
        await recorder.flush()
        counts = await store.stats.units("chat", route.rollout_key, units_interval(1), ["base@all"])
        assert counts == {"base@all": 1}

    asyncio.run(run())
