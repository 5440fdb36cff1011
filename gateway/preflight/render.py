"""A pre-flight report as Markdown (for a pull request or a terminal) and as one self-contained HTML page
(inline CSS and SVG charts: no script, nothing fetched), from the report's dict."""

from __future__ import annotations

from html import escape
from typing import Any

ARMS = ("base", "candidate")
DASH = "-"  # a figure with nothing to show
COLOURS = {"base": "#6b7a90", "candidate": "#2f7ed8", "win": "#2e9e5b", "tie": "#b8bec8", "loss": "#d64545"}


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{value * 100:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _interval(figure: dict[str, Any] | None, key: str = "rate") -> str:
    if not figure or figure.get(key) is None:
        return DASH
    return f"{_pct(figure[key])} [{_pct(figure['low'])}, {_pct(figure['high'])}]"


def _score(figure: dict[str, Any] | None) -> str:
    if not figure or figure.get("mean") is None:
        return DASH
    return f"{figure['mean']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}] (n={figure['n']})"


def _arm_rows(group: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, base, candidate) rows of one group (the whole set, a category or a cohort)."""
    base, cand = group["base"], group["candidate"]
    rows = [
        ("answers", str(base["answers"]), str(cand["answers"])),
        ("error rate", _interval(base["errors"]), _interval(cand["errors"])),
        (
            "validation failures",
            _interval(base["validation_failures"]),
            _interval(cand["validation_failures"]),
        ),
        ("JSON valid", _interval(base["json_valid"]), _interval(cand["json_valid"])),
        ("schema valid", _interval(base["schema_valid"]), _interval(cand["schema_valid"])),
        ("tool calls valid", _interval(base["tool_calls_valid"]), _interval(cand["tool_calls_valid"])),
        ("latency p50 / p99 ms", _latency(base), _latency(cand)),
        ("output tokens (mean)", _num(base["output_tokens_mean"], 1), _num(cand["output_tokens_mean"], 1)),
        ("cost (total)", _num(base["cost_total"], 6), _num(cand["cost_total"], 6)),
    ]
    for name in sorted(set(base["scores"]) | set(cand["scores"])):
        rows.append((f"score: {name}", _score(base["scores"].get(name)), _score(cand["scores"].get(name))))
    return rows


def _latency(arm: dict[str, Any]) -> str:
    latency = arm["latency_ms"]
    return f"{_num(latency['p50'], 0)} / {_num(latency['p99'], 0)}"


def _pair_row(name: str, pair: dict[str, Any]) -> tuple[str, ...]:
    return (
        name,
        str(pair["pairs"]),
        f"{pair['wins']} ({_interval(pair['win_rate'])})",
        str(pair["ties"]),
        f"{pair['losses']} ({_interval(pair['loss_rate'])})",
        str(pair["flips"]),
    )


def _gate_row(gate: dict[str, Any]) -> tuple[str, ...]:
    value = gate["value"]
    shown = DASH if value is None else f"{value:+.4f} [{_num(gate['low'], 4)}, {_num(gate['high'], 4)}]"
    return (
        gate["gate"] + ("" if gate["cohort"] == "all" else f" [{gate['cohort']}]"),
        gate["result"] + (" (non-inferior)" if gate["non_inferior"] else ""),
        shown,
        f"{gate['threshold']:g}",
        gate["reason"] + (f"; {gate['needed']}" if gate["needed"] else ""),
    )


HEADLINE = {
    "pass": "PASS: the candidate is not worse than the base on this set",
    "fail": "FAIL: the candidate is worse than the base",
    "undecided": "UNDECIDED: the set cannot tell (see what each gate needs)",
}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Pre-flight: route `{report['route']}`",
        "",
        f"**{HEADLINE[report['verdict']]}** (exit code {report['exit_code']})",
        "",
        f"- held-out set: `{report['dataset']}`, {report['items']} items x {report['samples']} samples; "
        f"{report['answered']} of {report['planned']} answered in {report['duration_s']:.1f} s",
        f"- base `{report['models']['base']}`, candidate `{report['models']['candidate']}`; "
        f"gates at confidence {report['confidence']:g}",
    ]
    if report["interrupted"]:
        lines.append(f"- **partial report: the run stopped early ({report['interrupted']})**")
    lines += ["", "## Gates", ""]
    lines += _md_table(
        ("gate", "result", "estimate [interval]", "threshold", "why"), map(_gate_row, report["gates"])
    )
    lines += ["", "## Whole set", ""]
    lines += _md_table(("figure", "base", "candidate"), _arm_rows(report["arms"]))
    if report["pairs"]:
        lines += ["", "## Judged pairs (candidate vs base)", ""]
        header = ("evaluator", "pairs", "wins", "ties", "losses", "flips")
        lines += _md_table(header, (_pair_row(n, p) for n, p in report["pairs"].items()))
    for title, key in (("category", "categories"), ("cohort", "cohorts")):
        for name, group in report[key].items():
            lines += ["", f"## {title.capitalize()} `{name}` ({group['items']} items)", ""]
            lines += _md_table(("figure", "base", "candidate"), _arm_rows(group))
            if group["pairs"]:
                lines.append("")
                header = ("evaluator", "pairs", "wins", "ties", "losses", "flips")
                lines += _md_table(header, (_pair_row(n, p) for n, p in group["pairs"].items()))
    if report["not_judged"]:
        lines += ["", "## Not judged", ""]
        for name, counts in report["not_judged"].items():
            lines.append(f"- {name}: " + ", ".join(f"{why} x{n}" for why, n in counts.items()))
    if report["worst"]:
        lines += ["", "## Where the candidate did worst", ""]
        for row in report["worst"]:
            lines.append(f"### `{row['id']}` (line {row['line']}, {row['category']})")
            if "prompt" in row:
                lines.append(f"> {_one_line(row['prompt'])}")
            for arm in ARMS:
                side = row[arm]
                said = f": {_one_line(side['answer'])}" if "answer" in side else ""
                problem = side["error"] or side["failure"]
                lines.append(f"- {arm}: scores {side['scores']}{f' ({problem})' if problem else ''}{said}")
            for name, pair in row["pairs"].items():
                lines.append(f"- {name}: {pair['verdict']}{' (flip)' if pair['flip'] else ''}")
            lines.append("")
        if not report["captured"]:
            lines.append("(answers are shown with --capture)")
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: tuple[str, ...], rows: Any) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return out


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:72rem;color:#1c2430;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde2e8}
table{border-collapse:collapse;margin:.5rem 0;width:100%}th,td{border:1px solid #dde2e8;padding:.3rem .5rem;
text-align:left;vertical-align:top}th{background:#f3f5f8}.verdict{font-size:1.2rem;padding:.6rem 1rem;
border-radius:.4rem;display:inline-block}.pass{background:#dff3e6}.fail{background:#fbe0e0}
.undecided{background:#fff4d6}.partial{color:#a33;font-weight:600}svg{display:block;margin:.5rem 0}
.legend span{display:inline-block;margin-right:1rem}.legend i{display:inline-block;width:.8rem;height:.8rem;
margin-right:.3rem;vertical-align:middle}pre{white-space:pre-wrap;background:#f6f8fa;padding:.5rem;margin:0}
"""


def html(report: dict[str, Any]) -> str:
    verdict = report["verdict"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>Pre-flight {escape(report['route'])}: {verdict}</title><style>{CSS}</style></head><body>",
        f"<h1>Pre-flight: route <code>{escape(report['route'])}</code></h1>",
        f"<p class='verdict {verdict}' id=verdict>{escape(HEADLINE[verdict])} "
        f"(exit code {report['exit_code']})</p>",
        f"<p>Held-out set <code>{escape(report['dataset'])}</code>: {report['items']} items x "
        f"{report['samples']} samples; {report['answered']} of {report['planned']} answered in "
        f"{report['duration_s']:.1f} s. Base <code>{escape(report['models']['base'])}</code>, candidate "
        f"<code>{escape(report['models']['candidate'])}</code>; gates at confidence "
        f"{report['confidence']:g}.</p>",
    ]
    if report["interrupted"]:
        parts.append(
            f"<p class=partial>Partial report: the run stopped early ({escape(report['interrupted'])}).</p>"
        )
    parts.append("<h2>Gates</h2>")
    parts.append(
        _html_table(
            ("gate", "result", "estimate [interval]", "threshold", "why"),
            map(_gate_row, report["gates"]),
            "gates",
        )
    )
    parts.append("<h2>Scores per category</h2>")
    parts.append(_legend(ARMS))
    parts.append(_score_chart(report))
    if report["pairs"]:
        parts.append("<h2>Judged pairs: the candidate's wins, ties and losses</h2>")
        parts.append(_legend(("win", "tie", "loss")))
        parts.append(_pairs_chart(report))
        header = ("evaluator", "pairs", "wins", "ties", "losses", "flips")
        parts.append(_html_table(header, (_pair_row(n, p) for n, p in report["pairs"].items()), "pairs"))
    parts.append("<h2>Whole set</h2>")
    parts.append(_html_table(("figure", "base", "candidate"), _arm_rows(report["arms"]), "arms"))
    for title, key in (("Category", "categories"), ("Cohort", "cohorts")):
        for name, group in report[key].items():
            parts.append(f"<h2>{title} <code>{escape(name)}</code> ({group['items']} items)</h2>")
            parts.append(_html_table(("figure", "base", "candidate"), _arm_rows(group), f"{key}-{name}"))
    if report["worst"]:
        parts.append("<h2>Where the candidate did worst</h2>")
        rows = []
        for row in report["worst"]:
            cells = [f"<b>{escape(row['id'])}</b><br>line {row['line']}, {escape(row['category'])}"]
            if "prompt" in row:
                cells[0] += f"<pre>{escape(row['prompt'])}</pre>"
            for arm in ARMS:
                side = row[arm]
                problem = side["error"] or side["failure"]
                text = f"<pre>{escape(side['answer'])}</pre>" if "answer" in side else ""
                scores = ", ".join(f"{escape(k)} {v:.2f}" for k, v in side["scores"].items())
                cells.append(f"{scores}{f'<br><i>{escape(problem)}</i>' if problem else ''}{text}")
            verdicts = ", ".join(f"{escape(n)}: {p['verdict']}" for n, p in row["pairs"].items())
            cells.append(verdicts or DASH)
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append(
            "<table id=worst><tr><th>item</th><th>base</th><th>candidate</th><th>pairs</th></tr>"
            + "".join(rows)
            + "</table>"
        )
        if not report["captured"]:
            parts.append("<p>Answers are shown with <code>--capture</code>.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(header: tuple[str, ...], rows: Any, name: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table data-table='{escape(name)}'><tr>{head}</tr>{body}</table>"


def _legend(keys: tuple[str, ...]) -> str:
    return (
        "<p class=legend>"
        + "".join(f"<span><i style='background:{COLOURS[k]}'></i>{k}</span>" for k in keys)
        + "</p>"
    )


def _score_chart(report: dict[str, Any]) -> str:
    """Per category and score: a bar per arm (its mean, 0..1) with its 95% interval as a whisker."""
    rows = []
    for category, group in report["categories"].items():
        names = sorted(set(group["base"]["scores"]) | set(group["candidate"]["scores"]))
        for name in names:
            rows.append((f"{category} · {name}", [group[arm]["scores"].get(name) for arm in ARMS]))
    if not rows:
        return "<p>No scores: the route has no evaluators and the set no expectations.</p>"
    label_w, bar_w, bar_h = 260, 420, 12
    height = len(rows) * (2 * bar_h + 12) + 24
    out = [f"<svg class=chart id=scores width={label_w + bar_w + 60} height={height} role=img>"]
    y = 4
    for label, figures in rows:
        out.append(f"<text x=0 y={y + bar_h + 4} font-size=12>{escape(label[:40])}</text>")
        for arm, figure in zip(ARMS, figures, strict=True):
            if figure and figure.get("mean") is not None:
                width = bar_w * figure["mean"]
                out.append(
                    f"<rect class='bar {arm}' x={label_w} y={y} width={width:.1f} height={bar_h} "
                    f"fill='{COLOURS[arm]}'><title>{arm}: {figure['mean']:.3f}</title></rect>"
                )
                low, high = label_w + bar_w * figure["low"], label_w + bar_w * figure["high"]
                mid = y + bar_h / 2
                out.append(f"<line x1={low:.1f} x2={high:.1f} y1={mid} y2={mid} stroke='#1c2430'/>")
            y += bar_h
        y += 12
    axis = height - 14
    for tick in (0, 0.25, 0.5, 0.75, 1):
        x = label_w + bar_w * tick
        out.append(f"<text x={x:.0f} y={axis + 12} font-size=10 text-anchor=middle>{tick:g}</text>")
    out.append("</svg>")
    return "".join(out)


def _pairs_chart(report: dict[str, Any]) -> str:
    """Per evaluator, the whole set and each category: a stacked bar of wins, ties and losses."""
    rows = [(f"all · {n}", p) for n, p in report["pairs"].items()]
    for category, group in report["categories"].items():
        rows += [(f"{category} · {n}", p) for n, p in group["pairs"].items()]
    label_w, bar_w, bar_h = 260, 420, 16
    height = len(rows) * (bar_h + 8) + 8
    out = [f"<svg class=chart id=pairs width={label_w + bar_w + 10} height={height} role=img>"]
    y = 4
    for label, pair in rows:
        out.append(f"<text x=0 y={y + bar_h - 3} font-size=12>{escape(label[:40])}</text>")
        x = float(label_w)
        total = pair["pairs"] or 1
        for kind, count in (("win", pair["wins"]), ("tie", pair["ties"]), ("loss", pair["losses"])):
            width = bar_w * count / total
            out.append(
                f"<rect class='bar {kind}' x={x:.1f} y={y} width={width:.1f} height={bar_h} "
                f"fill='{COLOURS[kind]}'><title>{kind}: {count}</title></rect>"
            )
            x += width
        y += bar_h + 8
    out.append("</svg>")
    return "".join(out)
