"""A client request and its upstream attempts: what each attempt sends, measures and concludes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import ClientTimeout
from opentelemetry.trace import Span

from gateway.apis import ANTHROPIC_HEADERS, as_chat
from gateway.asgi import Reply
from gateway.body import Body
from gateway.checks import SchemaChecks
from gateway.errors import GatewayError, InvalidOutput, UpstreamError, UpstreamTimeout
from gateway.logs import Every
from gateway.mirror import Observation, Pair
from gateway.route import Route, RouteArm
from gateway.routing import ANONYMOUS, Unit
from gateway.streaming import MAX_PENDING, first_data_end
from gateway.telemetry import ArmMetrics, RouteMetrics
from gateway.upstream import Call, Response, Upstream
from gateway.validation import SHAPE_ONLY, Deferred, Failure, Rules, check_for

if TYPE_CHECKING:
    from gateway.traces import Step

log = logging.getLogger("gateway.proxy")

# Client tracing headers passed upstream as they came when the gateway makes no spans of its own.
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


def upstream_headers(arm: RouteArm, client: Mapping[str, str], rid: str, api: str = "chat") -> dict[str, str]:
    """What every call to an arm carries: its own headers and credentials (the client's only when the
    policy forwards them), JSON, no compression on the hop, the request id; on the Messages API, the
    client's anthropic-version and anthropic-beta (what the server is to speak)."""
    headers = dict(arm.headers)
    headers["Content-Type"] = "application/json"
    headers["Accept-Encoding"] = "identity"
    headers["X-Request-Id"] = rid
    if arm.forward_client_auth and "authorization" in client:
        headers["Authorization"] = client["authorization"]
    if api == "messages":
        if arm.forward_client_auth and "x-api-key" in client and "authorization" not in client:
            headers["x-api-key"] = client["x-api-key"]
        for name in ANTHROPIC_HEADERS:
            if name in client:
                headers[name] = client[name]
    return headers


class Request:
    """What every attempt at one client request shares."""

    __slots__ = (
        "body",
        "checks",
        "cohort",
        "conversation",
        "endpoint",
        "headers",
        "metrics",
        "pairs",
        "payload",
        "pinned",
        "request_id",
        "route",
        "rules",
        "scope",
        "share",
        "span",
        "stream",
        "token",
        "trace",
        "unit",
        "upstream_s",
        "weighed",
    )

    def __init__(
        self,
        route: Route,
        endpoint: str,
        body: Body,
        headers: dict[str, str],
        token: str | None,
        rules: Rules | None,
        metrics: RouteMetrics,
        span: Span | None,
        cohort: str,
        checks: SchemaChecks,
        unit: Unit = ANONYMOUS,
        share: float = 0.0,
        request_id: str = "",
    ) -> None:
        self.request_id = request_id
        self.checks = checks  # where schema checks too costly for the loop run
        self.route = route
        self.cohort = cohort
        self.unit = unit  # who it is, for the statistics, and its probability of being the candidate's
        self.share = share
        self.endpoint = endpoint
        self.body = body
        self.payload = body.payload
        self.headers = headers
        self.token = token
        self.rules = rules
        self.metrics = metrics
        self.span = span
        self.stream = body.payload.get("stream") is True
        self.upstream_s = 0.0  # time spent waiting on upstreams, summed over attempts
        self.pairs: list[Pair] = []  # shadow calls that will be compared with this request's answer
        self.trace: Step | None = None  # its step in a trace (assignment.trace_keys), when it has one
        self.pinned: RouteArm | None = None  # the arm holding the state it continues (gateway.pins)
        self.scope: str | None = None  # the client's key, when keys are required: its records are its own
        self.conversation: str | None = None  # the Responses API conversation it continues
        self.weighed = "base"  # the arm the route's weights (and overrides) chose, pinned or not

    def call(self, arm: RouteArm, rid: str, deadline: float) -> Call:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamTimeout(
                f"the request's deadline ({self.route.deadline_s:g}s, timeouts.deadline_s) passed "
                f"before the {arm.name} arm could be asked"
            )
        timeout = arm.client_timeout
        if remaining < arm.timeouts.total_s:
            timeout = ClientTimeout(total=remaining, connect=min(arm.timeouts.connect_s, remaining))
        headers = upstream_headers(arm, self.headers, rid, self.endpoint)
        if self.span is None:
            for name in TRACE_HEADERS:
                if name in self.headers:
                    headers[name] = self.headers[name]
        elif "baggage" in self.headers:  # carried on, with the arm's added (Tracing.client_span)
            headers["baggage"] = self.headers["baggage"]
        body = self.body.with_model(arm.model)  # the client's bytes, this arm's model
        first_token_s = min(arm.timeouts.first_token_s, remaining)
        return Call(arm, self.endpoint, body, headers, self.token, timeout, first_token_s, self.stream)

    async def check(self, answer: dict[str, Any] | None, malformed: str | None = None) -> Failure | None:
        """The answer's first failure; malformed: what was wrong with a stream's shape, when it was.
        Without rules, only the answer's shape is checked. Schema checks that may be costly run in the
        worker processes, after everything else has passed."""
        if malformed is not None:
            return Failure("malformed", malformed)
        rules = self.rules or SHAPE_ONLY
        later: list[Deferred] = []
        failure = check_for(self.endpoint)(answer, rules, later)
        if failure is None and later:
            failure = await self.checks.first_failure(later)
        return failure


