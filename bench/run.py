"""Benchmarks of the request hot path, every figure measured with wrk in one run.

proxy suite: one hop, direct (nginx fixed upstream) vs reference passthrough vs the gateway. The
passthrough runs twice, with aiohttp and with httpx as its upstream client: that pair is the
measurement behind the gateway's choice of client. The gateway runs as `canarygate serve`, one uvicorn
worker (uvloop + httptools), doing its real work: route lookup, sticky hashing (a different user per
request, candidate weight 50%), body parse and model rewrite.

validation suite: the gateway with output validation on vs off, same request bodies, against fixed
answers: a JSON-schema answer and a tool call (candidate weight 100%, so validation is enforced).

mirror suite: the same gateway and requests, on a route with mirror.percent 100 (every request also
sent to the candidate and compared) and on one without.

evaluation suite: the same, on a route whose every answer goes through three deterministic evaluators
and 10% of them to a rubric judge (nginx answering a fixed verdict, at most 4 judge calls at once).

telemetry suite: three gateways, same requests: metrics off (CANARYGATE_METRICS=false); metrics on;
metrics on and tracing on, exporting every span through the OTLP/HTTP batch exporter to a sink.

Targets: p50 overhead over direct <= 0.35 ms and >= 80% of the passthrough's req/s at 32 connections;
validation adds <= 0.2 ms p50; mirroring everything adds <= 0.3 ms p50 and keeps >= 50% of the
throughput, and so does evaluating every answer; metrics add <= 0.1 ms p50; tracing adds <= 0.3 ms p50 on top.
client suite: the upstream client alone, in-process against the same nginx: CPU time per call for
gateway.upstream (aiohttp behind the gateway's bulkhead, classification and bounds) and bare aiohttp.

apis suite: the same exchange in each API through the gateway, non-streamed and streamed, against fixed
answers in each API's shape (nginx): chat completions, the Responses API, the Messages API; each
against its direct call, so the gateway's added p50 per API is measured in one run; targets: each API
within 0.15 ms of chat's added p50 and at 75% of its req/s.

naming suite: a route with answer_model: route (each answer's model renamed to the route's) against the same
route without, non-streamed and streamed, alternating.

traces suite: the same requests with and without a trace key (body:user, 1000 traces open at once), each
a step of its trace in the first: the step's index, its sums, and the traces ending once a second.

Usage: python bench/run.py [--suite all|client|proxy|validation|mirror|evaluation|telemetry|traces|apis
       |naming] [--duration 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "order_id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4,}$"},
        "items": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["sku", "qty"], "additionalProperties": False,
            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                           "price": {"type": "number"}}}},
        "priority": {"enum": ["low", "normal", "high"]},
    },
    "required": ["customer", "order_id", "items", "priority"],
    "additionalProperties": False,
}  # fmt: skip
ORDER_PARAMETERS = {
    "type": "object",
    "required": ["order_id"],
    "additionalProperties": False,
    "properties": {"order_id": {"type": "string"}, "include_items": {"type": "boolean"}},
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup_order", "description": "Find an order", "parameters": ORDER_PARAMETERS},
    }
]
PROMPT = [{"role": "user", "content": "Summarise the quarterly report in three bullet points."}]


def completion(message: dict[str, Any], finish: str = "stop") -> str:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "fixed",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52},
    })  # fmt: skip


WORDS = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "."]
ANSWERS = {
    "json": ("application/json", completion({"content": "The quick brown fox jumps over the lazy dog."})),
    "sse": ("text/event-stream", "".join(
        "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fixed",
                               "choices": [{"index": 0, "delta": {"content": w + " "},
                                            "finish_reason": None}]}) + "\n\n" for w in WORDS
    ) + "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fixed",
                               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
      + "\n\ndata: [DONE]\n\n"),  # as every OpenAI-compatible server ends a stream: how it finished
    "valjson": ("application/json", completion({"content": json.dumps({
        "customer": "Ada Lovelace", "order_id": "UK-12345", "priority": "high",
        "items": [{"sku": "A1", "qty": 2, "price": 9.5}, {"sku": "B7", "qty": 1, "price": 120.0}]})})),
    "judge": ("application/json", completion({"content": json.dumps({"reason": "done", "score": 5})})),
    "valtool": ("application/json", completion({"content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "lookup_order",
                     "arguments": json.dumps({"order_id": "UK-12345", "include_items": True})},
    }]}, "tool_calls")),
}  # fmt: skip


def _sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: " + json.dumps({"type": kind, **data}) + "\n\n"


RESPONSE = {
    "id": "resp_bench",
    "object": "response",
    "created_at": 0,
    "status": "completed",
    "model": "fixed",
    "output": [
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": " ".join(WORDS), "annotations": []}],
        }
    ],
    "usage": {"input_tokens": 12, "output_tokens": 40, "total_tokens": 52},
}
MESSAGE = {
    "id": "msg_bench",
    "type": "message",
    "role": "assistant",
    "model": "fixed",
    "stop_reason": "end_turn",
    "content": [{"type": "text", "text": " ".join(WORDS)}],
    "usage": {"input_tokens": 12, "output_tokens": 40},
}
# Fixed answers of the other APIs: (upstream path, content type, body), by the bench kind naming them.
API_ANSWERS = {
    "respjson": ("responses", "application/json", json.dumps(RESPONSE)),
    "respsse": ("responses", "text/event-stream",
        _sse("response.created", {"response": {**RESPONSE, "output": []}})
        + "".join(_sse("response.output_text.delta", {"output_index": 0, "content_index": 0,
                                                     "delta": w + " "}) for w in WORDS)
        + _sse("response.completed", {"response": RESPONSE})),
    "msgjson": ("messages", "application/json", json.dumps(MESSAGE)),
    "msgsse": ("messages", "text/event-stream", _sse("message_start", {"message": {**MESSAGE, "content": []}})
        + _sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        + "".join(_sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w + " "}})
                  for w in WORDS)
        + _sse("content_block_stop", {"index": 0})
        + _sse("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 40}})
        + _sse("message_stop", {})),
}  # fmt: skip

NGINX_CONF = """
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location = /v1/traces {{ return 200; }}
{locations}
    }}
}}
"""

POLICY = """
route: {route}
arms:
  base: {{url: "http://127.0.0.1:{port}/{kind}/v1", model: fixed-base}}
  candidate: {{url: "http://127.0.0.1:{port}/{kind}/v1", model: fixed-candidate}}
