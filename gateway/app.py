"""create_app(settings): the ASGI app. The proxy endpoints are raw ASGI; the rest is FastAPI."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import re
import signal
import threading
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from gateway import endpoints, logs
from gateway.analysis import ArmWindow, per_interval
from gateway.apis import CLIENT_PATHS
from gateway.asgi import (
    ASGIApp,
    Message,
    Receive,
    Reply,
    Scope,
    Send,
    client_request_id,
    header_map,
    new_request_id,
)
from gateway.auth import ApiKeys, KeysFile, bearer_token
from gateway.capacity import Capacity
from gateway.checks import SchemaChecks
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    Unauthorized,
    Unavailable,
    log_error,
)
from gateway.evaluation.evaluations import Evaluations
from gateway.feedback import Assignments, Feedback, FeedbackIn
from gateway.fields import invalid_fields
from gateway.pins import Pins
from gateway.proxy import Proxy
from gateway.readiness import Readiness
from gateway.rollout import Analysis, Controller, Rollouts, analyse, effective
from gateway.route import Route
from gateway.routetable import RouteTable
from gateway.settings import Settings
from gateway.stats import Recorder
from gateway.store import StateUnavailable, Store
from gateway.store.rollouts import RouteState, order, skewed
from gateway.stored import ACTIONS as STORED_ACTIONS
from gateway.stored import PREFIXES as STORED_PREFIXES
from gateway.stored import StoredResponses
from gateway.tasks import LoopLag, Spawner
from gateway.telemetry import Metrics
from gateway.traces import Traces
from gateway.tracing import Tracing
from gateway.upstream import Upstream

log = logging.getLogger("gateway")

# Each API under /v1, and without it (a client whose base_url left it out).
PROXY_PATHS = {**CLIENT_PATHS, **{path.removeprefix("/v1"): api for path, api in CLIENT_PATHS.items()}}


class Services:
    """What the lifespan opens and closes; typed, so handlers never reach into string-keyed state."""

    def __init__(
        self, settings: Settings, registry: CollectorRegistry | None = None, tracing: Tracing | None = None
    ) -> None:
        self.settings = settings
        self.metrics = Metrics(registry, enabled=settings.metrics)
        self.tracing = tracing if tracing is not None else Tracing.from_env(os.environ)
        self.spawner = Spawner()
        self.store = (
            Store.redis(
                settings.redis_url,
                settings.redis_prefix,
                self.spawner,
                records_ttl_s=settings.feedback_ttl_s,
                records=settings.redis_records,
                on_error=self.metrics.state_sync_errors.inc,
            )
            if settings.redis_url
            else Store.memory(settings.feedback_ttl_s, settings.memory_records)
        )
        self.store.rollouts.on_change(self._state_changed)
        self._versions: dict[str, tuple[str, int]] = {}  # route -> (rollout, version) last applied
        self._skews: dict[str, dict[str, str] | None] = {}  # route -> its policy skew, last seen
        self.routes = RouteTable(
            settings.policy_dir,
            on_reload=self._reloaded,
            overlay=lambda route: effective(route, self.store.rollouts.current(route.name)),
        )
        self.rollouts = Rollouts(self.store.rollouts, self.routes.compiled, self.tracing)
        self.stats = Recorder(self.store.stats, self.store.rollouts)
        self.traces = Traces(
            self.store.traces,
            self.stats,
            self.metrics,
            self.routes.compiled,
            self.spawner,
            max_open=settings.max_open_traces,
        )
        self.assignments = Assignments(self.store.records, on_dropped=self.metrics.records_dropped.inc)
        self.pins = Pins(
            self.store.records,
            self.spawner,
            shared=self.store.backend != "memory",
            on_dropped=self.metrics.records_dropped.inc,
        )
        self.feedback = Feedback(
            self.assignments,
            self.store.backend,
            self.metrics,
            self.stats,
            self.routes.compiled,
            self.routes.routes,
        )
        self.upstream = Upstream()
        self.capacity = Capacity()  # the slots of servers that run few requests at once: users first
        self.evaluations = Evaluations(
            self.upstream, self.spawner, self.stats, self.metrics, self.tracing, os.environ, self.capacity
        )
        self.readiness = Readiness(self.upstream, settings.readyz_probe_timeout_s)
        self.controller = Controller(
            self.store.lease,
            self.store.stats,
            self.rollouts,
            self._automatic,
            on_analysis=self.metrics.gates,
            ready=self.readiness.check,
            preflight=self._preflight,
        )
        self.api_keys = ApiKeys(settings.api_keys, settings.api_key_groups)
        self.loop_lag = LoopLag()
        self.keys_file = (
            KeysFile(settings.api_keys_file, self.api_keys, settings.env_api_keys)
            if settings.api_keys_file is not None
            else None
        )
        self.stored = StoredResponses(
            self.routes.get,
            self.upstream,
            self.api_keys,
            self.pins,
            settings.max_body_bytes,
            settings.client_timeout_s,
        )
        self.proxy = Proxy(
            self.routes.get,
            self.upstream,
            self.api_keys,
            settings.max_body_bytes,
            settings.client_timeout_s,
            SchemaChecks(settings.schema_check_timeout_s),
            self.metrics,
            self.tracing,
            self.spawner,
            self.store.pairs,
            self.stats,
            self.assignments,
            self.evaluations,
            self.capacity,
            self.traces,
            self.pins,
        )

    async def _preflight(self, route: Route) -> dict[str, Any]:
        """The route's pre-flight phase, run in this gateway: its arms' calls take spare slots only (users
        first, as shadow calls), its judge is the route's. Returns what the rollout records."""
        from gateway.preflight import Preflight, Settings
        from gateway.preflight.dataset import load
        from gateway.preflight.report import recorded
        from gateway.preflight.run import Direct, Runner

        policy = route.automatic.preflight if route.automatic is not None else None
        assert policy is not None
        assert policy.dataset is not None
        path = route.source.parent / policy.dataset
        items = await asyncio.to_thread(load, path, limit=policy.limit)
        judge = self.evaluations.judge(route)
        settings = Settings.of(route)
        send = Direct(self.upstream, self.capacity)
        runner = Runner(route, items, send, judge, settings.samples, settings.concurrency, keep_answers=False)
        preflight = Preflight(runner, settings, policy.dataset)
        self.metrics.preflight(route.name, "running")
        try:
            report = await preflight.run(policy.timeout_s)
        except BaseException:
            self.metrics.preflight(route.name, None)
            raise
        self.metrics.preflight(route.name, report["verdict"])
        return recorded(report)

    def _automatic(self) -> list[Route]:
        return [route for route in self.routes.policies() if route.automatic is not None]

    def _reloaded(self, accepted: bool) -> None:
        self.metrics.policy_reloads.labels("ok" if accepted else "rejected").inc()
        if accepted:
            self.metrics.prepare(self.routes.routes())
            for route in self.routes.routes():
                self.proxy.shadows.mirrors.get(route)  # a new rollout: the old one's shadow calls stop
            self.spawner.spawn(self._adopt(), name="state-adopt")
            routes = list(self.routes.routes())
            bulkheads = [arm.bulkhead for route in routes for arm in route.arms()]
            bulkheads += self.evaluations.bulkheads(routes)
            self.spawner.spawn(self.upstream.retire(bulkheads), name="upstream-retire")

    async def _adopt(self) -> None:
        """New or changed policies: new rollouts start from their policy, the others keep their state."""
        await self.store.rollouts.adopt(self.routes.policies())
        self._show_rollouts()

    def _show_rollouts(self) -> None:
        """The rollout gauges of every route, from its current state."""
        for route in self.routes.routes():
            state = self.store.rollouts.current(route.name)
            if state is not None:
                self.metrics.rollout(state)
            self._check_skew(route.name)

    def skew(self, name: str) -> dict[str, str] | None:
        """How this replica's policy for a route differs from the active rollout (None: it does not)."""
        route = self.routes.compiled(name)
        state = self.store.rollouts.current(name)
        if route is None or state is None or not skewed(route, state):
            return None
        standing = "superseded" if order(route, state) == "older" else "not yet started"
        return {"policy_rollout": route.rollout_key, "active_rollout": state.rollout, "policy_is": standing}

    def _check_skew(self, name: str) -> None:
        """The skew gauge, and a log line each time a route's skew begins or ends."""
        skew = self.skew(name)
        seen = self._skews.get(name)
        self._skews[name] = skew
        self.metrics.skew(name, skew is not None)
        if skew == seen:
            return
        if skew is not None and skew["policy_is"] == "superseded":
            log.warning(
                "route=%s policy skew: this replica's policy is rollout %s, which rollout %s superseded; "
                "the route is served from the base only until this replica's policy catches up (to run it "
                "again, give it a new identity: see 'Several replicas' in the README)",
                name,
                skew["policy_rollout"],
                skew["active_rollout"],
            )
        elif skew is None and seen is not None:
            log.info("route=%s policy skew over: this replica serves the active rollout", name)

    def _state_changed(self, state: RouteState) -> None:
        self._check_skew(state.route)
        seen = self._versions.get(state.route)
        self._versions[state.route] = (state.rollout, state.version)
        self.routes.refresh(state.route)
        route = self.routes.get(state.route)
        if route is not None:
            self.proxy.shadows.mirrors.get(route)  # shadow traffic turned off: its mirror stops now
        moved = seen is not None and seen[0] == state.rollout and seen[1] < state.version
        self.metrics.rollout(state, transition=moved)
        if moved:
            last = state.history[-1] if state.history else None
            log.info(
                "route=%s rollout state v%d: %s, weight %g (%s, by %s)",
                state.route,
                state.version,
                state.phase,
                state.weight,
                last.reason if last else "",
                last.by if last else "",
            )

    async def start(self) -> None:
        self.routes.load()
        await self.store.start(self.routes.policies())
        self.metrics.prepare(self.routes.routes())
        self._show_rollouts()
        await self.upstream.start()
        self.spawner.spawn(self.stats.run(), name="stats-flush")
        self.spawner.spawn(self.assignments.run(), name="assignments-flush")
        self.spawner.spawn(self.traces.run(), name="traces")
        self.spawner.spawn(self.controller.run(), name="rollout-controller")
        self.spawner.spawn(self.loop_lag.run(), name="loop-lag")
        if self.settings.watch_policies:
            self.spawner.spawn(self.routes.watch(), name="policy-watch")
        if self.keys_file is not None:
            self.spawner.spawn(self.keys_file.watch(), name="keys-file-watch")
        log.info(
            "serving %d routes from %s: %s",
            len(self.routes.routes()),
            self.settings.policy_dir,
            ", ".join(r.name for r in self.routes.routes()),
        )
        if not self.api_keys.enabled:
            log.warning("client authentication is off: set CANARYGATE_API_KEYS or CANARYGATE_API_KEYS_FILE")

    async def close(self) -> None:
        await self.spawner.close()
        await self.controller.resign()
        await self.controller.close()
        with contextlib.suppress(StateUnavailable):
            await self.stats.flush()
            await self.assignments.flush()
            await self.traces.flush()
        await self.store.close()
        await self.upstream.close()
        self.proxy.checks.close()
        self.tracing.shutdown()
        self.metrics.worker_exited(os.getpid())