class Attempt:
    """One upstream call: its timing, its answer as far as it was read, and its verdict. The ledger books
    it once its meaning is known (for a candidate that failed: once the base has been asked too)."""

    __slots__ = (
        "accumulated",
        "answer",
        "arm",
        "call",
        "cost",
        "duration_s",
        "end_ns",
        "enforce",
        "error",
        "metrics",
        "mode",
        "opened",
        "output_tokens",
        "span",
        "started",
        "status",
        "ttft_s",
        "unfinished",
        "upstream_s",
        "validation",
    )

    def __init__(self, arm: RouteArm, mode: str, metrics: ArmMetrics, enforce: Collection[str]) -> None:
        self.arm = arm
        self.mode = mode  # "primary", or "mirror" for shadow calls (and noise-floor replays)
        self.metrics = metrics
        self.enforce = enforce
        self.started = time.perf_counter()
        self.opened = self.started
        self.duration_s = 0.0
        self.end_ns: int | None = None  # when it ended, for its span (booked later than that, maybe)
        self.error: GatewayError | None = None  # how it failed; None: answered
        # client_closed: the client left; cancelled: a shadow call that yielded to a user or was turned
        # off; internal_error: the gateway failed. No verdict on the arm, either way.
        self.unfinished: Literal["client_closed", "cancelled", "internal_error"] | None = None
        self.call: Call | None = None
        self.metrics.inflight.inc()
        self.span: Span | None = None
        self.answer: dict[str, Any] | None = None  # the parsed answer, or a stream's last event
        self.accumulated: dict[str, Any] | None = None  # a stream rebuilt into a complete answer, when it was
        self.output_tokens: int | None = None
        self.cost: float | None = None  # by the arm's prices, when it has them and usage came back
        self.status: int | None = None
        self.ttft_s: float | None = None
        self.upstream_s = 0.0
        self.validation = "skipped"

    def open(self) -> Call:
        """The call, marking the moment the upstream is asked."""
        assert self.call is not None
        self.opened = time.perf_counter()
        return self.call

    def closed(self) -> None:
        """The upstream is done (answered, failed or cut off)."""
        self.upstream_s += time.perf_counter() - self.opened

    def end(self) -> None:
        """The attempt is over (its booking may come later)."""
        self.duration_s = time.perf_counter() - self.started
        self.end_ns = time.time_ns()
        self.metrics.inflight.dec()
        self.metrics.duration.observe(self.duration_s)

    def first_token(self) -> None:
        self.ttft_s = time.perf_counter() - self.started
        self.metrics.ttft.observe(self.ttft_s)

    @property
    def invalid(self) -> bool:
        return self.validation not in ("ok", "skipped")

    def answered(self, answer: Any) -> None:
        """Count the tokens the upstream reports for this answer (or that it reported none). A Responses or
        Messages answer is kept as a chat completion reads (apis.as_chat)."""
        if self.call is not None:
            answer = as_chat(self.call.endpoint, answer)
        self.answer = answer if isinstance(answer, dict) else None
        usage = self.answer.get("usage") if self.answer is not None else None
        if not isinstance(usage, dict):
            self.metrics.usage_missing.inc()
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            self.metrics.tokens_in.inc(prompt)
        if isinstance(completion, int):
            self.metrics.tokens_out.inc(completion)
            self.output_tokens = completion
        price = self.call.arm.price if self.call is not None else None
        if price is not None:
            self.cost = (prompt if isinstance(prompt, int) else 0) * price[0] + (
                self.output_tokens or 0
            ) * price[1]
            self.metrics.cost.inc(self.cost)

    def observation(self) -> Observation:
        """This attempt as one side of a shadow pair."""
        failed = self.error is not None or self.unfinished is not None
        answer = None if failed else (self.accumulated if self.accumulated is not None else self.answer)
        return Observation(
            answer,
            self.duration_s,
            self.output_tokens,
            self.error,
            self.invalid,
            self.unfinished is not None,
            self.validation if self.invalid else None,
        )

    def judge(
        self, failure: Failure | None, reply: Reply, logged: Every, *, released: bool = False
    ) -> InvalidOutput | None:
        """Record the verdict. Returns InvalidOutput for a kind enforced here on an answer not yet released
        (the caller withholds it: the attempt failed); any other failure, and every failure of an answer
        already released (passthrough streams), is counted, logged (at most once per route, arm and kind
        every `logged.seconds`) and let through."""
        if failure is None:
            self.validation = "ok"
            return None
        self.validation = failure.kind
        self.metrics.validation[failure.kind].inc()
        assert self.call is not None
        invalid = InvalidOutput(failure.kind, failure.message, self.call.arm.name)
        enforced = failure.kind in self.enforce
        if enforced and not released:
            return invalid
        more = logged.due((reply.route, reply.arm, invalid.kind))
        if more is not None:
            log.info(
                "request_id=%s route=%s arm=%s output failed validation (%s), returned unchanged: %s%s",
                *reply.context(),
                invalid.kind,
                invalid.detail,
                more,
            )
        return None


