"""`canarygate demo`: a whole canary rehearsed on one machine, with nothing else running.

Two simulated checkpoints (the base, and a candidate whose behaviour the scenario sets), the gateway
with an automatic rollout (a mirror-only phase, then steps judged by gates every few seconds), and
simulated users speaking through the official openai client: chat, JSON mode and tool calls, some
streamed. A live view shows both arms, the gates and the controller's moves; the demo ends with the
verdict and exits 0 when the scenario's expected outcome happened (promoted, or rolled back).
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway import heldout, logs
from gateway.agents import PLANS, run_agent
from gateway.app import create_app
from gateway.server import BackgroundServer
from gateway.settings import Settings
from gateway.simulator import Simulator
from gateway.synth import Knobs

if TYPE_CHECKING:
    from rich.console import RenderableType

ROUTE = "assistant"
DEMO_KEY = "demo-key"
ADMIN_TOKEN = "demo-admin-token"  # noqa: S105 - the demo's own loopback gateway, printed for the user
BASE_MODEL, CANDIDATE_MODEL = "llama-3.1-8b-instruct", "assistant-ckpt-1124"
BASE_KNOBS = Knobs(latency_s=0.03, time_per_token_s=0.002, output_tokens=24)
STEPS = [10, 30, 60, 100]
POLICY = """\
# The demo's route: a tuned checkpoint rolled out behind its base, judged by gates.
route: {route}
arms:
  base: {{url: "{base}", model: {base_model}}}
  candidate: {{url: "{candidate}", model: {candidate_model}}}
timeouts: {{connect_s: 2, first_token_s: 10, total_s: 30}}
assignment: {{sticky_keys: [body:user]}}   # an agent run (x-conversation-id) is sticky by its trace
traces: {{idle_timeout_s: 2}}              # and has ended 2 s after its last call
mirror: {{percent: 30}}
validation: {{json: auto, tool_calls: true, stream: buffer}}
fallback:
  on: [connect_error, timeout, http_5xx, http_4xx, malformed, json_parse, json_schema, tool_unknown,
       tool_args_parse, tool_args_schema]
  budget: {{ratio: 0.5, window_s: 10, min_per_window: 10}}
rollout:
  preflight:                  # first the held-out set: no user or shadow call reaches the candidate
    dataset: heldout.jsonl
    samples: {preflight_samples}
    concurrency: 16
    min_samples: 60
    gates:                    # what a set of this size can tell: gross failures, and the quality below
      error_rate: {{max_increase: 0.25}}
      validation_failure_rate: {{max_increase: 0.25}}
      eval_score_decrease:
        expected_contains: {{max_decrease: 0.05}}
{preflight_quality}  shadow_first: true          # then a mirror-only phase: users see only the base
  steps: {steps}
  interval_s: {interval}
  min_samples: 80
  confidence: 0.95
  gates:
    error_rate: {{max_increase: 0.01, critical: true}}
    validation_failure_rate: {{max_increase: 0.01, critical: true}}
    latency_p99_ratio: {{max: 2.0}}   # a p99's interval narrows slowly on a busy machine; slow is x3
    ttft_p50_ratio: {{max: 1.6, min_samples: 40}}   # streamed answers only: fewer
    steps_per_trace_ratio: {{max: 1.3, min_samples: 10}}   # agent runs: model calls per run
    trace_failure_rate: {{max_increase: 0.1, min_samples: 10}}
{quality}"""
# The judged scenario's evaluators (a third simulator is the judge) and the gates on what they find.
QUALITY = """\
    pairwise_loss_rate: {{preference: {{max: 0.05, min_samples: 60}}}}
    eval_score_decrease: {{adherence: {{max_decrease: 0.05, min_samples: 60}}}}
evaluation:
  judge: {{url: "{judge}", model: {judge_model}, max_concurrency: 16}}
  evaluators:
    - {{name: adherence, kind: rubric, rubric: instruction_adherence, sample: 0.5}}
    - {{name: preference, kind: pairwise}}