def create_app(
    settings: Settings, *, registry: CollectorRegistry | None = None, tracing: Tracing | None = None
) -> ASGIApp:
    """registry and tracing are for embedding and tests; by default a private registry and OTEL_* env."""
    services = Services(settings, registry, tracing)
    api = _api(services)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await api(scope, receive, send)
            return
        if scope["path"].startswith(STORED_PREFIXES):  # /v1/responses/{id}: from the server that holds it
            await services.stored.handle(scope, receive, send)
            return
        endpoint = PROXY_PATHS.get(scope["path"])
        if endpoint is not None and scope["method"] == "POST":
            await services.proxy.handle(scope, receive, send, endpoint)
            return
        reply = Reply(send, new_request_id(), client_request_id(header_map(scope).get("x-request-id")))
        if endpoint is not None:
            reply.api = endpoint  # told in its API's words
            error = MethodNotAllowed(f"use POST for {scope['path']}, not {scope['method']}")
            log_error(error, reply.context()[0])
            await reply.error(error)
            return
        scope.setdefault("state", {})["request_id"] = reply.context()[0]  # for the log: ours, and theirs
        await api(scope, receive, _tag_request_id(send, reply.request_id))

    app.services = services  # type: ignore[attr-defined]  # for tests and embedding
    return app


