"""Replicas that agree: on one real Redis, an operator's word wins over a controller move judged before
it, on every interleaving tried."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from gateway.errors import Conflict
from gateway.rollout import Rollouts
from gateway.state import RedisState, RouteState, VersionConflict
from gateway.tasks import Spawner
from tests.conftest import REDIS_URL, policy_yaml
from tests.test_state import AUTOMATIC, routes_of

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
        leader = RedisState(REDIS_URL, prefix, spawner, poll_s=30)  # the controller's replica
        other = RedisState(REDIS_URL, prefix, spawner, poll_s=30)  # the operator's
        for state in (leader, other):
            await state.start([route])
        controller = Rollouts(leader, lambda name: route)
        operator = Rollouts(other, lambda name: route)
        overruled = landed = 0
        try:
            for _ in range(8):
                await leader.refresh()
                judged = leader.current("chat")  # what the controller decided on
                assert judged is not None
                spoken: RouteState | None = None
                if rng.random() < 0.5:  # the operator acts after the controller judged, before it writes
                    await other.refresh()
                    try:
                        spoken = await _operator(operator, rng.choice(OPERATOR_ACTIONS), rng)
                    except Conflict:
                        spoken = None  # not possible in this phase: nothing was said
                move = rng.choice(("advance", "rollback", "promote"))
                changes: dict[str, object] = {
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
                    await other.refresh()
                    stored = other.current("chat")
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
