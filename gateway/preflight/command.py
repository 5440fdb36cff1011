"""`canarygate preflight SET.jsonl --route R`: the route's candidate against its base on a held-out set,
a live progress line, and the report as JSON, Markdown and HTML. Exit code 0 pass, 1 fail, 3 undecided,
2 when it cannot run (a bad set, policy or gateway), 130 when stopped (the partial report is written)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import orjson

from gateway import adminclient
from gateway.preflight.run import Outcome

FAILED_TO_RUN = 2
STOPPED = 130


def add_parser(sub: Any, policies_option: Any) -> None:
    parser = sub.add_parser(
        "preflight",
        help="the candidate against the base on a held-out set, before any user sees it "
        "(exit 0 pass, 1 fail, 3 undecided)",
    )
    parser.add_argument("dataset", type=Path, help="the held-out set: chat JSONL, or the OpenAI evals shape")
    parser.add_argument("--route", required=True, help="the route whose base and candidate are compared")
    policies_option(parser)
    parser.add_argument(
        "--url",
        help="send through this running gateway (each item with x-canary naming the arm; the route needs "
        "assignment.allow_override_header) instead of to the arms' servers",
    )
    parser.add_argument(
        "--api-key-env",
        default="CANARYGATE_API_KEY",
        help="with --url: the variable holding the gateway's client API key (default CANARYGATE_API_KEY)",
    )
    parser.add_argument("--concurrency", type=_positive, help="items in flight at once (default 2)")
    parser.add_argument("--samples", type=_positive, help="answers per item and arm (default 1)")
    parser.add_argument("--limit", type=_positive, help="use the first N items (after --shuffle)")
    parser.add_argument("--shuffle", type=int, metavar="SEED", help="shuffle the items with this seed")
    parser.add_argument("--min-samples", type=_positive, help="answers per arm before a gate decides (20)")
    parser.add_argument("--confidence", type=float, help="the gates' confidence (the rollout's)")
    parser.add_argument(
        "--report",
        default=None,
        help="where the report goes: PREFIX.json, PREFIX.md, PREFIX.html (default preflight-ROUTE)",
    )
    parser.add_argument(
        "--capture", action="store_true", help="put prompts and answers of the worst items in the report"
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="attach the verdict to the route's rollout on the gateway at --admin-url (its pre-flight phase "
        "then takes it instead of running one); needs CANARYGATE_ADMIN_TOKEN",
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("CANARYGATE_URL", adminclient.DEFAULT_URL),
        help="with --record: the gateway, with or without /v1 (env CANARYGATE_URL)",
    )
    parser.set_defaults(func=main)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of 1 or more, got {text!r}")
    return int(text)


def main(args: argparse.Namespace) -> int:
    from gateway.loader import load_dir
    from gateway.preflight.dataset import DatasetError, load

    def fail(message: str) -> int:
        print(f"canarygate preflight: {message}", file=sys.stderr)
        return FAILED_TO_RUN

    routes, problems = load_dir(args.policies)
    errors = [p for p in problems if p.severity == "error"]
    for problem in errors:
        print(problem, file=sys.stderr)
    route = routes.get(args.route)
    if route is None:
        known = ", ".join(sorted(routes)) or "none loaded"
        return fail(f"no route {args.route!r} in {args.policies} ({known})")
    if route.candidate is None:
        return fail(f"route {args.route!r} has no candidate arm to compare with its base")
    if args.confidence is not None and not 0.5 <= args.confidence < 1:
        return fail(f"--confidence must be in [0.5, 1), got {args.confidence}")
    try:
        items = load(args.dataset, limit=args.limit, shuffle=args.shuffle)
    except DatasetError as exc:
        return fail(str(exc))
    if args.record and not os.environ.get("CANARYGATE_ADMIN_TOKEN"):
        return fail("--record needs CANARYGATE_ADMIN_TOKEN (the gateway's admin token)")
    prefix = Path(args.report or f"preflight-{route.name}")
    progress = Progress(sys.stderr, len(items) * (args.samples or _samples(route)))
    try:
        report = asyncio.run(_run(args, route, items, progress))
    except DatasetError as exc:
        return fail(str(exc))
    except _Stopped as stopped:
        progress.done()
        _write(prefix, stopped.report)
        print(f"stopped: a partial report is in {prefix}.{{json,md,html}}", file=sys.stderr)
        return STOPPED
    except _CannotRun as exc:
        progress.done()
        return fail(str(exc))
    progress.done()
    _write(prefix, report)
    _print_summary(report, prefix)
    if args.record:
        code = _record(args, route.name, report)
        if code:
            return code
    exit_code: int = report["exit_code"]
    return exit_code


class _Stopped(Exception):
    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__("stopped")
        self.report = report


class _CannotRun(Exception):
    pass


def _samples(route: Any) -> int:
    preflight = route.policy.rollout.preflight
    return preflight.samples if preflight is not None else 1


async def _run(args: argparse.Namespace, route: Any, items: list[Any], progress: Progress) -> dict[str, Any]:
    from gateway.capacity import Capacity
    from gateway.evaluation.judge import Judge, compile_judge
    from gateway.preflight import Preflight, Settings
    from gateway.preflight.run import Direct, Misconfigured, Runner, ViaGateway
    from gateway.tasks import Spawner
    from gateway.upstream import Upstream

    settings = Settings.of(
        route, samples=args.samples, concurrency=args.concurrency, min_samples=args.min_samples,
        confidence=args.confidence,
    )  # fmt: skip
    upstream = Upstream(os.environ)
    await upstream.start()
    capacity = Capacity()
    spawner = Spawner()
    judge = None
    judge_policy = route.policy.evaluation.judge
    if judge_policy is not None:
        arm, missing = compile_judge(route.name, judge_policy, os.environ)
        if missing:
            raise _CannotRun(f"the judge cannot be asked: {missing}")
        judge = Judge(route.name, judge_policy, arm, upstream, spawner, capacity)
    via = None
    if args.url:
        timeout = max(arm.timeouts.total_s for arm in route.arms()) + 5
        via = ViaGateway(args.url, route.name, os.environ.get(args.api_key_env), timeout)
    send = via if via is not None else Direct(upstream, capacity)
    runner = Runner(
        route, items, send, judge, settings.samples, settings.concurrency, progress.add, args.capture
    )
    preflight = Preflight(runner, settings, str(args.dataset), capture=args.capture)
    try:
        return await preflight.run()
    except Misconfigured as exc:
        raise _CannotRun(str(exc)) from None
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels this task, then raises KeyboardInterrupt
        raise _Stopped(preflight.report("stopped by the user (Ctrl-C)")) from None
    finally:
        if via is not None:
            await via.close()
        await spawner.close()
        await upstream.close()


def _write(prefix: Path, report: dict[str, Any]) -> None:
    from gateway.preflight.render import html, markdown

    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    Path(f"{prefix}.md").write_text(markdown(report))
    Path(f"{prefix}.html").write_text(html(report))


def _print_summary(report: dict[str, Any], prefix: Path) -> None:
    from gateway.preflight.render import HEADLINE, _gate_row

    print(HEADLINE[report["verdict"]])
    for row in map(_gate_row, report["gates"]):
        print(f"  {row[0]:<44} {row[1]:<24} {row[2]:<32} <= {row[3]}")
        print(f"      {row[4]}")
    print(f"report: {prefix}.json, {prefix}.md, {prefix}.html")


def _record(args: argparse.Namespace, route: str, report: dict[str, Any]) -> int:
    """Attach the verdict to the route's rollout (POST /admin/routes/ROUTE/preflight)."""
    from gateway.preflight.report import recorded

    try:
        response = adminclient.call(
            args.admin_url, "POST", f"/admin/routes/{quote(route, safe='/')}/preflight", json=recorded(report)
        )
    except adminclient.AdminError as exc:
        print(f"canarygate preflight: --record: {exc}", file=sys.stderr)
        return FAILED_TO_RUN
    print(f"recorded on {args.admin_url}: {response.json().get('message', '')}")
    return 0