async def fetch(upstream: Upstream, attempt: Attempt) -> tuple[Response, bytes, Any]:
    """A non-streamed exchange: the response, its body, and the body parsed as a JSON object. Raises the
    upstream's error status as UpstreamHTTPError; counts the answer's tokens."""
    call = attempt.open()

    def seen(status: int) -> None:
        attempt.status = status

    try:
        resp, data, answer = await upstream.fetch(call, seen)
    finally:
        attempt.closed()
    attempt.answered(answer)
    return resp, data, answer


async def first_chunk(upstream: Upstream, attempt: Attempt) -> tuple[Response, bytes]:
    """Open the stream and wait for its first whole event: only then is the client's response started."""
    call = attempt.open()
    try:
        resp, first = await asyncio.wait_for(_open_stream(upstream, call), call.first_token_s)
    except TimeoutError:
        attempt.closed()
        raise UpstreamTimeout(
            f"the {call.arm.name} upstream sent no token within {call.first_token_s:g}s "
            "(timeouts.first_token_s / deadline_s)"
        ) from None
    except BaseException:
        attempt.closed()
        raise
    attempt.status = resp.status
    attempt.first_token()
    return resp, first


async def _open_stream(upstream: Upstream, call: Call) -> tuple[Response, bytes]:
    resp = await upstream.open(call)
    handed_over = False
    try:
        if resp.status >= 400:
            raise call.http_error(resp, await resp.read())
        # The client's response starts with the first whole event that carries data (comments such as
        # `: keepalive` are no first token): an upstream that breaks before it has sent the client nothing,
        # so the request can still fall back.
        first = await resp.readany()
        while first and not first_data_end(first) and len(first) <= MAX_PENDING:
            more = await resp.readany()
            if not more:
                break
            first += more
        if not first_data_end(first) and len(first) <= MAX_PENDING:
            raise UpstreamError(
                f"the {call.arm.name} upstream's stream ended before its first data event",
                code="upstream_protocol_error",
            )
        handed_over = True
        return resp, first
    except GatewayError:
        raise
    except Exception as exc:
        raise call.failure(exc) from exc
    finally:
        if not handed_over:
            resp.close()
