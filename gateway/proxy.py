"""The request pipeline, top to bottom:

auth -> body -> route -> assign arm -> (circuit open? base) -> attempt the arm -> validate
     -> on a candidate failure listed in fallback.on, within budget and deadline: attempt base -> reply

Kept framework-free (raw ASGI, orjson, aiohttp): it is the hot path, and bench/ measures it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import aiohttp
import orjson

from gateway.asgi import (
    EVENT_STREAM,
    JSON,
    ClientGone,
    DisconnectWatch,
    Receive,
    Reply,
    Scope,
    Send,
    header_map,
    read_body,
    request_id,
)
from gateway.auth import ApiKeys, bearer_token
from gateway.errors import (
    GatewayError,
    InternalError,
    InvalidOutput,
    InvalidRequest,
    ModelNotFound,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
    log_error,
)
from gateway.fallback import CIRCUIT_OPEN, Guards, reason_for
from gateway.route import Route, RouteArm
from gateway.routing import OVERRIDE_HEADER, choose_arm, unit_key
from gateway.streaming import Accumulator, EventParser, collect, relay
from gateway.upstream import Call, Upstream
from gateway.validation import (
    KINDS,
    Failure,
    Rules,
    SchemaCache,
    SchemaError,
    check_chat,
    check_completion,
    rules_for,
)

log = logging.getLogger("gateway.proxy")

# Fields each endpoint cannot do without; checked here so the client hears it from us, clearly.
REQUIRED_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input"}


class Proxy:
    def __init__(
        self,
        routes: Callable[[str], Route | None],
        upstream: Upstream,
        api_keys: ApiKeys,
        max_body_bytes: int,
    ) -> None:
        self._routes = routes
        self._upstream = upstream
        self._api_keys = api_keys
        self._max_body = max_body_bytes
        self._schemas = SchemaCache()
        self.guards = Guards()

    async def handle(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        headers = header_map(scope)
        reply = Reply(send, request_id(headers.get("x-request-id")))
        try:
            token = bearer_token(headers.get("authorization"))
            self._api_keys.authenticate(token)
            _check_content_type(headers.get("content-type"))
            body = await read_body(receive, headers.get("content-length"), self._max_body)
            payload = _parse(body)
            route = self._route(payload)
            _check_fields(payload, endpoint)
            reply.route = route.name
            key = unit_key(route.sticky_sources, headers, payload, token)
            override = headers.get(OVERRIDE_HEADER) if route.allow_override else None
            assigned = choose_arm(route, key, override).arm
            rules = self._rules(payload, route, endpoint)
            request = Request(route, endpoint, payload, headers, token, rules)
            async with DisconnectWatch(receive) as watch:
                await self._serve(request, assigned, reply, watch)
        except GatewayError as exc:
            _log_error(reply, exc)
            await reply.error(exc)
        except ClientGone:
            log.info("request_id=%s route=%s arm=%s client disconnected", *reply.context())
        except Exception:
            log.exception("request_id=%s route=%s arm=%s internal error", *reply.context())
            await reply.error(InternalError(f"internal gateway error; quote request id {reply.request_id}"))

    async def _serve(self, request: Request, assigned: str, reply: Reply, watch: DisconnectWatch) -> None:
        route = request.route
        budget = self.guards.budget(route)
        budget.record_request()
        deadline = time.monotonic() + route.deadline_s
        breaker = self.guards.breaker(route)
        if assigned == "candidate" and route.candidate is not None:
            if breaker is None or breaker.allow():
                verdict: bool | None = None
                try:
                    error = await self._attempt(
                        request, route.candidate, route.enforce_on_candidate, deadline, reply, watch
                    )
                    verdict = error is not None and reason_for(error) is not None
                finally:
                    if breaker is not None and verdict is not None:
                        breaker.record(verdict)
                    elif breaker is not None:
                        breaker.release()  # the client left: no verdict on the candidate
                if error is None or reply.started:
                    return  # answered (a failure after the first byte was told to the client in the stream)
                self._check_fallback(route, error, budget.try_spend, deadline, reply)
            else:
                reply.fallback = CIRCUIT_OPEN
        error = await self._attempt(
            request, route.base, KINDS if route.enforce_on_base else (), deadline, reply, watch
        )
        if error is not None and not reply.started:
            raise error

    def _check_fallback(
        self, route: Route, error: GatewayError, spend: Callable[[], bool], deadline: float, reply: Reply
    ) -> None:
        """Raises the candidate's error unless base may answer instead; marks the reply when it will."""
        reason = reason_for(error)
        if reason is None or reason not in route.fallback_on:
            raise error
        if deadline - time.monotonic() <= 0:
            reply.fallback_denied = "deadline"
            raise error
        if not spend():
            reply.fallback_denied = "budget"
            log.warning(
                "request_id=%s route=%s fallback budget spent: the candidate's error is returned (%s)",
                reply.request_id,
                route.name,
                reason,
            )
            raise error
        log.info(
            "request_id=%s route=%s fallback to base: %s: %s",
            reply.request_id,
            route.name,
            reason,
            error.message,
        )
        reply.fallback = reason

    async def _attempt(
        self,
        request: Request,
        arm: RouteArm,
        enforce: Collection[str],
        deadline: float,
        reply: Reply,
        watch: DisconnectWatch,
    ) -> GatewayError | None:
        """One upstream call, answered to the client unless it failed before the first byte.

        Returns the failure (None on success); when reply.started, the client has already been told.
        """
        reply.arm = arm.name
        try:
            call = request.call(arm, reply.request_id, deadline)
            if not request.stream:
                await self._forward(call, request, enforce, reply, watch)
                return None
            if request.rules is not None and enforce and request.route.buffer_streams:
                return await self._stream_validated(call, request, enforce, reply, watch)
            return await self._stream(call, request, enforce, reply, watch)
        except GatewayError as exc:
            return exc

    async def _forward(
        self, call: Call, request: Request, enforce: Collection[str], reply: Reply, watch: DisconnectWatch
    ) -> None:
        resp = await self._upstream.open(call)
        try:
            data = await resp.read()
        except Exception as exc:
            raise call.failure(exc) from exc
        finally:
            resp.release()
        if resp.status >= 400:
            raise call.http_error(resp, data)
        if request.rules is not None:
            try:
                body = orjson.loads(data)
            except orjson.JSONDecodeError:
                body = None
            _judge(request.check(body), enforce, call.arm, reply)
        watch.finishing()
        await reply.complete(resp.status, data, _content_type(resp, JSON))

    async def _stream(
        self, call: Call, request: Request, enforce: Collection[str], reply: Reply, watch: DisconnectWatch
    ) -> GatewayError | None:
        """Relay as it arrives; with rules, validate alongside and record (nothing can be taken back)."""
        resp, first = await self._first_chunk(call)
        try:
            accumulator = Accumulator() if request.rules is not None else None
            observe = _feeder(accumulator) if accumulator is not None else None
            await reply.start_stream(resp.status, _content_type(resp, EVENT_STREAM))
            error = await relay(resp, reply, first, call.failure, observe)
            if error is not None:
                _log_error(reply, error)
                return error
            watch.finishing()
            await reply.end_stream()
            if accumulator is not None:
                failure = request.check(accumulator)
                if failure is not None:
                    invalid = InvalidOutput(failure.kind, failure.message, call.arm.name)
                    _record_invalid(reply, invalid)
                    return invalid if failure.kind in enforce else None
            return None
        finally:
            resp.close()

    async def _stream_validated(
        self, call: Call, request: Request, enforce: Collection[str], reply: Reply, watch: DisconnectWatch
    ) -> GatewayError | None:
        """Hold the whole stream, validate it, then release it: invalid output never reaches the client."""
        resp, first = await self._first_chunk(call)
        try:
            try:
                data, complete = await collect(resp, first, request.route.max_buffer_bytes)
            except Exception as exc:
                raise call.failure(exc) from exc
            if not complete:
                log.warning(
                    "request_id=%s route=%s arm=%s stream passed validation.max_buffer_bytes; "
                    "relayed unvalidated",
                    *reply.context(),
                )
                await reply.start_stream(resp.status, _content_type(resp, EVENT_STREAM))
                error = await relay(resp, reply, data, call.failure)
                if error is None:
                    watch.finishing()
                    await reply.end_stream()
                return error
            accumulator = Accumulator()
            _feeder(accumulator)(data)
            if accumulator.error is not None:
                raise UpstreamError(
                    f"the {call.arm.name} upstream's stream ended with an error event",
                    code="upstream_protocol_error",
                )
            _judge(request.check(accumulator), enforce, call.arm, reply)
            await reply.start_stream(resp.status, _content_type(resp, EVENT_STREAM))
            await reply.chunk(data)
            watch.finishing()
            await reply.end_stream()
            return None
        finally:
            resp.close()

    async def _first_chunk(self, call: Call) -> tuple[aiohttp.ClientResponse, bytes]:
        """Open the stream and wait for its first bytes: only then is the client's response started."""
        try:
            return await asyncio.wait_for(self._open_stream(call), call.first_token_s)
        except TimeoutError:
            raise UpstreamTimeout(
                f"the {call.arm.name} upstream sent no token within {call.first_token_s:g}s "
                "(timeouts.first_token_s / deadline_s)"
            ) from None

    async def _open_stream(self, call: Call) -> tuple[aiohttp.ClientResponse, bytes]:
        resp = await self._upstream.open(call)
        handed_over = False
        try:
            if resp.status >= 400:
                raise call.http_error(resp, await resp.read())
            first = await resp.content.readany()
            if not first:
                raise aiohttp.ServerDisconnectedError()
            handed_over = True
            return resp, first
        except GatewayError:
            raise
        except Exception as exc:
            raise call.failure(exc) from exc
        finally:
            if not handed_over:
                resp.close()

    def _route(self, payload: dict[str, Any]) -> Route:
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest(
                "'model' is required: set it to one of the routes listed by GET /v1/models",
                code="missing_model",
                param="model",
            )
        route = self._routes(model)
        if route is None:
            raise ModelNotFound(
                f"the model {model[:100]!r} does not exist on this gateway; GET /v1/models lists the routes",
                param="model",
            )
        return route

    def _rules(self, payload: dict[str, Any], route: Route, endpoint: str) -> Rules | None:
        if endpoint == "embeddings":
            return None
        try:
            return rules_for(payload, route.validation, self._schemas)
        except SchemaError as exc:
            raise InvalidRequest(str(exc), code="invalid_schema") from None


