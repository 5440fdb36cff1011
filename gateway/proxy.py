"""The request pipeline, top to bottom:

auth -> body -> route -> assign arm -> (circuit open? base) -> attempt the arm -> validate
     -> on a candidate failure listed in fallback.on, within budget and deadline: attempt base -> reply

Kept framework-free (raw ASGI, orjson, aiohttp behind gateway.upstream): it is the hot path, and bench/
measures it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Any, NoReturn

from opentelemetry.trace import Span

from gateway.apis import FINISHED, TITLES, TRANSLATED, as_chat
from gateway.asgi import (
    EVENT_STREAM,
    JSON,
    ClientGone,
    DisconnectWatch,
    Receive,
    Reply,
    Scope,
    Send,
    client_request_id,
    header_map,
    new_request_id,
    read_body,
)
from gateway.attempt import Attempt, Request, fetch, first_chunk
from gateway.auth import ApiKeys, bearer_token
from gateway.body import parse
from gateway.breaker import CircuitBreaker
from gateway.capacity import Capacity
from gateway.checks import SchemaChecks
from gateway.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    UnsupportedMediaType,
    UpstreamError,
    log_error,
    same_way,
)
from gateway.evaluation.evaluations import Evaluations, evaluated
from gateway.fallback import CIRCUIT_OPEN, Guards
from gateway.feedback import TRACE_RECORD, Assignments
from gateway.fields import wrong_type
from gateway.ledger import Ledger
from gateway.logs import LOG_EVERY_S, Every
from gateway.pins import Pins, PreviousResponseUnknown, pinned_arm, references
from gateway.route import Route, RouteArm
from gateway.routing import (
    OVERRIDE_HEADER,
    choose_arm,
    cohort_of,
    mirror_sampled,
    trace_key,
    unit_key,
    unit_of,
)
from gateway.shadow import Shadows
from gateway.stats import Recorder
from gateway.store.pairs import PairStore
from gateway.streaming import Tail, accumulate, accumulator_for, collect, last_event, observer, relay
from gateway.tasks import Spawner
from gateway.telemetry import Metrics
from gateway.traces import Step, Traces
from gateway.tracing import Tracing
from gateway.upstream import CutShort, Response, Upstream, is_json, media_type
from gateway.validation import Compiling, FieldError, Rules, SchemaCache, SchemaError, rules_for

log = logging.getLogger("gateway.proxy")
# The statistics' arm of a base answer given to a user assigned to the candidate (a fallback, or its
# circuit open): a stratum of its own, so that the candidate's users never count as the base's.
FALLBACK_ARM = "fallback"

# Fields each API cannot do without; checked here so the client hears it from us, clearly. (A Responses
# request may continue a response or a conversation without new input.)
REQUIRED_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input", "messages": "messages"}


class Proxy:
    def __init__(
        self,
        routes: Callable[[str], Route | None],
        upstream: Upstream,
        api_keys: ApiKeys,
        max_body_bytes: int,
        client_timeout_s: float,
        checks: SchemaChecks,
        metrics: Metrics,
        tracing: Tracing,
        spawner: Spawner,
        pairs: PairStore,
        stats: Recorder,
        assignments: Assignments,
        evaluations: Evaluations | None = None,
        capacity: Capacity | None = None,
        traces: Traces | None = None,
        pins: Pins | None = None,
    ) -> None:
        self._routes = routes
        self._pins = pins
        self.logged = Every(LOG_EVERY_S)  # lines that would come with every request, by what they say
        self._stats = stats
        self._assignments = assignments
        self._upstream = upstream
        self._api_keys = api_keys
        self._max_body = max_body_bytes
        self._client_timeout = client_timeout_s
        self.checks = checks
        self._metrics = metrics
        self._tracing = tracing
        self._schemas = SchemaCache()
        self.guards = Guards()
        self._traces = traces
        self._ledger = Ledger(stats, tracing, evaluations, traces)
        self._capacity = capacity if capacity is not None else Capacity()
        self.shadows = Shadows(upstream, tracing, spawner, pairs, self._ledger, self._capacity, evaluations)

    async def handle(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        started = time.perf_counter()
        headers = header_map(scope)
        reply = Reply(send, new_request_id(), client_request_id(headers.get("x-request-id")))
        reply.api = endpoint
        span = self._tracing.server_span(headers, endpoint) if self._tracing.enabled else None
        if span is not None and reply.client_request_id is not None:
            span.set_attribute("canarygate.client_request_id", reply.client_request_id)
        request: Request | None = None
        failure: BaseException | None = None
        try:
            token = bearer_token(headers.get("authorization"))
            if token is None and endpoint == "messages":  # Anthropic's SDK sends its key as x-api-key
                token = headers.get("x-api-key") or None
            key_group = self._api_keys.authenticate(token)
            _check_content_type(headers.get("content-type"))
            length = headers.get("content-length")
            raw = await read_body(receive, length, self._max_body, self._client_timeout)
            body = parse(raw)  # ~8 ms/MB on the loop: the parsers hold the GIL, a thread would not help
            payload = body.payload
            route = self._route(payload)
            reply.route = route.name
            reply.model = route.answer_model
            if span is not None:
                self._tracing.name_route(span, endpoint, route.name, payload)
            lacking = route.lacking(endpoint)
            if lacking is not None:
                raise NotFound(
                    f"route {route.name!r} does not serve {TITLES[endpoint]}: its {lacking.name} arm's "
                    f"server is declared to speak {', '.join(sorted(lacking.apis))} (arms.{lacking.name}"
                    f".apis in {route.source.name}); add {endpoint!r} there if it speaks it",
                    code="api_not_served",
                    param="model",
                )
            _check_fields(payload, endpoint)
            owner = token if self._api_keys.enabled else None  # a client's records are its own
            pinned, conversation = (
                await self._pinned(payload, route, owner) if endpoint == "responses" else (None, None)
            )
            trace = trace_key(route.trace_sources, headers, payload) if route.trace_sources else None
            key = unit_key(route.sticky_sources, headers, payload, token)
            if trace is not None and route.by_trace:
                key = trace  # every step of a run on one arm: the trace is the unit
            cohort = cohort_of(route, headers, payload, key_group)
            override = headers.get(OVERRIDE_HEADER) if route.allow_override else None
            assignment = choose_arm(route, key, override, cohort=cohort)
            assigned = assignment.arm if pinned is None else pinned.name
            rules = await self._rules(payload, route, endpoint)
            unit = unit_of(route.name, key)
            request = Request(
                route,
                endpoint,
                body,
                headers,
                token,
                rules,
                self._metrics.route(route),
                span,
                cohort,
                self.checks,
                unit,
                assignment.share,
                reply.request_id,
            )
            request.scope = owner
            request.pinned = pinned
            request.conversation = conversation
            request.weighed = assignment.arm
            if trace is not None and self._traces is not None:
                request.trace = self._traces.begin(
                    route, trace, assigned, cohort, unit.group, unit.sign, unit.id, owner
                )
            if span is not None:
                if route.cohorts is not None:
                    span.set_attribute("canarygate.cohort", cohort)
                if trace is not None:
                    span.set_attribute("gen_ai.conversation.id", trace)
            shadows: tuple[str, ...] = ()
            stateful = pinned is not None or conversation is not None  # never sent to the other arm
            if assigned == "base" and route.mirror is not None and not stateful:
                shadows = tuple(
                    kind
                    for kind, noise in (("candidate", False), ("noise", True))
                    if mirror_sampled(route, key, noise=noise, cohort=cohort)
                )
            async with DisconnectWatch(receive) as watch:
                await self._serve(request, assigned, shadows, reply, watch)
        except GatewayError as exc:
            failure = exc
            if request is None:
                self._metrics.rejected(reply.route or "unknown", endpoint)
            _log_error(reply, exc)
            await reply.error(exc)
        except ClientGone as exc:
            failure = exc
            if (more := self.logged.due((reply.route, "disconnected"))) is not None:
                log.info("request_id=%s route=%s arm=%s client disconnected%s", *reply.context(), more)
        except Exception as exc:
            failure = exc
            log.exception("request_id=%s route=%s arm=%s internal error", *reply.context())
            await reply.error(InternalError(f"internal gateway error; quote request id {reply.request_id}"))
        finally:
            if request is not None:
                request.metrics.overhead.observe(time.perf_counter() - started - request.upstream_s)
                if request.trace is not None:
                    await self._end_step(request.trace, span)
                if reply.status == 200 and reply.arm is not None:  # an answer: it may get feedback
                    route = request.route
                    self._assignments.remember(
                        reply.request_id,
                        route.name,
                        reply.arm,
                        request.cohort,
                        route.rollout_key,
                        request.unit.group,
                    )
                    if request.trace is not None:  # the trace is the arm's it was assigned to
                        self._assignments.remember(
                            TRACE_RECORD + request.trace.tid,  # as feedback.trace_record names it
                            route.name,
                            request.trace.arm,
                            request.cohort,
                            route.rollout_key,
                            request.unit.group,
                        )
            if span is not None:
                self._tracing.end_server(span, reply.arm, reply.fallback, reply.status, failure)

    async def _end_step(self, step: Step, span: Span | None) -> None:
        """The request's step joins its trace's sums; its span says which step it was (the index may take
        the store a moment: it is waited for after the answer, never before)."""
        assert self._traces is not None
        try:
            index = await step.known_index() if span is not None else step.index
            if span is not None and index is not None:
                span.set_attribute("canarygate.trace.step", index)
        finally:
            self._traces.end(step)

    async def _serve(
        self, request: Request, assigned: str, shadows: tuple[str, ...], reply: Reply, watch: DisconnectWatch
    ) -> None:
        route = request.route
        self.guards.budget(route).record_request()
        deadline = time.monotonic() + route.deadline_s
        stats_arm = "base"
        if request.pinned is not None:
            await self._pinned_attempt(request, request.pinned, deadline, reply, watch)
            return
        if assigned == "candidate" and route.candidate is not None:
            breaker = self.guards.breaker(route)
            if breaker is None or breaker.allow():
                await self._candidate(request, route.candidate, breaker, deadline, reply, watch)
                return
            request.metrics.circuit.set(1)
            self._fell_back(request, reply, CIRCUIT_OPEN, attempted=False)
            stats_arm = FALLBACK_ARM  # the candidate's user, answered by the base: never base data
        else:
            for kind in shadows:
                self.shadows.start(request, reply.request_id, kind)
        attempt = await self._attempt(request, route.base, route.enforce_on_base, deadline, reply, watch)
        self._ledger.book(request, attempt, stats_arm=stats_arm)
        if attempt.error is not None and not reply.started:
            raise attempt.error

    async def _candidate(
        self,
        request: Request,
        arm: RouteArm,
        breaker: CircuitBreaker | None,
        deadline: float,
        reply: Reply,
        watch: DisconnectWatch,
    ) -> None:
        """The candidate's attempt, and on a failure listed in fallback.on (within the deadline) the base's.
        The candidate's failure is booked once the base has answered: blame by comparison."""
        route = request.route
        candidate = await self._attempt(
            request, arm, route.enforce_on_candidate, deadline, reply, watch, breaker
        )
        error = candidate.error
        if error is None or reply.started:
            # answered (a failure after the first byte was told to the client in the stream)
            self._ledger.book(request, candidate, breaker=breaker, stats_arm="candidate")
            return
        reason = error.reason
        if reason is None or reason not in route.fallback_on:  # a client's error is never one
            self._no_fallback(request, candidate, breaker, reply, None)
        if deadline - time.monotonic() <= 0:
            self._no_fallback(request, candidate, breaker, reply, "deadline")
        budget = self.guards.budget(route)
        spent = budget.try_spend()
        if not spent and breaker is None:  # circuit_breaker.enabled: false: the budget can only refuse
            if (more := self.logged.due((route.name, "budget"))) is not None:
                log.warning(
                    "request_id=%s route=%s fallback budget spent: the candidate's error is returned (%s)%s",
                    *(reply.request_id, route.name, reason, more),
                )
            self._no_fallback(request, candidate, breaker, reply, "budget")
        if (more := self.logged.due((route.name, reason))) is not None:
            log.info(
                "request_id=%s route=%s fallback to base: %s: %s%s", *reply.context()[:2], reason, error, more
            )
        self._fell_back(request, reply, reason, attempted=True)
        base: Attempt | None = None
        try:
            base = await self._attempt(request, route.base, route.enforce_on_base, deadline, reply, watch)
        finally:
            blamed = None  # not known when the base was not heard to the end (the client left)
            if base is not None and base.unfinished is None:
                blamed = not same_way(error, base.error, base.invalid)
            self._ledger.book(request, candidate, blamed=blamed, breaker=breaker, stats_arm="candidate")
            if blamed is False and spent:
                budget.refund()  # requests that fail everywhere must not spend the candidate's budget
            elif not spent and breaker is not None and blamed is not False:
                # The budget protects the base by taking the candidate out of the path, not by failing
                # users: this user is answered all the same.
                breaker.trip(
                    f"the fallback budget is spent (fallback.budget: {route.budget.ratio:g} of the "
                    f"requests over {route.budget.window_s:g}s)"
                )
                request.metrics.circuit.set(1)
        self._ledger.book(request, base, stats_arm=FALLBACK_ARM)
        if base.error is not None and not reply.started:
            raise base.error

    async def _pinned_attempt(
        self, request: Request, arm: RouteArm, deadline: float, reply: Reply, watch: DisconnectWatch
    ) -> None:
        """A request continuing state its arm's server holds: that arm only, no fallback (no other server has
        the state), its circuit breaker not asked. It counts in the rollout's statistics when the weight
        would have sent it there anyway (otherwise it was not assigned at random: metrics only)."""
        route = request.route
        enforce = route.enforce_on_candidate if arm.name == "candidate" else route.enforce_on_base
        attempt = await self._attempt(request, arm, enforce, deadline, reply, watch)
        self._ledger.book(request, attempt, stats_arm=arm.name if arm.name == request.weighed else None)
        if attempt.error is not None and not reply.started:
            raise attempt.error

    async def _pinned(
        self, payload: dict[str, Any], route: Route, scope: str | None
    ) -> tuple[RouteArm | None, str | None]:
        """(the arm holding the response or conversation this request continues, its conversation id)."""
        previous, conversation = references(payload)
        if self._pins is None or (previous is None and conversation is None):
            return None, conversation
        if previous is not None:
            pin = await self._pins.recall("response", previous, scope)
            if pin is None:
                raise PreviousResponseUnknown(
                    f"previous_response_id {previous[:100]!r} is not a response this gateway passed on (or "
                    "it is older than CANARYGATE_FEEDBACK_TTL_S): it cannot tell which server holds it; send "
                    "the conversation's input without previous_response_id",
                    param="previous_response_id",
                )
            return pinned_arm(pin, route, previous, "previous_response_id"), conversation
        assert conversation is not None
        pin = await self._pins.recall("conversation", conversation, scope, wait=False)
        if pin is None:
            return None, conversation  # its first turn through the gateway: assigned as any request is
        return pinned_arm(pin, route, conversation, "conversation"), conversation

    def _pin(self, request: Request, attempt: Attempt) -> None:
        """A Responses answer is leaving: remember which arm's server holds it (and the conversation)."""
        if request.endpoint != "responses" or self._pins is None or attempt.answer is None:
            return
        made = attempt.answer.get("id")
        if isinstance(made, str) and made:
            self._pins.remember("response", made, request.scope, request.route, attempt.arm)
        if request.conversation is not None:
            self._pins.remember(
                "conversation", request.conversation, request.scope, request.route, attempt.arm
            )

    def _no_fallback(
        self,
        request: Request,
        candidate: Attempt,
        breaker: CircuitBreaker | None,
        reply: Reply,
        denied: str | None,
    ) -> NoReturn:
        """The candidate's failure goes to the client (denied: why a fallback that was due did not happen)."""
        reply.fallback_denied = denied
        self._ledger.book(request, candidate, breaker=breaker, stats_arm="candidate")
        assert candidate.error is not None
        raise candidate.error

    def _fell_back(self, request: Request, reply: Reply, reason: str, *, attempted: bool) -> None:
        reply.fallback = reason
        request.metrics.fallbacks[(reason, request.cohort)].inc()
        self._stats.fallback(request, attempted)
        if request.trace is not None and self._traces is not None:
            self._traces.fallback(request.trace)

    async def _attempt(
        self,
        request: Request,
        arm: RouteArm,
        enforce: Collection[str],
        deadline: float,
        reply: Reply,
        watch: DisconnectWatch,
        breaker: CircuitBreaker | None = None,
    ) -> Attempt:
        """One upstream call, answered to the client unless it failed before the first byte. Returns the
        attempt with its failure (attempt.error; when reply.started, the client has already been told), for
        the caller to book once its meaning is known. When the client leaves (or the gateway fails), it is
        booked here, without a verdict on the arm, and the exception goes on."""
        reply.arm = arm.name
        attempt = Attempt(
            arm,
            "primary",
            request.metrics.arm(arm.name, "primary", request.cohort, request.endpoint),
            enforce,
        )
        slots = self._capacity.slots(arm)
        if slots is not None:
            slots.primary_started()  # a shadow call in the user's way is cancelled
        try:
            attempt.call = request.call(arm, reply.request_id, deadline)
            if request.span is not None:
                attempt.span = self._tracing.client_span(
                    request.span,
                    request.route.name,
                    attempt.call,
                    conversation=request.trace.trace if request.trace is not None else None,
                    rollout=request.route.rollout_key,
                )
            if not request.stream:
                await self._forward(attempt, request, reply, watch)
            elif request.rules is not None and enforce and request.route.buffer_streams:
                attempt.error = await self._stream_validated(attempt, request, reply, watch)
            else:
                attempt.error = await self._stream(attempt, request, reply, watch)
        except GatewayError as exc:
            attempt.error = exc
        except BaseException as exc:
            gone = isinstance(exc, ClientGone) or not isinstance(exc, Exception)  # or cancelled
            attempt.unfinished = "client_closed" if gone else "internal_error"
            attempt.end()
            self._ledger.book(request, attempt, breaker=breaker, stats_arm=arm.name)
            raise
        finally:
            request.upstream_s += attempt.upstream_s
            if slots is not None:
                slots.primary_ended()
        attempt.end()
        return attempt

    async def _forward(
        self, attempt: Attempt, request: Request, reply: Reply, watch: DisconnectWatch
    ) -> None:
        resp, data, answer = await fetch(self._upstream, attempt)
        if request.endpoint != "embeddings":  # without rules, the answer's shape is still checked
            failure = await request.check(answer)
            if failure is not None or request.rules is not None:
                invalid = attempt.judge(failure, reply, self.logged)
                if invalid is not None:
                    raise invalid
        self._pin(request, attempt)
        watch.finishing()
        await reply.complete(resp.status, data, _content_type(resp, JSON))

    async def _stream(
        self, attempt: Attempt, request: Request, reply: Reply, watch: DisconnectWatch
    ) -> GatewayError | None:
        """Relay as it arrives; with rules, validate alongside and record (nothing can be taken back)."""
        resp, first = await first_chunk(self._upstream, attempt)
        call = attempt.call
        assert call is not None
        api = request.endpoint
        try:
            tail = Tail()
            kept = (  # the whole answer is needed (a Responses or Messages stream's usage is spread over it)
                request.rules is not None or request.pairs or evaluated(request) or api in TRANSLATED
            )
            accumulator = accumulator_for(api) if kept else None
            await reply.start_stream(resp.status, _content_type(resp, EVENT_STREAM))
            observe = observer(tail, accumulator, request.route.max_buffer_bytes)
            error = await relay(resp, reply, first, call.failure, observe, watch.finishing, FINISHED[api])
            attempt.closed()
            if error is not None:
                _log_error(reply, error)
                return error
            overflowed = accumulator is not None and accumulator.overflowed
            if overflowed:
                log.warning(
                    "request_id=%s route=%s arm=%s stream passed validation.max_buffer_bytes; not validated",
                    *reply.context(),
                )
            answer = accumulator.body() if accumulator is not None else None
            if answer is not None and api in TRANSLATED:
                # past the bound only its id is known (no usage: none counted)
                attempt.answered({"id": answer.get("id")} if overflowed else answer)
                self._pin(request, attempt)
                await reply.end_stream()
            else:
                await reply.end_stream()
                attempt.answered(tail.last_event())
            if answer is not None and accumulator is not None and not overflowed:
                attempt.accumulated = as_chat(api, answer)
                if request.rules is not None:
                    failure = await request.check(answer, accumulator.malformed)
                    return attempt.judge(failure, reply, self.logged, released=True)
            return None
        finally:
            resp.close()

    async def _stream_validated(
        self, attempt: Attempt, request: Request, reply: Reply, watch: DisconnectWatch
    ) -> GatewayError | None:
        """Hold the whole stream, validate it, then release it: invalid output never reaches the client."""
        resp, first = await first_chunk(self._upstream, attempt)
        call = attempt.call
        assert call is not None
        try:
            try:
                data, complete = await collect(resp, first, request.route.max_buffer_bytes)
            except Exception as exc:
                raise call.failure(exc) from exc
            finally:
                attempt.closed()
            if not complete:
                log.warning(
                    "request_id=%s route=%s arm=%s stream passed validation.max_buffer_bytes; "
                    "relayed unvalidated",
                    *reply.context(),
                )
                await reply.start_stream(resp.status, _content_type(resp, EVENT_STREAM))
                error = await relay(
                    resp,
                    reply,
                    data,
                    call.failure,
                    finishing=watch.finishing,
                    finished=FINISHED[request.endpoint],
                )
                if error is None:
                    await reply.end_stream()
                return error
            accumulator = accumulate(request.endpoint, data)
            if accumulator.error is not None:
                raise UpstreamError(
                    f"the {call.arm.name} upstream's stream ended with an error event",
                    code="upstream_protocol_error",
                )
            if not accumulator.finished:
                raise call.failure(CutShort())
            answer = accumulator.body()
            attempt.answered(answer if request.endpoint in TRANSLATED else last_event(data))
            attempt.accumulated = as_chat(request.endpoint, answer)
            failure = await request.check(answer, accumulator.malformed)
            invalid = attempt.judge(failure, reply, self.logged)
            if invalid is not None:
                raise invalid
            self._pin(request, attempt)
            await reply.start_stream(resp.status, _content_type(resp, EVENT_STREAM))
            await reply.chunk(data)
            watch.finishing()
            await reply.end_stream()
            return None
        finally:
            resp.close()

    def _route(self, payload: dict[str, Any]) -> Route:
        model = payload.get("model")
        if model is None or model == "":
            raise InvalidRequest(
                "'model' is required: set it to one of the routes listed by GET /v1/models",
                code="missing_model",
                param="model",
            )
        if not isinstance(model, str):
            raise wrong_type("model", "a string", model, "the name of a route listed by GET /v1/models")
        route = self._routes(model)
        if route is None:
            raise ModelNotFound(
                f"the model {model[:100]!r} does not exist on this gateway; GET /v1/models lists the routes",
                param="model",
            )
        return route

    async def _rules(self, payload: dict[str, Any], route: Route, endpoint: str) -> Rules | None:
        if endpoint == "embeddings":
            return None
        compiling = Compiling()
        try:
            rules = rules_for(payload, route.validation, self._schemas, compiling, endpoint)
            for schema, where in compiling.pending:  # past the request's share of the loop
                await self.checks.compile(schema, where)
                self._schemas.add(schema)
        except SchemaError as exc:
            raise InvalidRequest(str(exc), code="invalid_schema", param=exc.param) from None
        except FieldError as exc:
            raise InvalidRequest(str(exc), param=exc.param) from None
        return rules


