"""A pre-flight run: every item of a held-out set (each --samples times) to both arms of a route, at most
`concurrency` items at once, every answer through the route's validation, its evaluators and its judge
(the same code as live traffic), plus the item's own expectations. Calls to an arm that declares
max_concurrency take its spare slots only, and inside a serving gateway they yield to users' requests as
shadow calls do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from gateway.capacity import Capacity, Preempted
from gateway.errors import KINDS, GatewayError
from gateway.evaluation.checks import Result, check, message_of, same_tools, text_of, tool_choice
from gateway.evaluation.evaluations import pairwise, rubric
from gateway.evaluation.judge import Judge, JudgeFailed, settled
from gateway.evaluation.prompts import Verdict
from gateway.policy import Evaluator
from gateway.preflight.dataset import DatasetError, Item
from gateway.route import Route, RouteArm
from gateway.routing import OVERRIDE_HEADER
from gateway.upstream import Call, Upstream
from gateway.validation import SHAPE_ONLY, Rules, SchemaCache, SchemaError, check_chat, rules_for

# Scores every item with an expectation gets, beside the route's evaluators (same names in gates).
EXPECTED = ("expected_tool", "expected_arguments", "expected_contains", "expected_answer")


class NoAnswer(Exception):
    """An arm gave no answer to an item: why, and the validation kind when the gateway fell back for it."""

    def __init__(self, reason: str, kind: str | None = None, latency_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.latency_s = latency_s  # until the failure: a failed call is timed too, as on live traffic


class Misconfigured(Exception):
    """The run cannot go on (a gateway that does not honour the arm override): nothing more is sent."""


Send = Callable[[RouteArm, dict[str, Any]], Awaitable[tuple[dict[str, Any], float]]]


@dataclass
class Answer:
    """One arm's answer to one sample of an item, and what it scored."""

    arm: str
    answer: dict[str, Any] | None = None
    error: str | None = None  # why there is no answer
    failure: str | None = None  # the validation failure's kind
    failure_message: str | None = None
    latency_s: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    asked: dict[str, bool] = field(default_factory=dict)  # json, schema, tools: what its request asked for

    @property
    def text(self) -> str:
        return text_of(self.answer) if self.answer is not None else ""


@dataclass
class Outcome:
    item: Item
    sample: int
    base: Answer
    candidate: Answer
    pairs: dict[str, tuple[str, float, bool, str]] = field(default_factory=dict)  # verdict, value, flip, why
    not_judged: dict[str, str] = field(default_factory=dict)  # evaluator -> the judge's failure