assignment: {{sticky_keys: [body:user]}}
rollout: {{weight: {weight}}}
{extra}
"""

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, '{head}' .. (n % 1000) .. '{tail}')
end
"""


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    body: dict[str, Any]  # the request; "user" gets a different value each time


def lua_body(body: dict[str, Any]) -> tuple[str, str]:
    text = json.dumps({**body, "user": "user-@@"}, separators=(",", ":"))
    head, tail = text.split("@@")
    return head.replace("\\", "\\\\").replace("'", "\\'"), tail.replace("\\", "\\\\").replace("'", "\\'")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def wrk(target: Target, connections: int, duration: float, workdir: Path) -> dict[str, float]:
    script = workdir / f"{target.name}-{connections}.lua"
    head, tail = lua_body(target.body)
    script.write_text(WRK_SCRIPT.format(head=head, tail=tail))
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-s",
        str(script),
        target.url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        result[f"p{pct}_ms"] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["errors"] = float(non_2xx.group(1)) if non_2xx else 0.0
    if socket_errors:
        result["errors"] += sum(float(x) for x in socket_errors.groups())
    return result


def check_answer(target: Target, arm: str | None = None) -> None:
    """Before measuring: the answer parses, and on the gateway the expected arm gave it, no fallback."""
    response = httpx.post(target.url, json={**target.body, "user": "check"}, timeout=10)
    response.raise_for_status()
    if target.body.get("stream"):
        text = (
            response.text.rstrip()
        )  # each API's last event: chat's [DONE], response.completed, message_stop
        done = text.endswith(("data: [DONE]", '{"type": "message_stop"}')) or '"response.completed"' in text
        assert done, f"{target.name}: broken stream"
    else:
        json.loads(response.text)
    if arm is not None:
        assert response.headers["x-canarygate-arm"] == arm, f"{target.name}: answered by the wrong arm"
        assert "x-canarygate-fallback" not in response.headers, f"{target.name}: fell back"