class Request:
    """What every attempt at one client request shares."""

    __slots__ = ("endpoint", "headers", "payload", "route", "rules", "stream", "token")

    def __init__(
        self,
        route: Route,
        endpoint: str,
        payload: dict[str, Any],
        headers: dict[str, str],
        token: str | None,
        rules: Rules | None,
    ) -> None:
        self.route = route
        self.endpoint = endpoint
        self.payload = payload
        self.headers = headers
        self.token = token
        self.rules = rules
        self.stream = payload.get("stream") is True

    def call(self, arm: RouteArm, rid: str, deadline: float) -> Call:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamTimeout(
                f"the request's deadline ({self.route.deadline_s:g}s, timeouts.deadline_s) passed "
                f"before the {arm.name} arm could be asked"
            )
        timeout = arm.client_timeout
        if remaining < arm.timeouts.total_s:
            timeout = aiohttp.ClientTimeout(total=remaining, sock_connect=arm.timeouts.connect_s)
        self.payload["model"] = arm.model
        headers = dict(arm.headers)
        headers["Content-Type"] = "application/json"
        headers["Accept-Encoding"] = "identity"
        headers["X-Request-Id"] = rid
        if arm.forward_client_auth and "authorization" in self.headers:
            headers["Authorization"] = self.headers["authorization"]
        body = orjson.dumps(self.payload)
        first_token_s = min(arm.timeouts.first_token_s, remaining)
        return Call(arm, self.endpoint, body, headers, self.token, timeout, first_token_s)

    def check(self, answer: dict[str, Any] | Accumulator | None) -> Failure | None:
        assert self.rules is not None
        if isinstance(answer, Accumulator):
            answer = answer.chat_body() if self.endpoint == "chat" else answer.completion_body()
        if self.endpoint == "chat":
            return check_chat(answer, self.rules)
        return check_completion(answer, self.rules)