"""
# Pre-flight's gates on the judge, for the judged scenario.
PREFLIGHT_QUALITY = """\
        adherence: {max_decrease: 0.05}
      pairwise_loss_rate: {preference: {max: 0.05}}
"""
AGENT_SHARE = 4  # one user in four runs agents: tool calls until done, one conversation id a run
PREFLIGHT_SAMPLES = 5  # answers per item and arm: 400 of the 80-item set, enough to tell 20 points
JUDGE_MODEL = "judge-8b-instruct"


@dataclass(frozen=True)
class Scenario:
    story: str  # what the candidate does
    knobs: dict[str, float]  # the candidate's simulator knobs, over the base's
    expect: Literal["promoted", "rolled_back"]
    policy_model: str = (
        CANDIDATE_MODEL  # the candidate model the policy names (the server serves the right one)
    )
    judged: bool = False  # a judge evaluates the answers, with gates on its verdicts


SCENARIOS = {
    "healthy": Scenario("answers like the base", {}, "promoted"),
    "bad-json": Scenario(
        "breaks JSON mode: 30% of its JSON answers do not parse", {"invalid_json_rate": 0.3}, "rolled_back"
    ),
    "wrong-tools": Scenario(
        "calls a tool nobody declared in 30% of tool calls", {"wrong_tool_rate": 0.3}, "rolled_back"
    ),
    "slow": Scenario("answers about 3x slower", {"latency_s": 0.3, "time_per_token_s": 0.005}, "rolled_back"),
    "flaky": Scenario("fails 10% of its calls with HTTP 500", {"error_rate": 0.1}, "rolled_back"),
    "subtle": Scenario(
        "answers fast and in valid JSON, but ignores the instructions in 20% of its answers: only a judge "
        "can tell",
        {"quality": 0.8},
        "rolled_back",
        judged=True,
    ),
    "agent-loops": Scenario(
        "answers like the base, but its agents call their last tool twice more before answering: about "
        "60% more model calls per run",
        {"extra_steps": 2},
        "rolled_back",
    ),
    "misconfigured": Scenario(
        "is deployed with its model name misspelled in the policy (the server answers 404)",
        {},
        "rolled_back",
        policy_model="assistant-ckpt-1142",
    ),
}
TERMINAL = {"promoted", "rolled_back"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Find an order by id",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    }
]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "amount": {"type": "number"}},
    "required": ["name", "amount"],
}


# --- what the users saw ----------------------------------------------------------------------------


@dataclass
class Seen:
    """One answered request, as the client saw it."""

    at: float
    arm: str  # base / candidate, from x-canarygate-arm; "error" when the client got an error
    latency: float
    ttft: float | None  # streams only
    fallback: str | None


@dataclass
class Traffic:
    seen: deque[Seen] = field(default_factory=lambda: deque(maxlen=50_000))
    total: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # client-side errors, shown, never hidden

    def window(self, seconds: float) -> list[Seen]:
        since = time.monotonic() - seconds
        return [s for s in list(self.seen) if s.at >= since]


async def _one_request(client: Any, user: str, rng: random.Random, traffic: Traffic) -> None:
    messages = [{"role": "user", "content": f"Help {user} with order {rng.randint(1000, 9999)}"}]
    kind = rng.choices(["chat", "json", "tools"], weights=[50, 25, 25])[0]
    extra: dict[str, Any] = {}
    if kind == "json":
        extra["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "invoice", "schema": SCHEMA},
        }
    elif kind == "tools":
        extra["tools"] = TOOLS
        extra["tool_choice"] = "required"
    stream = rng.random() < 0.4
    started = time.perf_counter()
    ttft = None
    try:
        if stream:
            async with client.chat.completions.with_streaming_response.create(
                model=ROUTE, messages=messages, user=user, stream=True, **extra
            ) as response:
                async for line in response.iter_lines():
                    if ttft is None and line.startswith("data: {"):
                        ttft = time.perf_counter() - started
                    if line.startswith('data: {"error"'):
                        raise RuntimeError(line[6:200])
                headers = response.headers
        else:
            raw = await client.chat.completions.with_raw_response.create(
                model=ROUTE, messages=messages, user=user, **extra
            )
            raw.parse()
            headers = raw.headers
    except Exception as exc:  # every failure is counted and shown, none is hidden
        traffic.seen.append(Seen(time.monotonic(), "error", time.perf_counter() - started, None, None))
        traffic.total["error"] += 1
        if len(traffic.failures) < 20:
            traffic.failures.append(f"{type(exc).__name__}: {str(exc)[:160]}")
        return
    arm = str(headers.get("x-canarygate-arm", "?"))
    fallback = headers.get("x-canarygate-fallback")
    traffic.seen.append(Seen(time.monotonic(), arm, time.perf_counter() - started, ttft, fallback))
    traffic.total[arm] += 1


async def _agent_run(client: Any, user: str, run: int, rng: random.Random, traffic: Traffic) -> None:
    """One agent run (a trace): its calls counted as any user's, its failure too."""

    def seen(headers: Any, seconds: float) -> None:
        arm = str(headers.get("x-canarygate-arm", "?"))
        traffic.seen.append(Seen(time.monotonic(), arm, seconds, None, headers.get("x-canarygate-fallback")))
        traffic.total[arm] += 1

    task = rng.choice(list(PLANS))
    done = await run_agent(client, ROUTE, f"{user}-run-{run}", task, user=user, on_call=seen)
    if done.error is not None:
        traffic.seen.append(Seen(time.monotonic(), "error", 0.0, None, None))
        traffic.total["error"] += 1
        if len(traffic.failures) < 20:
            traffic.failures.append(f"agent run: {done.error}")


