"""Shadow traffic: sampled copies of base-served requests sent to the candidate, bounded so they can never
delay or fail the primary, and each one compared with the answer the user actually got."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.lane import Lane, Limits
from gateway.route import MirrorSettings, PerRoute, Route
from gateway.tasks import Spawner
from gateway.validation import Rules

log = logging.getLogger("gateway.mirror")


class Mirror(Lane):
    """One route's shadow calls: at most max_concurrency at once and max_queue waiting; beyond that, and
    while the token budget of the last minute is spent, new ones are dropped (the caller counts them).
    Stopped when shadow traffic is off (rollback, pause, promotion, a new policy)."""

    def __init__(
        self,
        name: str,
        settings: MirrorSettings,
        spawner: Spawner,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        limits = Limits(settings.max_concurrency, settings.max_queue, settings.tokens_per_minute)
        super().__init__(f"mirror:{name}", limits, spawner, clock)
        self.settings = settings


class Mirrors:
    """A Mirror per route, kept across policy reloads while the route's mirror settings stay the same."""

    def __init__(self, spawner: Spawner) -> None:
        def new_mirror(route: Route) -> Mirror:
            assert route.mirror is not None  # PerRoute builds only when the settings key exists
            return Mirror(route.name, route.mirror, spawner)

        # A new rollout (another candidate) gets a mirror of its own: the old one's queue never reaches it.
        self._mirrors = PerRoute(
            lambda route: (route.mirror, route.rollout_key) if route.mirror is not None else None,
            new_mirror,
            retire=Mirror.stop,
        )

    def get(self, route: Route) -> Mirror | None:
        return self._mirrors.get(route)


@dataclass(slots=True)
class Observation:
    """One side of a pair: the answer in its complete shape (streams rebuilt), as far as it came, and how
    the attempt ended (so that a shadow failure is blamed only when the primary did not fail the same way)."""

    answer: dict[str, Any] | None
    duration_s: float
    output_tokens: int | None
    error: GatewayError | None = None
    invalid: bool = False  # the answer failed validation (enforced or not)
    unfinished: bool = False  # the client left, or the gateway failed: no verdict on the arm
    failure: str | None = None  # the kind of the validation failure


class Pair:
    """Waits for the primary answer and its shadow, in either order, then hands both to on_complete."""

    __slots__ = ("_on_complete", "primary", "shadow")

    def __init__(self, on_complete: Callable[[Observation, Observation], None]) -> None:
        self._on_complete = on_complete
        self.primary: Observation | None = None
        self.shadow: Observation | None = None

    def record_primary(self, observation: Observation) -> None:
        self.primary = observation
        self._maybe_complete()

    def record_shadow(self, observation: Observation) -> None:
        self.shadow = observation
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if self.primary is not None and self.shadow is not None:
            try:
                self._on_complete(self.primary, self.shadow)
            except Exception:  # a comparison must never break the request that completed it
                log.exception("comparing a shadow pair failed")


def pair_record(
    *,
    pair_id: str,
    kind: str,
    route: str,
    request_id: str,
    checks: dict[str, bool],
    primary: Observation,
    shadow: Observation,
    models: tuple[str, str],
    prompt: Any | None,
    tools: Any | None = None,
) -> dict[str, Any]:
    """What an exported pair says; the prompt and both answers only when the operator captures content."""
    record: dict[str, Any] = {
        "pair_id": pair_id,
        "kind": kind,
        "route": route,
        "time": _utc_now(),
        "request_id": request_id,
        "agree": all(checks.values()),
        "checks": checks,
    }
    for side, observation, model in (("primary", primary, models[0]), ("shadow", shadow, models[1])):
        answer = observation.answer or {}
        record[side] = {
            "model": model,
            "latency_ms": round(observation.duration_s * 1000, 3),
            "output_tokens": observation.output_tokens,
            "finish_reason": _finish_reason(answer),
        }
        if prompt is not None:
            record[side]["output"] = _first_message(answer)
    if prompt is not None:
        record["prompt"] = prompt
        if tools:
            record["tools"] = tools
    return record


_clock_text: tuple[int, str] = (0, "")


def _utc_now() -> str:
    """ISO 8601 to the second, formatted once per second rather than once per pair."""
    global _clock_text
    second = int(time.time())
    if _clock_text[0] != second:
        _clock_text = (second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)))
    return _clock_text[1]


def compare(
    base: dict[str, Any],
    candidate: dict[str, Any],
    rules: Rules | None,
    failures: tuple[str | None, str | None] = (None, None),
) -> dict[str, bool]:
    """The checks that apply to this pair, each True when both sides agree (first choice of each).
    failures: the kind of each answer's validation failure, as its attempt found it (None: it passed), so
    nothing is validated twice."""
    left, right = _first_message(base), _first_message(candidate)
    out: dict[str, bool] = {}
    if rules is not None and rules.json_object:
        left_kind, right_kind = failures
        out["json_valid"] = (left_kind == "json_parse") == (right_kind == "json_parse")
        if rules.schemas:
            out["schema_valid"] = _content_ok(left_kind) == _content_ok(right_kind)
    left_calls, right_calls = _calls(left), _calls(right)
    if left_calls or right_calls:
        out["tool_name"] = [name for name, _ in left_calls] == [name for name, _ in right_calls]
        if out["tool_name"]:
            out["tool_args"] = [args for _, args in left_calls] == [args for _, args in right_calls]
    left_finish, right_finish = _finish_reason(base), _finish_reason(candidate)
    if left_finish is not None and right_finish is not None:
        out["finish_reason"] = left_finish == right_finish
    return out


def _first_message(answer: dict[str, Any]) -> dict[str, Any]:
    choices = answer.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        message = choice.get("message")
        if isinstance(message, dict):
            return message
        if isinstance(choice.get("text"), str):
            return {"content": choice["text"]}
    return {}


def _content_ok(failure: str | None) -> bool:
    """Whether the content passed its JSON checks (a tool call's failures are about the call)."""
    return failure is None or failure.startswith("tool_")


def _calls(message: dict[str, Any]) -> list[tuple[Any, str]]:
    """(name, canonical arguments) of every call: arguments compared as JSON, key order ignored."""
    raw: list[Any] = []
    if isinstance(message.get("tool_calls"), list):
        raw = [c.get("function") for c in message["tool_calls"] if isinstance(c, dict)]
    elif isinstance(message.get("function_call"), dict):
        raw = [message["function_call"]]
    out = []
    for function in raw:
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        canonical = str(arguments)  # unparseable on this side: compared as written
        if isinstance(arguments, str):
            with contextlib.suppress(orjson.JSONDecodeError):
                canonical = orjson.dumps(orjson.loads(arguments), option=orjson.OPT_SORT_KEYS).decode()
        out.append((function.get("name"), canonical))
    return out


def _finish_reason(answer: dict[str, Any]) -> str | None:
    choices = answer.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        return reason if isinstance(reason, str) else None
    return None