def _judge(failure: Failure | None, enforce: Collection[str], arm: RouteArm, reply: Reply) -> None:
    """Raise InvalidOutput for an enforced failure; record (and let through) any other."""
    if failure is None:
        return
    invalid = InvalidOutput(failure.kind, failure.message, arm.name)
    if failure.kind in enforce:
        raise invalid
    _record_invalid(reply, invalid)


def _record_invalid(reply: Reply, invalid: InvalidOutput) -> None:
    log.info(
        "request_id=%s route=%s arm=%s output failed validation (%s), returned unchanged: %s",
        *reply.context(),
        invalid.kind,
        invalid.detail,
    )


def _feeder(accumulator: Accumulator) -> Callable[[bytes], None]:
    parser = EventParser()

    def feed(data: bytes) -> None:
        for event in parser.feed(data):
            accumulator.add(event)

    return feed


def _parse(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise InvalidRequest(
            f"the request body must be a JSON object, got a JSON {type(payload).__name__}",
            code="invalid_json",
        )
    return payload


def _check_fields(payload: dict[str, Any], endpoint: str) -> None:
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false", param="stream")
    if stream and endpoint == "embeddings":
        raise InvalidRequest("embeddings cannot be streamed; remove 'stream'", param="stream")
    field = REQUIRED_FIELD[endpoint]
    if payload.get(field) in (None, "", []):
        raise InvalidRequest(f"'{field}' is required for this endpoint", code="missing_field", param=field)
    if endpoint == "chat" and not isinstance(payload["messages"], list):
        raise InvalidRequest("'messages' must be an array of message objects", param="messages")


def _check_content_type(content_type: str | None) -> None:
    if content_type is None:
        return
    media = content_type.partition(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"send the body as application/json, not {media[:60]!r}")


def _content_type(resp: aiohttp.ClientResponse, default: bytes) -> bytes:
    value = resp.headers.get("content-type")
    return value.encode("latin-1") if value else default


def _log_error(reply: Reply, exc: GatewayError) -> None:
    log_error(exc, *reply.context())
