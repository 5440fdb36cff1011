"""Compiled routes: what a policy becomes at load time, ready for the request hot path."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypeVar

from aiohttp import ClientTimeout
from yarl import URL

from gateway.apis import UPSTREAM_PATHS
from gateway.breaker import BreakerSettings
from gateway.budget import BudgetSettings
from gateway.errors import KINDS
from gateway.policy import Arm as ArmPolicy
from gateway.policy import ArmName, Policy, Rollout, Timeouts, Tls, merge_timeouts
from gateway.validation import RoutePolicy, compile_schema

T = TypeVar("T")
UpstreamName = Literal["base", "candidate", "judge"]  # who an upstream is, in its errors and pools


@dataclass(frozen=True)
class MirrorSettings:
    percent: float
    by_unit: bool
    salt: str  # not the canary's salt: the shadow cohort is not the live cohort
    max_concurrency: int
    max_queue: int
    tokens_per_minute: int | None
    noise_percent: float  # base replayed to base: how much two answers of the same model differ
    capture_content: bool
    records: int


@dataclass(frozen=True)
class CohortSettings:
    kind: str  # header, metadata, api_key_group, tools, json_mode, stream
    name: str  # the header or metadata field
    values: frozenset[str]  # the declared cohorts; anything else is "other"
    names: tuple[str, ...]  # every label value this route can produce, "other" included
    candidate_may_serve: frozenset[str]  # after rollout.cohorts: include / exclude


@dataclass(frozen=True, slots=True)
class Bulkhead:
    """What an arm's own connection pool is built from; while it stays the same, reloads keep the pool."""

    route: str
    arm: UpstreamName
    origin: str  # scheme://host:port
    max_connections: int
    keepalive_s: float
    tls: Tls | None


@dataclass(frozen=True, slots=True)
class RouteArm:
    name: UpstreamName
    model: str
    url: str
    urls: Mapping[str, URL]
    headers: Mapping[str, str]
    forward_client_auth: bool
    secret: str | None
    timeouts: Timeouts
    client_timeout: ClientTimeout
    price: tuple[float, float] | None  # per token: (input, output)
    bulkhead: Bulkhead
    max_response_bytes: int
    max_concurrency: int | None  # what its server runs at once, when declared (shadow calls yield)
    apis: frozenset[str] = frozenset()  # the APIs its server speaks (arms.*.apis)
    server: str = ""  # which server it is (a digest of its url): where state a response left lives


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    base: RouteArm
    candidate: RouteArm | None
    weight: float
    salt: str
    sticky_sources: tuple[tuple[str, str], ...]
    trace_sources: tuple[tuple[str, str], ...]  # () : no traces on this route
    by_trace: bool  # assignment.sticky_by: trace (a request with a trace key is assigned by it)
    trace_idle_s: float
    allow_override: bool
    validation: RoutePolicy
    buffer_streams: bool  # validation.stream == "buffer"
    enforce_on_base: frozenset[str]  # every validation kind with validation.enforce_on_base, else none
    max_buffer_bytes: int
    fallback_on: frozenset[str]
    enforce_on_candidate: frozenset[str]  # the validation kinds in fallback_on
    budget: BudgetSettings
    breaker: BreakerSettings | None
    deadline_s: float
    mirror: MirrorSettings | None  # None: no shadow traffic
    cohorts: CohortSettings | None
    rollout: Rollout  # the gates, interval and confidence the rollout is judged by (compare, controller)
    automatic: Rollout | None  # rollout.steps set: the controller walks them
    rollout_key: str  # which rollout this is (see rollout_key())
    source: Path
    policy: Policy
    answer_model: str | None = None  # answer_model: route: the name `model` says in answers

    def arm(self, name: ArmName) -> RouteArm:
        if name == "candidate" and self.candidate is not None:
            return self.candidate
        return self.base

    def arms(self) -> tuple[RouteArm, ...]:
        return (self.base,) if self.candidate is None else (self.base, self.candidate)

    def lacking(self, api: str) -> RouteArm | None:
        """The first of its arms that does not serve this API (None: the route serves it)."""
        return next((arm for arm in self.arms() if api not in arm.apis), None)


