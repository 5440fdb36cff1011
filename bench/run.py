"""Benchmark one proxy hop: direct (nginx fixed upstream) vs reference passthrough vs the gateway.

The reference passthrough runs twice, with aiohttp and with httpx as its upstream client: that pair
is the measurement behind the gateway's choice of client.

All three are measured in the same run with wrk: p50/p99 latency at 1 connection and req/s at 32
connections, for a JSON answer and an SSE stream. The gateway runs as `canarygate serve` with one
uvicorn worker (uvloop + httptools), doing its real work: auth off, route lookup, sticky hashing
(a different user per request, candidate weight 50%), body parse and model rewrite.

Usage: python bench/run.py [--duration 8] [--json bench/results/latest.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CHAT_JSON = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "fixed",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22},
    }
)
SSE = (
    "".join(
        "data: "
        + json.dumps(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "fixed",
                "choices": [{"index": 0, "delta": {"content": w + " "}, "finish_reason": None}],
            }
        )
        + "\n\n"
        for w in ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "."]
    )
    + "data: [DONE]\n\n"
)

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
        location = /json/v1/chat/completions {{ default_type application/json; return 200 '{json}'; }}
        location = /sse/v1/chat/completions {{ default_type text/event-stream; return 200 '{sse}'; }}
    }}
}}
"""

POLICY = """
route: bench-{kind}
arms:
  base: {{url: "http://127.0.0.1:{port}/{kind}/v1", model: fixed-base}}
  candidate: {{url: "http://127.0.0.1:{port}/{kind}/v1", model: fixed-candidate}}
assignment: {{sticky_keys: [body:user]}}
rollout: {{weight: 50}}
"""

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  local body = '{{"model":"{model}","user":"user-' .. (n % 1000) .. '","stream":{stream},' ..
    '"messages":[{{"role":"user","content":"Summarise the quarterly report in three bullet points."}}]}}'
  return wrk.format(nil, nil, nil, body)
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.post(
                url,
                content=b'{"model":"bench-json","messages":[{"role":"user","content":"x"}]}',
                headers={"content-type": "application/json"},
                timeout=1,
            )
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def wrk(
    url: str, model: str, stream: bool, connections: int, duration: float, workdir: Path
) -> dict[str, float]:
    script = workdir / f"{model}-{stream}.lua"
    script.write_text(WRK_SCRIPT.format(model=model, stream="true" if stream else "false"))
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        result[f"p{pct}_ms"] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    if socket_errors:
        result["errors"] += sum(float(x) for x in socket_errors.groups())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench needs {tool}: apt-get install wrk nginx (make bench does it)", file=sys.stderr)
            return 2

    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="canarygate-bench-") as tmp:
        work = Path(tmp)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / sub).mkdir()
        nginx_port, pass_port, httpx_port, gw_port = free_port(), free_port(), free_port(), free_port()
        (work / "nginx.conf").write_text(
            NGINX_CONF.format(
                dir=work, port=nginx_port, json=CHAT_JSON.replace("'", "\\'"), sse=SSE.replace("'", "\\'")
            )
        )
        policies = work / "policies"
        policies.mkdir()
        for kind in ("json", "sse"):
            (policies / f"{kind}.yaml").write_text(POLICY.format(kind=kind, port=nginx_port))
        env = {
            **os.environ,
            "UPSTREAM": f"http://127.0.0.1:{nginx_port}",
            "CANARYGATE_WATCH_POLICIES": "false",
        }
        env.pop("CANARYGATE_API_KEYS", None)
        env.pop("CANARYGATE_API_KEYS_FILE", None)
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
        ]
        commands = [
            (["nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"], env),
            ([*uvicorn, str(pass_port)], {**env, "PASSTHROUGH_CLIENT": "aiohttp"}),
            ([*uvicorn, str(httpx_port)], {**env, "PASSTHROUGH_CLIENT": "httpx"}),
            ([*gateway, "--port", str(gw_port)], env),
        ]
        try:
            processes.extend(subprocess.Popen(cmd, cwd=ROOT, env=cmd_env) for cmd, cmd_env in commands)
            targets = {
                "direct": (f"http://127.0.0.1:{nginx_port}", "/{kind}/v1/chat/completions"),
                "passthrough": (f"http://127.0.0.1:{pass_port}", "/{kind}/v1/chat/completions"),
                "passthrough-httpx": (f"http://127.0.0.1:{httpx_port}", "/{kind}/v1/chat/completions"),
                "gateway": (f"http://127.0.0.1:{gw_port}", "/v1/chat/completions"),
            }
            for base, path in targets.values():
                wait_up(base + path.format(kind="json"))
            results: dict[str, dict[str, dict[str, float]]] = {}
            for kind in ("json", "sse"):
                for name, (base, path) in targets.items():
                    url = base + path.format(kind=kind)
                    model = f"bench-{kind}"
                    wrk(url, model, kind == "sse", 8, 2, work)  # warm-up: pools, caches, JIT-free but still
                    one = wrk(url, model, kind == "sse", 1, args.duration, work)
                    many = wrk(url, model, kind == "sse", 32, args.duration, work)
                    results.setdefault(kind, {})[name] = {
                        "p50_ms": one["p50_ms"],
                        "p99_ms": one["p99_ms"],
                        "rps_32": many["rps"],
                        "errors": one["errors"] + many["errors"],
                    }
                    print(
                        f"{kind:<5} {name:<12} p50 {one['p50_ms']:.3f} ms  p99 {one['p99_ms']:.3f} ms  "
                        f"{many['rps']:>8.0f} req/s @32  errors {int(one['errors'] + many['errors'])}",
                        flush=True,
                    )
        finally:
            for process in reversed(processes):  # the proxies before their upstream: no shutdown noise
                process.terminate()
                process.wait(timeout=20)

    print()
    print(
        "| response | target | p50 @1 conn | p99 @1 conn | overhead p50 vs direct | req/s @32 conns | "
        "% of passthrough req/s | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, by_target in results.items():
        direct, reference = by_target["direct"], by_target["passthrough"]
        for name, r in by_target.items():
            overhead = "—" if name == "direct" else f"{r['p50_ms'] - direct['p50_ms']:.3f} ms"
            share = "—" if name == "direct" else f"{100 * r['rps_32'] / reference['rps_32']:.0f}%"
            print(
                f"| {kind} | {name} | {r['p50_ms']:.3f} ms | {r['p99_ms']:.3f} ms | {overhead} | "
                f"{r['rps_32']:.0f} | {share} | {int(r['errors'])} |"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    gateway_ok = all(
        by_target["gateway"]["p50_ms"] - by_target["direct"]["p50_ms"] <= 1.0
        and by_target["gateway"]["rps_32"] >= 0.5 * by_target["passthrough"]["rps_32"]
        and by_target["gateway"]["errors"] == 0
        for by_target in results.values()
    )
    print(
        f"\ntargets (p50 overhead <= 1.0 ms, >= 50% of passthrough req/s, no errors): "
        f"{'met' if gateway_ok else 'NOT met'}"
    )
    return 0 if gateway_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