async def _users(client: Any, count: int, stop: asyncio.Event, traffic: Traffic) -> None:
    """count users; one in AGENT_SHARE runs agents (several calls a run, one conversation id each)."""

    async def user(index: int) -> None:
        rng = random.Random(index)
        name = f"user-{index:03d}"
        runs = 0
        while not stop.is_set():
            if index % AGENT_SHARE == 0:
                runs += 1
                await _agent_run(client, name, runs, rng, traffic)
            else:
                await _one_request(client, name, rng, traffic)
            await asyncio.sleep(rng.uniform(0.0, 0.2))

    await asyncio.gather(*(user(i) for i in range(count)))


# --- what the gateway says -------------------------------------------------------------------------


@dataclass
class Snapshot:
    elapsed: float
    rollout: dict[str, Any]
    analysis: dict[str, Any] | None
    validation: dict[tuple[str, str], Counter[str]]  # (arm, mode) -> kind -> count
    fallbacks: Counter[str]
    agreement: dict[str, tuple[float, float]]  # check -> (agree, total)
    traffic: Traffic

    @property
    def phase(self) -> str:
        return str(self.rollout.get("phase", "?"))


async def _snapshot(http: httpx.AsyncClient, started: float, traffic: Traffic) -> Snapshot:
    rollout = (await http.get(f"/admin/routes/{ROUTE}")).json()
    reply = await http.get(f"/admin/routes/{ROUTE}/analysis")
    analysis = reply.json() if reply.status_code == 200 else None
    validation: dict[tuple[str, str], Counter[str]] = {}
    fallbacks: Counter[str] = Counter()
    agreement: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families((await http.get("/metrics")).text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "canarygate_validation_failures_total":
                key = (labels["arm"], labels.get("mode", "primary"))
                validation.setdefault(key, Counter())[labels["kind"]] += int(sample.value)
            elif sample.name == "canarygate_fallbacks_total":
                fallbacks[labels["reason"]] += int(sample.value)
            elif sample.name == "canarygate_mirror_agreement_total":
                agree, total = agreement.get(labels["check"], (0.0, 0.0))
                agreement[labels["check"]] = (
                    agree + sample.value * (labels["result"] == "agree"),
                    total + sample.value,
                )
    return Snapshot(time.monotonic() - started, rollout, analysis, validation, fallbacks, agreement, traffic)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.0f}"


def _gates(snap: Snapshot) -> list[dict[str, Any]]:
    """The gates of the analysis (the sample-ratio check is shown among the controller's moves when it
    holds the rollout). Once the controller has decided, the gates it decided on: a gate that failed reads
    `fail`, whatever more answers in flight say since."""
    return [g for g in (snap.analysis or {}).get("gates", []) if not g["gate"].startswith("sample_ratio")]


