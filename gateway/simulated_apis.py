"""The simulator's Responses API and Messages API: each request read as the chat request it means (so the
same synthetic model answers it, with the same knobs), each answer written in the API's own shapes and
streaming events, as OpenAI's and Anthropic's servers (and vLLM's) send them."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from gateway.synth import Generation


def _hex() -> str:
    return uuid.uuid4().hex


def _text(content: Any) -> str | None:
    """The text of a message's content: a string, or the text of its parts (input_text, text, ...)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return None


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _common(body: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    for field in ("temperature", "seed", "metadata", "top_p"):
        if field in body:
            out[field] = body[field]
    return out


# --- the Responses API ---------------------------------------------------------------------------------


def responses_to_chat(body: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """history: the conversation a previous response left (its input and output), as chat messages."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):  # instructions do not carry over from a previous response
        messages.append({"role": "system", "content": body["instructions"]})
    messages.extend(history)
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    for item in given if isinstance(given, list) else ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role", "user"), "content": _text(item.get("content")) or ""})
        elif kind == "function_call":
            call = {"name": item.get("name"), "arguments": item.get("arguments", "")}
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": item.get("call_id"), "type": "function", "function": call}],
                }
            )
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {"role": "tool", "tool_call_id": item.get("call_id"), "content": _json_text(output)}
            )
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    tools = [
        {"type": "function", "function": {"name": t["name"], "parameters": t.get("parameters") or {}}}
        for t in body.get("tools") or ()
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str)
    ]
    if tools:
        out["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        out["tool_choice"] = choice.get("mode", "auto")
    elif isinstance(choice, str):
        out["tool_choice"] = choice
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.get("name", "answer"), "schema": fmt.get("schema")},
        }
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["response_format"] = {"type": "json_object"}
    if isinstance(body.get("max_output_tokens"), int):
        out["max_tokens"] = body["max_output_tokens"]
    return _common(body, out)


def assistant_turn(g: Generation) -> dict[str, Any]:
    """The answer as a chat message, for the conversation a stored response leaves."""
    if g.tool_name is None:
        return {"role": "assistant", "content": g.text}
    call = {"id": g.tool_call_id, "type": "function", "function": {"name": g.tool_name, "arguments": g.text}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def response_object(
    model: str, g: Generation, usage: dict[str, Any], body: dict[str, Any], conversation: str | None
) -> dict[str, Any]:
    if g.tool_name is not None:
        item: dict[str, Any] = {
            "type": "function_call",
            "id": f"fc_{_hex()}",
            "call_id": g.tool_call_id,
            "name": g.tool_name,
            "arguments": g.text,
            "status": "completed",
        }
    else:
        item = {
            "type": "message",
            "id": f"msg_{_hex()}",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": g.text, "annotations": []}],
        }
    incomplete = g.finish_reason == "length"
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    response: dict[str, Any] = {
        "id": f"resp_{_hex()}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "model": model,
        "output": [item],
        "instructions": body.get("instructions"),
        "previous_response_id": body.get("previous_response_id"),
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice", "auto"),
        "parallel_tool_calls": True,
        "text": body.get("text") or {"format": {"type": "text"}},
        "store": body.get("store", True),
        "metadata": body.get("metadata") or {},
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": usage["total_tokens"],
        },
    }
    if conversation is not None:
        response["conversation"] = {"id": conversation}
    return response


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def response_events(response: dict[str, Any], g: Generation, malformed: bool = False) -> list[bytes]:
    """The Responses API's typed events, each numbered (sequence_number) as OpenAI numbers them."""
    events: list[tuple[str, dict[str, Any]]] = []
    opening = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    events += [("response.created", {"response": opening}), ("response.in_progress", {"response": opening})]
    item = response["output"][0]
    at = {"item_id": item["id"], "output_index": 0}
    if item["type"] == "function_call":
        events.append(
            (
                "response.output_item.added",
                {"output_index": 0, "item": {**item, "arguments": "", "status": "in_progress"}},
            )
        )
        events += [("response.function_call_arguments.delta", {**at, "delta": p}) for p in g.pieces]
        events.append(
            ("response.function_call_arguments.done", {**at, "name": item["name"], "arguments": g.text})
        )
    else:
        events.append(
            (
                "response.output_item.added",
                {"output_index": 0, "item": {**item, "content": [], "status": "in_progress"}},
            )
        )
        part = {**at, "content_index": 0}
        events.append(
            (
                "response.content_part.added",
                {**part, "part": {"type": "output_text", "text": "", "annotations": []}},
            )
        )
        events += [("response.output_text.delta", {**part, "delta": p, "logprobs": []}) for p in g.pieces]
        events.append(("response.output_text.done", {**part, "text": g.text, "logprobs": []}))
        events.append(("response.content_part.done", {**part, "part": item["content"][0]}))
    events.append(("response.output_item.done", {"output_index": 0, "item": item}))
    done = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    events.append((done, {"response": response}))
    if malformed:  # an event no server sends: its output_index is not a number
        events.insert(3, ("response.output_text.delta", {"output_index": "first", "delta": 5}))
    return [_sse(kind, {**data, "sequence_number": n}) for n, (kind, data) in enumerate(events)]


# --- the Messages API ----------------------------------------------------------------------------------


def messages_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    system = _text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        role, content = message.get("role", "user"), message.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in content if isinstance(content, list) else ():
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use":
                arguments = _json_text(block.get("input", {}))
                function = {"name": block.get("name"), "arguments": arguments}
                calls.append({"id": block.get("id"), "type": "function", "function": function})
            elif kind == "tool_result":
                result = block.get("content")
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": block.get("tool_use_id"),
                        "content": _text(result) if not isinstance(result, dict) else _json_text(result),
                    }
                )
        if calls:
            messages.append({"role": "assistant", "content": "\n".join(texts) or None, "tool_calls": calls})
        elif texts:
            messages.append({"role": role, "content": "\n".join(texts)})
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    tools = [
        {"type": "function", "function": {"name": t["name"], "parameters": t.get("input_schema") or {}}}
        for t in body.get("tools") or ()
        if isinstance(t, dict) and isinstance(t.get("name"), str) and "input_schema" in t
    ]
    if tools:
        out["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in ("auto", "any", "none"):
            out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": fmt.get("schema")},
        }
    if isinstance(body.get("max_tokens"), int):
        out["max_tokens"] = body["max_tokens"]
    return _common(body, out)


