from __future__ import annotations

from collections import Counter
from hashlib import sha256
from pathlib import Path

import pytest

from gateway.analysis import UNIT_GROUPS
from gateway.errors import InvalidRequest
from gateway.policy import Policy
from gateway.route import Route, compile_policy
from gateway.routing import bucket, choose_arm, unit_key, unit_of


def make_route(
    weight: float, *, override: bool = False, candidate: bool = True, salt: str | None = "s1"
) -> Route:
    arms: dict[str, object] = {"base": {"url": "http://b/v1", "model": "b"}}
    if candidate:
        arms["candidate"] = {"url": "http://c/v1", "model": "c"}
    policy = Policy.model_validate(
        {
            "route": "r",
            "arms": arms,
            "rollout": {"weight": weight},
            "assignment": {"salt": salt, "allow_override_header": override} if salt else {},
        }
    )
    return compile_policy(policy, Path("r.yaml"), {})[0]


def test_bucket_is_the_documented_formula() -> None:
    expected = int.from_bytes(sha256(b"support:ckpt-1:user-42").digest()[:8], "big") / 2**64
    assert bucket("support", "ckpt-1", "user-42") == expected
    assert 0 <= expected < 1


def test_bucket_depends_on_route_salt_and_key() -> None:
    values = {bucket("r", "s", "k"), bucket("r2", "s", "k"), bucket("r", "s2", "k"), bucket("r", "s", "k2")}
    assert len(values) == 4


def test_unit_key_takes_first_present_source_bare() -> None:
    sources = (("header", "x-session-id"), ("body", "user"), ("api_key", ""))
    assert unit_key(sources, {"x-session-id": "sess"}, {"user": "u"}, "key") == "sess"
    assert unit_key(sources, {}, {"user": "u"}, "key") == "u"
    assert unit_key(sources, {}, {"user": 7}, "key") == "key"  # a non-string body field is not a key
    assert unit_key(sources, {"x-session-id": ""}, {}, None) is None


def test_weight_split_matches_weight() -> None:
    route = make_route(20)
    keys = [f"user-{i}" for i in range(20000)]
    share = sum(choose_arm(route, k).arm == "candidate" for k in keys) / len(keys)
    assert 0.19 < share < 0.21


def test_raising_the_weight_only_adds_units() -> None:
    keys = [f"user-{i}" for i in range(5000)]
    previous: set[str] = set()
    for weight in (1, 5, 25, 50, 100):
        route = make_route(weight)
        current = {k for k in keys if choose_arm(route, k).arm == "candidate"}
        assert previous <= current
        previous = current
    assert previous == set(keys)


def test_same_key_same_arm_and_sticky_flag() -> None:
    route = make_route(50)
    first = choose_arm(route, "alice")
    assert all(choose_arm(route, "alice") == first for _ in range(50))
    assert first.sticky and first.bucket == bucket("r", "s1", "alice")


def test_no_key_draws_a_random_bucket() -> None:
    route = make_route(50)
    assert choose_arm(route, None, rand=lambda: 0.1).arm == "candidate"
    assert choose_arm(route, None, rand=lambda: 0.9).arm == "base"
    assert not choose_arm(route, None, rand=lambda: 0.1).sticky


def test_weight_zero_and_no_candidate_serve_base() -> None:
    assert choose_arm(make_route(0), "k", rand=lambda: 0.0).arm == "base"
    assert choose_arm(make_route(0, candidate=False, salt=None), "k").arm == "base"


def test_override_header_only_when_allowed() -> None:
    assert choose_arm(make_route(0, override=True), "k", "candidate").arm == "candidate"
    assert choose_arm(make_route(100, override=True), "k", "BASE").arm == "base"
    assert choose_arm(make_route(0, override=False), "k", "candidate").arm == "base"
    with pytest.raises(InvalidRequest, match="x-canary must be"):
        choose_arm(make_route(0, override=True), "k", "tuned")


def test_default_salt_is_the_candidate_model() -> None:
    route = make_route(10, salt=None)
    assert route.salt == "c"


def test_the_assignment_carries_each_request_s_chance_of_the_candidate() -> None:
    route = make_route(20, override=True)
    assert choose_arm(route, "user-1").share == pytest.approx(0.2)
    assert choose_arm(route, "user-1", override="candidate").share == 1.0  # forced: no chance about it
    assert choose_arm(route, "user-1", override="base").share == 0.0
    assert choose_arm(make_route(0), "user-1").share == 0.0
    assert choose_arm(make_route(0, candidate=False), "user-1").share == 0.0


def test_unit_groups_are_stable_even_and_mix_both_arms() -> None:
    """A unit's group and sign come from its key alone (every replica agrees); groups are filled evenly,
    signs are balanced, and each group holds units of both arms (its hash is not the assignment's)."""
    route = make_route(20)
    keys = [f"user-{i}" for i in range(20_000)]
    units = [unit_of("r", k) for k in keys]
    assert units == [unit_of("r", k) for k in keys]
    assert len({u.id for u in units}) == len(keys) and all(u.id and len(u.id) == 16 for u in units)
    assert not any(k in (u.id or "") for u, k in zip(units, keys, strict=True))  # opaque: no key in it
    drawn = [(u.group, u.sign) for u in units]
    per_group = Counter(g for g, _ in drawn)
    assert set(per_group) == set(range(UNIT_GROUPS))
    assert max(per_group.values()) < 1.3 * len(keys) / UNIT_GROUPS
    assert abs(sum(s for _, s in drawn)) < 0.03 * len(keys) and {s for _, s in drawn} == {-1, 1}
    candidates = Counter(
        g for (g, _), k in zip(drawn, keys, strict=True) if choose_arm(route, k).arm == "candidate"
    )
    assert set(candidates) == set(range(UNIT_GROUPS))  # every group has candidate units, at 20%
    assert all(0.1 < candidates[g] / per_group[g] < 0.3 for g in range(UNIT_GROUPS))
    randoms = [unit_of("r", None) for _ in range(2000)]  # no key: a unit of its own, anywhere, no id
    assert {u.group for u in randoms} == set(range(UNIT_GROUPS)) and {u.sign for u in randoms} == {-1, 1}
    assert all(u.id is None for u in randoms)