class Direct:
    """Calls an arm's upstream as the gateway does (its pool, headers, timeouts); within the arm's server
    slots when it declares max_concurrency, yielding to users when the capacity is a serving gateway's."""

    def __init__(self, upstream: Upstream, capacity: Capacity) -> None:
        self._upstream = upstream
        self._capacity = capacity

    async def __call__(self, arm: RouteArm, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        headers = {**arm.headers, "Content-Type": "application/json"}
        data = orjson.dumps({**body, "model": arm.model, "stream": False})
        call = Call(arm, "chat", data, headers, None, arm.client_timeout, arm.timeouts.first_token_s)
        slots = self._capacity.slots(arm)
        while True:
            try:
                if slots is None:
                    started = time.perf_counter()
                    _, _, answer = await self._upstream.fetch(call)
                else:
                    await settled(slots)
                    started = time.perf_counter()
                    _, _, answer = await slots.run_shadow(self._upstream.fetch(call))
            except Preempted:
                continue  # a user needed the slot: the item waits for the next spare one
            except GatewayError as exc:
                raise NoAnswer(exc.message, latency_s=time.perf_counter() - started) from exc
            return answer, time.perf_counter() - started


class ViaGateway:
    """Calls a running gateway's route with the arm forced (x-canary), so the answer is what the gateway
    serves: a fallback to the base is the candidate's failure, never its answer."""

    def __init__(self, url: str, route: str, api_key: str | None, timeout_s: float) -> None:
        base = url.rstrip("/")
        self._url = (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"
        self._route = route
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, arm: RouteArm, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {**self._headers, OVERRIDE_HEADER: arm.name}
        data = orjson.dumps({**body, "model": self._route, "stream": False})
        started = time.perf_counter()
        try:
            async with self._session.post(self._url, data=data, headers=headers) as resp:
                raw = await resp.content.read(16 * 1024 * 1024)
                latency = time.perf_counter() - started
                served = resp.headers.get("x-canarygate-arm")
                fallback = resp.headers.get("x-canarygate-fallback")
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = f"the gateway at {self._url} could not be reached: {exc or type(exc).__name__}"
            raise NoAnswer(reason, latency_s=time.perf_counter() - started) from None
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        if status >= 400:
            error = parsed.get("error") if isinstance(parsed, dict) else None
            message = error.get("message") if isinstance(error, dict) else raw[:200].decode(errors="replace")
            if status in (401, 403):
                raise Misconfigured(f"the gateway refused the key (HTTP {status}): {message}")
            if status == 404:
                raise Misconfigured(f"the gateway has no route {self._route!r}: {message}")
            raise NoAnswer(f"HTTP {status}: {message}", latency_s=latency)
        if fallback:
            kind = fallback if fallback in KINDS else None
            raise NoAnswer(f"the gateway fell back to the base ({fallback})", kind, latency)
        if served != arm.name:
            raise Misconfigured(
                f"asked for the {arm.name} arm, the gateway answered from {served or 'an unnamed arm'}: the "
                f"route must honour {OVERRIDE_HEADER} (assignment.allow_override_header: true)"
            )
        if not isinstance(parsed, dict):
            raise NoAnswer(f"HTTP {status} with a body that is not a JSON object", latency_s=latency)
        return parsed, latency

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class Runner:
    """Runs the items; outcomes fill in as items finish (what a cancelled run leaves is still a report)."""

    def __init__(
        self,
        route: Route,
        items: list[Item],
        send: Send,
        judge: Judge | None,
        samples: int = 1,
        concurrency: int = 4,
        on_outcome: Callable[[Outcome], None] | None = None,
        keep_answers: bool = True,
    ) -> None:
        if route.candidate is None:
            raise ValueError(f"route {route.name!r} has no candidate arm to compare with its base")
        self.route = route
        self.items = items
        self.samples = samples
        self.total = len(items) * samples
        self.outcomes: list[Outcome] = []
        self._send = send
        self._judge = judge
        self._concurrency = concurrency
        self._on_outcome = on_outcome
        self._keep_answers = keep_answers  # False: answers are dropped once scored (memory: a large set)
        self._rules = _rules(route, items)

    async def run(self) -> list[Outcome]:
        work = [(item, sample) for sample in range(self.samples) for item in self.items]
        work.reverse()  # popped from the end: in the set's order

        async def worker() -> None:
            while work:
                item, sample = work.pop()
                outcome = await self.one(item, sample)
                self.outcomes.append(outcome)
                if self._on_outcome is not None:
                    self._on_outcome(outcome)

        workers = [asyncio.ensure_future(worker()) for _ in range(min(self._concurrency, len(work)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return self.outcomes

    async def one(self, item: Item, sample: int) -> Outcome:
        route = self.route
        assert route.candidate is not None
        base, candidate = await asyncio.gather(
            self._answer(route.base, item), self._answer(route.candidate, item)
        )
        outcome = Outcome(item, sample, base, candidate)
        for answer in (base, candidate):
            self._expectations(item, answer)
        jobs = []
        for evaluator in route.policy.evaluation.evaluators:
            if evaluator.kind == "pairwise":
                jobs.append(self._pair(evaluator, item, outcome))
            elif evaluator.kind == "tool_selection" and item.expected.tool is None and evaluator.on_pairs:
                _agreement(evaluator, item, base, candidate)
            else:
                for answer in (base, candidate):
                    if answer.arm in evaluator.arms:
                        jobs.append(self._single(evaluator, item, answer, outcome))
        await asyncio.gather(*jobs)
        if not self._keep_answers:
            base.answer = candidate.answer = None
        return outcome

    async def _answer(self, arm: RouteArm, item: Item) -> Answer:
        rules = self._rules.get(item.id)
        asked = {
            "json": rules is not None and rules.json_object,
            "schema": rules is not None and bool(rules.schemas),
            "tools": rules is not None and rules.tools is not None,
        }
        answer = Answer(arm.name, asked=asked)
        try:
            body, answer.latency_s = await self._send(arm, item.request)
        except NoAnswer as exc:
            answer.latency_s = exc.latency_s
            answer.error = None if exc.kind else exc.reason
            answer.failure, answer.failure_message = exc.kind, exc.reason if exc.kind else None
            return answer
        answer.answer = body
        usage = body.get("usage")
        if isinstance(usage, dict):
            tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
            answer.input_tokens = tokens_in if isinstance(tokens_in, int) else None
            answer.output_tokens = tokens_out if isinstance(tokens_out, int) else None
            if arm.price is not None and answer.input_tokens is not None and answer.output_tokens is not None:
                answer.cost = answer.input_tokens * arm.price[0] + answer.output_tokens * arm.price[1]
        failure = check_chat(body, rules or SHAPE_ONLY)
        if failure is not None:
            answer.failure, answer.failure_message = failure.kind, failure.message
        return answer

    def _expectations(self, item: Item, answer: Answer) -> None:
        """The item's own expectations: each a score of 1 or 0. An arm that gave no answer is not scored
        (as live traffic, where only answers are evaluated): its error rate counts it."""
        expected = item.expected
        body = answer.answer
        if body is None:
            return
        if expected.tool is not None:
            _result(answer, tool_choice("expected_tool", body, expected.tool))
        if expected.arguments is not None:
            got = _arguments(body)
            ok = got is not None and all(got.get(k) == v for k, v in expected.arguments.items())
            _score(answer, "expected_arguments", ok, f"arguments {orjson.dumps(got).decode()[:200]}")
        text = answer.text
        if expected.contains:
            missing = [c for c in expected.contains if c.casefold() not in text.casefold()]
            _score(
                answer,
                "expected_contains",
                not missing,
                f"missing {missing!r}" if missing else "contains all",
            )
        if expected.answer is not None:
            ok = _normal(text).startswith(_normal(expected.answer)) if text else False
            _score(answer, "expected_answer", ok, f"answer {text[:80]!r}, expected {expected.answer[:80]!r}")

    async def _single(self, evaluator: Evaluator, item: Item, answer: Answer, outcome: Outcome) -> None:
        body = answer.answer
        if body is None:
            return
        if evaluator.kind == "tool_selection" and item.expected.tool is not None:
            _result(answer, tool_choice(evaluator.name, body, item.expected.tool))
            return
        if evaluator.kind == "rubric":
            if self._judge is None:
                outcome.not_judged[evaluator.name] = "no_judge"
                return
            ask = self._asker()
            try:
                result = await rubric(ask, evaluator, item.request, body, self._judge.policy.max_answer_chars)
            except JudgeFailed as failed:
                outcome.not_judged[evaluator.name] = failed.outcome
                return
        else:
            checked = check(evaluator, body, item.request)
            if checked is None:
                return
            result = checked
        _result(answer, result)

    async def _pair(self, evaluator: Evaluator, item: Item, outcome: Outcome) -> None:
        base, other = outcome.base.answer, outcome.candidate.answer
        if base is None or other is None:  # nothing to compare: the error rate counts the missing answer
            outcome.not_judged[evaluator.name] = "no_answer"
            return
        if self._judge is None:
            outcome.not_judged[evaluator.name] = "no_judge"
            return
        try:
            verdict, value, flip, result = await pairwise(
                self._asker(), evaluator, item.request, base, other, self._judge.policy.max_answer_chars
            )
        except JudgeFailed as failed:
            outcome.not_judged[evaluator.name] = failed.outcome
            return
        outcome.pairs[evaluator.name] = (verdict, value, flip, result.explanation)

    def _asker(self) -> Callable[[dict[str, Any], str], Awaitable[Verdict]]:
        judge = self._judge
        assert judge is not None

        async def ask(body: dict[str, Any], schema: str) -> Verdict:
            return (await judge.ask(body, schema))[0]

        return ask


def _rules(route: Route, items: list[Item]) -> dict[str, Rules | None]:
    """Each item's validation rules, compiled before anything is sent: a schema that does not compile is
    the set's mistake, named by its line."""
    cache = SchemaCache()
    rules: dict[str, Rules | None] = {}
    for item in items:
        try:
            rules[item.id] = rules_for(item.request, route.validation, cache)
        except SchemaError as exc:
            raise DatasetError(f"line {item.line}: {exc}") from None
    return rules


def _agreement(evaluator: Evaluator, item: Item, base: Answer, candidate: Answer) -> None:
    """tool_selection with no expected tool: the candidate against the base's choice (the base, the
    reference, agrees with itself)."""
    if base.answer is None or candidate.answer is None:
        return
    result = same_tools(evaluator, item.request, base.answer, candidate.answer)
    if result is not None:
        _result(candidate, result)
        _score(base, evaluator.name, True, "the reference")


def _score(answer: Answer, name: str, ok: bool, why: str) -> None:
    answer.scores[name] = float(ok)
    answer.reasons[name] = why


def _result(answer: Answer, result: Result) -> None:
    answer.scores[result.evaluator] = result.score
    answer.reasons[result.evaluator] = result.explanation


def _arguments(body: dict[str, Any] | None) -> dict[str, Any] | None:
    calls = message_of(body).get("tool_calls")
    if not isinstance(calls, list) or not calls or not isinstance(calls[0], dict):
        return None
    function = calls[0].get("function")
    raw = function.get("arguments") if isinstance(function, dict) else None
    try:
        parsed = orjson.loads(raw) if isinstance(raw, str) else raw
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())