def _gate_value(gate: dict[str, Any]) -> str:
    value = gate.get("value")
    if value is None:
        return "-"
    if gate["gate"].endswith("_ratio"):
        return f"x{value:.2f}"
    return f"{value * 100:+.2f} pts"


def _limit(gate: dict[str, Any]) -> str:
    if gate["gate"].endswith("_ratio"):
        return f"x{gate['threshold']:g}"
    return f"{gate['threshold'] * 100:+.2f} pts"


def _gate_threshold(gate: dict[str, Any]) -> str:
    return f"<= {_limit(gate)}"


def _gate_against(gate: dict[str, Any]) -> str:
    """value and limit in one cell, the sign between them saying which side of the limit it is:
    `+5.03 > +1.00 pts`, `x0.64 <= x2` (the unit once: gate names need the width)."""
    value = gate.get("value")
    if value is None:
        return f"- (<= {_limit(gate)})"
    shown = _gate_value(gate).removesuffix(" pts")
    return f"{shown} {'<=' if value <= gate['threshold'] else '>'} {_limit(gate)}"


def _phase_line(snap: Snapshot) -> str:
    rollout = snap.rollout
    phase = snap.phase
    if phase == "preflight":
        where = "base and candidate answer the held-out set; no user or shadow call reaches the candidate"
    elif phase == "shadow":
        where = "mirror-only phase: users get the base, 30% of requests are replayed to the candidate"
    elif phase == "progressing":
        where = (
            f"step {rollout['step'] + 1} of {len(STEPS)}: candidate serves {rollout['weight']:g}% of users"
        )
    elif phase == "promoted":
        where = "the candidate serves everyone"
    elif phase == "rolled_back":
        where = "the base serves everyone"
    else:
        where = f"weight {rollout.get('weight', 0):g}%"
    return f"[{snap.elapsed:5.1f}s] {phase}: {where}"


def _arm_rows(snap: Snapshot, window_s: float = 5.0) -> list[list[str]]:
    recent = snap.traffic.window(window_s)
    rows = []
    for arm in ("base", "candidate"):
        mine = [s for s in recent if s.arm == arm]
        served = snap.traffic.total[arm]
        measured = None
        if snap.analysis is not None:
            side = "base" if arm == "base" else "candidate"
            measured = snap.analysis["window"][side]
        rows.append(
            [
                arm,
                f"{len(mine) / window_s:.0f}/s",
                str(served),
                _pct(measured["error_rate"]) if measured else "-",
                ", ".join(f"{k} {n}" for k, n in _invalid(snap, arm).most_common(3)) or "0",
                _ms([s.latency for s in mine], 0.5),
                _ms([s.latency for s in mine], 0.99),
                f"{_ms(ttfts := [s.ttft for s in mine if s.ttft is not None], 0.5)}/{_ms(ttfts, 0.99)}",
            ]
        )
    return rows


def _invalid(snap: Snapshot, arm: str) -> Counter[str]:
    """The arm's validation failures by kind: its answers' and its shadow calls'."""
    return snap.validation.get((arm, "primary"), Counter()) + snap.validation.get((arm, "mirror"), Counter())


ERRORS_FOOTNOTE = (
    "* errors: each arm's calls as the gateway counted them"
    " (in the mirror-only phase, the candidate's shadow calls)"
)
LATENCY_LEGEND = (
    "latency above: as the simulated users' clients measured it, their own waiting included (every user, "
    "both simulated servers and the gateway share this machine); the gates compare the gateway's own "
    "measurements of each arm, which is why they read lower"
)
COMPACT_LATENCY_LEGEND = (
    "latency above: as the users' clients measured it, their own waiting included; the gates compare the "
    "gateway's own measurements of each arm, so they read lower"
)
CRITICAL_LEGEND = "! critical gate: judged every second, one failure rolls back at once"
ARM_HEADER = ["arm", "rate", "served", "errors*", "validation failures", "p50 ms", "p99 ms", "TTFT p50/p99"]


