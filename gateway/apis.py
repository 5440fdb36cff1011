"""The APIs the gateway serves, and how each one's answers read to the rest of the gateway.

OpenAI's chat completions, completions, embeddings and Responses API, and Anthropic's Messages API, are
forwarded as they are: the client's bytes (with the arm's model) to the same path under the arm's url. No
API is translated into another. An arm declares which it serves (arms.*.apis); a route serves an API when
all its arms do.

What the gateway reads of an answer beyond validation (tokens, tool calls and text for shadow pairs,
evaluators, traces and spans) it reads in one shape: `as_chat` turns a Responses or Messages answer into a
chat completion's choices and usage. Validation reads each API's own shape (gateway.validation), so its
messages name the fields the client sees.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import orjson

from gateway.errors import GatewayError, UpstreamHTTPError

Api = Literal["chat", "completions", "embeddings", "responses", "messages"]
DEFAULT_APIS: tuple[Api, ...] = ("chat", "completions", "embeddings")
# The client's path -> the API; the upstream's path is the same below the arm's url (which ends in /v1).
CLIENT_PATHS: Mapping[str, Api] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}
UPSTREAM_PATHS: Mapping[str, str] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "responses": "/responses",
    "messages": "/messages",
    "models": "/models",
}
TITLES: Mapping[str, str] = {
    "chat": "chat completions (POST /v1/chat/completions)",
    "completions": "completions (POST /v1/completions)",
    "embeddings": "embeddings (POST /v1/embeddings)",
    "responses": "the Responses API (POST /v1/responses)",
    "messages": "the Messages API (POST /v1/messages)",
}
# The APIs whose answers are read through as_chat.
TRANSLATED = frozenset({"responses", "messages"})
# Request headers of Anthropic's API that its servers need to hear as the client said them.
ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")

# How a stream says that its answer is complete: a chat or completion choice's finish_reason, the
# Responses API's response.completed (or .incomplete: finished, at a limit), the Messages API's
# message_stop. A stream that ends without it was cut short.
_FINISH_REASON = re.compile(rb'"finish_reason"\s*:\s*"')
FINISHED: Mapping[str, re.Pattern[bytes]] = {
    "chat": _FINISH_REASON,
    "completions": _FINISH_REASON,
    "responses": re.compile(rb'"type"\s*:\s*"response\.(?:completed|incomplete)"'),
    "messages": re.compile(rb'"type"\s*:\s*"message_stop"'),
}

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_body(api: str | None, exc: GatewayError) -> bytes:
    """The error as the client's API says errors: OpenAI's {"error": {...}}, or Anthropic's
    {"type": "error", "error": {"type", "message"}} on the Messages API (with our code and param beside)."""
    if api != "messages" or (isinstance(exc, UpstreamHTTPError) and not exc.wrapped):
        return exc.body()  # an upstream's own error passes on as it said it
    status = exc.status_code()
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    error = {"type": kind, "message": exc.message, "code": exc.code, "param": exc.param}
    return orjson.dumps({"type": "error", "error": error})


def error_event(api: str | None, exc: GatewayError) -> bytes:
    """The error as an SSE event of the client's API, for a stream whose headers are gone. OpenAI's SDK
    raises on any data event with an "error" object; Anthropic's reads only events named `error`."""
    if api == "messages":
        return b"event: error\ndata: " + error_body(api, exc) + b"\n\n"
    if api == "responses":  # the Responses API's error event, with OpenAI's error object beside
        error = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
        event = {
            "type": "error",
            "code": exc.code,
            "message": exc.message,
            "param": exc.param,
            "error": error,
        }
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"
    return b"data: " + exc.body() + b"\n\n"