class Progress:
    """A progress bar with each arm's running figures: redrawn in place on a terminal, a line per tenth
    of the run otherwise (a log, CI)."""

    WIDTH = 24

    def __init__(self, out: TextIO, total: int) -> None:
        self._out = out
        self._total = max(total, 1)
        self._live = out.isatty()
        self._done = 0
        self._errors = {"base": 0, "candidate": 0}
        self._invalid = {"base": 0, "candidate": 0}
        self._latency: dict[str, list[float]] = {"base": [], "candidate": []}
        self._pairs = {"win": 0, "tie": 0, "loss": 0}
        self._shown_tenth = -1
        self._last_draw = 0.0

    def add(self, outcome: Outcome) -> None:
        self._done += 1
        for answer in (outcome.base, outcome.candidate):
            self._errors[answer.arm] += answer.error is not None
            self._invalid[answer.arm] += answer.failure is not None
            if answer.latency_s is not None:
                self._latency[answer.arm].append(answer.latency_s)
        for verdict, *_ in outcome.pairs.values():
            self._pairs[verdict] += 1
        self._draw()

    def line(self) -> str:
        filled = self.WIDTH * self._done // self._total
        arms = []
        for arm in ("base", "candidate"):
            times = sorted(self._latency[arm])
            p50 = f"{times[len(times) // 2] * 1000:.0f} ms" if times else "-"
            arms.append(f"{arm}: {self._errors[arm]} err {self._invalid[arm]} invalid p50 {p50}")
        pairs = sum(self._pairs.values())
        judged = (
            f" | pairs W{self._pairs['win']} T{self._pairs['tie']} L{self._pairs['loss']}" if pairs else ""
        )
        bar = "#" * filled + "." * (self.WIDTH - filled)
        return f"[{bar}] {self._done}/{self._total} | " + " | ".join(arms) + judged

    def _draw(self) -> None:
        if self._live:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or self._done == self._total:
                self._last_draw = now
                self._out.write("\r" + self.line()[:200] + "\x1b[K")
                self._out.flush()
            return
        tenth = 10 * self._done // self._total
        if tenth != self._shown_tenth:
            self._shown_tenth = tenth
            self._out.write(self.line() + "\n")
            self._out.flush()

    def done(self) -> None:
        if self._live and self._done:
            self._out.write("\n")
            self._out.flush()