def _extras(snap: Snapshot, compact: bool = False, width: int = 0) -> list[str]:
    lines = []
    fallbacks = sum(snap.fallbacks.values())
    if fallbacks:
        reasons = ", ".join(f"{k} {n}" for k, n in snap.fallbacks.most_common(3))
        seen = "none seen by users" if compact else "users saw none of those failures"
        lines.append(f"fallbacks to base: {fallbacks} ({reasons}); {seen}")
    shown = ", ".join(
        f"{check} {agree / total * 100:.0f}%"
        for check, (agree, total) in sorted(snap.agreement.items())
        if total
    )
    if shown:  # none before the first compared pair
        lines.append(f"mirror agreement (shadow vs base answer): {shown}")
        if "tool_args" in shown:
            lines.append(
                "  (tool_args: identical arguments, which different checkpoints rarely give)"
                if compact
                else "  (tool_args asks for identical arguments: different checkpoints rarely match word for "
                "word)"
            )
    errors = snap.traffic.total["error"]
    if errors:
        line = f"client errors: {errors} (e.g. {snap.traffic.failures[0]})"
        lines.append(line if not compact or len(line) <= width else line[: width - 3] + "...")
    return lines


# --- the two views ---------------------------------------------------------------------------------


class PlainView:
    """No terminal (CI, a pipe): a line of numbers every few seconds, and every controller move."""

    def __init__(self, every_s: float = 3.0) -> None:
        self.every_s = every_s
        self._last = -every_s
        self._moves = 0

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def update(self, snap: Snapshot) -> None:
        history = list(reversed(snap.rollout.get("history", [])))
        for move in history[self._moves :]:
            said = f"{move['phase']} at {move['weight']:g}%: {move['reason']}"
            print(f"[{snap.elapsed:5.1f}s] controller: {said}", flush=True)
        self._moves = len(history)
        if snap.elapsed - self._last < self.every_s:
            return
        self._last = snap.elapsed
        print(_phase_line(snap), flush=True)
        for row in _arm_rows(snap):
            cells = dict(zip(ARM_HEADER, row, strict=True))
            print(
                f"    {cells['arm']:<9} {cells['rate']:>6} served {cells['served']:>5}  "
                f"errors {cells['errors*']:>6}  "
                f"p50/p99 {cells['p50 ms']}/{cells['p99 ms']} ms  TTFT {cells['TTFT p50/p99']} ms  "
                f"validation: {cells['validation failures']}",
                flush=True,
            )
        for gate in _gates(snap):
            shown = f"{gate['result']:<5} {_gate_value(gate):>11} {_gate_threshold(gate)}"
            print(f"    gate {gate['gate']:<30} {shown}", flush=True)
        for line in _extras(snap):
            print(f"    {line}", flush=True)


# Below this many columns, or when the full layout is taller than the terminal, the live view takes its
# compact layout (an 80x40 terminal fits).
FULL_COLUMNS = 120
COLOURS = {"pass": "green", "fail": "bold red", "wait": "yellow"}


