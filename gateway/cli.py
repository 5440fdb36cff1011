"""The `canarygate` command: serve, check, plan, preflight, simulate, demo; and, against a running
gateway's admin API, status, set-weight, pause, resume, promote, rollback, pairs."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gateway import adminclient, logs
from gateway.adminclient import AdminError
from gateway.logs import FORMATS, LEVELS
from gateway.server import PortUnavailable
from gateway.settings import Settings, SettingsError
from gateway.synth import Knobs


def main(argv: list[str] | None = None) -> int:
    try:
        parser = _parser()  # flags default to CANARYGATE_* variables, which may be malformed
    except SettingsError as exc:
        print(f"canarygate: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except (SettingsError, PortUnavailable) as exc:
        print(f"canarygate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canarygate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    _policies_option(serve)
    serve.add_argument(
        "--host",
        default=os.environ.get("CANARYGATE_HOST", "127.0.0.1"),
        help="address to listen on (env CANARYGATE_HOST; the container image sets 0.0.0.0)",
    )
    serve.add_argument("--port", type=int, default=_env_port(), help="(env CANARYGATE_PORT)")
    serve.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("CANARYGATE_WORKERS", "1")),
        help="worker processes sharing the port (env CANARYGATE_WORKERS)",
    )
    serve.add_argument(
        "--log-level",
        default=os.environ.get("CANARYGATE_LOG_LEVEL", "info").lower(),
        choices=LEVELS,
        help="(env CANARYGATE_LOG_LEVEL; default info: one line per rollout move, circuit change, reload, "
        "and per route at most one every 10 s for fallbacks and failed shadow calls)",
    )
    serve.add_argument(
        "--log-format",
        default=os.environ.get("CANARYGATE_LOG_FORMAT", "text").lower(),
        choices=FORMATS,
        help="text, or json: one JSON object a line, for log pipelines (env CANARYGATE_LOG_FORMAT)",
    )
    serve.set_defaults(func=_serve)

    health = sub.add_parser(
        "healthcheck", help="exit 0 when the gateway on this machine answers /healthz (container probes)"
    )
    health.add_argument(
        "--url",
        default=f"http://127.0.0.1:{_env_port()}",
        help="the gateway (default: loopback at CANARYGATE_PORT, else 8080)",
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds")
    health.set_defaults(func=_healthcheck)

    check = sub.add_parser(
        "check",
        help="validate policy files and directories; every problem, each with its line; exit 2 if any",
    )
    check.add_argument(
        "policies",
        type=Path,
        nargs="*",
        default=[Path("policies")],
        help="files and directories (default policies)",
    )
    check.add_argument(
        "--strict", action="store_true", help="treat unset api_key_env variables as errors (as serve does)"
    )
    check.set_defaults(func=_check)

    plan = sub.add_parser(
        "plan",
        help="how long a route's automatic rollout will take, and what it will catch, on given traffic",
    )
    plan.add_argument("route")
    _policies_option(plan)
    plan.add_argument(
        "--requests", type=float, required=True, help="requests the route gets per rollout interval"
    )
    plan.add_argument("--error-rate", type=float, default=0.005, help="the base's (default 0.005)")
    plan.add_argument("--validation-failure-rate", type=float, default=0.01, help="the base's (default 0.01)")
    plan.add_argument("--latency-p50", type=float, default=0.8, help="seconds (default 0.8)")
    plan.add_argument(
        "--latency-sigma", type=float, default=0.5, help="log-normal spread of latency (default 0.5)"
    )
    plan.add_argument(
        "--steps-per-trace",
        type=float,
        default=4.0,
        help="model calls per trace, for trace gates (default 4)",
    )
    plan.add_argument(
        "--trace-failure-rate", type=float, default=0.02, help="the base's failed traces (default 0.02)"
    )
    plan.add_argument(
        "--worse",
        action="append",
        default=[],
        metavar="GATE=SIZE",
        help="a regression to plan for, in the gate's unit (validation_failure_rate=0.004: +0.4 points; "
        "latency_p99_ratio=1.3); default: each configured gate at twice its allowed margin",
    )
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=_plan)

    simulate = sub.add_parser("simulate", help="run the simulated OpenAI-compatible model server")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=9000)
    simulate.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME:KNOB=VALUE,...",
        help="knobs for one model name, e.g. tuned:invalid_json_rate=0.2,latency_s=0.05",
    )
    simulate.add_argument(
        "--served-models",
        default="",
        help="comma-separated model names: listed by /v1/models, and the only ones answered (404 otherwise)",
    )
    simulate.add_argument(
        "--api-key-env", default=None, metavar="NAME", help="require the key in this environment variable"
    )
    for knob in fields(Knobs):
        default: int | float = knob.default  # type: ignore[assignment]
        simulate.add_argument(
            f"--{knob.name.replace('_', '-')}",
            type=_knob_type(default),
            default=default,
            metavar=type(default).__name__.upper(),
            help=f"default {default}",
        )
    simulate.set_defaults(func=_simulate)

    pairs = sub.add_parser("pairs", help="export compared shadow pairs from a running gateway")
    pairs.add_argument("--route", required=True)
    pairs.add_argument("--disagreements", action="store_true", help="only pairs that disagree on a check")
    pairs.add_argument("--jsonl", action="store_true", help="one JSON record a line (as --format jsonl)")
    pairs.add_argument(
        "--format",
        choices=["table", "jsonl", "preference", "sft"],
        default="table",
        help="preference: JSONL preference rows of the pairs a pairwise judge decided (winner preferred); "
        "sft: the base's answers where the candidate lost (needs mirror.capture_content)",
    )
    pairs.add_argument("--evaluator", help="preference, sft: the pairwise evaluator whose verdicts count")
    pairs.add_argument("--limit", type=int, default=100)
    _admin_options(pairs, json_flag=False)
    pairs.set_defaults(func=_pairs)

    status = sub.add_parser("status", help="every route's rollout state on a running gateway")
    status.add_argument("route", nargs="?", help="one route, with its history")
    _admin_options(status)
    status.set_defaults(func=_status)
    compare = sub.add_parser("compare", help="base vs candidate: every gate's value, interval and verdict")
    compare.add_argument("route")
    _admin_options(compare)
    compare.set_defaults(func=_compare)
    set_weight = sub.add_parser("set-weight", help="serve N%% of units from the candidate (manual mode)")
    set_weight.add_argument("route")
    set_weight.add_argument("weight", type=float)
    _admin_options(set_weight, reason=True)
    set_weight.set_defaults(func=_act, action="weight")
    for action, text in (
        ("pause", "hold the rollout where it is"),
        ("resume", "continue a paused rollout"),
        ("promote", "send every unit to the candidate"),
        ("rollback", "send every unit to the base and stop shadow traffic"),
    ):
        verb = sub.add_parser(action, help=text)
        verb.add_argument("route")
        _admin_options(verb, reason=True)
        verb.set_defaults(func=_act, action=action)

    from gateway.preflight import command as preflight

    preflight.add_parser(sub, _policies_option)

    demo = sub.add_parser(
        "demo", help="rehearse a canary: simulated base and candidate, the gateway, users, live view"
    )
    demo.add_argument(
        "--scenario",
        choices=[
            "healthy",
            "bad-json",
            "wrong-tools",
            "slow",
            "flaky",
            "agent-loops",
            "subtle",
            "misconfigured",
        ],
        default="healthy",
        help="how the candidate behaves (default healthy: it should be promoted; the others rolled back)",
    )
    demo.add_argument("--port", type=int, default=8080, help="the gateway's port (0: any free port)")
    demo.add_argument(
        "--duration", type=float, default=120.0, help="give up after S seconds without a decision"
    )
    demo.add_argument("--users", type=int, default=60, help="simulated users (sticky keys)")
    demo.add_argument(
        "--interval", type=float, default=3.0, help="seconds between the controller's judgements"
    )
    demo.add_argument("--keep-serving", action="store_true", help="keep everything up after the verdict")
    view = demo.add_mutually_exclusive_group()
    view.add_argument(
        "--live", action="store_true", default=None, help="the live view even without a terminal"
    )
    view.add_argument("--plain", dest="live", action="store_false", help="plain lines even in a terminal")
    demo.set_defaults(func=_demo)
    return parser


def _policies_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policies",
        type=Path,
        default=Path(os.environ.get("CANARYGATE_POLICY_DIR", "policies")),
        help="directory of route policy files (env CANARYGATE_POLICY_DIR)",
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway import server

    policy_dir = args.policies.resolve()
    os.environ["CANARYGATE_POLICY_DIR"] = str(policy_dir)
    os.environ["CANARYGATE_LOG_LEVEL"] = args.log_level
    os.environ["CANARYGATE_LOG_FORMAT"] = args.log_format
    settings = Settings.from_env()  # fail on bad settings here, once, rather than in every worker
    logs.configure(settings.log_level, settings.log_format)
    from gateway.loader import load_dir

    routes, problems = load_dir(policy_dir)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        for problem in errors:
            print(problem, file=sys.stderr)
        print(f"canarygate: not serving: {len(errors)} problem(s) in {policy_dir}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("canarygate: --workers must be at least 1", file=sys.stderr)
        return 2
    automatic = sorted(name for name, route in routes.items() if route.automatic is not None)
    if args.workers > 1 and not settings.redis_url and (automatic or settings.admin_token):
        # In-memory state is one process's: workers would each walk (or be told) their own rollout.
        why = f"routes {', '.join(automatic)} roll out automatically" if automatic else "the admin API is on"
        print(
            f"canarygate: {why}, and {args.workers} workers share rollout state only through Redis: "
            "set CANARYGATE_REDIS_URL, or serve with --workers 1",
            file=sys.stderr,
        )
        return 2
    metrics_dir = None
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Workers share one /metrics: prometheus_client keeps each process's values in files here.
        metrics_dir = tempfile.mkdtemp(prefix="canarygate-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    config = uvicorn.Config(
        "gateway.app:create_app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        log_config=None,  # uvicorn's lines go through the gateway's handler, in its format
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        **server.SERVER_OPTIONS,
    )
    config.head_timeout_s = settings.client_timeout_s  # type: ignore[attr-defined]  # read by the protocol
    try:
        server.run(config)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _env_port() -> int:
    raw = os.environ.get("CANARYGATE_PORT", "8080")
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(f"CANARYGATE_PORT: expected a port number, got {raw!r}")
    return int(raw)


def _healthcheck(args: argparse.Namespace) -> int:
    """Docker's HEALTHCHECK: the slim image has no curl, and this says what went wrong when it fails.
    The standard library's client and no policy machinery: it runs every few seconds."""
    import urllib.error
    import urllib.request

    try:
        url = f"{adminclient.gateway_root(args.url)}/healthz"
    except AdminError as exc:
        print(f"canarygate healthcheck: {exc}", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310 - checked above
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"canarygate healthcheck: {url}: {reason}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"canarygate healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    """Every file given, and every policy file of every directory given, read in one pass."""
    from gateway.loader import Problem, load_files, policy_files

    files: list[Path] = []
    problems: list[Problem] = []
    for given in args.policies:
        if given.is_dir():
            found = policy_files(given)
            files += found
            if not found:
                problems.append(Problem(given, None, "", "holds no policy files (*.yaml or *.yml)"))
        elif given.is_file():
            files.append(given)
        else:
            problems.append(Problem(given, None, "", "no such file or directory"))
    routes, loaded = load_files(list(dict.fromkeys(files)), require_secrets=args.strict)
    problems += loaded
    for problem in problems:
        print(problem)
    errors = [p for p in problems if p.severity == "error"]
    for route in routes.values():
        if any(p.file == route.source for p in errors):
            continue
        candidate = f"{route.candidate.model} at {route.weight:g}%" if route.candidate else "none"
        print(f"ok  {route.name:<28} base={route.base.model}  candidate={candidate}  ({route.source.name})")
    if errors:
        bad = len({p.file for p in errors})
        print(f"{len(errors)} problem(s) in {bad} file(s); fix them before serving", file=sys.stderr)
        return 2
    return 0


def _plan(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from gateway.loader import load_dir
    from gateway.plan import Traffic, regression_of, walk

    routes, problems = load_dir(args.policies)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        for problem in errors:
            print(problem, file=sys.stderr)
        return 2
    route = routes.get(args.route)
    if route is None:
        known = ", ".join(sorted(routes)) or "none"
        print(
            f"canarygate plan: no route {args.route!r} in {args.policies} (routes: {known})", file=sys.stderr
        )
        return 2
    if args.steps_per_trace < 1 or not 0 <= args.trace_failure_rate < 1:
        print(
            "canarygate plan: --steps-per-trace is at least 1, --trace-failure-rate in [0, 1)",
            file=sys.stderr,
        )
        return 2
    rollout = route.automatic
    if rollout is None:
        print(
            f"canarygate plan: route {route.name!r} has no automatic rollout (rollout.steps)", file=sys.stderr
        )
        return 2
    flags = (
        ("--requests", args.requests, 1, 1e9, "a number of requests per interval"),
        ("--error-rate", args.error_rate, 0, 0.99, "a fraction"),
        ("--validation-failure-rate", args.validation_failure_rate, 0, 0.99, "a fraction"),
        ("--latency-p50", args.latency_p50, 0.001, 3600, "seconds"),
        ("--latency-sigma", args.latency_sigma, 0.01, 5, "a log-normal spread"),
    )
    for flag, value, low, high, what in flags:
        if not (math.isfinite(value) and low <= value <= high):
            print(
                f"canarygate plan: {flag} must be {what} in [{low:g}, {high:g}], got {value:g}",
                file=sys.stderr,
            )
            return 2
    configured = [name for name, _ in rollout.gates.configured() if ":" not in name]
    quality = [name for name, _ in rollout.gates.configured() if ":" in name]
    regressions: list[tuple[str, float]] = []
    for given in args.worse:
        name, _, size = given.partition("=")
        try:
            value = float(size)
        except ValueError:
            value = math.nan
        if name not in configured or not math.isfinite(value):
            gates = ", ".join(configured)
            print(f"canarygate plan: --worse {given!r}: give GATE=SIZE, GATE one of {gates}", file=sys.stderr)
            return 2
        ratio = name.endswith("_ratio")
        if not (0 < value <= 100 if ratio else 0 <= value < 1):
            what = "a factor in (0, 100]" if ratio else "a fraction in [0, 1) (0.004: +0.4 points)"
            print(f"canarygate plan: --worse {given!r}: {name}'s size must be {what}", file=sys.stderr)
            return 2
        regressions.append((name, value))
    if not regressions:
        regressions = [(name, regression_of(rollout.gates, name)) for name in configured]
    traffic = Traffic(
        args.requests,
        error_rate=args.error_rate,
        validation_failure_rate=args.validation_failure_rate,
        latency_p50_s=args.latency_p50,
        latency_sigma=args.latency_sigma,
        steps_per_trace=args.steps_per_trace,
        trace_failure_rate=args.trace_failure_rate,
        mirror_percent=route.mirror.percent if route.mirror is not None else 0.0,
    )
    identical = walk(rollout, traffic)
    worse = [(name, size, walk(rollout, traffic, {name: size})) for name, size in regressions]
    if args.json:
        print(json.dumps({
            "route": route.name,
            "identical": asdict(identical),
            "worse": [{"gate": n, "size": s, **asdict(c)} for n, s, c in worse],
        }, indent=2))  # fmt: skip
        return 0
    every = rollout.interval_s
    steps = ", ".join(f"{w:g}" for w in rollout.steps or [])
    print(
        f"route {route.name}: steps {steps}% (promoted on reaching 100), judged every {every:g} s, "
        f"confidence {rollout.confidence:g}, min_samples {rollout.min_samples}"
    )
    print(
        f"traffic: {args.requests:,.0f} requests per interval; base errors {args.error_rate * 100:.2f}%, "
        f"validation failures {args.validation_failure_rate * 100:.2f}%, "
        f"p50 latency {args.latency_p50 * 1000:.0f} ms"
    )
    print("(expected values: a typical rollout, about the median; bench/decisions.py measures the spread)")
    if quality:
        print(f"not planned: {', '.join(quality)} (a judge's results cannot be predicted here)")
    print()

    def took(course: Any) -> str:
        span, plural = _span(course.intervals * every), "s" if course.intervals != 1 else ""
        return (
            f"{course.intervals} interval{plural} ({span}), {course.candidate_requests:,} candidate requests"
        )

    if identical.outcome == "promoted":
        print(f"an identical candidate: promoted after {took(identical)}")
    else:
        print(f"an identical candidate: {identical.outcome.replace('_', ' ')} after {took(identical)}")
    if identical.holding:
        gate, count = max(identical.holding.items(), key=lambda item: item[1])
        print(f"  held longest by {gate}: {count} intervals with too few samples, or with its interval")
        print("  still reaching past its threshold")
    print(f"\n{'a candidate worse by':<36}{'outcome':<13}after")
    for name, size, course in worse:
        shown = (
            f"x{size:g}"
            if name.endswith("_ratio")
            else f"{size * 100:+.2f} pts"
            if name != "fallback_rate"
            else f"{size * 100:.2f}%"
        )
        print(f"{name + ' ' + shown:<36}{course.outcome.replace('_', ' '):<13}{took(course)}")
    return 0


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _simulate(args: argparse.Namespace) -> int:
    from gateway.server import BackgroundServer
    from gateway.simulator import Simulator

    try:
        default = Knobs(**{k.name: getattr(args, k.name) for k in fields(Knobs)})
        models = dict(_model_knobs(spec, default) for spec in args.model)
    except ValueError as exc:
        print(f"canarygate simulate: {exc}", file=sys.stderr)
        return 2
    served = [m for m in args.served_models.split(",") if m]
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        print(f"canarygate simulate: environment variable {args.api_key_env} is not set", file=sys.stderr)
        return 2
    sim = Simulator(default, models, served, api_key)
    logs.configure("info", "text")
    with BackgroundServer(sim.app(), args.host, args.port, log_level="info") as running:
        print(f"simulated model server on {running.url}/v1 (knobs: {running.url}/sim/knobs)", flush=True)
        _wait_forever()
    return 0


def _model_knobs(spec: str, default: Knobs) -> tuple[str, Knobs]:
    name, _, settings = spec.partition(":")
    if not name or not settings:
        raise ValueError(f"--model expects NAME:KNOB=VALUE[,KNOB=VALUE], got {spec!r}")
    types = {f.name: _knob_type(getattr(default, f.name)) for f in fields(Knobs)}
    values: dict[str, object] = {}
    for pair in settings.split(","):
        key, _, raw = pair.partition("=")
        if key not in types:
            raise ValueError(f"unknown knob {key!r}; known: {', '.join(types)}")
        try:
            values[key] = types[key](raw)
        except ValueError:
            raise ValueError(f"knob {key} expects a {types[key].__name__}, got {raw!r}") from None
    return name, replace(default, **values)  # type: ignore[arg-type]


def _knob_type(default: object) -> Callable[[str], object]:
    """How a knob's value is read from the command line: bool("false") is True, so booleans are spelled."""
    if not isinstance(default, bool):
        return type(default)

    def boolean(raw: str) -> bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError(raw)

    boolean.__name__ = "bool"
    return boolean


def _admin_options(parser: argparse.ArgumentParser, *, reason: bool = False, json_flag: bool = True) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("CANARYGATE_URL", adminclient.DEFAULT_URL),
        help="the gateway, with or without /v1 (env CANARYGATE_URL); the token comes from "
        "CANARYGATE_ADMIN_TOKEN",
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="the gateway's JSON answer, for scripts")
    if reason:
        parser.add_argument("--reason", help="why: kept in the route's history")


def _admin(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    return adminclient.call(args.url, method, path, **kwargs)


def _run_admin(name: str, call: Callable[[], int]) -> int:
    try:
        return call()
    except AdminError as exc:
        print(f"canarygate {name}: {exc}", file=sys.stderr)
        return 2


def _pairs(args: argparse.Namespace) -> int:
    return _run_admin("pairs", lambda: _print_pairs(args))


def _print_pairs(args: argparse.Namespace) -> int:
    import orjson

    fmt = "jsonl" if args.jsonl else args.format
    training = fmt in ("preference", "sft")
    params: dict[str, str | int] = {"route": args.route, "limit": args.limit}
    if args.disagreements:
        params["disagreements"] = "true"
    if training:
        params["decisive"] = "true"
    response = _admin(args, "GET", "/admin/pairs", params=params)
    if fmt == "jsonl":
        sys.stdout.write(response.text)
        return 0
    records = [orjson.loads(line) for line in response.text.splitlines() if line]
    if training:
        rows = [row for r in records if (row := training_row(r, fmt, args.evaluator)) is not None]
        for row in rows:
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
        print(f"{len(rows)} {fmt} row(s) from {len(records)} decided pair(s)", file=sys.stderr)
        if records and not any("prompt" in r for r in records):
            print(
                "the pairs carry no content: set mirror.capture_content: true on the route to export them",
                file=sys.stderr,
            )
        return 0
    print(
        f"{'time':<21}{'pair':<10}{'kind':<10}{'primary ms':>11}{'shadow ms':>10}  disagreements / verdicts"
    )
    for r in records:
        disagreements = ", ".join(check for check, agreed in r["checks"].items() if not agreed) or "-"
        verdicts = ", ".join(f"{name}: {v.get('verdict')}" for name, v in (r.get("verdicts") or {}).items())
        print(
            f"{r['time']:<21}{r['pair_id'][:8]:<10}{r['kind']:<10}{r['primary']['latency_ms']:>11.1f}"
            f"{r['shadow']['latency_ms']:>10.1f}  {disagreements}{' / ' + verdicts if verdicts else ''}"
        )
    print(f"{len(records)} pair(s)", file=sys.stderr)
    return 0


def training_row(record: dict[str, Any], fmt: str, evaluator: str | None = None) -> dict[str, Any] | None:
    """A decided pair as a training row: preference ({"input": {"messages", "tools"}, "preferred_output",
    "non_preferred_output"}, OpenAI's preference fine-tuning format) or sft (the conversation with the
    base's answer, where the candidate lost). None for a pair without content or a decisive verdict."""
    prompt = record.get("prompt")
    verdicts = record.get("verdicts") or {}
    decided = [
        v["verdict"]
        for name, v in verdicts.items()
        if (evaluator is None or name == evaluator) and v.get("verdict") in ("win", "loss")
    ]
    if record.get("kind") != "candidate" or not isinstance(prompt, list) or not decided:
        return None
    base, candidate = _assistant(record["primary"]), _assistant(record["shadow"])
    if base is None or candidate is None:
        return None
    tools = record.get("tools") or []
    if fmt == "sft":
        if decided[0] != "loss":
            return None
        return {"messages": [*prompt, base], **({"tools": tools} if tools else {})}
    preferred, other = (candidate, base) if decided[0] == "win" else (base, candidate)
    return {
        "input": {"messages": prompt, "tools": tools},
        "preferred_output": [preferred],
        "non_preferred_output": [other],
    }


def _assistant(side: dict[str, Any]) -> dict[str, Any] | None:
    output = side.get("output")
    if not isinstance(output, dict):
        return None
    message = {"role": "assistant", "content": output.get("content")}
    if output.get("tool_calls"):
        message["tool_calls"] = output["tool_calls"]
    return message


def _status(args: argparse.Namespace) -> int:
    def show() -> int:
        path = f"/admin/routes/{quote(args.route, safe='/')}" if args.route else "/admin/routes"
        answer = _admin(args, "GET", path).json()
        if args.json:
            print(json.dumps(answer, indent=2))
            return 0
        _print_routes(answer["routes"] if not args.route else [answer])
        if not args.route and not answer["state"]["ok"]:
            print(f"state store: {answer['state'].get('error')}", file=sys.stderr)
        if args.route:
            _print_history(answer)
        return 0

    return _run_admin("status", show)


def _act(args: argparse.Namespace) -> int:
    def act() -> int:
        body: dict[str, Any] = {"by": f"cli:{getpass.getuser()}"[:100]}
        if args.reason:
            body["reason"] = args.reason
        if args.action == "weight":
            body["weight"] = args.weight
        path = f"/admin/routes/{quote(args.route, safe='/')}/{args.action}"
        answer = _admin(args, "POST", path, json=body).json()
        if args.json:
            print(json.dumps(answer, indent=2))
        else:
            _print_routes([answer])
        return 0

    return _run_admin(args.action if args.action != "weight" else "set-weight", act)


SHOWN_PER_GATE = 8  # per-interval estimates compare prints per gate (--json has up to 50)


def _compare(args: argparse.Namespace) -> int:
    def show() -> int:
        answer = _admin(args, "GET", f"/admin/routes/{quote(args.route, safe='/')}/analysis").json()
        if args.json:
            print(json.dumps(answer, indent=2))
            return 0
        measured = answer["candidate_measured_as"]
        print(
            f"route {answer['route']}: {answer['phase']}, weight {answer['weight']:g}%, candidate measured "
            f"as {measured}{' (its shadow calls)' if measured == 'shadow' else ''}"
        )
        decided = answer.get("decided")
        if decided is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(decided["at"]))
            print(f"{decided['phase']} by {decided['by']} at {when}, on these verdicts: {decided['reason']}")
        elif answer["phase"] == "manual":
            print("manual mode: the gates as the controller would judge them; nothing acts on them")
        print(
            f"\n{'gate':<38}{'verdict':<9}{'value':>10}  {'interval':<22}{'threshold':>10}"
            f"{'n base':>9}{'n cand':>9}"
        )
        checks = [g for g in answer["gates"] if g["gate"].startswith("sample_ratio")]
        for gate in answer["gates"]:
            if gate["gate"].startswith("sample_ratio"):
                continue
            ratio, ceiling = gate["gate"].endswith("_ratio"), gate["gate"] == "fallback_rate"
            shown = _ratio if ratio else _pct if ceiling else _points
            cohort = gate.get("cohort", "all")
            name = (
                gate["gate"]
                + (" *" if gate["critical"] else "")
                + ("" if cohort == "all" else f" [{cohort}]")
            )
            interval = f"[{shown(gate['low'])}, {shown(gate['high'])}]" if gate["low"] is not None else "-"
            threshold = shown(gate["threshold"])
            print(
                f"{name:<38}{gate['result']:<9}{shown(gate['value']):>10}  {interval:<22}{threshold:>10}"
                f"{gate['n_base']:>9}{gate['n_candidate']:>9}"
            )
            if gate.get("needs"):
                print(f"{'':<38}needs {gate['needs']}")
            recent = gate.get("intervals") or []
            if recent:
                values = ", ".join(shown(row["value"]) for row in recent[-SHOWN_PER_GATE:])
                print(f"{'':<38}per interval, newest last: {values}")
        print("  * critical: a failure rolls back at once")
        for check in checks:  # not a gate: a mismatch holds the rollout, whatever the gates say
            where = "" if check["cohort"] == "all" else f" [{check['cohort']}]"
            verdict = {"fail": "MISMATCH", "pass": "ok"}.get(check["result"], check["result"])
            of = "units" if check["gate"].endswith("_units") else "requests"
            print(f"sample ratio of {of}{where}: {verdict}: {check['reason']}")
        for label, key in (
            ("rollout so far", "window"),
            (f"last {answer['interval_s']:g} s interval", "last_interval"),
        ):
            print(f"\n{label}:")
            for arm in ("base", "candidate"):
                w = answer[key][arm]
                print(
                    f"  {arm:<10}{w['requests']:>8} requests  errors {_pct(w['error_rate'])}  "
                    f"invalid {_pct(w['validation_failure_rate'])}  fallbacks {_pct(w['fallback_rate'])}"
                )
        _print_evaluations(answer.get("evaluations") or {})
        return 0

    return _run_admin("compare", show)


ARM_SHOWN = {"base": "base", "candidate": "candidate", "shadow": "candidate (shadow)", "noise": "noise floor"}


def _print_evaluations(evaluations: dict[str, Any]) -> None:
    """Each evaluator's results so far; a pairwise judge's verdicts beside its calibration: how it judged
    the noise floor's base-against-base pairs, where any verdict but a tie is the judge's own noise."""
    if not evaluations:
        return
    print("\nevaluations (rollout so far):")
    for name, e in evaluations.items():
        head = f"  {name} ({e['kind']}, {e['sample'] * 100:g}% sampled)"
        if e["kind"] != "pairwise":
            arms = [f"{ARM_SHOWN[a]} {e[a]['mean']:.3f} (n={e[a]['results']})" for a in ARM_SHOWN if a in e]
            print(f"{head}: mean score {'; '.join(arms) or 'no results yet'}")
            continue
        print(f"{head}:")
        for arm, label in (("shadow", "candidate vs base"), ("noise", "base vs base (calibration)")):
            v = e.get(arm)
            if v is None:
                print(f"    {label}: no judged pair yet")
                continue
            n = v["pairs"]
            print(
                f"    {label}: {v['wins']} wins, {v['ties']} ties, {v['losses']} losses of {n} pairs; "
                f"ties {_pct(v['ties'] / n)}, order flips {_pct(v['flips'] / n)}"
            )


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.2f}%"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _print_routes(routes: list[dict[str, Any]]) -> None:
    print(f"{'route':<24}{'phase':<13}{'weight':>7}  {'mirror':<7}{'candidate':<28}{'version':>8}")
    for r in routes:
        print(
            f"{r['route']:<24}{r['phase']:<13}{r['weight']:>6g}%  {'on' if r['mirror'] else 'off':<7}"
            f"{r['candidate'] or '-':<28}{r['version']:>8}"
        )


def _print_history(route: dict[str, Any]) -> None:
    print("\nhistory (newest first):")
    for t in route.get("history", []):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["at"]))
        print(f"  {when}  {t['phase']:<12}{t['weight']:>6g}%  by {t['by']}: {t['reason']}")


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(
        args.scenario, args.port, args.duration, args.users, args.interval, args.keep_serving, args.live
    )


def _wait_forever() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


if __name__ == "__main__":
    raise SystemExit(main())
