"""Evaluations of a route's answers and shadow pairs, in the background: sampled by request id (every
evaluator sees the same requests), deterministic checks at once, judged ones through the route's Judge.
Each result goes to the metrics, the rollout statistics (gates), a span event and the pair's record.

Pairwise judging shows the judge both answers twice, in both orders: a judge prefers the first (or the
second) answer more often than chance, so a verdict counts only when it survives the swap; a verdict that
flips with the order is a tie (and counted as a flip)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from gateway.capacity import Capacity
from gateway.evaluation.checks import Result, check, same_tools
from gateway.evaluation.judge import JUDGE_HEADER, Judge, JudgeFailed, compile_judge
from gateway.evaluation.prompts import Verdict, pairwise_prompt, rubric_prompt, swapped
from gateway.lane import Work
from gateway.policy import Evaluator
from gateway.route import Bulkhead, PerRoute, Route
from gateway.stats import Recorder
from gateway.tasks import Spawner
from gateway.telemetry import Metrics
from gateway.tracing import Tracing
from gateway.upstream import Upstream

if TYPE_CHECKING:
    from gateway.attempt import Attempt, Request
    from gateway.mirror import Observation

log = logging.getLogger("gateway.evaluation")

_SPAN = 2.0**64
ARMS = ("base", "candidate", "shadow")  # the statistics' arms whose answers single-answer evaluators read


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request is in an evaluator's sample: a hash of its id, so every evaluator (and both sides
    of a pair) takes the same requests, and a smaller rate takes a subset of a larger one's."""
    if rate >= 1:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SPAN < rate  # 2^64: the digest's range, so a point in [0, 1)


def evaluated(request: Request) -> bool:
    """Whether a single-answer evaluator will read this request's answer (a stream's then is rebuilt)."""
    return any(
        not e.on_pairs and sampled(request.request_id, e.sample)
        for e in request.route.policy.evaluation.evaluators
    )


@dataclass(frozen=True, slots=True)
class Subject:
    """What was evaluated, and where its results are counted."""

    request: Request
    stats_arm: str  # base, candidate, shadow or noise
    arm: str  # the metrics' arm label: base or candidate
    mode: str  # primary or mirror
    span: Any  # the judged span (an attempt's, or the request's for a pair)
    response_id: str | None