def render(snap: Snapshot, title: str, width: int, height: int) -> RenderableType:
    """The live view for a terminal of width x height: the full layout where it fits, else a compact one
    that fits 80x40 (no column cut, the controller's newest move whole)."""
    from rich import box
    from rich.console import Console, Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    header = Text(_phase_line(snap), style="bold")
    rows = _arm_rows(snap)
    gates = _gates(snap)
    history = snap.rollout.get("history", [])  # newest first
    decided = (snap.analysis or {}).get("decided")
    since = "as the controller decided" if decided else "since the rollout began"
    measure = Console(width=width, height=height, file=io.StringIO(), color_system=None)
    if width >= FULL_COLUMNS:
        arms = Table(expand=True, title="what users were served (last 5 s)", title_justify="left")
        for name in ARM_HEADER:
            arms.add_column(name, justify="left" if name in ("arm", "validation failures") else "right")
        for row in rows:
            arms.add_row(*row)
        table = Table(expand=True, title=f"gates: candidate vs base, {since}", title_justify="left")
        for name in ("gate", "verdict", "value", "threshold", "samples base / candidate", "why"):
            table.add_column(name)
        for gate in gates:
            table.add_row(
                gate["gate"] + (" (critical)" if gate["critical"] else ""),
                Text(gate["result"], style=COLOURS.get(gate["result"], "")),
                _gate_value(gate),
                _gate_threshold(gate),
                f"{gate['n_base']} / {gate['n_candidate']}",
                gate["reason"],
            )
        moves = Table(expand=True, show_header=False, title="controller", title_justify="left")
        moves.add_column("move")
        for move in reversed(history[:6]):
            moves.add_row(f"{move['phase']} at {move['weight']:g}%: {move['reason']}")
        extras = Text("\n".join([*_extras(snap), ERRORS_FOOTNOTE, LATENCY_LEGEND]))
        full = Panel(Group(header, arms, table, moves, extras), title=title)
        if len(measure.render_lines(full, pad=False)) <= height:
            return full
    # Compact: borderless tables, cells that never shrink below their text, validation failures and the
    # gates' reasons left to the lines below (the failing gates' reasons are in the controller's move).
    arms = Table(
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=True,
        title="what users were served (last 5 s)", title_justify="left",
    )  # fmt: skip
    for name, justify in (
        ("arm", "left"), ("rate", "right"), ("served", "right"), ("errors*", "right"),
        ("p50/p99 ms", "right"), ("TTFT p50/p99", "right"), ("invalid", "right"),
    ):  # fmt: skip
        arms.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for arm, row in zip(("base", "candidate"), rows, strict=True):
        arms.add_row(
            row[0],
            row[1],
            row[2],
            row[3],
            f"{row[5]}/{row[6]}",
            row[7],
            str(sum(_invalid(snap, arm).values())),
        )
    invalid = [
        f"{arm} {', '.join(f'{k} {n}' for k, n in kinds.most_common(3))}"
        for arm in ("base", "candidate")
        if (kinds := _invalid(snap, arm))
    ]
    table = Table(
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=True,
        title=f"gates: candidate vs base, {since}", title_justify="left",
    )  # fmt: skip
    table.add_column("gate", overflow="fold")  # a long name wraps; it is never cut
    table.add_column("verdict", no_wrap=True)
    table.add_column("value vs limit", justify="right", no_wrap=True)
    table.add_column("base / cand.", justify="right", no_wrap=True)
    for gate in gates:
        table.add_row(
            gate["gate"] + (" !" if gate["critical"] else ""),
            Text(gate["result"], style=COLOURS.get(gate["result"], "")),
            _gate_against(gate),
            f"{gate['n_base']} / {gate['n_candidate']}",
        )
    said = [f"{m['phase']} at {m['weight']:g}%: {m['reason']}" for m in history[:4]]  # newest first
    older = [m if len(m) <= width - 4 else m[: width - 7] + "..." for m in said[1:]]  # a line each
    notes = [f"validation failures: {'; '.join(invalid)}"] if invalid else []
    notes += _extras(snap, compact=True, width=width - 4)
    legends = [ERRORS_FOOTNOTE, CRITICAL_LEGEND, COMPACT_LATENCY_LEGEND]

    def panel(older: list[str], legends: list[str]) -> RenderableType:
        controller = Text("controller (newest first)\n")
        controller.append(said[0] if said else "-", style="bold")
        controller.append("".join(f"\n{m}" for m in older))
        return Panel(Group(header, arms, table, controller, Text("\n".join(notes + legends))), title=title)

    # What does not fit goes, least needed first: older moves, then the legends. The newest move, which
    # says why the rollout stands where it is, stays whole.
    shown = panel(older, legends)
    while len(measure.render_lines(shown, pad=False)) > height and (older or legends):
        if older:
            older = older[:-1]
        else:
            legends = legends[:-1]
        shown = panel(older, legends)
    return shown