def _check_fields(payload: dict[str, Any], endpoint: str) -> None:
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise wrong_type("stream", "true or false", stream)
    if stream and endpoint == "embeddings":
        raise InvalidRequest("embeddings cannot be streamed; remove 'stream'", param="stream")
    field = REQUIRED_FIELD.get(endpoint)
    if field is not None and payload.get(field) in (None, "", []):
        raise InvalidRequest(f"'{field}' is required for this endpoint", code="missing_field", param=field)
    if endpoint in ("chat", "messages") and not isinstance(payload["messages"], list):
        raise wrong_type("messages", "an array", payload["messages"], "of message objects")
    if endpoint == "messages":
        limit = payload.get("max_tokens")
        if limit is None:
            raise InvalidRequest(
                "'max_tokens' is required by the Messages API: a positive integer",
                code="missing_field",
                param="max_tokens",
            )
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise wrong_type("max_tokens", "an integer", limit, "1 or more")
        if limit < 1:
            raise InvalidRequest(f"'max_tokens' must be 1 or more, got {limit}", param="max_tokens")
    if endpoint == "responses":
        given = payload.get("input")
        if given is not None and not isinstance(given, str | list):
            raise wrong_type("input", "a string or an array", given, "text, or input items")


def _check_content_type(content_type: str | None) -> None:
    if content_type is None:
        return
    media = media_type(content_type)
    if not is_json(media):
        raise UnsupportedMediaType(f"send the body as application/json, not {media[:60]!r}")


def _content_type(resp: Response, default: bytes) -> bytes:
    value = resp.headers.get("content-type")
    return value.encode("latin-1") if value else default


def _log_error(reply: Reply, exc: GatewayError) -> None:
    log_error(exc, *reply.context())
