from __future__ import annotations

from gateway.breaker import BreakerSettings, CircuitBreaker
from gateway.budget import BudgetSettings, RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_opens_at_the_failure_rate_after_min_requests() -> None:
    clock = Clock()
    breaker = CircuitBreaker(
        "r/candidate", BreakerSettings(window=10, min_requests=4, failure_rate=0.5), clock
    )
    for failed in (True, True, True):
        assert breaker.allow()
        breaker.record(failed)
    assert breaker.state == "closed"  # 3 outcomes: below min_requests
    breaker.record(False)
    assert breaker.state == "open"  # 3 of 4 failed
    assert not breaker.allow()


def test_sliding_window_forgets_old_failures() -> None:
    breaker = CircuitBreaker("r", BreakerSettings(window=4, min_requests=4, failure_rate=0.75), Clock())
    for failed in (True, True, False, False, False, True, True):
        breaker.record(failed)
    assert breaker.state == "closed"  # the window holds F F T T: 50%
    breaker.record(True)
    assert breaker.state == "open"  # F T T T: 75%


def test_half_open_probes_close_or_reopen() -> None:
    clock = Clock()
    settings = BreakerSettings(window=4, min_requests=2, failure_rate=0.5, open_s=30, half_open_requests=2)
    breaker = CircuitBreaker("r", settings, clock)
    breaker.record(True)
    breaker.record(True)
    assert breaker.state == "open"
    clock.now += 29
    assert not breaker.allow()
    clock.now += 2
    assert breaker.allow() and breaker.allow()
    assert breaker.state == "half_open"
    assert not breaker.allow()  # only two probes at a time
    breaker.record(True)
    assert breaker.state == "open"  # a failed probe opens it again
    clock.now += 31
    assert breaker.allow() and breaker.allow()
    breaker.release()  # a probe whose client left gives its slot back
    assert breaker.allow()
    breaker.record(False)
    breaker.record(False)
    assert breaker.state == "closed"


def test_budget_allows_a_share_of_requests_over_the_window() -> None:
    clock = Clock()
    budget = RetryBudget(BudgetSettings(ratio=0.2, window_s=10, min_per_window=2), clock)
    for _ in range(20):
        budget.record_request()
    assert [budget.try_spend() for _ in range(5)] == [True, True, True, True, False]  # 20% of 20
    clock.now += 11  # the window slides past all of it
    budget.record_request()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]  # the floor of 2


def test_guards_outlive_reloads_with_unchanged_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    from gateway.fallback import Guards
    from gateway.policy import Policy
    from gateway.route import compile_policy

    def route(weight: float, failure_rate: float = 0.5, candidate: bool = True):  # type: ignore[no-untyped-def]
        arms: dict[str, object] = {"base": {"url": "http://b/v1", "model": "b"}}
        if candidate:
            arms["candidate"] = {"url": "http://c/v1", "model": "c"}
        policy = Policy.model_validate(
            {
                "route": "r",
                "arms": arms,
                "rollout": {"weight": weight},
                "fallback": {"circuit_breaker": {"failure_rate": failure_rate}},
            }
        )
        return compile_policy(policy, Path("r.yaml"), {})[0]

    guards = Guards()
    first = guards.breaker(route(10))
    assert first is not None
    assert guards.breaker(route(50)) is first  # a weight change keeps the breaker (and its state)
    assert guards.budget(route(50)) is guards.budget(route(70))
    assert guards.breaker(route(50, failure_rate=0.2)) is not first  # new settings, new breaker
    assert guards.breaker(route(0, candidate=False)) is None
