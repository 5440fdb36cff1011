"""For a request to no endpoint, the nearest one: a 404 that says where to go instead. A path under /v1
that the admin API serves at the root (users copy their clients' base_url), an API of OpenAI's or
Anthropic's the gateway does not serve, a misspelt path: each gets its own hint."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from gateway.apis import CLIENT_PATHS

# APIs a client of an OpenAI- or Anthropic-compatible server may expect that the gateway does not serve.
NOT_SERVED = {
    "/v1/images": "images",
    "/v1/audio": "audio",
    "/v1/files": "files",
    "/v1/uploads": "uploads",
    "/v1/batches": "batches",
    "/v1/moderations": "moderations",
    "/v1/fine_tuning": "fine-tuning",
    "/v1/assistants": "assistants",
    "/v1/threads": "threads",
    "/v1/vector_stores": "vector stores",
    "/v1/conversations": "conversations",
    "/v1/realtime": "realtime",
    "/v1/evals": "evals",
    "/v1/messages/count_tokens": "token counting",
    "/v1/messages/batches": "message batches",
}
# Paths longer than this get no "did you mean" (the request head may be 64 KiB; comparing costs time on the
# serving loop in proportion to the path's length times the endpoints'): no endpoint is near one anyway.
MATCHED = 120
ROOT_ONLY = ("/admin", "/metrics", "/healthz", "/readyz")  # at the gateway's root, never under /v1


def hint(method: str, path: str, known: Sequence[tuple[str, str]]) -> str:
    """The 404's message for `method path`, given every (method, path template) served."""
    where = f"{method} {path[:200]}"
    if path.startswith("/v1/") and path[3:].startswith(ROOT_ONLY):
        return (
            f"no such endpoint: {where}; did you mean {method} {path[3:200]}? The admin API, /metrics and "
            "the probes are at the gateway's root, not under /v1 (give the CLI the gateway's URL, "
            "CANARYGATE_URL, with or without /v1)"
        )
    unserved = next((name for prefix, name in NOT_SERVED.items() if _under(path, prefix)), None)
    if unserved is not None:
        served = ", ".join(CLIENT_PATHS)
        said = f"no such endpoint: {where}; the gateway does not serve the {unserved} API; it serves {served}"
        if unserved == "conversations":
            said += " (a conversation made at the model server is followed through the gateway by its id)"
        return said
    near = nearest(method, path, known) if len(path) <= MATCHED else None
    if near is not None:
        return f"no such endpoint: {where}; did you mean {near[0]} {near[1]}?"
    return (
        f"no such endpoint: {where}; the OpenAI-compatible API is under /v1 (/v1/chat/completions, "
        "/v1/models, ...), the admin API under /admin"
    )


def nearest(method: str, path: str, known: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """The served endpoint whose path reads most like this one (a template's {parameters} take this
    path's segments at their places), preferring the same method; None when none is close."""
    segments = path.strip("/").split("/")
    best: tuple[float, tuple[str, str]] | None = None
    for verb, template in known:
        parts = template.strip("/").split("/")
        if len(parts) == len(segments):  # fill the template's parameters from the path
            filled = "/".join(s if p.startswith("{") else p for p, s in zip(parts, segments, strict=True))
        else:
            filled = "/".join(p for p in parts if not p.startswith("{"))
        score = difflib.SequenceMatcher(None, path.strip("/"), filled).ratio() + 0.05 * (verb == method)
        if best is None or score > best[0]:
            best = (score, (verb, template))
    return best[1] if best is not None and best[0] >= 0.75 else None


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith((prefix + "/", prefix.removeprefix("/v1") + "/"))