def compile_policy(
    policy: Policy, source: Path, environ: Mapping[str, str]
) -> tuple[Route, list[tuple[str, str]]]:
    """Build the runtime route; also returns (field path, message) for secrets missing from the env."""
    missing: list[tuple[str, str]] = []
    base = _compile_arm(policy.route, "base", policy.arms.base, policy.timeouts, environ, missing)
    candidate = (
        _compile_arm(policy.route, "candidate", policy.arms.candidate, policy.timeouts, environ, missing)
        if policy.arms.candidate
        else None
    )
    judge = policy.evaluation.judge
    if judge is not None and judge.api_key_env and not environ.get(judge.api_key_env):
        missing.append(
            ("evaluation.judge.api_key_env", f"environment variable {judge.api_key_env} is not set")
        )
    salt = policy.assignment.salt or (policy.arms.candidate.model if policy.arms.candidate else policy.route)
    assignment = policy.assignment
    sources = _sources(assignment.sticky_keys)
    checks = policy.validation
    shadow = policy.mirror
    fallback = policy.fallback
    breaker = fallback.circuit_breaker
    deadline = policy.timeouts.deadline_s or sum(arm.timeouts.total_s for arm in (base, candidate) if arm)
    route = Route(
        name=policy.route,
        base=base,
        candidate=candidate,
        weight=policy.rollout.weight,
        salt=salt,
        sticky_sources=sources,
        trace_sources=_sources(assignment.trace_keys),
        by_trace=assignment.sticky_by == "trace",
        trace_idle_s=policy.traces.idle_timeout_s,
        allow_override=assignment.allow_override_header,
        validation=RoutePolicy(
            json=checks.json_,
            schema=compile_schema(checks.schema_, "validation.schema")
            if checks.schema_ is not None
            else None,
            tool_calls=checks.tool_calls,
        ),
        buffer_streams=checks.stream == "buffer",
        enforce_on_base=frozenset(KINDS if checks.enforce_on_base else ()),
        max_buffer_bytes=checks.max_buffer_bytes,
        fallback_on=frozenset(fallback.on),
        enforce_on_candidate=frozenset(fallback.on).intersection(KINDS),
        budget=BudgetSettings(
            fallback.budget.ratio, fallback.budget.window_s, fallback.budget.min_per_window
        ),
        breaker=BreakerSettings(
            breaker.window,
            breaker.min_requests,
            breaker.failure_rate,
            breaker.open_s,
            breaker.half_open_requests,
        )
        if breaker.enabled
        else None,
        deadline_s=deadline,
        mirror=MirrorSettings(
            shadow.percent,
            shadow.sample_by == "unit",
            f"{salt}:mirror",
            shadow.max_concurrency,
            shadow.max_queue,
            shadow.tokens_per_minute,
            shadow.noise_floor_percent,
            shadow.capture_content,
            shadow.records,
        )
        if shadow.percent > 0 or shadow.noise_floor_percent > 0
        else None,
        cohorts=_cohorts(policy),
        rollout=policy.rollout,
        automatic=policy.rollout if policy.rollout.steps is not None else None,
        rollout_key=rollout_key(policy, salt),
        source=source,
        policy=policy,
        answer_model=policy.route if policy.answer_model == "route" else None,
    )
    return route, missing


def _sources(keys: list[str]) -> tuple[tuple[str, str], ...]:
    """("header", "x-user-id"), ("body", "metadata.conversation_id"), ("traceparent", ""), ...."""
    return tuple((kind, name) for kind, _, name in (key.partition(":") for key in keys))


def _cohorts(policy: Policy) -> CohortSettings | None:
    cohorts = policy.cohorts
    if cohorts is None:
        return None
    kind, _, name = cohorts.source.partition(":")
    names = tuple(cohorts.names())
    targeting = policy.rollout.cohorts
    allowed = set(names)
    if targeting is not None:
        if targeting.include is not None:
            allowed &= set(targeting.include)
        allowed -= set(targeting.exclude)
    return CohortSettings(kind, name, frozenset(cohorts.values), names, frozenset(allowed))


def rollout_key(policy: Policy, salt: str) -> str:
    """Changes when the operator deploys something new: another candidate, salt or rollout section.
    Stored state (and statistics) of an older rollout then give way to the policy's starting point."""
    candidate = policy.arms.candidate
    text = "|".join(
        (
            candidate.model if candidate else "",
            candidate.url if candidate else "",
            salt,
            policy.rollout.model_dump_json(),
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compile_arm(
    route: str,
    name: ArmName,
    arm: ArmPolicy,
    route_timeouts: Timeouts,
    environ: Mapping[str, str],
    missing: list[tuple[str, str]],
) -> RouteArm:
    headers = dict(arm.headers)
    secret = None
    if arm.api_key_env:
        secret = environ.get(arm.api_key_env) or None
        if secret is None:
            missing.append((f"arms.{name}.api_key_env", f"environment variable {arm.api_key_env} is not set"))
        else:
            if arm.api_key_header == "x-api-key":  # Anthropic's own API
                headers["x-api-key"] = secret
            else:
                headers["Authorization"] = f"Bearer {secret}"
    timeouts = merge_timeouts(route_timeouts, arm.timeouts)
    url = URL(arm.url)
    return RouteArm(
        name=name,
        model=arm.model,
        url=arm.url,
        urls={key: URL(arm.url + path) for key, path in UPSTREAM_PATHS.items()},
        headers=headers,
        forward_client_auth=arm.forward_client_auth,
        secret=secret,
        timeouts=timeouts,
        client_timeout=ClientTimeout(total=timeouts.total_s, connect=timeouts.connect_s),
        price=(arm.price.input_per_million / 1e6, arm.price.output_per_million / 1e6) if arm.price else None,
        bulkhead=Bulkhead(route, name, str(url.origin()), arm.max_connections, arm.keepalive_s, arm.tls),
        max_response_bytes=arm.max_response_bytes,
        max_concurrency=arm.max_concurrency,
        apis=frozenset(arm.apis),
        server=hashlib.sha256(arm.url.encode()).hexdigest()[:16],
    )


class PerRoute(Generic[T]):
    """One object per route (a breaker, a budget, a mirror) that outlives policy reloads while its
    settings stay the same: a weight change must not close an open circuit or empty a mirror's queue.
    Routes are immutable and a reload builds new ones, so identity answers the common case."""

    def __init__(
        self,
        settings: Callable[[Route], Hashable | None],
        build: Callable[[Route], T],
        retire: Callable[[T], object] | None = None,
    ) -> None:
        self._settings = settings  # what the object depends on; None: the route has no such object
        self._build = build
        self._retire = retire  # told when its object gives way (its settings changed or went)
        self._items: dict[str, tuple[Route, Hashable | None, T | None]] = {}

    def get(self, route: Route) -> T | None:
        current = self._items.get(route.name)
        if current is not None and current[0] is route:
            return current[2]
        key = self._settings(route)
        item: T | None = None
        kept = current is not None and current[1] == key
        if key is not None:
            item = current[2] if current is not None and kept else self._build(route)
        if current is not None and not kept and current[2] is not None and self._retire is not None:
            self._retire(current[2])
        self._items[route.name] = (route, key, item)
        return item