def _body_model(request: Request) -> type[BaseModel] | None:
    """The pydantic model of the body the matched endpoint takes (for its fields' descriptions)."""
    endpoint = request.scope.get("endpoint")
    try:
        hints = typing.get_type_hints(endpoint) if endpoint is not None else {}
    except (NameError, TypeError):
        return None
    for hint in hints.values():
        for option in (hint, *typing.get_args(hint)):
            if isinstance(option, type) and issubclass(option, BaseModel):
                return option
    return None


def _served(api: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path template) the gateway serves, for the hint of a 404."""
    served = [("POST", path) for path in CLIENT_PATHS]
    for action, methods in STORED_ACTIONS.items():
        served += [(m, "/v1/responses/{response_id}" + (f"/{action}" if action else "")) for m in methods]
    for route in api.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # {route:path} -> {route}
            served += [(method, path) for method in route.methods or () if method != "HEAD"]
    return served


def _tag_request_id(send: Send, rid: str) -> Send:
    async def tagged(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
        await send(message)

    return tagged


def create_app_from_env() -> ASGIApp:
    """Entry point for `uvicorn --factory` and `canarygate serve --workers N`."""
    settings = Settings.from_env()
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    # Everything built so far lives as long as the process: keep the cyclic collector from rescanning
    # it on every full collection (measured: +7-8% requests/s at 32 connections).
    gc.collect()
    gc.freeze()
    return app


def _api(services: Services) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await services.start()
        hup = _install_sighup(services)
        try:
            yield
        finally:
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await services.close()

    api = FastAPI(title="canarygate", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def authenticated(request: Request) -> None:
        services.api_keys.authenticate(bearer_token(request.headers.get("authorization")))

    @api.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        log_error(exc, request.state.request_id)
        return Response(exc.body(), status_code=exc.status_code(), media_type="application/json")

    served: list[tuple[str, str]] = []  # (method, path template) of every endpoint, for a 404's hint

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        error: GatewayError
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            if not served:  # every route is in by the first request
                served.extend(sorted(set(_served(api))))  # in one order: ties resolve alike
            error = NotFound(endpoints.hint(request.method, request.url.path, served))
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"method not allowed: {where}")
        else:
            error = InvalidRequest(f"{exc.detail}: {where}")
        return await gateway_error(request, error)

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return await gateway_error(request, invalid_fields(exc.errors(), _body_model(request)))

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def admin(request: Request) -> None:
        """The admin API answers only when CANARYGATE_ADMIN_TOKEN is set, and only to that bearer token."""
        expected = services.settings.admin_token
        if expected is None:
            raise NotFound("the admin API is disabled: set CANARYGATE_ADMIN_TOKEN to enable it")
        given = bearer_token(request.headers.get("authorization")) or ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized("the admin API needs 'Authorization: Bearer <CANARYGATE_ADMIN_TOKEN>'")

    @api.get("/admin/runtime", dependencies=[Depends(admin)])
    async def runtime() -> dict[str, Any]:
        """This process's resources, for leak hunting: soak runs read them before and after."""
        return {
            "pid": os.getpid(),
            **_process_resources(),
            "upstream_pools": services.upstream.stats(),
            "schema_checks": services.proxy.checks.stats(),
            "loop_lag": services.loop_lag.view(),
        }

    @api.get("/admin/pairs", dependencies=[Depends(admin)])
    async def pairs(
        route: str, disagreements: bool = False, decisive: bool = False, limit: int = 100
    ) -> Response:
        """Recent compared shadow pairs of a route, newest first, as JSON lines; decisive: only those a
        pairwise judge decided."""
        if services.routes.get(route) is None:
            raise ModelNotFound(f"no route {route[:100]!r} on this gateway", param="route")
        try:
            records = await services.store.pairs.recent(
                route, max(1, min(limit, 100_000)), disagreements, decisive
            )
        except StateUnavailable as exc:
            raise Unavailable("the pair store (Redis) cannot be reached") from exc
        body = b"".join(orjson.dumps(record) + b"\n" for record in records)
        return Response(body, media_type="application/x-ndjson")

    @api.get("/admin/routes", dependencies=[Depends(admin)])
    async def routes() -> dict[str, Any]:
        """Every route with its rollout state."""
        views = [_rollout_view(*services.rollouts.view(r.name)) for r in services.routes.policies()]
        return {"routes": views, "state": services.store.health()}

    @api.get("/admin/routes/{route:path}/analysis", dependencies=[Depends(admin)])
    async def analysis(route: str) -> dict[str, Any]:
        """The gates as the controller sees them (in manual mode: as it would): over the rollout so far,
        and the last interval's numbers; computed from the shared statistics, so every replica answers the
        same. Once the controller has ended the rollout, the gates are the verdicts it decided on."""
        policy_route, state = services.rollouts.view(route)
        try:
            result = await analyse(services.store.stats, policy_route, state)
        except StateUnavailable as exc:
            raise Unavailable("the rollout state store (Redis) cannot be reached") from exc
        return _analysis_view(result, state, policy_route)

    @api.get("/admin/routes/{route:path}", dependencies=[Depends(admin)])
    async def route_detail(route: str) -> dict[str, Any]:
        return _rollout_view(*services.rollouts.view(route), history=True)

    @api.post("/admin/routes/{route:path}/preflight", dependencies=[Depends(admin)])
    async def record_preflight(route: str, given: RecordedPreflight) -> dict[str, Any]:
        """A pre-flight run elsewhere (canarygate preflight --record): the rollout waiting in its pre-flight
        phase moves by its verdict."""
        state = await services.rollouts.record_preflight(route, given.model_dump(), "admin")
        return {**_rollout_view(services.rollouts.view(route)[0], state, history=True),
                "message": f"route {route} is now {state.phase}: {state.history[-1].reason}"}  # fmt: skip

    @api.post("/admin/routes/{route:path}/{action}", dependencies=[Depends(admin)])
    async def act(
        route: str,
        action: str,
        change: Change | None = None,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> dict[str, Any]:
        """weight (with {"weight": N}), pause, resume, promote, rollback; optional reason and by. With an
        Idempotency-Key header, a retry of a change already applied (its answer lost) is not applied again."""
        change = change or Change()
        by = f"admin:{change.by}" if change.by else "admin"
        rollouts = services.rollouts
        key = f"{action}:{idempotency_key}" if idempotency_key else None
        if key is not None and await rollouts.replayed(route, key) is not None:
            return _rollout_view(*rollouts.view(route), history=True)
        if action == "weight":
            if change.weight is None:
                raise InvalidRequest('set the new weight: {"weight": 25}', param="weight")
            await rollouts.set_weight(route, change.weight, by, change.reason, key)
        elif action in ("pause", "resume", "promote", "rollback"):
            await getattr(rollouts, action)(route, by, change.reason, key=key)
        else:
            raise NotFound(f"no admin action {action!r}: use weight, pause, resume, promote or rollback")
        return _rollout_view(*rollouts.view(route), history=True)

    @api.get("/metrics")
    async def metrics() -> Response:
        body, content_type = services.metrics.exposition()
        return Response(body, media_type=content_type)

    @api.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """Ready once policies are loaded. The detail (every arm checked, the state store, the last
        reload's problems) goes only to the admin token: it names models, upstreams and their errors."""
        try:
            await admin(request)
        except GatewayError:
            ready = bool(services.routes.routes())
            return JSONResponse(
                {"status": "ready" if ready else "not_ready"}, status_code=200 if ready else 503
            )
        return await _readiness(services)

    @api.post("/v1/feedback", dependencies=[Depends(authenticated)])
    @api.post("/feedback", dependencies=[Depends(authenticated)], include_in_schema=False)
    async def feedback(given: FeedbackIn, request: Request) -> dict[str, object]:
        """Thumbs up/down (or a score in [0, 1]) on an earlier answer, by its x-request-id, or on a whole
        trace (a conversation, an agent run) of the caller's, by its trace key."""
        scope = bearer_token(request.headers.get("authorization")) if services.api_keys.enabled else None
        return await services.feedback.record(given, scope)

    @api.get("/v1/models", dependencies=[Depends(authenticated)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(r) for r in services.routes.routes()]}

    @api.get("/v1/models/{model:path}", dependencies=[Depends(authenticated)])
    async def model(model: str) -> dict[str, Any]:
        route = services.routes.get(model)
        if route is None:
            raise ModelNotFound(f"the model {model[:100]!r} does not exist on this gateway", param="model")
        return _model_card(route)

    return api


class Change(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float | None = None
    reason: str | None = Field(default=None, max_length=500)
    by: str | None = Field(default=None, max_length=100, pattern=r"^[\w.@:+-]+$")


def _rollout_view(route: Route, state: RouteState, history: bool = False) -> dict[str, Any]:
    view: dict[str, Any] = {
        "route": route.name,
        "base": route.base.model,
        "candidate": route.candidate.model if route.candidate else None,
        "phase": state.phase,
        "weight": state.weight,
        "step": state.step,
        "mirror": state.mirror and route.mirror is not None,
        "policy_weight": route.policy.rollout.weight,
        "version": state.version,
        "updated_at": state.updated_at,
    }
    if state.phase == "paused":
        view["resume_to"] = state.resume_to
    if history:
        view["history"] = [asdict(t) for t in reversed(state.history)]
    return view


SHOWN_INTERVALS = 50  # per-interval estimates the analysis view shows per gate, the newest


def _analysis_view(analysis: Analysis, state: RouteState, route: Route) -> dict[str, Any]:
    def arm(window: ArmWindow) -> dict[str, Any]:
        n, asked = window.requests, window.attempts
        return {
            "requests": n,
            "attempts": asked,
            "error_rate": window.errors / asked if asked else None,
            "validation_failure_rate": window.invalid / asked if asked else None,
            "fallback_rate": window.fallbacks / n if n else None,
            "output_tokens_mean": window.tokens / window.token_answers if window.token_answers else None,
        }

    gates = [asdict(v) for v in analysis.verdicts]
    # What each combined estimate is made of: the gate's estimate per interval (for the view only: the
    # controller, judging every second, never needs them).
    estimates = per_interval(route.rollout.gates, analysis.strata[-SHOWN_INTERVALS:])
    for gate in gates:
        if gate["cohort"] == "all":
            gate["intervals"] = estimates.get(gate["gate"], [])
    decided = None
    last = state.history[-1] if state.history else None
    if (
        state.phase in ("rolled_back", "promoted", "preflight")
        and last is not None
        and last.gates is not None
    ):
        # What the decision was made on, not a recomputation (answers still in flight were counted since);
        # held in pre-flight: the pre-flight's verdicts.
        gates = last.gates
        decided = {"at": last.at, "by": last.by, "phase": last.phase, "reason": last.reason}
    return {
        "route": analysis.route,
        "phase": state.phase,
        "weight": state.weight,
        "step": state.step,
        "candidate_measured_as": analysis.candidate_arm,
        "interval_s": analysis.interval_s,
        "decided": decided,
        "gates": gates,
        "window": {"base": arm(analysis.window[0]), "candidate": arm(analysis.window[1])},
        "last_interval": {"base": arm(analysis.last[0]), "candidate": arm(analysis.last[1])},
        "evaluations": analysis.evaluations,
    }


class RecordedPreflight(BaseModel):
    """What `canarygate preflight --record` sends: the report's verdict, models and gates."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["pass", "fail", "undecided"]
    summary: str = Field(max_length=4000)
    models: dict[Literal["base", "candidate"], Annotated[str, Field(max_length=500)]]
    dataset: str = Field(max_length=1000)
    answered: int = Field(ge=0)
    gates: list[dict[str, Any]] = Field(max_length=500)


def _model_card(route: Route) -> dict[str, Any]:
    return {
        "id": route.name,
        "object": "model",
        "created": int(route.source.stat().st_mtime) if route.source.exists() else 0,
        "owned_by": "canarygate",
    }


def _process_resources() -> dict[str, int]:
    """RSS, open file descriptors and asyncio tasks (Linux /proc; zeros elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        pages = fds = 0
    return {
        "rss_bytes": pages * os.sysconf("SC_PAGE_SIZE"),
        "open_fds": fds,
        "tasks": len(asyncio.all_tasks()),
    }


async def _readiness(services: Services) -> JSONResponse:
    """Ready once policies are loaded. Every arm is checked for detail (reachable, authorized, its model
    listed; cached, see readiness.py): an unreachable model server must not take every gateway replica
    out of service (fallback may still answer), so a broken arm makes the status "degraded", not 503."""
    routes = services.routes.routes()
    arms = [(route, arm) for route in routes for arm in route.arms()]
    results = await asyncio.gather(*(services.readiness.check(arm) for _, arm in arms))
    detail: dict[str, dict[str, Any]] = {}
    for (route, arm), result in zip(arms, results, strict=True):
        detail.setdefault(route.name, {})[arm.name] = {"model": arm.model, **result.view()}
    all_up = all(r.ok for r in results)
    body = {
        "status": "ready" if all_up else "degraded",
        "routes": detail,
        "state": services.store.health(),  # Redis down: detail only, replicas keep serving (fail static)
        "policies": {
            "directory": str(services.routes.policy_dir),
            "loaded_at": services.routes.loaded_at,
            "reloads": services.routes.reloads,
            "last_reload_errors": [str(p) for p in services.routes.last_problems],
        },
        # Routes whose policy here is not the active rollout's: served from the base until it catches up.
        "policy_skew": {r.name: skew for r in routes if (skew := services.skew(r.name)) is not None},
        # Whether this replica runs the controller (one replica at a time holds the lease).
        "controller": {"owner": services.controller.owner, "leading": services.controller.leading},
        "api_keys": {
            "keys": len(services.api_keys),
            **(services.keys_file.view() if services.keys_file is not None else {}),
        },
    }
    return JSONResponse(body, status_code=200 if routes else 503)


def _install_sighup(services: Services) -> bool:
    """SIGHUP reads the policies, and the API keys file, again."""
    if threading.current_thread() is not threading.main_thread():
        return False  # signals reach only the main thread (embedded servers in tests run elsewhere)

    def reload() -> None:
        services.spawner.spawn(services.routes.reload(), name="policy-reload")
        if services.keys_file is not None:
            services.spawner.spawn(services.keys_file.reload(), name="keys-reload")

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    return True
