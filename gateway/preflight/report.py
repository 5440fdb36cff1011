"""A pre-flight's report: figures per arm, per category and per cohort, the judged pairs, and the verdict
of the rollout's own gates (analysis.judge, with every item a stratum and its own unit) as
non-inferiority at the set's size, with the size that would have decided when it could not."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, replace
from typing import Any

from gateway.analysis import (
    UNIT_GROUPS,
    ArmWindow,
    Groups,
    Paired,
    Verdict,
    bucket_of,
    decide,
    judge,
    non_inferior,
)
from gateway.policy import Gates
from gateway.preflight.run import Answer, Outcome

Z95 = 1.959963984540054  # the descriptive tables' intervals: 95%
WORST = 10  # items shown side by side
VERDICTS = {"advance": "pass", "rollback": "fail", "hold": "undecided"}
EXIT_CODES = {"pass": 0, "fail": 1, "undecided": 3}
# Validity per kind of check, over the answers whose request asked for it: (what was asked, the kinds
# of failure that make it invalid).
VALIDITY = {
    "json_valid": ("json", frozenset({"malformed", "json_parse"})),
    "schema_valid": ("schema", frozenset({"malformed", "json_parse", "json_schema"})),
    "tool_calls_valid": (
        "tools",
        frozenset({"malformed", "tool_unknown", "tool_args_parse", "tool_args_schema", "tool_choice"}),
    ),
}


def build(
    outcomes: list[Outcome],
    *,
    route: str,
    models: tuple[str, str],
    gates: Gates,
    evaluators: dict[str, str],  # name -> kind (the route's, then the expectations used)
    confidence: float,
    min_samples: int,
    dataset: str,
    items: int,
    samples: int,
    interrupted: str | None = None,
    capture: bool = False,
    duration_s: float = 0.0,
) -> dict[str, Any]:
    """The report as a JSON-able dict; its "verdict" is pass, fail or undecided (interrupted: undecided)."""
    pair_names = {name for name, kind in evaluators.items() if kind == "pairwise"}
    categories = sorted({o.item.category for o in outcomes})
    cohorts = sorted({o.item.cohort for o in outcomes})
    # Every category and the whole set share the error budget, as a rollout's cohorts do.
    shared = 1 - (1 - confidence) / (1 + len(categories))
    verdicts = _gates(outcomes, gates, pair_names, shared, min_samples)
    failed_in: list[Verdict] = []
    for category in categories:
        among = [o for o in outcomes if o.item.category == category]
        judged = _gates(among, gates, pair_names, shared, min_samples)
        failed_in.extend(replace(v, cohort=f"category:{category}") for v in judged if v.result == "fail")
    # A category clearly worse fails the run; one too small to tell does not hold it (the whole set does).
    decision = decide([*verdicts, *failed_in], "rollback", "hold", final=True)
    verdict = "undecided" if interrupted else VERDICTS[decision]
    return {
        "route": route,
        "dataset": dataset,
        "models": {"base": models[0], "candidate": models[1]},
        "items": items,
        "samples": samples,
        "planned": items * samples,
        "answered": len(outcomes),
        "interrupted": interrupted,
        "duration_s": round(duration_s, 3),
        "confidence": confidence,
        "verdict": verdict,
        "exit_code": EXIT_CODES[verdict],
        "gates": [_gate(v) for v in [*verdicts, *failed_in]],
        "arms": _arms(outcomes, evaluators),
        "pairs": _pairs(outcomes, pair_names),
        "categories": {
            c: _group([o for o in outcomes if o.item.category == c], evaluators) for c in categories
        },
        "cohorts": {c: _group([o for o in outcomes if o.item.cohort == c], evaluators) for c in cohorts},
        "not_judged": _not_judged(outcomes),
        "worst": _worst(outcomes, capture),
        "captured": capture,
    }


def summary(report: dict[str, Any]) -> str:
    """One line for a rollout's history."""
    failed = [
        f"{g['gate']}{'' if g['cohort'] == 'all' else ' [' + g['cohort'] + ']'} {g['reason']}"
        for g in report["gates"]
        if g["result"] == "fail"
    ]
    waiting = [
        f"{g['gate']} ({g['needed']})" for g in report["gates"] if g["needed"] and g["result"] != "fail"
    ]
    head = f"pre-flight {report['verdict']} on {report['answered']} answers of {report['dataset']}"
    if report["interrupted"]:
        head += f" (stopped early: {report['interrupted']})"
    if failed:
        return f"{head}: " + "; ".join(failed)
    if waiting and report["verdict"] == "undecided":
        return f"{head}: undecided: " + "; ".join(waiting)
    return head