def measure(target: Target, duration: float, workdir: Path) -> dict[str, float]:
    wrk(target, 8, 2, workdir)  # warm-up: connection pools, caches
    one = wrk(target, 1, duration, workdir)
    many = wrk(target, 32, duration, workdir)
    result = {
        "p50_ms": one["p50_ms"],
        "p99_ms": one["p99_ms"],
        "rps_32": many["rps"],
        "errors": one["errors"] + many["errors"],
    }
    print(
        f"  {target.name:<24} p50 {result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms  "
        f"{result['rps_32']:>8.0f} req/s @32  errors {int(result['errors'])}",
        flush=True,
    )
    return result


def proxy_suite(ports: dict[str, int], duration: float, work: Path) -> tuple[list[str], bool]:
    rows = [
        "| response | target | p50 @1 conn | p99 @1 conn | overhead p50 vs direct | req/s @32 conns | "
        "% of passthrough req/s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    for kind in ("json", "sse"):
        body = {"model": f"bench-{kind}", "stream": kind == "sse", "messages": PROMPT}
        path = f"/{kind}/v1/chat/completions"
        targets = [
            Target("direct", f"http://127.0.0.1:{ports['nginx']}{path}", body),
            Target("passthrough", f"http://127.0.0.1:{ports['aiohttp']}{path}", body),
            Target("passthrough-httpx", f"http://127.0.0.1:{ports['httpx']}{path}", body),
            Target("gateway", f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions", body),
        ]
        print(f"proxy, {kind}:")
        for target in targets:
            check_answer(target)
        results = {t.name: measure(t, duration, work) for t in targets}
        direct, reference, gateway = results["direct"], results["passthrough"], results["gateway"]
        for name, r in results.items():
            overhead = "—" if name == "direct" else f"{r['p50_ms'] - direct['p50_ms']:.3f} ms"
            share = "—" if name == "direct" else f"{100 * r['rps_32'] / reference['rps_32']:.0f}%"
            rows.append(
                f"| {kind} | {name} | {r['p50_ms']:.3f} ms | {r['p99_ms']:.3f} ms | {overhead} | "
                f"{r['rps_32']:.0f} | {share} | {int(r['errors'])} |"
            )
        ok &= gateway["p50_ms"] - direct["p50_ms"] <= 0.35 and gateway["rps_32"] >= 0.8 * reference["rps_32"]
        ok &= gateway["errors"] == 0
    return rows, ok


def validation_suite(ports: dict[str, int], duration: float, work: Path) -> tuple[list[str], bool]:
    rows = [
        "| answer | validation | p50 @1 conn | p99 @1 conn | added p50 | req/s @32 conns | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    ok = True
    extras = {
        "valjson": {
            "response_format": {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA}}
        },
        "valtool": {"tools": TOOLS, "tool_choice": "required"},
    }
    for kind, label in (("valjson", "JSON schema"), ("valtool", "tool call")):
        print(f"validation, {label}:")
        results = {}
        for mode in ("off", "on"):
            body = {"model": f"bench-{kind}-{mode}", "messages": PROMPT, **extras[kind]}
            target = Target(
                f"{kind}-{mode}", f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions", body
            )
            check_answer(target, arm="candidate")
            results[mode] = measure(target, duration, work)
        added = results["on"]["p50_ms"] - results["off"]["p50_ms"]
        for mode, r in results.items():
            rows.append(
                f"| {label} | {mode} | {r['p50_ms']:.3f} ms | {r['p99_ms']:.3f} ms | "
                f"{'—' if mode == 'off' else f'{added:.3f} ms'} | {r['rps_32']:.0f} | {int(r['errors'])} |"
            )
        ok &= added <= 0.2 and results["on"]["errors"] == 0 and results["off"]["errors"] == 0
    return rows, ok


def apis_suite(ports: dict[str, int], duration: float, work: Path) -> tuple[list[str], bool]:
    rows = [
        "| response | API | p50 @1 conn | p99 @1 conn | overhead p50 vs direct | req/s @32 conns | "
        "% of chat's req/s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    apis = (
        ("chat", "", "chat/completions", {"messages": PROMPT}),
        ("responses", "resp", "responses", {"input": PROMPT[0]["content"]}),
        ("messages", "msg", "messages", {"messages": PROMPT, "max_tokens": 64}),
    )
    for shape in ("json", "sse"):
        direct, gateway = {}, {}
        for api, prefix, path, fields in apis:
            kind = f"{prefix}{shape}"
            body = {"model": f"bench-{kind}", "stream": shape == "sse", **fields}
            direct[api] = Target(
                f"{api}-{shape}-direct", f"http://127.0.0.1:{ports['nginx']}/{kind}/v1/{path}", body
            )
            gateway[api] = Target(
                f"{api}-{shape}-gateway", f"http://127.0.0.1:{ports['gateway']}/v1/{path}", body
            )
            check_answer(direct[api])
            check_answer(gateway[api])
        print(f"apis, {shape}:")
        base = {api: measure(target, duration, work) for api, target in direct.items()}
        # The APIs alternate, twice each, and each keeps its better round (as on_off does).
        rounds = [{api: measure(target, duration, work) for api, target in gateway.items()} for _ in range(2)]
        best = {
            api: max((r[api] for r in rounds), key=lambda r: r["rps_32"])
            | {"errors": sum(r[api]["errors"] for r in rounds)}
            for api in gateway
        }
        chat = best["chat"]
        chat_added = chat["p50_ms"] - base["chat"]["p50_ms"]
        for api, r in best.items():
            added = r["p50_ms"] - base[api]["p50_ms"]
            share = r["rps_32"] / chat["rps_32"]
            kept = "—" if api == "chat" else f"{100 * share:.0f}%"
            rows.append(
                f"| {shape} | {api} | {r['p50_ms']:.3f} ms | {r['p99_ms']:.3f} ms | {added:.3f} ms | "
                f"{r['rps_32']:.0f} | {kept} | {int(r['errors'])} |"
            )
            ok &= r["errors"] == 0 and (api == "chat" or (added - chat_added <= 0.15 and share >= 0.75))
    return rows, ok


def on_off(
    ports: dict[str, int],
    duration: float,
    work: Path,
    what: str,
    routes: dict[str, str],
    stream: bool = False,
) -> tuple[list[str], dict[str, dict[str, float]], float, float]:
    """The same requests to two routes of one gateway, "off" and the feature's label: the table's rows,
    each route's better round, the added p50 and the share of "off"'s throughput kept."""
    rows = [
        f"| {what} | p50 @1 conn | p99 @1 conn | added p50 | req/s @32 conns | % of {what}-off | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    print(f"{what}:")
    targets = {}
    for label, model in routes.items():
        body = {"model": model, "messages": PROMPT, **({"stream": True} if stream else {})}
        targets[label] = Target(
            f"{what}-{label}", f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions", body
        )
        check_answer(targets[label], arm="base")
    # Off and on alternate, twice each, and each keeps its better round: a ratio of two runs minutes
    # apart on a shared machine measures the neighbours as much as the gateway.
    rounds = [{label: measure(t, duration, work) for label, t in targets.items()} for _ in range(2)]
    results = {
        label: max((r[label] for r in rounds), key=lambda r: r["rps_32"])
        | {"errors": sum(r[label]["errors"] for r in rounds)}
        for label in targets
    }
    off, on = results["off"], results[next(label for label in routes if label != "off")]
    added = on["p50_ms"] - off["p50_ms"]
    share = on["rps_32"] / off["rps_32"]
    for label, r in results.items():
        rows.append(
            f"| {label} | {r['p50_ms']:.3f} ms | {r['p99_ms']:.3f} ms | "
            f"{'—' if label == 'off' else f'{added:.3f} ms'} | {r['rps_32']:.0f} | "
            f"{'—' if label == 'off' else f'{100 * share:.0f}%'} | {int(r['errors'])} |"
        )
    return rows, results, added, share


def mirror_suite(ports: dict[str, int], duration: float, work: Path) -> tuple[list[str], bool]:
    rows, results, added, share = on_off(
        ports, duration, work, "mirror", {"off": "bench-plain", "100%": "bench-mirror"}
    )
    errors = sum(r["errors"] for r in results.values())
    return rows, added <= 0.3 and share >= 0.5 and errors == 0


def evaluation_suite(ports: dict[str, int], duration: float, work: Path) -> tuple[list[str], bool]:
    """Every answer through three deterministic checks, and 10% of them to a rubric judge (nginx answers
    with a fixed verdict), bounded at 4 judge calls at once: what is over the bound is dropped and
    counted, never waited for."""
    rows, results, added, share = on_off(
        ports, duration, work, "evaluation", {"off": "bench-plain", "checks+judge": "bench-judged"}
    )
    metrics = httpx.get(f"http://127.0.0.1:{ports['gateway']}/metrics").text
    calls = {
        m.group(1): float(m.group(2))
        for m in re.finditer(
            r'canarygate_judge_calls_total\{outcome="(\w+)",route="bench-judged"\} (\S+)', metrics
        )
    }
    rows.append(f"\njudge calls during the runs: {', '.join(f'{k} {v:.0f}' for k, v in calls.items() if v)}")
    errors = sum(r["errors"] for r in results.values())
    return rows, added <= 0.3 and share >= 0.5 and errors == 0 and calls.get("ok", 0) > 0


def naming_suite(ports: dict[str, int], duration: float, work: Path) -> tuple[list[str], bool]:
    """answer_model: route (every answer's model renamed to the route's: a JSON parse and dump per answer,
    or per stream event) against the same route answering as the upstream named it."""
    rows: list[str] = []
    ok = True
    for stream, kind in ((False, "json"), (True, "sse")):
        named = {"model": f"bench-{kind}-named", "messages": PROMPT, "stream": stream}
        said = httpx.post(f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions", json=named, timeout=10)
        names = set(re.findall(r'"model":\s*"([^"]*)"', said.text))
        assert names == {f"bench-{kind}-named"}, f"answer_model ({kind}): not renamed: {said.text[:300]}"
        table, results, added, share = on_off(
            ports, duration, work, f"answer_model ({kind})",
            {"off": f"bench-{kind}-upstream", "route": f"bench-{kind}-named"}, stream,
        )  # fmt: skip
        rows += table if not rows else ["", *table]
        ok &= added <= 0.2 and share >= 0.8 and sum(r["errors"] for r in results.values()) == 0
    return rows, ok


def traces_suite(ports: dict[str, int], duration: float, work: Path) -> tuple[list[str], bool]:
    """Every request a step of a trace (trace key body:user, 1000 traces open at once: an agent's steps)
    against the same requests with no trace key: the step's index, its sums, and the traces ending."""
    rows, results, added, share = on_off(
        ports, duration, work, "traces", {"off": "bench-plain", "every request a step": "bench-traced"}
    )
    metrics = httpx.get(f"http://127.0.0.1:{ports['gateway']}/metrics").text
    ended = sum(
        float(m.group(1))
        for m in re.finditer(r'canarygate_trace_steps_count\{[^}]*route="bench-traced"[^}]*\} (\S+)', metrics)
    )
    rows.append(f"\ntraces ended during the runs: {ended:.0f}")
    errors = sum(r["errors"] for r in results.values())
    return rows, added <= 0.1 and share >= 0.8 and errors == 0


def telemetry_suite(ports: dict[str, int], duration: float, work: Path) -> tuple[list[str], bool]:
    rows = [
        "| gateway | p50 @1 conn | p99 @1 conn | added p50 | req/s @32 conns | errors |",
        "|---|---|---|---|---|---|",
    ]
    body = {"model": "bench-json", "messages": PROMPT}
    print("telemetry:")
    results = {}
    gateways = (
        ("metrics off, tracing off", "gateway_bare"),
        ("metrics on, tracing off", "gateway"),
        ("metrics on, tracing on", "gateway_traced"),
        ("metrics on, tracing 10% sampled", "gateway_sampled"),
    )
    for name, port in gateways:
        target = Target(name, f"http://127.0.0.1:{ports[port]}/v1/chat/completions", body)
        check_answer(target)
        results[name] = measure(target, duration, work)
    bare, metered, traced, sampled = results.values()
    added = {  # metrics against none; tracing against metrics alone
        "metrics on, tracing off": metered["p50_ms"] - bare["p50_ms"],
        "metrics on, tracing on": traced["p50_ms"] - metered["p50_ms"],
        "metrics on, tracing 10% sampled": sampled["p50_ms"] - metered["p50_ms"],
    }
    for name, r in results.items():
        note = f"{added[name]:.3f} ms" if name in added else "—"
        rows.append(
            f"| {name} | {r['p50_ms']:.3f} ms | {r['p99_ms']:.3f} ms | {note} | {r['rps_32']:.0f} | "
            f"{int(r['errors'])} |"
        )
    ok = added["metrics on, tracing off"] <= 0.1 and added["metrics on, tracing on"] <= 0.3
    return rows, ok and all(r["errors"] == 0 for r in results.values())


def client_suite(ports: dict[str, int], duration: float, work: Path) -> tuple[list[str], bool]:
    """The upstream client alone, in this process: CPU time per call, 32 calls in flight, same nginx:
    gateway.upstream (bulkhead, classification, bounded read) against a bare aiohttp session."""
    import aiohttp
    import uvloop

    from gateway.policy import Policy
    from gateway.route import compile_policy
    from gateway.upstream import Call, Upstream

    base = f"http://127.0.0.1:{ports['nginx']}/json/v1"
    body = json.dumps({"model": "bench-json", "messages": PROMPT}).encode()
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", "X-Request-Id": "0" * 32}
    calls = max(2000, int(duration * 3000))
    policy = Policy.model_validate({"route": "bench", "arms": {"base": {"url": base, "model": "m"}}})
    arm = compile_policy(policy, Path("bench.yaml"), {})[0].base

    async def per_call(call: Any) -> float:
        left = calls

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await call()

        for _ in range(200):
            await call()  # warm the pool
        started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(32)))
        return (time.process_time() - started) / calls * 1e6

    async def run() -> dict[str, float]:
        upstream = Upstream({})
        await upstream.start()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000),
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent",),
        )
        timeout = aiohttp.ClientTimeout(total=30, connect=5)
        upstream_call = Call(arm, "chat", body, headers, None, timeout, 30.0)

        async def ours() -> None:
            resp = await upstream.open(upstream_call)
            try:
                json.loads(await resp.read())
            finally:
                resp.close()

        async def bare() -> None:
            async with session.post(
                f"{base}/chat/completions", data=body, headers=headers, timeout=timeout
            ) as r:
                json.loads(await r.read())

        result = {"gateway.upstream": 1e9, "aiohttp, bare": 1e9}
        for _ in range(2):  # alternating; each keeps its best round
            result["gateway.upstream"] = min(result["gateway.upstream"], await per_call(ours))
            result["aiohttp, bare"] = min(result["aiohttp, bare"], await per_call(bare))
        await upstream.close()
        await session.close()
        return result

    print("client:")
    result = uvloop.run(run())
    rows = ["| upstream client | CPU per call, 32 in flight | vs bare aiohttp |", "|---|---|---|"]
    for name, cpu in result.items():
        print(f"  {name:<24} {cpu:.1f} us CPU per call", flush=True)
        rows.append(f"| {name} | {cpu:.1f} us | {cpu / result['aiohttp, bare']:.2f}x |")
    return rows, result["gateway.upstream"] <= 1.25 * result["aiohttp, bare"]


