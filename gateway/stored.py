"""A stored response, asked for by its id, from the server that holds it: `GET` and `DELETE
/v1/responses/{id}`, `POST /v1/responses/{id}/cancel`, `GET /v1/responses/{id}/input_items`. A background
response (`background: true`) is only ever read this way.

The id is looked up where the gateway recorded which arm answered it (gateway.pins): only responses the
gateway passed on, to their client, go to the arm's server, at a path the gateway builds (the id quoted,
the client's query string after it). Nothing is validated or counted in the rollout: the answer was
judged when it was made (a background response is judged by its client).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import quote

from yarl import URL

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
from gateway.attempt import upstream_headers
from gateway.auth import ApiKeys, bearer_token
from gateway.errors import GatewayError, InternalError, MethodNotAllowed, NotFound, log_error
from gateway.pins import Pins, pinned_arm
from gateway.route import Route
from gateway.upstream import Upstream, http_error

log = logging.getLogger("gateway.stored")

# What may follow /v1/responses/{id}, and with which methods.
ACTIONS = {"": ("GET", "DELETE"), "cancel": ("POST",), "input_items": ("GET",)}
PREFIXES = ("/v1/responses/", "/responses/")


class StoredResponses:
    def __init__(
        self,
        routes: Callable[[str], Route | None],
        upstream: Upstream,
        api_keys: ApiKeys,
        pins: Pins,
        max_body_bytes: int,
        client_timeout_s: float,
    ) -> None:
        self._routes = routes
        self._upstream = upstream
        self._api_keys = api_keys
        self._pins = pins
        self._max_body = max_body_bytes
        self._client_timeout = client_timeout_s

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_map(scope)
        reply = Reply(send, new_request_id(), client_request_id(headers.get("x-request-id")))
        reply.api = "responses"
        try:
            token = bearer_token(headers.get("authorization"))
            self._api_keys.authenticate(token)
            path = scope["path"]
            rest = next(path[len(p) :] for p in PREFIXES if path.startswith(p))
            response_id, _, action = rest.partition("/")
            if not response_id or action not in ACTIONS:
                raise NotFound(
                    f"no such endpoint: {scope['method']} {path[:200]}; a stored response is read at "
                    "/v1/responses/{id}, /v1/responses/{id}/input_items, cancelled at .../cancel"
                )
            if scope["method"] not in ACTIONS[action]:
                raise MethodNotAllowed(f"use {' or '.join(ACTIONS[action])} for {path[:200]}")
            await read_body(receive, headers.get("content-length"), self._max_body, self._client_timeout)
            owner = token if self._api_keys.enabled else None
            pin = await self._pins.recall("response", response_id, owner)
            route = self._routes(pin.route) if pin is not None else None
            if pin is None or route is None:
                raise NotFound(
                    f"response {response_id[:100]!r} is not one this gateway passed on (or it is older than "
                    "CANARYGATE_FEEDBACK_TTL_S): it cannot tell which server holds it",
                    code="response_not_found",
                )
            arm = pinned_arm(pin, route, response_id, "response")
            reply.route, reply.arm, reply.model = route.name, arm.name, route.answer_model
            target = f"/responses/{quote(response_id, safe='')}" + (f"/{action}" if action else "")
            query = scope.get("query_string", b"").decode("latin-1")
            url = URL(arm.url + target + (f"?{query}" if query else ""), encoded=True)
            sent = upstream_headers(arm, headers, reply.request_id, "responses")
            body = b"" if scope["method"] == "POST" else None
            resp = await self._upstream.send(arm, scope["method"], url, sent, body, arm.client_timeout)
            async with DisconnectWatch(receive) as watch:
                try:
                    content_type = resp.headers.get("content-type", "")
                    if resp.status < 400 and content_type.startswith("text/event-stream"):
                        await reply.start_stream(resp.status, EVENT_STREAM)  # a background response, streamed
                        while chunk := await resp.readany():
                            await reply.chunk(chunk)
                        watch.finishing()
                        await reply.end_stream()
                        return
                    data = await resp.read()
                finally:
                    resp.close()
                if resp.status >= 400:
                    secrets = (arm.secret, token if arm.forward_client_auth else None)
                    raise http_error(resp.status, data, arm, secrets, resp.headers.get("retry-after"))
                watch.finishing()
                await reply.complete(resp.status, data, content_type.encode("latin-1") or JSON)
        except GatewayError as exc:
            log_error(exc, *reply.context())
            await reply.error(exc)
        except ClientGone:
            log.info("request_id=%s route=%s arm=%s client disconnected", *reply.context())
        except Exception:
            log.exception("request_id=%s route=%s arm=%s internal error", *reply.context())
            await reply.error(InternalError(f"internal gateway error; quote request id {reply.request_id}"))