class Evaluations:
    def __init__(
        self,
        upstream: Upstream,
        spawner: Spawner,
        stats: Recorder,
        metrics: Metrics,
        tracing: Tracing,
        environ: Mapping[str, str],
        capacity: Capacity | None = None,
    ) -> None:
        self._stats = stats
        self._metrics = metrics
        self._tracing = tracing

        def build(route: Route) -> Judge:
            policy = route.policy.evaluation.judge
            assert policy is not None  # PerRoute builds only when the settings key exists
            arm, _ = compile_judge(route.name, policy, environ)
            return Judge(route.name, policy, arm, upstream, spawner, capacity)

        # A judge outlives reloads while its settings stay the same (its queue, breaker and budgets).
        self._judges = PerRoute(lambda route: route.policy.evaluation.judge, build, retire=Judge.stop)

    def judge(self, route: Route) -> Judge | None:
        return self._judges.get(route)

    def bulkheads(self, routes: list[Route]) -> list[Bulkhead]:
        """The connection pools the routes' judges use (kept when a reload retires the others)."""
        return [judge.arm.bulkhead for route in routes if (judge := self._judges.get(route)) is not None]

    def answer(self, request: Request, attempt: Attempt, stats_arm: str) -> None:
        """A booked attempt with an answer (a primary, or the candidate's shadow call): the single-answer
        evaluators that take its arm and mode, if the request is in their sample."""
        evaluators = request.route.policy.evaluation.evaluators
        if not evaluators or JUDGE_HEADER.lower() in request.headers:
            return
        observation = attempt.observation()
        answer = observation.answer
        if answer is None or str(answer.get("object")).endswith(".chunk") or stats_arm not in ARMS:
            return  # no answer, or only a stream's last chunk (the stream was not rebuilt)
        mode = "mirror" if stats_arm == "shadow" else "primary"
        arm = "base" if stats_arm == "base" else "candidate"
        subject = Subject(request, stats_arm, arm, mode, attempt.span, _response_id(answer))
        results = []
        for evaluator in evaluators:
            if evaluator.on_pairs or arm not in evaluator.arms or mode not in evaluator.modes:
                continue
            if not sampled(request.request_id, evaluator.sample):
                continue
            if evaluator.kind == "rubric":
                self._submit(subject, evaluator, 1, partial(self._rubric, subject, evaluator, answer))
            else:
                result = check(evaluator, answer, request.payload)
                if result is not None:
                    results.append(result)
        if results:
            self._scored(subject, results, judge_reason=False)

    def pair(
        self,
        request: Request,
        kind: str,
        primary: Observation,
        shadow: Observation,
        record: dict[str, Any] | None,
        keep: Callable[[], None],
    ) -> None:
        """A compared shadow pair (kind candidate, or noise: base against base): the pair evaluators. The
        pair's record gets each verdict, and is kept (keep) once every sampled verdict is in."""
        evaluators = [e for e in request.route.policy.evaluation.evaluators if e.on_pairs]
        base, other = primary.answer, shadow.answer
        if not evaluators or base is None or other is None or JUDGE_HEADER.lower() in request.headers:
            keep()
            return
        stats_arm = "shadow" if kind == "candidate" else "noise"
        subject = Subject(request, stats_arm, "candidate" if kind == "candidate" else "base", "mirror",
                          request.span, _response_id(other))  # fmt: skip
        judged: list[Evaluator] = []
        for evaluator in evaluators:
            if not sampled(request.request_id, evaluator.sample):
                continue
            if evaluator.kind == "tool_selection":
                result = same_tools(evaluator, request.payload, base, other)
                if result is not None:  # the base's side of this check: how often it agrees with itself
                    where = subject if kind == "candidate" else _as(subject, "base")
                    self._scored(where, [result], judge_reason=False)
                    _note(record, evaluator.name, result, None)
            else:
                judged.append(evaluator)
        if not judged:
            keep()
            return
        left = [len(judged)]

        def done() -> None:
            left[0] -= 1
            if left[0] == 0:
                keep()

        for evaluator in judged:
            work = partial(self._pairwise, subject, evaluator, kind, base, other, record, done)
            self._submit(subject, evaluator, 2, work, on_refused=done)

    def _submit(
        self,
        subject: Subject,
        evaluator: Evaluator,
        calls: int,
        work: Work,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        """Queue a judging of `calls` judge calls (work makes its coroutine when its turn comes)."""
        route = subject.request.route
        judge = self._judges.get(route)
        refusal = "no_judge" if judge is None else judge.submit(work, calls)
        if refusal is not None:
            self._metrics.skipped(route.name, evaluator.name, refusal)
            for _ in range(calls):
                self._metrics.judge_call(route.name, refusal, None)
            if on_refused is not None:
                on_refused()

    async def _ask(
        self, subject: Subject, evaluator: Evaluator, body: dict[str, Any], schema: str
    ) -> Verdict:
        route = subject.request.route
        judge = self._judges.get(route)
        assert judge is not None
        try:
            verdict, spent = await judge.ask(body, schema)
        except JudgeFailed as failed:
            self._metrics.judge_call(route.name, failed.outcome, failed.spent)
            raise
        finally:
            breaker = judge.breaker
            self._metrics.judge_state(
                route.name, breaker is not None and breaker.state != "closed", judge.lane.pending
            )
        self._metrics.judge_call(route.name, "ok", spent)
        return verdict

    async def _rubric(self, subject: Subject, evaluator: Evaluator, answer: dict[str, Any]) -> None:
        judge = self._judges.get(subject.request.route)
        assert judge is not None
        ask = partial(self._ask, subject, evaluator)
        try:
            result = await rubric(
                ask, evaluator, subject.request.payload, answer, judge.policy.max_answer_chars
            )
        except JudgeFailed as failed:
            self._metrics.skipped(subject.request.route.name, evaluator.name, failed.outcome)
            return
        self._scored(subject, [result], judge_reason=True)

    async def _pairwise(
        self,
        subject: Subject,
        evaluator: Evaluator,
        kind: str,
        base: dict[str, Any],
        other: dict[str, Any],
        record: dict[str, Any] | None,
        done: Callable[[], None],
    ) -> None:
        request = subject.request
        judge = self._judges.get(request.route)
        assert judge is not None
        ask = partial(self._ask, subject, evaluator)
        limit = judge.policy.max_answer_chars
        try:
            try:
                pairing = await pairwise(ask, evaluator, request.payload, base, other, limit)
            except JudgeFailed as failed:
                self._metrics.skipped(request.route.name, evaluator.name, failed.outcome)
                _note(record, evaluator.name, None, f"not judged: {failed.outcome}")
                return
            verdict, value, flip, result = pairing
            self._metrics.verdict(request.route.name, evaluator.name, verdict, kind)
            if flip:
                self._metrics.verdict(request.route.name, evaluator.name, "flip", kind)
            self._stats.evaluation(
                request.route,
                subject.stats_arm,
                request.cohort,
                request.unit.group,
                [(evaluator.name, value, flip)],
            )
            self._tracing.evaluation(
                subject.span, request.route.name, result, subject.response_id, judge_reason=True
            )
            _note(record, evaluator.name, result, None, flip=flip)
        finally:
            done()

    def _scored(self, subject: Subject, results: list[Result], *, judge_reason: bool) -> None:
        request = subject.request
        route = request.route
        for result in results:
            self._metrics.evaluated(
                route.name, subject.arm, subject.mode, request.cohort, result.evaluator, result.score
            )
            self._tracing.evaluation(
                subject.span, route.name, result, subject.response_id, judge_reason=judge_reason
            )
        scores = [(result.evaluator, result.score, False) for result in results]
        self._stats.evaluation(route, subject.stats_arm, request.cohort, request.unit.group, scores)
        if request.trace is not None and subject.mode == "primary":
            # A score under 0.5 fails its step, and so its trace (trace_failure_rate).
            request.trace.count("eval_failures", sum(1 for result in results if result.score < 0.5))


Ask = Callable[[dict[str, Any], str], Awaitable[Verdict]]


async def rubric(
    ask: Ask, evaluator: Evaluator, payload: dict[str, Any], answer: dict[str, Any], limit: int
) -> Result:
    """A rubric evaluator's judging of one answer (live traffic and pre-flight): its score in [0, 1]."""
    assert evaluator.rubric is not None
    verdict = await ask(rubric_prompt(evaluator.rubric, payload, answer, limit), "canarygate_rubric")
    assert verdict.score is not None
    return Result(evaluator.name, verdict.score, "pass" if verdict.score >= 0.5 else "fail", verdict.reason)


async def pairwise(
    ask: Ask,
    evaluator: Evaluator,
    payload: dict[str, Any],
    base: dict[str, Any],
    other: dict[str, Any],
    limit: int,
) -> tuple[str, float, bool, Result]:
    """A pairwise evaluator's judging of the base's answer against another (live and pre-flight), shown
    both ways round: the base's answer first, then the other's. The other wins only when both say so,
    and loses only when both say so. (verdict, value for the statistics, whether the order decided, and
    the result: score 1 for a win, 0.5 a tie, 0 a loss)."""
    base_first = await ask(
        pairwise_prompt(evaluator.rubric, payload, base, other, limit), "canarygate_pairwise"
    )
    other_first = await ask(
        pairwise_prompt(evaluator.rubric, payload, other, base, limit), "canarygate_pairwise"
    )
    verdict, value, flip = swapped(base_first.winner, other_first.winner)
    reason = other_first.reason if verdict == "win" else base_first.reason
    explained = f"{verdict}{' (the order decided: a flip)' if flip else ''}: {reason}"
    return verdict, value, flip, Result(evaluator.name, (1 - value) / 2, verdict, explained)


def _as(subject: Subject, stats_arm: str) -> Subject:
    return Subject(subject.request, stats_arm, subject.arm, subject.mode, subject.span, subject.response_id)


def _note(
    record: dict[str, Any] | None,
    evaluator: str,
    result: Result | None,
    failure: str | None,
    *,
    flip: bool = False,
) -> None:
    """A verdict on the pair's record; the judge's reason only when the route captures content."""
    if record is None:
        return
    verdicts = record.setdefault("verdicts", {})
    if result is None:
        verdicts[evaluator] = {"verdict": "not_judged", "reason": failure}
        return
    entry: dict[str, Any] = {"verdict": result.label, "score": result.score}
    if flip:
        entry["flip"] = True
    if "prompt" in record:  # captured content: the reason may quote it
        entry["reason"] = result.explanation
    verdicts[evaluator] = entry


def _response_id(answer: dict[str, Any] | None) -> str | None:
    value = answer.get("id") if isinstance(answer, dict) else None
    return value if isinstance(value, str) else None