SUITES = {
    "client": client_suite,
    "proxy": proxy_suite,
    "validation": validation_suite,
    "mirror": mirror_suite,
    "evaluation": evaluation_suite,
    "telemetry": telemetry_suite,
    "traces": traces_suite,
    "apis": apis_suite,
    "naming": naming_suite,
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=["all", *SUITES], default="all")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench needs {tool}: apt-get install wrk nginx (make bench does it)", file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory(prefix="canarygate-bench-") as tmp:
        work = Path(tmp)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / sub).mkdir()
        ports = {
            name: free_port()
            for name in (
                "nginx",
                "aiohttp",
                "httpx",
                "gateway",
                "gateway_bare",
                "gateway_traced",
                "gateway_sampled",
            )
        }
        # nginx reads backslashes in quoted strings as escapes: double them, or the JSON breaks.
        locations = (
            "\n".join(
                f"        location = /{kind}/v1/chat/completions {{ default_type {ctype}; "
                f"return 200 '{body.replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'; }}"
                for kind, (ctype, body) in ANSWERS.items()
            )
            + "\n"
            + "\n".join(
                f"        location = /{kind}/v1/{path} {{ default_type {ctype}; "
                f"return 200 '{body.replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'; }}"
                for kind, (path, ctype, body) in API_ANSWERS.items()
            )
        )
        (work / "nginx.conf").write_text(
            NGINX_CONF.format(dir=work, port=ports["nginx"], locations=locations)
        )
        policies = work / "policies"
        policies.mkdir()
        for kind in ("json", "sse"):
            (policies / f"{kind}.yaml").write_text(
                POLICY.format(route=f"bench-{kind}", port=ports["nginx"], kind=kind, weight=50, extra="")
            )
        for kind in API_ANSWERS:
            (policies / f"{kind}.yaml").write_text(
                POLICY.format(route=f"bench-{kind}", port=ports["nginx"], kind=kind, weight=50, extra="")
                .replace("model: fixed-base}", "model: fixed-base, apis: [responses, messages]}")
                .replace("model: fixed-candidate}", "model: fixed-candidate, apis: [responses, messages]}")
            )
        for kind in ("json", "sse"):
            for mode, extra in (("upstream", ""), ("named", "answer_model: route")):
                (policies / f"{kind}-{mode}.yaml").write_text(
                    POLICY.format(
                        route=f"bench-{kind}-{mode}", port=ports["nginx"], kind=kind, weight=0, extra=extra
                    )
                )
        (policies / "plain.yaml").write_text(
            POLICY.format(route="bench-plain", port=ports["nginx"], kind="json", weight=0, extra="")
        )
        (policies / "mirror.yaml").write_text(
            POLICY.format(
                route="bench-mirror",
                port=ports["nginx"],
                kind="json",
                weight=0,
                extra="mirror: {percent: 100, sample_by: request, max_concurrency: 64, max_queue: 1024}",
            )
        )
        (policies / "traced.yaml").write_text(
            POLICY.format(
                route="bench-traced",
                port=ports["nginx"],
                kind="json",
                weight=0,
                extra="traces: {idle_timeout_s: 1}",
            ).replace("{sticky_keys: [body:user]}", "{sticky_keys: [body:user], trace_keys: [body:user]}")
        )
        judged = (
            f"evaluation:\n  judge: {{url: http://127.0.0.1:{ports['nginx']}/judge/v1, model: j, "
            "max_concurrency: 4}\n  evaluators:\n"
            "    - {name: adherence, kind: rubric, rubric: instruction_adherence, sample: 0.1}\n"
            "    - {name: greets, kind: regex, pattern: '^The quick'}\n"
            "    - {name: polite, kind: contains, text: [please, thank]}\n"
            "    - {name: short, kind: max_length, max_chars: 2000}\n"
        )
        (policies / "judged.yaml").write_text(
            POLICY.format(route="bench-judged", port=ports["nginx"], kind="json", weight=0, extra=judged)
        )
        for kind in ("valjson", "valtool"):
            for mode, extra in (("on", ""), ("off", "validation: {json: off, tool_calls: false}")):
                (policies / f"{kind}-{mode}.yaml").write_text(
                    POLICY.format(
                        route=f"bench-{kind}-{mode}", port=ports["nginx"], kind=kind, weight=100, extra=extra
                    )
                )
        env = {
            **os.environ,
            "UPSTREAM": f"http://127.0.0.1:{ports['nginx']}",
            "CANARYGATE_WATCH_POLICIES": "false",
        }
        for secret in ("CANARYGATE_API_KEYS", "CANARYGATE_API_KEYS_FILE"):
            env.pop(secret, None)
        uvicorn = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "bench.passthrough:create_app",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
            "--port",
        ]
        gateway = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--policies",
            str(policies),
            "--log-level",
            "warning",
            "--port",
        ]
        traced = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{ports['nginx']}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
        commands = [
            (["nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"], env),
            ([*uvicorn, str(ports["aiohttp"])], {**env, "PASSTHROUGH_CLIENT": "aiohttp"}),
            ([*uvicorn, str(ports["httpx"])], {**env, "PASSTHROUGH_CLIENT": "httpx"}),
            ([*gateway, str(ports["gateway"])], env),
            ([*gateway, str(ports["gateway_bare"])], {**env, "CANARYGATE_METRICS": "false"}),
            (
                [*gateway, str(ports["gateway_traced"])],
                {**env, **traced},
            ),
            (
                [*gateway, str(ports["gateway_sampled"])],
                {**env, **traced, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
            ),
        ]
        processes: list[subprocess.Popen[bytes]] = []
        try:
            processes.extend(subprocess.Popen(cmd, cwd=ROOT, env=cmd_env) for cmd, cmd_env in commands)
            for name in [n for n in ports if n != "nginx"]:
                wait_up(f"http://127.0.0.1:{ports[name]}/healthz")
            tables, ok = [], True
            for name, suite in SUITES.items():
                if args.suite in ("all", name):
                    rows, passed = suite(ports, args.duration, work)
                    tables.append(rows)
                    ok &= passed
        finally:
            for process in reversed(processes):  # the proxies before their upstream: no shutdown noise
                process.terminate()
                process.wait(timeout=20)
    for rows in tables:
        print("\n" + "\n".join(rows))
    print(f"\ntargets: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
