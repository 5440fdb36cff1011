"""The request pipeline: auth -> body -> route -> assign arm -> send upstream -> reply.

Kept framework-free (raw ASGI, orjson, aiohttp): it is the hot path, and bench/ measures it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
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
    InvalidRequest,
    ModelNotFound,
    UnsupportedMediaType,
    UpstreamTimeout,
    log_error,
)
from gateway.route import Route, RouteArm
from gateway.routing import OVERRIDE_HEADER, choose_arm, unit_key
from gateway.streaming import relay
from gateway.upstream import Call, Upstream, failure

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
            arm = route.arm(choose_arm(route, key, override).arm)
            reply.arm = arm.name
            payload["model"] = arm.model
            call = Call(
                arm, endpoint, orjson.dumps(payload), _upstream_headers(arm, headers, reply.request_id), token
            )
            async with DisconnectWatch(receive) as watch:
                if payload.get("stream"):
                    await self._stream(call, reply, watch)
                else:
                    await self._forward(call, reply, watch)
        except GatewayError as exc:
            _log_error(reply, exc)
            await reply.error(exc)
        except ClientGone:
            log.info("request_id=%s route=%s arm=%s client disconnected", *reply.context())
        except Exception:
            log.exception("request_id=%s route=%s arm=%s internal error", *reply.context())
            await reply.error(InternalError(f"internal gateway error; quote request id {reply.request_id}"))

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

    async def _forward(self, call: Call, reply: Reply, watch: DisconnectWatch) -> None:
        resp = await self._upstream.open(call)
        try:
            data = await resp.read()
        except Exception as exc:
            raise failure(exc, call.arm) from exc
        finally:
            resp.release()
        if resp.status >= 400:
            raise call.http_error(resp, data)
        watch.finishing()
        await reply.complete(resp.status, data, _content_type(resp, JSON))

    async def _stream(self, call: Call, reply: Reply, watch: DisconnectWatch) -> None:
        limit = call.arm.timeouts.first_token_s
        try:
            resp, first = await asyncio.wait_for(self._first_chunk(call), limit)
        except TimeoutError:
            raise UpstreamTimeout(
                f"the {call.arm.name} upstream sent no token within {limit}s (timeouts.first_token_s)"
            ) from None
        try:
            await reply.start_stream(resp.status, _content_type(resp, EVENT_STREAM))
            error = await relay(resp, reply, first, lambda exc: failure(exc, call.arm))
            if error is not None:
                _log_error(reply, error)
                return
            watch.finishing()
            await reply.end_stream()
        finally:
            resp.close()

    async def _first_chunk(self, call: Call) -> tuple[aiohttp.ClientResponse, bytes]:
        """Open the stream and wait for its first bytes: only then is the client's response started."""
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
            raise failure(exc, call.arm) from exc
        finally:
            if not handed_over:
                resp.close()


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


def _upstream_headers(arm: RouteArm, client: dict[str, str], request_id: str) -> dict[str, str]:
    headers = dict(arm.headers)
    headers["Content-Type"] = "application/json"
    headers["Accept-Encoding"] = "identity"
    headers["X-Request-Id"] = request_id
    if arm.forward_client_auth and "authorization" in client:
        headers["Authorization"] = client["authorization"]
    return headers


def _content_type(resp: aiohttp.ClientResponse, default: bytes) -> bytes:
    value = resp.headers.get("content-type")
    return value.encode("latin-1") if value else default


def _log_error(reply: Reply, exc: GatewayError) -> None:
    log_error(exc, *reply.context())