def _strata(outcomes: list[Outcome]) -> tuple[list[tuple[ArmWindow, ArmWindow]], Paired, Groups]:
    """Per item: (base, candidate) windows, the pairs' (empty, verdicts) windows; and the same per unit
    group (an item is its unit: repeated samples of one item are alike, which the design effects read)."""
    by_item: dict[str, tuple[ArmWindow, ArmWindow, ArmWindow]] = {}
    groups = [[ArmWindow() for _ in range(UNIT_GROUPS)] for _ in range(3)]
    for outcome in outcomes:
        windows = by_item.setdefault(outcome.item.id, (ArmWindow(), ArmWindow(), ArmWindow()))
        group = _group_of(outcome.item.id)
        for side, answer in ((0, outcome.base), (1, outcome.candidate)):
            for window in (windows[side], groups[side][group]):
                _count(window, answer)
        for name, (_, value, flip, _) in outcome.pairs.items():
            for window in (windows[2], groups[2][group]):
                window.score(name, value, flip)
    strata = [(b, c) for b, c, _ in by_item.values()]
    pairs = [(ArmWindow(), p) for _, _, p in by_item.values()]
    names = frozenset(n for o in outcomes for n in o.pairs)
    return strata, Paired(pairs, (groups[0], groups[2]), names), (groups[0], groups[1])


def _count(window: ArmWindow, answer: Answer) -> None:
    latency = answer.latency_s if answer.latency_s is not None else 0.0
    if answer.latency_s is not None:
        bucket = bucket_of(latency)
        window.latency[bucket] = window.latency.get(bucket, 0) + 1
    window.attempt(
        answer.error is not None,
        answer.failure is not None,
        answer.output_tokens,
        answer.cost,
        math.log(max(latency, 1e-6)),
    )
    for name, value in answer.scores.items():
        window.score(name, value)


def _group_of(item_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=4).digest(), "big") % UNIT_GROUPS


def _gates(
    outcomes: list[Outcome], gates: Gates, pair_names: set[str], confidence: float, min_samples: int
) -> list[Verdict]:
    if not outcomes:
        return [
            Verdict(name, "wait", None, None, None, 0.0, 0, 0, False, "no answers yet")
            for name, _ in gates.configured()
        ]
    strata, paired, groups = _strata(outcomes)
    paired = replace(paired, evaluators=frozenset(pair_names))
    return judge(gates, strata, confidence=confidence, min_samples=min_samples, groups=groups, paired=paired)


def _gate(verdict: Verdict) -> dict[str, Any]:
    """A verdict, with whether it is non-inferior and, when it could not decide, the size that might."""
    out = asdict(verdict)
    out["reason"] = verdict.reason.replace("over the same intervals", "on the same items")
    out["non_inferior"] = non_inferior(verdict)
    out["needed"] = _needed(verdict) if not out["non_inferior"] and verdict.result != "fail" else None
    return out


def _needed(verdict: Verdict) -> str:
    """What would decide a verdict that did not: the interval narrows as 1/sqrt(n), so n grows by the
    square of how much narrower it must be to end below the threshold."""
    n = min(verdict.n_base, verdict.n_candidate)
    if verdict.needs and (verdict.value is None or n == 0 or verdict.needs.startswith("min_samples")):
        return verdict.needs
    if verdict.value is None or verdict.high is None:
        return verdict.needs or "needs more answers"
    room = verdict.threshold - verdict.value
    if room <= 0:
        return "no larger set would pass it: the estimate is past the threshold"
    width = verdict.high - verdict.value
    size = max(math.ceil(n * (width / room) ** 2), n + 1)
    return f"about {size} answers per arm would decide it (this run: {n})"


def _rate(events: int, n: int) -> dict[str, Any]:
    """A rate with its 95% Wilson interval (sound at 0 and 1, unlike value +- z*se)."""
    if n == 0:
        return {"n": 0, "rate": None, "low": None, "high": None}
    p = events / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low = 0.0 if events == 0 else max(centre - half, 0.0)  # exactly: the bounds at 0 and n are 0 and 1
    high = 1.0 if events == n else min(centre + half, 1.0)
    return {"n": n, "events": events, "rate": p, "low": low, "high": high}


def _mean(values: list[float]) -> dict[str, Any]:
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None}
    if all(v in (0.0, 1.0) for v in values):
        rate = _rate(int(sum(values)), n)
        return {"n": n, "mean": rate["rate"], "low": rate["low"], "high": rate["high"]}
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.25
    half = Z95 * math.sqrt(variance / n)
    return {"n": n, "mean": mean, "low": max(mean - half, 0.0), "high": min(mean + half, 1.0)}


def _arm(answers: list[Answer], evaluators: Iterable[str]) -> dict[str, Any]:
    n = len(answers)
    latencies = sorted(a.latency_s for a in answers if a.latency_s is not None)
    kinds = Counter(a.failure for a in answers if a.failure is not None)
    tokens = [a.output_tokens for a in answers if a.output_tokens is not None]
    costs = [a.cost for a in answers if a.cost is not None]
    answered = [a for a in answers if a.error is None]
    return {
        "answers": n,
        "errors": _rate(sum(a.error is not None for a in answers), n),
        "validation_failures": _rate(sum(a.failure is not None for a in answers), n),
        "failures_by_kind": dict(sorted(kinds.items())),
        **{
            name: _valid([a for a in answered if a.asked[asked]], wrong)
            for name, (asked, wrong) in VALIDITY.items()
        },
        "latency_ms": {
            "p50": _quantile(latencies, 0.5),
            "p99": _quantile(latencies, 0.99),
        },
        "output_tokens_mean": sum(tokens) / len(tokens) if tokens else None,
        "input_tokens_total": sum(a.input_tokens or 0 for a in answers),
        "output_tokens_total": sum(tokens),
        "cost_total": sum(costs) if costs else None,
        "cost_mean": sum(costs) / len(costs) if costs else None,
        "scores": {
            name: _mean([a.scores[name] for a in answers if name in a.scores])
            for name in evaluators
            if any(name in a.scores for a in answers)
        },
    }


