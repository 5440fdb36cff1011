"""Replicas that agree, on one real Redis: an operator's word wins over a controller move judged before
it, on every interleaving tried; a replica whose policy was superseded never writes it again and serves
the route from the base until it catches up."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.analysis import ArmWindow
from gateway.errors import Conflict, Unavailable
from gateway.rollout import Controller, Rollouts, effective
from gateway.stats import Recorder
from gateway.store import StateUnavailable, Store
from gateway.store.pairs import RedisPairStore
from gateway.store.rollouts import RedisRolloutStore, RouteState, VersionConflict, change, order, skewed
from gateway.store.shared import Shared
from gateway.store.stats import RedisStatsStore, StatsKey
from gateway.tasks import Spawner
from tests.conftest import REDIS_URL, GatewayFactory, Sim, policy_yaml, wait_for
from tests.test_metrics import scrape, value
from tests.test_state import AUTOMATIC, canary_text, routes_of

ROLLED_BACK: dict[str, Any] = {"phase": "rolled_back", "weight": 0.0, "mirror": False}
OPERATOR_ACTIONS = ("pause", "resume", "rollback", "promote", "set_weight")


async def _operator(rollouts: Rollouts, action: str, rng: random.Random) -> RouteState:
    if action == "set_weight":
        return await rollouts.set_weight("chat", float(rng.choice((0, 5, 30))), "admin", None)
    method = getattr(rollouts, action)
    return await method("chat", "admin", None)  # type: ignore[no-any-return]


def test_an_operator_s_action_wins_over_a_controller_move_judged_before_it(
    tmp_path: Path, redis_prefix: str
) -> None:
    text = policy_yaml("chat", "http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1").replace(
        "rollout:\n  weight: 0\n", ""
    ) + AUTOMATIC.format(min_samples=10)
    (route,) = routes_of(tmp_path, text)

    async def one(seed: int) -> tuple[int, int]:
        rng = random.Random(seed)
        spawner = Spawner()
        prefix = f"{redis_prefix}{seed}:"
        leader = Store.redis(REDIS_URL, prefix, spawner, poll_s=30)  # the controller's replica
        other = Store.redis(REDIS_URL, prefix, spawner, poll_s=30)  # the operator's
        for state in (leader, other):
            await state.start([route])
        controller = Rollouts(leader.rollouts, lambda name: route)
        operator = Rollouts(other.rollouts, lambda name: route)
        overruled = landed = 0
        try:
            for _ in range(8):
                await leader.rollouts.refresh()
                judged = leader.rollouts.current("chat")  # what the controller decided on
                assert judged is not None
                spoken: RouteState | None = None
                if rng.random() < 0.5:  # the operator acts after the controller judged, before it writes
                    await other.rollouts.refresh()
                    try:
                        spoken = await _operator(operator, rng.choice(OPERATOR_ACTIONS), rng)
                    except Conflict:
                        spoken = None  # not possible in this phase: nothing was said
                move = rng.choice(("advance", "rollback", "promote"))
                changes: dict[str, Any] = {
                    "advance": {"phase": "progressing", "step": 1, "weight": 50.0},
                    "rollback": {"phase": "rolled_back", "weight": 0.0, "mirror": False, "resume_to": None},
                    "promote": {"phase": "promoted", "weight": 100.0},
                }[move]
                try:
                    await controller.move("chat", "controller", f"controller: {move}", judged, **changes)
                    assert spoken is None, "a controller move judged before the operator spoke landed"
                    landed += 1
                except VersionConflict:
                    assert spoken is not None, "a controller move on the newest state was refused"
                    overruled += 1
                    await other.rollouts.refresh()
                    stored = other.rollouts.current("chat")
                    assert stored is not None and stored.version == spoken.version
                    assert (stored.phase, stored.weight) == (spoken.phase, spoken.weight)  # their word stands
        finally:
            await spawner.close()
            for state in (leader, other):
                await state.close()
        return overruled, landed

    async def run() -> None:
        totals = [await one(seed) for seed in range(30)]
        assert sum(o for o, _ in totals) > 0 and sum(landed for _, landed in totals) > 0  # both paths ran

    asyncio.run(run())


def test_a_replica_with_a_superseded_policy_never_writes_it_and_serves_the_base(
    tmp_path: Path, redis_prefix: str
) -> None:
    (old,) = routes_of(tmp_path, canary_text(weight=30))
    (new,) = routes_of(tmp_path, canary_text(weight=30, model="tuned-2"))

    async def run() -> None:
        spawner = Spawner()
        a, b, c = (Store.redis(REDIS_URL, redis_prefix, spawner, poll_s=30) for _ in range(3))
        try:
            await a.start([old])  # the old policy's rollout, rolled back by an operator
            await change(
                a.rollouts, "chat", "admin", "rolled back", phase="rolled_back", weight=0.0, mirror=False
            )
            await b.start([new])  # a rolling update: the new policy starts its rollout once
            started = b.rollouts.current("chat")
            assert started is not None and started.rollout == new.rollout_key
            assert started.superseded == (old.rollout_key,) and started.phase == "manual"
            await change(
                b.rollouts, "chat", "admin", "rolled back", phase="rolled_back", weight=0.0, mirror=False
            )
            rolled_back = b.rollouts.current("chat")
            assert rolled_back is not None
            await c.start([old])  # a replica still on the old policy starts, or restarts
            for _ in range(5):  # and they all sync, again and again: nobody rewrites the rollout
                for state, route in ((a, old), (b, new), (c, old)):
                    await state.rollouts.adopt([route])
            for state, route in ((a, old), (c, old)):
                seen = state.rollouts.current("chat")
                assert seen == rolled_back  # the active rollout, as stored: rolled back, and staying so
                assert skewed(route, seen) and order(route, seen) == "older"
                served = effective(route, seen)
                assert served.weight == 0 and served.mirror is None  # the old candidate gets no one
            await a.rollouts.adopt([new])  # its policy catches up
            caught_up = a.rollouts.current("chat")
            assert caught_up == rolled_back and not skewed(new, caught_up)
        finally:
            await spawner.close()
            for state in (a, b, c):
                await state.close()

    asyncio.run(run())


def test_a_skewed_replica_says_so_and_its_users_get_the_base(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, redis_prefix: str
) -> None:
    base, candidate = sims
    shared = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix, "admin_token": "admin"}
    old = make_gateway({"chat": policy_yaml("chat", base.url, candidate.url, weight=100)}, **shared)
    newer = policy_yaml("chat", base.url, candidate.url, weight=100).replace(
        "model: tuned-model", "model: tuned-2"
    )
    make_gateway({"chat": newer}, **shared)  # a replica with the new policy: its rollout supersedes

    def detail() -> dict[str, Any]:
        return httpx.get(f"{old.url}/readyz", headers={"Authorization": "Bearer admin"}).json()  # type: ignore[no-any-return]

    wait_for(lambda: "chat" in detail()["policy_skew"], message="the old replica to see the new rollout")
    skew = detail()["policy_skew"]["chat"]
    assert skew["policy_is"] == "superseded" and skew["policy_rollout"] != skew["active_rollout"]
    assert value(scrape(old.url), "canarygate_policy_skew", route="chat") == 1
    client = old.client()
    arms = {
        client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], user=f"user-{n}"
        ).headers["x-canarygate-arm"]
        for n in range(10)
    }
    assert arms == {"base"}  # weight 100 in its policy, and still: the superseded candidate serves no one


def test_a_leader_that_stops_gives_the_lease_up_at_once(redis_prefix: str) -> None:
    async def run() -> None:
        spawner = Spawner()
        a, b = (Store.redis(REDIS_URL, redis_prefix, spawner) for _ in range(2))
        leader = Controller(a.lease, a.stats, Rollouts(a.rollouts, lambda name: None), list)
        try:
            assert await a.lease.lead(leader.owner, Controller.LEASE_S)
            leader.leading = True
            assert not await b.lease.lead("other", Controller.LEASE_S)  # held, for LEASE_S unless given up
            await leader.resign()  # what a replica does at shutdown
            assert await b.lease.lead(
                "other", Controller.LEASE_S
            )  # taken at the next tick, not after the TTL
            await a.lease.resign("someone else")  # only the holder can give it up
            assert not await a.lease.lead(leader.owner, Controller.LEASE_S)
        finally:
            await spawner.close()
            for state in (a, b):
                await state.close()

    asyncio.run(run())


def test_feedback_sent_at_once_to_another_replica_finds_the_answer(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, redis_prefix: str
) -> None:
    shared = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix}
    policies = {"chat": policy_yaml("chat", sims[0].url, sims[1].url, weight=50)}
    answering, other = make_gateway(policies, **shared), make_gateway(policies, **shared)
    client = answering.client()
    for n in range(5):  # each sent to the other replica the moment the answer arrives (before a flush)
        answer = client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], user=f"user-{n}"
        )
        rid = answer.headers["x-request-id"]
        given = httpx.post(f"{other.url}/v1/feedback", json={"request_id": rid, "score": "down"}, timeout=10)
        assert given.status_code == 200, given.text
        assert given.json()["arm"] == answer.headers["x-canarygate-arm"] and given.json()["recorded"]
    unknown = httpx.post(
        f"{other.url}/v1/feedback", json={"request_id": "never-answered", "score": "up"}, timeout=10
    )
    assert unknown.status_code == 404 and "looked for 1.5 s" in unknown.json()["error"]["message"]


class TimesOutAfterWriting(RedisStatsStore):
    """Redis applied the write, and the answer never came back (Redis frozen past the socket timeout)."""

    lost_answers = 1

    async def add(self, batch: Mapping[StatsKey, ArmWindow], batch_id: str) -> None:
        await super().add(batch, batch_id)
        if self.lost_answers:
            self.lost_answers -= 1
            raise StateUnavailable("timed out")


def test_a_statistics_batch_whose_write_timed_out_is_counted_once(tmp_path: Path, redis_prefix: str) -> None:
    (route,) = routes_of(tmp_path, canary_text(weight=30))

    async def run() -> None:
        spawner = Spawner()
        shared = Shared(REDIS_URL, redis_prefix)
        rollouts, stats = RedisRolloutStore(shared, spawner, 30), TimesOutAfterWriting(shared)
        try:
            await rollouts.start([route])
            recorder = Recorder(stats, rollouts)
            now = int(time.time() // route.rollout.interval_s)
            intervals = range(now - 1, now + 60)  # wherever the test's seconds fall
            for _ in range(72):
                recorder.feedback(route, "candidate", "all", negative=True, escalated=False)
            await recorder.flush()  # applied, but answered as a failure: held for the next flush
            for _ in range(10):
                recorder.feedback(route, "candidate", "all", negative=False, escalated=False)
            await recorder.flush()  # the held batch again (same id), then the new one
            stored = await stats.read(route.name, route.rollout_key, intervals)
            counted = sum(arms["candidate"].feedback for arms in stored.values())
            negative = sum(arms["candidate"].negative for arms in stored.values())
            assert (counted, negative) == (82, 72)  # not 154 / 144
        finally:
            await spawner.close()
            await shared.close()

    asyncio.run(run())


def test_pair_records_whose_write_timed_out_are_kept_once(redis_prefix: str) -> None:
    async def run() -> None:
        spawner = Spawner()
        shared = Shared(REDIS_URL, redis_prefix)
        store = RedisPairStore(shared, spawner)
        applied = store._add_once

        async def applied_then_lost(**kwargs: Any) -> Any:  # Redis wrote them; the answer never came
            await applied(**kwargs)
            store._add_once = applied
            raise RedisTimeoutError("timed out")

        store._add_once = applied_then_lost  # type: ignore[assignment]
        try:
            for n in range(4):
                store.add({"pair_id": f"p{n}", "route": "chat", "agree": True}, 100)
            await store.flush()  # failed, as far as the store can tell: held
            store.add({"pair_id": "p4", "route": "chat", "agree": False}, 100)
            kept = await store.recent("chat", 100, disagreements=False)  # flushes: the held ones, then p4
            assert sorted(r["pair_id"] for r in kept) == ["p0", "p1", "p2", "p3", "p4"]
        finally:
            await spawner.close()
            await store.close()
            await shared.close()

    asyncio.run(run())


class WriteAnswerLost(RedisRolloutStore):
    """The rollout write reaches Redis, and its answer does not come back (Redis frozen a moment)."""

    lost_answers = 0

    async def write(self, new: RouteState, expect_version: int) -> None:
        await super().write(new, expect_version)
        if self.lost_answers:
            self.lost_answers -= 1
            raise StateUnavailable("timed out", maybe_applied=True)


def test_an_admin_change_whose_answer_was_lost_says_so_and_its_retry_applies_once(
    tmp_path: Path, redis_prefix: str
) -> None:
    (route,) = routes_of(tmp_path, canary_text(weight=30))

    async def run() -> None:
        spawner = Spawner()
        shared = Shared(REDIS_URL, redis_prefix)
        state = WriteAnswerLost(shared, spawner, 30)
        rollouts = Rollouts(state, lambda name: route)
        try:
            await state.start([route])
            state.lost_answers = 1
            with pytest.raises(Unavailable, match="may or may not have been applied"):
                await rollouts.set_weight("chat", 50.0, "admin", None, key="weight:k1")
            assert await rollouts.replayed("chat", "weight:k1") is not None  # it was: the retry says so
            await rollouts.set_weight("chat", 50.0, "admin", None, key="weight:k1")  # and a retry anyway
            current = state.current("chat")
            assert current is not None and current.weight == 50
            assert [t.key for t in current.history].count("weight:k1") == 1  # applied once
            assert await rollouts.replayed("chat", "weight:other") is None
        finally:
            await spawner.close()
            await shared.close()

    asyncio.run(run())