class LiveView:
    """A terminal: rich's live display, redrawn four times a second, in the layout its size allows."""

    def __init__(self, title: str) -> None:
        from rich.console import Console
        from rich.live import Live

        self.title = title
        self.console = Console()
        self._live = Live(console=self.console, refresh_per_second=4, transient=False)

    def __enter__(self) -> LiveView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    def update(self, snap: Snapshot) -> None:
        size = self.console.size
        self._live.update(render(snap, self.title, size.width, size.height))


# --- the run ---------------------------------------------------------------------------------------


def verdict(rollout: dict[str, Any], elapsed: float) -> tuple[str, str]:
    """(outcome, a sentence that says what happened)."""
    phase = rollout["phase"]
    history = rollout.get("history", [])  # newest first
    last = history[0] if history else {"reason": ""}
    if phase == "promoted":
        walked = len([s for s in STEPS if s < 100])  # reaching 100% is the promotion itself
        return "promoted", f"promoted after {walked} steps in {elapsed:.0f} s"
    if phase == "rolled_back":
        before = history[1] if len(history) > 1 else None
        if before is not None and before["phase"] == "preflight":
            where = "in pre-flight, before any user or shadow call reached the candidate"
        elif before is None or before["phase"] == "shadow":
            where = "in the mirror-only phase, before any user was served by the candidate"
        else:
            where = f"at step {before['step'] + 1} (weight {before['weight']:g}%)"
        return "rolled_back", f"rolled back {where}: {last['reason'].removeprefix('gate failed: ')}"
    return phase, f"no decision after {elapsed:.0f} s: still {phase} at weight {rollout['weight']:g}%"


def run_demo(
    scenario_name: str,
    port: int,
    duration: float,
    users: int,
    interval_s: float = 3.0,
    keep_serving: bool = False,
    live: bool | None = None,
) -> int:
    if importlib.util.find_spec("openai") is None:
        print("canarygate demo needs the openai client: pip install 'canarygate[demo]'", file=sys.stderr)
        return 2
    scenario = SCENARIOS[scenario_name]
    live = sys.stdout.isatty() if live is None else live
    if live:
        try:
            import rich  # noqa: F401
        except ImportError:
            live = False
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="canarygate-demo-")))
        base = stack.enter_context(BackgroundServer(Simulator(BASE_KNOBS, served_models=[BASE_MODEL]).app()))
        candidate_knobs = replace(BASE_KNOBS, **scenario.knobs)  # type: ignore[arg-type]
        served = Simulator(candidate_knobs, served_models=[CANDIDATE_MODEL])  # 404 for any other name
        candidate = stack.enter_context(BackgroundServer(served.app()))
        quality = ""
        if scenario.judged:
            judge = stack.enter_context(
                BackgroundServer(Simulator(BASE_KNOBS, served_models=[JUDGE_MODEL]).app())
            )
            quality = QUALITY.format(judge=f"{judge.url}/v1", judge_model=JUDGE_MODEL)
        (work / "heldout.jsonl").write_text(heldout.text())
        (work / f"{ROUTE}.yaml").write_text(
            POLICY.format(
                preflight_samples=PREFLIGHT_SAMPLES,
                preflight_quality=PREFLIGHT_QUALITY if scenario.judged else "",
                route=ROUTE,
                base=f"{base.url}/v1",
                candidate=f"{candidate.url}/v1",
                base_model=BASE_MODEL,
                candidate_model=scenario.policy_model,
                steps=STEPS,
                interval=interval_s,
                quality=quality,
            )
        )
        settings = Settings(
            policy_dir=work, api_keys=frozenset({DEMO_KEY}), admin_token=ADMIN_TOKEN, watch_policies=False
        )
        # The gateway's log at INFO (rollout moves, fallbacks, circuits), off the live view, in a file of
        # this run's own: concurrent demos never write into one another's.
        handle, name = tempfile.mkstemp(prefix=f"canarygate-demo-{scenario_name}-", suffix=".log")
        os.close(handle)
        log_file = Path(name)
        stack.enter_context(_logs_to(log_file))
        gateway = stack.enter_context(BackgroundServer(create_app(settings), port=port))
        expect = scenario.expect.replace("_", " ")
        print(f"scenario {scenario_name}: the candidate {scenario.story}; expected: {expect}")
        print(f"simulated base       {base.url}/v1 ({BASE_MODEL})")
        named = (
            "" if scenario.policy_model == CANDIDATE_MODEL else f"; the policy says {scenario.policy_model}"
        )
        print(f"simulated candidate  {candidate.url}/v1 ({CANDIDATE_MODEL}{named})")
        if scenario.judged:
            print(f"simulated judge      {judge.url}/v1 ({JUDGE_MODEL}): a rubric and a pairwise judge")
        print(
            f"gateway              {gateway.url}/v1, route {ROUTE!r}, {users} simulated users (openai client)"
        )
        steps = " -> ".join(f"{s}%" for s in STEPS)
        held_out = f"{len(heldout.rows())} held-out items x {PREFLIGHT_SAMPLES}"
        print(
            f"rollout              pre-flight ({held_out}), mirror-only, then {steps}; gates judged every "
            f"{interval_s:g} s"
        )
        print(f"gateway log          {log_file}")
        view: PlainView | LiveView = LiveView(f"canarygate demo: {scenario_name}") if live else PlainView()
        started = time.monotonic()
        with view:
            final, elapsed, traffic = asyncio.run(_run(gateway.url, users, duration, started, view.update))
        outcome, sentence = verdict(final, elapsed)
        print()
        print(f"verdict: {sentence}")
        print(
            f"users were served {traffic.total['base']} answers by the base and {traffic.total['candidate']} "
            f"by the candidate; {traffic.total['error']} client errors"
        )
        for failure in traffic.failures[:3]:
            print(f"  client error: {failure}")
        print(f"the gateway's log: {log_file}")
        expected = outcome == scenario.expect and traffic.total["error"] == 0
        print("as expected" if expected else f"NOT as expected: wanted {scenario.expect.replace('_', ' ')}")
        _next_steps(gateway.url, keep_serving)
        if keep_serving:
            with suppress(KeyboardInterrupt):
                threading.Event().wait()
    return 0 if expected else 1


