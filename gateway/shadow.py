"""Shadow calls for base-served requests: started beside the primary (never in its way), consumed here,
compared with the primary's answer, counted and kept as pair records."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from gateway.apis import TRANSLATED, as_chat
from gateway.attempt import Attempt, Request, fetch, first_chunk, upstream_headers
from gateway.capacity import Capacity, Preempted
from gateway.errors import GatewayError, same_way
from gateway.evaluation.evaluations import Evaluations
from gateway.ledger import Ledger
from gateway.logs import LOG_EVERY_S, Every
from gateway.mirror import Mirror, Mirrors, Observation, Pair, compare, pair_record
from gateway.route import RouteArm
from gateway.store.pairs import PairStore
from gateway.streaming import accumulate, collect, last_event
from gateway.tasks import Spawner
from gateway.tracing import Tracing
from gateway.upstream import Call, CutShort, Upstream

log = logging.getLogger("gateway.shadow")

MIRROR_HEADER = "X-Canarygate-Mirror"


class Shadows:
    def __init__(
        self,
        upstream: Upstream,
        tracing: Tracing,
        spawner: Spawner,
        pairs: PairStore,
        ledger: Ledger,
        capacity: Capacity,
        evaluations: Evaluations | None = None,
    ) -> None:
        self._upstream = upstream
        self._evaluations = evaluations
        self._ledger = ledger
        self.capacity = capacity
        self._logged = Every(LOG_EVERY_S)  # by route
        self._tracing = tracing
        self._pairs = pairs
        self.mirrors = Mirrors(spawner)

    def _log_failure(self, route: str, rid: str, error: GatewayError) -> None:
        """A failed shadow call, logged with its reason: at most one line per route every LOG_EVERY_S,
        with how many were left out since."""
        more = self._logged.due(route)
        if more is None:
            return
        log.warning("request_id=%s route=%s shadow call failed: %s%s", rid, route, error.message, more)

    def start(self, request: Request, rid: str, kind: str) -> None:
        """Send a copy of this base-served request to the candidate (kind "candidate") or, for the noise
        floor, to base again (kind "noise"), if the route's mirror has room."""
        route = request.route
        mirror = self.mirrors.get(route)
        arm = route.candidate if kind == "candidate" else route.base
        if mirror is None or arm is None:
            return
        pair_id = os.urandom(16).hex()  # as unique as a uuid4, a fifth of the cost
        made: list[Attempt] = []  # the shadow call's attempt, once it starts (it may wait in the queue)
        pair = Pair(
            lambda primary, shadow: self._paired(request, kind, made[0], (pair_id, rid), primary, shadow)
        )
        if mirror.submit(lambda: self._call(request, arm, made, pair, rid, mirror, pair_id)):
            request.metrics.mirror["sent"].inc()
            request.pairs.append(pair)
            if request.span is not None and kind == "candidate":
                request.span.set_attribute("canarygate.pair_id", pair_id)
        else:
            request.metrics.mirror["dropped"].inc()

    def _paired(
        self,
        request: Request,
        kind: str,
        attempt: Attempt,
        ids: tuple[str, str],
        primary: Observation,
        shadow: Observation,
    ) -> None:
        """Both sides are in: book the shadow call (its failure is the candidate's only when the primary did
        not fail the same way), then compare the answers."""
        blamed = None
        if attempt.error is not None and not primary.unfinished:
            blamed = not same_way(attempt.error, primary.error, primary.invalid)
        stats_arm = "shadow" if kind == "candidate" else None
        self._ledger.book(request, attempt, blamed=blamed, stats_arm=stats_arm)
        self._compared(request, kind, *ids, primary, shadow)

    def _compared(
        self, request: Request, kind: str, pair_id: str, rid: str, primary: Observation, shadow: Observation
    ) -> None:
        """Count how a shadow answer compares with the primary one, and keep the pair as a record."""
        if primary.answer is None or shadow.answer is None:
            return  # one side failed: nothing to compare (the failure is counted where it happened)
        checks = compare(primary.answer, shadow.answer, request.rules, (primary.failure, shadow.failure))
        counters = request.metrics.agreement if kind == "candidate" else request.metrics.noise
        for check, agreed in checks.items():
            counters[(check, "agree" if agreed else "disagree")].inc()
        if kind == "candidate":
            if primary.duration_s > 0:
                request.metrics.latency_ratio.observe(shadow.duration_s / primary.duration_s)
            if primary.output_tokens and shadow.output_tokens is not None:
                request.metrics.tokens_ratio.observe(shadow.output_tokens / primary.output_tokens)
        route = request.route
        settings = route.mirror
        record = None
        if settings is not None and settings.records > 0:
            shadow_arm = route.candidate if kind == "candidate" and route.candidate else route.base
            payload = request.payload
            record = pair_record(
                pair_id=pair_id,
                kind=kind,
                route=route.name,
                request_id=rid,
                checks=checks,
                primary=primary,
                shadow=shadow,
                models=(route.base.model, shadow_arm.model),
                prompt=_prompt(payload) if settings.capture_content else None,
                tools=payload.get("tools") if settings.capture_content else None,
            )
        kept = record

        def keep() -> None:
            if kept is not None and settings is not None:
                self._pairs.add(kept, settings.records)

        if self._evaluations is not None:
            self._evaluations.pair(request, kind, primary, shadow, record, keep)
        else:
            keep()

    async def _call(
        self,
        request: Request,
        arm: RouteArm,
        made: list[Attempt],
        pair: Pair,
        rid: str,
        mirror: Mirror,
        pair_id: str,
    ) -> None:
        """One shadow call: consumed here (a stream as a stream), validated, never sent to the client, never
        raised; booked and compared once the primary has answered too. Cancelled at shutdown."""
        attempt = Attempt(
            arm, "mirror", request.metrics.arm(arm.name, "mirror", request.cohort, request.endpoint), ()
        )
        made.append(attempt)
        slots = self.capacity.slots(arm)
        try:
            if slots is not None and not slots.spare:
                request.metrics.mirror["deferred"].inc()  # users first: it waits for a spare slot
                await slots.wait_for_spare()
            attempt.started = time.perf_counter()  # measured from here, as the primary is: like with like
            headers = upstream_headers(arm, request.headers, rid, request.endpoint)
            headers[MIRROR_HEADER] = "1"
            call = Call(
                arm,
                request.endpoint,
                request.body.with_model(arm.model),
                headers,
                request.token,
                arm.client_timeout,
                arm.timeouts.first_token_s,
                request.stream,
            )
            attempt.call = call
            attempt.span = self._tracing.mirror_span(request.span, request.route.name, call)
            if attempt.span is not None:
                attempt.span.set_attribute("canarygate.pair_id", pair_id)
            exchange = self._exchange(attempt, request)
            try:
                if slots is None:
                    answer, malformed = await exchange
                else:
                    answer, malformed = await slots.run_shadow(exchange)
            except GatewayError as exc:
                attempt.error, answer, malformed = exc, None, None
                self._log_failure(request.route.name, rid, exc)
            failure = await request.check(answer, malformed) if answer is not None else None
            if failure is not None:  # without rules, only the answer's shape is checked
                attempt.validation = failure.kind
                attempt.metrics.validation[failure.kind].inc()
            elif answer is not None and request.rules is not None:
                attempt.validation = "ok"
            if attempt.output_tokens is not None:
                mirror.spend(attempt.output_tokens + _input_tokens(attempt.answer))
        except Preempted:
            attempt.unfinished = "cancelled"  # it made room for a user's request: no verdict
            request.metrics.mirror["cancelled"].inc()
        except asyncio.CancelledError:
            attempt.unfinished = "cancelled"  # shadow traffic turned off, or shutdown: no verdict
            request.metrics.mirror["cancelled"].inc()
            raise
        except Exception:
            attempt.unfinished = "internal_error"
            log.exception("request_id=%s route=%s shadow call failed", rid, request.route.name)
        finally:
            attempt.end()
            if attempt.error is not None or attempt.unfinished == "internal_error":
                request.metrics.mirror["error"].inc()
            pair.record_shadow(attempt.observation())

    async def _exchange(self, attempt: Attempt, request: Request) -> tuple[dict[str, Any] | None, str | None]:
        """The shadow's whole answer in its complete shape (a stream rebuilt from its chunks), and what was
        wrong with the stream's shape, if anything."""
        call = attempt.call
        assert call is not None
        if not request.stream:
            _, _, answer = await fetch(self._upstream, attempt)
            return answer, None
        resp, first = await first_chunk(self._upstream, attempt)
        try:
            try:
                data, complete = await collect(resp, first, request.route.max_buffer_bytes)
                while not complete and await resp.readany():
                    pass  # too long to keep for comparison: read to the end all the same
            except Exception as exc:
                raise call.failure(exc) from exc
            finally:
                attempt.closed()
        finally:
            resp.close()
        api = request.endpoint
        if not complete:
            attempt.answered(last_event(data))
            return None, None
        accumulator = accumulate(api, data)
        answer = accumulator.body()
        attempt.answered(answer if api in TRANSLATED else last_event(data))
        if not accumulator.finished:
            raise call.failure(CutShort())
        attempt.accumulated = as_chat(api, answer)  # what the pair compares
        return answer, accumulator.malformed


def _prompt(payload: dict[str, Any]) -> Any:
    for field in ("messages", "input", "prompt"):
        if field in payload:
            return payload[field]
    return None


def _input_tokens(answer: dict[str, Any] | None) -> int:
    usage = answer.get("usage") if answer is not None else None
    prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return prompt if isinstance(prompt, int) else 0