def _valid(answers: list[Answer], wrong: frozenset[str]) -> dict[str, Any] | None:
    """The share of the answers asked for it that passed a kind of check (None: nothing asked for it)."""
    if not answers:
        return None
    return _rate(sum(a.failure not in wrong for a in answers), len(answers))


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000, 1)


def _arms(outcomes: list[Outcome], evaluators: dict[str, str]) -> dict[str, Any]:
    names = [n for n, kind in evaluators.items() if kind != "pairwise"]
    return {
        "base": _arm([o.base for o in outcomes], names),
        "candidate": _arm([o.candidate for o in outcomes], names),
    }


def _pairs(outcomes: list[Outcome], names: Iterable[str]) -> dict[str, Any]:
    out = {}
    for name in sorted(names):
        judged = [o.pairs[name] for o in outcomes if name in o.pairs]
        n = len(judged)
        wins = sum(v == "win" for v, *_ in judged)
        losses = sum(v == "loss" for v, *_ in judged)
        out[name] = {
            "pairs": n,
            "wins": wins,
            "ties": n - wins - losses,
            "losses": losses,
            "flips": sum(flip for _, _, flip, _ in judged),
            "win_rate": _rate(wins, n),
            "loss_rate": _rate(losses, n),
        }
    return out


def _group(outcomes: list[Outcome], evaluators: dict[str, str]) -> dict[str, Any]:
    pair_names = [n for n, kind in evaluators.items() if kind == "pairwise"]
    return {
        "items": len({o.item.id for o in outcomes}),
        **_arms(outcomes, evaluators),
        "pairs": _pairs(outcomes, pair_names),
    }


def _not_judged(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = {}
    for outcome in outcomes:
        for name, why in outcome.not_judged.items():
            out.setdefault(name, Counter())[why] += 1
    return {name: dict(counts) for name, counts in sorted(out.items())}


def _deficit(outcome: Outcome) -> float:
    """How much worse the candidate did on an item: its lost scores, lost pairs and failures."""
    base, candidate = outcome.base, outcome.candidate
    lost = sum(max(base.scores.get(n, 0.0) - s, 0.0) for n, s in candidate.scores.items())
    lost += sum(1.0 for verdict, *_ in outcome.pairs.values() if verdict == "loss")
    failed = [bool(answer.error or answer.failure) for answer in (base, candidate)]
    return lost + failed[1] - failed[0]  # an item both arms failed is not where the candidate did worse


def _worst(outcomes: list[Outcome], capture: bool) -> list[dict[str, Any]]:
    ranked = sorted((o for o in outcomes if _deficit(o) > 0), key=_deficit, reverse=True)[:WORST]
    out = []
    for outcome in ranked:
        row: dict[str, Any] = {
            "id": outcome.item.id,
            "line": outcome.item.line,
            "category": outcome.item.category,
            "sample": outcome.sample,
            "deficit": round(_deficit(outcome), 3),
            "pairs": {n: {"verdict": v, "flip": f} for n, (v, _, f, _) in outcome.pairs.items()},
        }
        for side, answer in (("base", outcome.base), ("candidate", outcome.candidate)):
            entry: dict[str, Any] = {
                "scores": answer.scores,
                "error": answer.error,
                "failure": answer.failure_message,
            }
            if capture:
                entry["answer"] = answer.text[:2000]
                entry["reasons"] = answer.reasons
            row[side] = entry
        if capture:
            row["prompt"] = _prompt(outcome)[:2000]
            row["pairs"] = {
                n: {"verdict": v, "flip": f, "reason": r} for n, (v, _, f, r) in outcome.pairs.items()
            }
        out.append(row)
    return out


def _prompt(outcome: Outcome) -> str:
    messages = outcome.item.request.get("messages", [])
    last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
    content = last.get("content")
    return content if isinstance(content, str) else str(content)


def recorded(report: dict[str, Any]) -> dict[str, Any]:
    """What a rollout keeps of a report: its verdict, the models it compared, the set, and each gate."""
    keep = (
        "gate", "cohort", "result", "value", "low", "high", "threshold", "n_base", "n_candidate", "critical",
        "reason",
    )  # fmt: skip
    return {
        "verdict": report["verdict"],
        "summary": summary(report),
        "models": report["models"],
        "dataset": report["dataset"],
        "answered": report["answered"],
        # needs: as a rollout's verdicts say what they wait for (canarygate compare shows it)
        "gates": [{k: g[k] for k in keep} | {"needs": g["needed"]} for g in report["gates"]],
    }