async def _run(
    url: str, users: int, duration: float, started: float, show: Callable[[Snapshot], None]
) -> tuple[dict[str, Any], float, Traffic]:
    import openai

    traffic = Traffic()
    stop = asyncio.Event()
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=DEMO_KEY, max_retries=0, timeout=60)
    load = asyncio.create_task(_users(client, users, stop, traffic))
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ended_at: float | None = None
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as http:
        try:
            while True:
                await asyncio.sleep(0.5)
                snap = await _snapshot(http, started, traffic)  # once decided: the gates it was decided on
                show(snap)
                if snap.phase in TERMINAL and ended_at is None:
                    ended_at = snap.elapsed  # a little more traffic, to show everyone on one arm
                if (ended_at is not None and snap.elapsed - ended_at > 3) or snap.elapsed > duration:
                    break
        finally:
            stop.set()
            await load
            await client.close()
        final = (await http.get(f"/admin/routes/{ROUTE}")).json()
    return final, ended_at if ended_at is not None else time.monotonic() - started, traffic


@contextmanager
def _logs_to(path: Path) -> Iterator[None]:
    logger = logging.getLogger("gateway")
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter(logs.TEXT))
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, level = saved
        logger.setLevel(level)
        handler.close()


def _next_steps(url: str, keep_serving: bool) -> None:
    print()
    if keep_serving:
        print("still serving (Ctrl-C stops); look around with")
    else:
        print("to look around afterwards, run it with --keep-serving; then, with")
    print(f"CANARYGATE_URL={url} CANARYGATE_ADMIN_TOKEN={ADMIN_TOKEN}:")
    for command, what in (
        (f"curl {url}/metrics", "Prometheus metrics, by arm"),
        (f"canarygate status {ROUTE}", "phase, weight, history"),
        (f"canarygate compare {ROUTE}", "every gate: value, interval, verdict"),
        (f"canarygate pairs --route {ROUTE} --disagreements", "shadow answers that differed from the base"),
    ):
        print(f"  {command:<50} # {what}")
    print("next: the same gateway in front of real model servers (README: Next: real model servers)")
