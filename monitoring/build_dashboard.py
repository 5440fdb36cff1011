"""Builds monitoring/grafana-dashboard.json: candidate vs base, side by side, per route.

Run after changing a panel: python monitoring/build_dashboard.py (a test checks the JSON is current).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("grafana-dashboard.json")
SEL = 'route=~"$route"'
WINDOW = "$__rate_interval"
ERRORS = 'outcome=~"upstream_error|timeout|refused|invalid_output"'


def rate(metric: str, labels: str = "") -> str:
    selector = f"{SEL}, {labels}" if labels else SEL
    if metric.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") in COHORTED:
        selector += f", {COHORT}"
    return f"rate({metric}{{{selector}}}[{WINDOW}])"


def quantile(q: float, metric: str, by: str = "arm", labels: str = 'mode="primary"') -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) ({rate(metric + '_bucket', labels)}))"


PRIMARY = 'mode="primary"'
SERVED = 'mode="primary", arm!="none"'
CANDIDATE = 'arm="candidate", mode="primary"'
BASE = 'arm="base", mode="primary"'
CIRCUIT_OPEN = 'reason="circuit_open"'
REQUESTS = "canarygate_requests_total"
FALLBACKS = "canarygate_fallbacks_total"
VALIDATION = "canarygate_validation_failures_total"
DURATION = "canarygate_request_duration_seconds"
TTFT = "canarygate_time_to_first_token_seconds"
FEEDBACK = "canarygate_feedback_total"
COST = "canarygate_cost_total"
COHORT = 'cohort=~"$cohort"'
EVAL = "canarygate_eval_score"
VERDICTS = "canarygate_eval_verdicts_total"
JUDGE = "canarygate_judge_calls_total"
NOT_FLIP = 'verdict!="flip"'  # a flip is also counted as a tie: the verdicts without it sum to the pairs
TRACES = "canarygate_traces_total"
STEPS = "canarygate_trace_steps"
TRACE_TOKENS = "canarygate_trace_tokens"
TRACE_COST = "canarygate_trace_cost"
# The metrics with a cohort label.
COHORTED = {
    REQUESTS,
    FALLBACKS,
    VALIDATION,
    DURATION,
    FEEDBACK,
    EVAL,
    TRACES,
    STEPS,
    TRACE_TOKENS,
    TRACE_COST,
}


def ratio(numerator: str, denominator: str) -> str:
    return f"{numerator} / {denominator}"


def by(labels: str, expr: str) -> str:
    return f"sum by ({labels}) ({expr})"


# (title, unit, [(expression, legend)]); two panels per row.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Requests by arm, mode and API", "reqps", [
        (by("arm, mode, api", rate(REQUESTS, 'arm!="none"')), "{{arm}} {{mode}} {{api}}")]),
    ("Error rate by arm (upstream errors, timeouts, invalid output)", "percentunit", [
        (ratio(by("arm", rate(REQUESTS, f"{PRIMARY}, {ERRORS}")), by("arm", rate(REQUESTS, SERVED))),
         "{{arm}}")]),
    ("Validation failures by arm and kind", "reqps", [
        (by("arm, kind", rate(VALIDATION, PRIMARY)), "{{arm}} {{kind}}")]),
    ("Validation failure rate by arm", "percentunit", [
        (ratio(by("arm", rate(VALIDATION, PRIMARY)), by("arm", rate(REQUESTS, SERVED))), "{{arm}}")]),
    ("Fallback rate (of requests assigned to the candidate)", "percentunit", [
        (ratio(f"sum({rate(FALLBACKS)})",
               f"(sum({rate(REQUESTS, CANDIDATE)}) + sum({rate(FALLBACKS, CIRCUIT_OPEN)}))"),
         "fallback rate")]),
    ("Fallbacks by reason", "reqps", [(by("reason", rate(FALLBACKS)), "{{reason}}")]),
    ("Latency p50 / p99 by arm", "s", [
        (quantile(0.5, DURATION), "p50 {{arm}}"), (quantile(0.99, DURATION), "p99 {{arm}}")]),
    ("Time to first token p50 / p99 by arm", "s", [
        (quantile(0.5, TTFT), "p50 {{arm}}"), (quantile(0.99, TTFT), "p99 {{arm}}")]),
    ("Candidate / base ratios: p99 latency and p50 TTFT", "none", [
        (ratio(quantile(0.99, DURATION, "route", CANDIDATE), quantile(0.99, DURATION, "route", BASE)),
         "p99 latency {{route}}"),
        (ratio(quantile(0.5, TTFT, "route", CANDIDATE), quantile(0.5, TTFT, "route", BASE)),
         "p50 TTFT {{route}}")]),
    ("Output tokens per answer by arm", "none", [
        (ratio(by("arm", rate("canarygate_tokens_total", f'{PRIMARY}, type="output"')),
               by("arm", rate(REQUESTS, f'{PRIMARY}, outcome=~"ok|invalid_output"'))), "{{arm}}")]),
    ("Rollout weight (% of units on the candidate)", "percent", [
        (f"max by (route) (canarygate_rollout_weight{{{SEL}}})", "{{route}}")]),
    ("Rollout phase (1: current) and the pre-flight on the held-out set", "none", [
        (f"max by (route, phase) (canarygate_rollout_phase{{{SEL}}}) == 1", "{{route}} {{phase}}"),
        (f"max by (route, verdict) (canarygate_preflight_verdict{{{SEL}}}) == 1",
         "{{route}} pre-flight {{verdict}}")]),
    ("Rollout gates: measured value and threshold (controller's latest judgement)", "none", [
        (f"max by (route, gate) (canarygate_gate_value{{{SEL}}})", "{{route}} {{gate}}"),
        (f"max by (route, gate) (canarygate_gate_threshold{{{SEL}}})", "{{route}} {{gate}} threshold")]),
    ("Candidate's share of the step's requests: observed, expected (sample ratio)", "percentunit", [
        (f'max by (route, cohort) (canarygate_candidate_share{{{SEL}, kind="observed"}})',
         "{{route}} {{cohort}} observed"),
        (f'max by (route, cohort) (canarygate_candidate_share{{{SEL}, kind="expected"}})',
         "{{route}} {{cohort}} expected"),
        (f"max by (route, cohort) (canarygate_sample_ratio_mismatch{{{SEL}}})",
         "{{route}} {{cohort}} mismatch")]),
    ("Negative feedback share by arm (thumbs down, of the feedback received)", "percentunit", [
        (ratio(by("arm", rate(FEEDBACK, 'value="negative"')),
               by("arm", rate(FEEDBACK, 'value!="escalated"'))), "{{arm}}")]),
    ("Cost per answer by arm, and shadow cost", "none", [
        (ratio(by("arm", rate(COST, PRIMARY)),
               by("arm", rate(REQUESTS, f'{PRIMARY}, outcome=~"ok|invalid_output"'))), "{{arm}} per answer"),
        (by("arm", rate(COST, 'mode="mirror"')), "{{arm}} shadow cost / s")]),
    ("Circuit open (1) by route and arm", "none", [
        (f"max by (route, arm) (canarygate_circuit_open{{{SEL}}})", "{{route}} {{arm}}")]),
    ("Shadow agreement by check: candidate vs base, and the noise floor (base vs base)", "percentunit", [
        (ratio(by("check", rate("canarygate_mirror_agreement_total", 'result="agree"')),
               by("check", rate("canarygate_mirror_agreement_total"))), "candidate {{check}}"),
        (ratio(by("check", rate("canarygate_noise_agreement_total", 'result="agree"')),
               by("check", rate("canarygate_noise_agreement_total"))), "noise floor {{check}}")]),
    ("Mirror calls by outcome", "reqps", [(by("outcome", rate("canarygate_mirror_total")), "{{outcome}}")]),
    ("Gateway overhead p50 / p99", "s", [
        (quantile(0.5, "canarygate_overhead_seconds", "route", ""), "p50 {{route}}"),
        (quantile(0.99, "canarygate_overhead_seconds", "route", ""), "p99 {{route}}")]),
    ("Upstream attempts in flight by arm", "none", [
        (f"sum by (arm) (canarygate_inflight_requests{{{SEL}}})", "{{arm}}")]),
    # Traces (agent runs, conversations): each counted once it ends, by the arm that served it.
    ("Traces: model calls per finished trace by arm (mean, p90)", "none", [
        (ratio(by("arm", rate(STEPS + "_sum")), by("arm", rate(STEPS + "_count"))), "mean {{arm}}"),
        (quantile(0.9, STEPS, "arm", ""), "p90 {{arm}}")]),
    ("Traces: cost and output tokens per finished trace by arm", "none", [
        (ratio(by("arm", rate(TRACE_COST + "_sum")), by("arm", rate(STEPS + "_count"))), "cost {{arm}}"),
        (ratio(by("arm", rate(TRACE_TOKENS + "_sum", 'type="output"')), by("arm", rate(STEPS + "_count"))),
         "output tokens {{arm}}")]),
    ("Traces: failure rate by arm (any step fell back, failed validation, failed, or failed an evaluator)",
     "percentunit", [
        (ratio(by("arm", rate(TRACES, 'result="failed"')), by("arm", rate(TRACES))), "{{arm}}")]),
    ("Traces: failed steps by their index in the trace", "reqps", [
        (by("arm, step", rate("canarygate_trace_step_failures_total")), "{{arm}} step {{step}}")]),
    # Evaluation: what the evaluators and the judge say, by arm and cohort, and how the judge is doing.
    ("Evaluation: mean score by evaluator and arm (mirror: the candidate's shadow answers)", "percentunit", [
        (ratio(by("evaluator, arm, mode", rate(EVAL + "_sum")),
               by("evaluator, arm, mode", rate(EVAL + "_count"))), "{{evaluator}} {{arm}} {{mode}}")]),
    ("Evaluation fail rate by cohort and arm (scores under 0.5)", "percentunit", [
        (ratio(by("evaluator, cohort, arm", rate(EVAL + "_bucket", 'le="0.25"')),
               by("evaluator, cohort, arm", rate(EVAL + "_count"))), "{{evaluator}} {{cohort}} {{arm}}")]),
    ("Pairwise judge: the candidate's wins, ties, losses; the noise floor's (base vs base)", "percentunit", [
        (ratio(by("evaluator, kind, verdict", rate(VERDICTS, NOT_FLIP)),
               "ignoring (verdict) group_left " + by("evaluator, kind", rate(VERDICTS, NOT_FLIP))),
         "{{evaluator}} {{kind}} {{verdict}}"),
        (ratio(by("evaluator, kind", rate(VERDICTS, 'verdict="flip"')),
               by("evaluator, kind", rate(VERDICTS, NOT_FLIP))), "{{evaluator}} {{kind}} order flips")]),
    ("Judge health: calls by outcome, p99 latency, circuit open", "none", [
        (by("outcome", rate(JUDGE)), "{{outcome}} calls / s"),
        (quantile(0.99, "canarygate_judge_duration_seconds", "route", ""), "p99 latency (s) {{route}}"),
        (f"max by (route) (canarygate_judge_circuit_open{{{SEL}}})", "circuit open {{route}}")]),
    ("Judge tokens and cost per second", "none", [
        (by("type", rate("canarygate_judge_tokens_total")), "{{type}} tokens / s"),
        (f"sum({rate('canarygate_judge_cost_total')})", "cost / s")]),
]  # fmt: skip

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def panel(index: int, title: str, unit: str, queries: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(queries)
        ],
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": "canarygate",
        "title": "canarygate: candidate vs base",
        "description": "Per-route comparison of the tuned candidate against the base model during a canary.",
        "tags": ["canarygate", "llm", "canary"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                query_variable("route", "Route", "label_values(canarygate_requests_total, route)"),
                query_variable(
                    "cohort", "Cohort", 'label_values(canarygate_requests_total{route=~"$route"}, cohort)'
                ),
            ]
        },
        "panels": [panel(i, *spec) for i, spec in enumerate(PANELS)],
    }


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-select variable filled from the metrics, with "All" matching everything."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}s"},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {},
        "sort": 1,
        "hide": 0,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