def message_object(model: str, g: Generation, usage: dict[str, Any]) -> dict[str, Any]:
    if g.tool_name is not None:
        try:
            given: Any = orjson.loads(g.text)
        except orjson.JSONDecodeError:
            given = g.text  # arguments that are not JSON (the bad_args knob): a shape no server should send
        content: list[dict[str, Any]] = [
            {"type": "tool_use", "id": f"toolu_{_hex()}", "name": g.tool_name, "input": given}
        ]
        stop = "tool_use"
    else:
        content = [{"type": "text", "text": g.text}]
        stop = "max_tokens" if g.finish_reason == "length" else "end_turn"
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "id": f"msg_{_hex()}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {  # Anthropic counts cached prompt tokens apart from input_tokens
            "input_tokens": usage["prompt_tokens"] - cached,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
            "output_tokens": usage["completion_tokens"],
        },
    }


def message_events(message: dict[str, Any], g: Generation, malformed: bool = False) -> list[bytes]:
    """message_start, one content block's start, deltas and stop, message_delta (stop_reason, usage),
    message_stop: the events Anthropic's SDK reads (by their event names)."""
    block = message["content"][0]
    usage = message["usage"]
    opening = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {"message": opening})]
    if block["type"] == "tool_use":
        start = {**block, "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in g.pieces]
    else:
        start = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": p} for p in g.pieces]
    events.append(("content_block_start", {"index": 0, "content_block": start}))
    events.append(("ping", {}))
    events += [("content_block_delta", {"index": 0, "delta": d}) for d in deltas]
    events.append(("content_block_stop", {"index": 0}))
    events.append(
        (
            "message_delta",
            {
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
    )
    events.append(("message_stop", {}))
    if malformed:  # an event no server sends: its block index is not a number
        events.insert(
            2, ("content_block_delta", {"index": "first", "delta": {"type": "text_delta", "text": 5}})
        )
    return [_sse(kind, data) for kind, data in events]


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }
    return {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}