def as_chat(api: str, answer: Any) -> Any:
    """A Responses or Messages answer read as a chat completion: the first choice's text, tool calls and
    finish_reason, and usage in OpenAI's names. Anything else comes back as it is."""
    if api not in TRANSLATED or not isinstance(answer, dict):
        return answer
    if api == "responses":
        text, calls, finish = _responses_message(answer)
        usage = _responses_usage(answer.get("usage"))
    else:
        text, calls, finish = _messages_message(answer)
        usage = _messages_usage(answer.get("usage"))
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    view: dict[str, Any] = {
        "id": answer.get("id"),
        "model": answer.get("model"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
    }
    if usage is not None:
        view["usage"] = usage
    return view


def _responses_message(answer: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]], str | None]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    output = answer.get("output")
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            calls.append(
                _call(item.get("call_id") or item.get("id"), item.get("name"), item.get("arguments"))
            )
        elif item.get("type") == "message" and isinstance(item.get("content"), list):
            texts.extend(
                p["text"]
                for p in item["content"]
                if isinstance(p, dict) and p.get("type") == "output_text" and isinstance(p.get("text"), str)
            )
    status = answer.get("status")
    finish = None
    if status == "incomplete":
        finish = "length"
    elif status == "completed":
        finish = "tool_calls" if calls else "stop"
    return ("".join(texts) if texts else None), calls, finish


def _messages_message(answer: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]], str | None]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    content = answer.get("content")
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "tool_use":
            calls.append(_call(block.get("id"), block.get("name"), block.get("input")))
        elif block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
    reason = answer.get("stop_reason")
    finish = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}
    said = finish.get(reason, reason) if isinstance(reason, str) else None
    return ("".join(texts) if texts else None), calls, said


def _call(call_id: Any, name: Any, arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        arguments = orjson.dumps(arguments).decode()
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _responses_usage(usage: Any) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None
    out: dict[str, Any] = {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
    }
    details = usage.get("input_tokens_details")
    if isinstance(details, dict) and "cached_tokens" in details:
        out["prompt_tokens_details"] = {"cached_tokens": details["cached_tokens"]}
    details = usage.get("output_tokens_details")
    if isinstance(details, dict) and "reasoning_tokens" in details:
        out["completion_tokens_details"] = {"reasoning_tokens": details["reasoning_tokens"]}
    return out


def _messages_usage(usage: Any) -> dict[str, Any] | None:
    """Anthropic counts cached prompt tokens apart from input_tokens; OpenAI counts them within."""
    if not isinstance(usage, dict):
        return None
    fresh, read, written = (
        usage.get(k) for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    )
    prompt = None
    if isinstance(fresh, int):
        prompt = fresh + sum(n for n in (read, written) if isinstance(n, int))
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": usage.get("output_tokens")}
    if isinstance(read, int):
        out["prompt_tokens_details"] = {"cached_tokens": read}
    return out


# Where an answer names its model, in every API: chat, completions and embeddings at the top, and a
# Responses answer too; a Responses stream's events under "response", a Messages stream's message_start
# under "message". (Nowhere else: a tool's input, an object in the Messages API, may hold a "model" key.)
_MODEL_HOLDERS = ("response", "message")
_MODEL_KEY = re.compile(rb'"model"\s*:')
# The key and its string value; in JSON text a quote inside a string is escaped, so `"model"` followed by
# a colon is always a key, never part of a string.
_MODEL_VALUE = re.compile(rb'("model"\s*:\s*)"(?:[^"\\]|\\.)*"')


def renamed(body: bytes, name: str) -> bytes:
    """An answer's JSON with `model` saying name (answer_model: route); anything else as it was."""
    if _MODEL_KEY.search(body) is None:  # an error, an answer without it: as it is, unparsed
        return body
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    return orjson.dumps(answer) if _rename(answer, name) else body


def renamed_events(data: bytes, name: str) -> bytes:
    """SSE events with every `"model": "..."` key's value saying name. In a stream of any of the APIs that
    key is only where the API names its model (a Messages tool input arrives as a string of partial JSON,
    in which quotes are escaped, so no key in it matches): no event needs parsing."""
    if _MODEL_KEY.search(data) is None:
        return data
    value = orjson.dumps(name)
    return _MODEL_VALUE.sub(lambda found: found[1] + value, data)


def _rename(answer: Any, name: str) -> bool:
    if not isinstance(answer, dict):
        return False
    changed = False
    if isinstance(answer.get("model"), str):
        answer["model"] = name
        changed = True
    for holder in _MODEL_HOLDERS:
        inner = answer.get(holder)
        if isinstance(inner, dict) and isinstance(inner.get("model"), str):
            inner["model"] = name
            changed = True
    return changed
