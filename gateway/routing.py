"""Sticky canary assignment: unit key -> bucket -> arm. Pure functions, no I/O."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from gateway.analysis import UNIT_GROUPS
from gateway.errors import InvalidRequest
from gateway.policy import ArmName
from gateway.route import Route

JSON_FORMATS = ("json_object", "json_schema")  # response_format types that ask for JSON

OVERRIDE_HEADER = "x-canary"


@dataclass(frozen=True, slots=True)
class Assignment:
    arm: ArmName
    bucket: float | None  # None when the arm was forced by the override header
    sticky: bool  # False when no unit key was present (random bucket per request)
    share: float  # the probability it had of being the candidate's: what the sample-ratio check expects


MAX_KEY_CHARS = 256  # a longer key is kept as its hash: trace keys name Redis fields and span attributes
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def unit_key(
    sources: tuple[tuple[str, str], ...],
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    api_key: str | None,
) -> str | None:
    """The bare value of the first configured source that is present."""
    for kind, name in sources:
        value = _source(kind, name, headers, body, api_key)
        if value:
            return value
    return None


def trace_key(
    sources: tuple[tuple[str, str], ...], headers: Mapping[str, str], body: Mapping[str, Any]
) -> str | None:
    """The request's trace (an agent run, a conversation): the first configured source present, as
    sent, or its sha256 when longer than MAX_KEY_CHARS or not printable ASCII."""
    value = unit_key(sources, headers, body, None)
    return bounded_key(value) if value is not None else None


def _source(
    kind: str, name: str, headers: Mapping[str, str], body: Mapping[str, Any], api_key: str | None
) -> str | None:
    """header:NAME, body:FIELD.PATH (a string field), api_key, or traceparent (the W3C trace id; not an
    all-zero one, which the specification makes invalid)."""
    if kind == "header":
        return headers.get(name)
    if kind == "body":
        value: Any = body
        for field in name.split("."):
            if not isinstance(value, dict):
                return None
            value = value.get(field)
        return value if isinstance(value, str) else None
    if kind == "traceparent":
        found = TRACEPARENT.match(headers.get("traceparent", "").strip().lower())
        return found.group(1) if found and found.group(1).strip("0") else None
    return api_key


def bounded_key(value: str) -> str:
    """A trace key as sent, or its sha256 when longer than MAX_KEY_CHARS or not printable ASCII."""
    plain = len(value) <= MAX_KEY_CHARS and value.isascii() and value.isprintable()
    return value if plain else sha256(value.encode()).hexdigest()


def cohort_of(
    route: Route, headers: Mapping[str, str], body: Mapping[str, Any], key_group: str | None
) -> str:
    """The request's cohort: one of the route's declared values, "other", or "all" (no cohorts)."""
    cohorts = route.cohorts
    if cohorts is None:
        return "all"
    kind = cohorts.kind
    if kind == "tools":
        return "true" if body.get("tools") or body.get("functions") else "false"
    if (
        kind == "json_mode"
    ):  # chat's response_format, the Responses API's text.format, Messages' output_config
        return "true" if _json_mode(body) else "false"
    if kind == "stream":
        return "true" if body.get("stream") is True else "false"
    if kind == "header":
        value = headers.get(cohorts.name)
    elif kind == "metadata":
        metadata = body.get("metadata")
        value = metadata.get(cohorts.name) if isinstance(metadata, dict) else None
    else:
        value = key_group
    return value if isinstance(value, str) and value in cohorts.values else "other"


def _json_mode(body: Mapping[str, Any]) -> bool:
    for outer, inner in (("response_format", None), ("text", "format"), ("output_config", "format")):
        fmt = body.get(outer)
        if inner is not None and isinstance(fmt, dict):
            fmt = fmt.get(inner)
        if isinstance(fmt, dict) and fmt.get("type") in JSON_FORMATS:
            return True
    return False


def bucket(route: str, salt: str, key: str) -> float:
    # The first 8 bytes of sha256 as an integer over 2**64: uniform in [0, 1), identical in every
    # process and language, so replicas agree and a unit stays on its arm while the weight only grows.
    return int.from_bytes(sha256(f"{route}:{salt}:{key}".encode()).digest()[:8], "big") / 2**64


def choose_arm(
    route: Route,
    key: str | None,
    override: str | None = None,
    rand: Callable[[], float] = random.random,
    cohort: str = "all",
) -> Assignment:
    if override is not None and route.allow_override:
        forced = override.strip().lower()
        if forced not in ("base", "candidate"):
            raise InvalidRequest(
                f"{OVERRIDE_HEADER} must be 'base' or 'candidate', got {override[:40]!r}",
                code="invalid_header",
                param=OVERRIDE_HEADER,
            )
        if forced == "base":
            return Assignment("base", None, key is not None, 0.0)
        return Assignment("candidate", None, key is not None, 1.0)
    if route.candidate is None or route.weight <= 0:
        return Assignment("base", None, key is not None, 0.0)
    if route.cohorts is not None and cohort not in route.cohorts.candidate_may_serve:
        return Assignment("base", None, key is not None, 0.0)  # a cohort the rollout leaves out
    point = bucket(route.name, route.salt, key) if key is not None else rand()
    share = min(route.weight / 100, 1.0)
    arm: ArmName = "candidate" if point < share else "base"
    return Assignment(arm, point, key is not None, share)


@dataclass(frozen=True, slots=True)
class Unit:
    """Who a request is, for the statistics: its unit group (analysis.UNIT_GROUPS), its sign (+1 or -1,
    for analysis.sample_ratio), and an opaque id of its key (the sample-ratio check of units seen), all
    by a hash of the unit key independent of the assignment's, so that each group holds units of both
    arms. A request without a key is a unit of its own, in a group at random, without an id."""

    group: int
    sign: int
    id: str | None


ANONYMOUS = Unit(0, 1, None)  # a request the statistics know nothing of


def unit_of(route: str, key: str | None, rand: Callable[[], float] = random.random) -> Unit:
    if key is None:
        point = int(rand() * UNIT_GROUPS * 2)
        return Unit(point % UNIT_GROUPS, 1 if point // UNIT_GROUPS % 2 else -1, None)
    digest = sha256(f"{route}:units:{key}".encode()).digest()
    point = int.from_bytes(digest[:4], "big")
    return Unit(point % UNIT_GROUPS, 1 if point // UNIT_GROUPS % 2 else -1, digest[4:12].hex())


def mirror_sampled(
    route: Route,
    key: str | None,
    rand: Callable[[], float] = random.random,
    *,
    noise: bool = False,
    cohort: str = "all",
) -> bool:
    """Is this base-served request also sent to the candidate as a shadow call (or, noise=True, replayed
    to base for the noise floor)? Each has its own salt, so the cohorts are independent."""
    shadow = route.mirror
    if shadow is None:
        return False
    percent = shadow.noise_percent if noise else shadow.percent
    if percent <= 0:
        return False
    if not noise and route.cohorts is not None and cohort not in route.cohorts.candidate_may_serve:
        return False  # a cohort left out of the rollout sends nothing to the candidate
    if shadow.by_unit and key is not None:
        return bucket(route.name, shadow.salt + (":noise" if noise else ""), key) < percent / 100
    return rand() < percent / 100
