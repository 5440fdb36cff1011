"""A route's judge: an OpenAI-compatible chat endpoint asked in the background, within its bounds (calls
at once, queue, requests and tokens per minute) and behind its own circuit breaker. Its failures are
counted and change nothing for users."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import ClientTimeout
from yarl import URL

from gateway.apis import UPSTREAM_PATHS
from gateway.breaker import BreakerSettings, CircuitBreaker
from gateway.capacity import Capacity, Preempted, Slots
from gateway.errors import GatewayError, UpstreamTimeout
from gateway.evaluation.prompts import BadVerdict, Verdict, read
from gateway.lane import Lane, Limits, Work
from gateway.logs import LOG_EVERY_S, Every
from gateway.policy import Judge as JudgePolicy
from gateway.policy import Timeouts
from gateway.route import Bulkhead, RouteArm
from gateway.tasks import Spawner
from gateway.upstream import Call, Upstream

log = logging.getLogger("gateway.evaluation.judge")

JUDGE_HEADER = "X-Canarygate-Judge"  # on every judge call: a gateway that judges itself skips judging these
OUTCOMES = (
    "ok", "error", "timeout", "invalid", "preempted", "circuit_open", "queue_full", "rate_limited",
    "token_budget",
)  # fmt: skip
# Refused before a call: the route's judge stopped (its settings changed), or none is configured.
REFUSALS = ("stopped", "no_judge")
SETTLE_S = 0.25  # how long a slot shared with users stays spare before a judge call takes it


class JudgeFailed(Exception):
    """A judge call that gave no verdict; outcome is its label in canarygate_judge_calls_total."""

    def __init__(self, outcome: str, message: str, spent: Spent | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.spent = spent  # what the call took, when it reached the judge


@dataclass(frozen=True, slots=True)
class Spent:
    """What one judge call took."""

    duration_s: float
    input_tokens: int
    output_tokens: int
    cost: float


def compile_judge(route: str, policy: JudgePolicy, environ: Mapping[str, str]) -> tuple[RouteArm, str | None]:
    """The judge as an upstream of its own (its own connection pool); and what is missing from the env."""
    headers = dict(policy.headers)
    secret = environ.get(policy.api_key_env) or None if policy.api_key_env else None
    missing = None
    if policy.api_key_env and secret is None:
        missing = f"environment variable {policy.api_key_env} is not set"
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    headers[JUDGE_HEADER] = "1"
    headers["Content-Type"] = "application/json"
    t = policy.timeouts
    timeouts = Timeouts.model_construct(connect_s=t.connect_s, first_token_s=t.total_s, total_s=t.total_s)
    url = URL(policy.url)
    price = policy.price
    arm = RouteArm(
        name="judge",
        model=policy.model,
        url=policy.url,
        urls={key: URL(policy.url + path) for key, path in UPSTREAM_PATHS.items()},
        headers=headers,
        forward_client_auth=False,
        secret=secret,
        timeouts=timeouts,
        client_timeout=ClientTimeout(total=t.total_s, connect=t.connect_s),
        price=(price.input_per_million / 1e6, price.output_per_million / 1e6) if price else None,
        bulkhead=Bulkhead(route, "judge", str(url.origin()), policy.max_concurrency, 4.0, policy.tls),
        max_response_bytes=1024 * 1024,
        max_concurrency=policy.max_concurrency,
        apis=frozenset({"chat"}),
    )
    return arm, missing


class Judge:
    """One route's judge. submit() queues a judging (refused with the reason when over a bound); ask()
    makes one call within it and returns the verdict, or raises JudgeFailed."""

    def __init__(
        self,
        route: str,
        policy: JudgePolicy,
        arm: RouteArm,
        upstream: Upstream,
        spawner: Spawner,
        capacity: Capacity | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        # A judge on a server an arm also uses, with the arm's max_concurrency, shares its slots: its
        # calls then yield to users' requests as shadow calls do.
        self._slots = capacity.slots(arm) if capacity is not None else None
        self.arm = arm
        self._upstream = upstream
        limits = Limits(
            policy.max_concurrency, policy.max_queue, policy.tokens_per_minute, policy.requests_per_minute
        )
        self.lane = Lane(f"judge:{route}", limits, spawner, clock)
        b = policy.circuit_breaker
        settings = BreakerSettings(b.window, b.min_requests, b.failure_rate, b.open_s, b.half_open_requests)
        self.breaker = (
            CircuitBreaker(
                f"judge:{route}", settings, clock, calls="judge calls", while_open="nothing is judged"
            )
            if b.enabled
            else None
        )
        self._route = route
        self._logged = Every(LOG_EVERY_S)

    def submit(self, work: Work, calls: int) -> str | None:
        """Queue a judging of `calls` calls; None when queued, else why it was refused."""
        if self.lane.submit(work, calls):
            return None
        return self.lane.refusal() or "queue_full"

    async def ask(self, body: dict[str, Any], schema: str) -> tuple[Verdict, Spent]:
        """One judge call: the verdict, and what it took. JudgeFailed when there is none."""
        if self.breaker is not None and not self.breaker.allow():
            raise JudgeFailed("circuit_open", "the judge's circuit is open")
        started = time.perf_counter()
        body = {**body, "model": self.arm.model, "max_tokens": self.policy.max_tokens, "stream": False}
        asked = self.policy.response_format
        if asked != "json_schema":  # the prompts ask for json_schema, which not every server takes
            wanted = body.pop("response_format")
            if asked == "json_object":
                body["response_format"] = {"type": "json_object", "schema": wanted["json_schema"]["schema"]}
        call = Call(
            self.arm, "chat", orjson.dumps(body), dict(self.arm.headers), None, self.arm.client_timeout,
            self.arm.timeouts.first_token_s,
        )  # fmt: skip
        slots = self._slots
        try:
            if slots is None:
                _, _, answer = await self._upstream.fetch(call)
            else:
                await settled(slots)
                started = time.perf_counter()  # the judge's latency, not the wait for a slot
                _, _, answer = await slots.run_shadow(self._upstream.fetch(call))
        except Preempted as exc:
            if self.breaker is not None:
                self.breaker.release()  # it made room for a user: nothing learnt about the judge
            raise JudgeFailed("preempted", "the judge call made room for a user's request") from exc
        except GatewayError as exc:
            self._failed(exc.message)
            spent = Spent(time.perf_counter() - started, 0, 0, 0.0)
            outcome = "timeout" if isinstance(exc, UpstreamTimeout) else "error"
            raise JudgeFailed(outcome, exc.message, spent) from exc
        tokens_in, tokens_out = _tokens(answer, "prompt_tokens"), _tokens(answer, "completion_tokens")
        self.lane.spend(tokens_in + tokens_out)
        price = self.arm.price
        cost = tokens_in * price[0] + tokens_out * price[1] if price else 0.0
        spent = Spent(time.perf_counter() - started, tokens_in, tokens_out, cost)
        try:
            verdict = read(answer, schema)
        except BadVerdict as exc:
            self._failed(str(exc))
            raise JudgeFailed("invalid", str(exc), spent) from exc
        if self.breaker is not None:
            self.breaker.record(False)
        return verdict, spent

    def _failed(self, message: str) -> None:
        if self.breaker is not None:
            self.breaker.record(True)
        more = self._logged.due(None)
        if more is not None:
            log.warning("route=%s judge call failed: %s%s", self._route, message, more)

    def stop(self) -> None:
        self.lane.stop()


async def settled(slots: Slots) -> None:
    """Until a slot is spare, and, on a server users are served by, has stayed spare SETTLE_S: a user's
    next request often follows the last answer within milliseconds (an agent's next step), and a judge
    call sent in that instant could reach a one-slot server after it and cut it short."""
    while True:
        if not slots.spare:
            await slots.wait_for_spare()
        if not slots.started:
            return  # the judge's own server: nobody to make way for
        await asyncio.sleep(SETTLE_S)
        if slots.spare:
            return


def _tokens(answer: dict[str, Any], kind: str) -> int:
    usage = answer.get("usage")
    value = usage.get(kind) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and value >= 0 else 0
