"""What a simulated checkpoint says: text, JSON, schema instances and tool calls, with failure knobs."""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any

WORDS = [
    "the",
    "model",
    "reviewed",
    "your",
    "request",
    "and",
    "found",
    "a",
    "clear",
    "answer",
    "based",
    "on",
    "the",
    "context",
    "provided",
    "please",
    "note",
    "that",
    "results",
    "may",
    "vary",
    "with",
    "more",
    "detail",
    "we",
    "can",
    "refine",
    "this",
    "further",
    "for",
    "you",
    "here",
    "is",
    "a",
    "short",
    "summary",
    "of",
    "the",
    "key",
    "points",
    "and",
    "the",
    "next",
    "steps",
    "to",
    "take",
    "today",
]


@dataclass(frozen=True)
class Knobs:
    """Behaviour of one simulated model; every rate is a probability in [0, 1]."""

    latency_s: float = 0.0  # before the first token (streams) or the response
    time_per_token_s: float = 0.0
    output_tokens: int = 16  # completion length when max_tokens does not cut it
    error_rate: float = 0.0
    error_status: int = 500
    invalid_json_rate: float = 0.0  # JSON mode: truncated, unparseable content
    schema_mismatch_rate: float = 0.0  # JSON mode: valid JSON that breaks the requested schema
    ignore_tool_choice_rate: float = (
        0.0  # calls a tool when told not to, or answers in words when told to call
    )
    wrong_tool_rate: float = 0.0  # calls a tool the request did not declare
    bad_args_rate: float = 0.0  # tool arguments that are not valid JSON
    args_mismatch_rate: float = 0.0  # tool arguments that parse but break the tool's schema
    hang_rate: float = 0.0  # accept the request, never answer
    malformed_rate: float = 0.0  # an answer not shaped like OpenAI's (choices: 5, a tool name as a list, ...)
    break_after_done_rate: float = 0.0  # a stream that sends [DONE], then drops the connection uncleanly
    keepalive_first: bool = False  # a stream opens with an SSE comment (`: keepalive`) before latency_s
    repeat_tool_fields: bool = False  # every tool-call delta repeats its id and name (as llama.cpp does)
    done_delay_s: float = 0.0  # [DONE] goes out, and the stream ends this much later, in a write of its own
    embedding_dim: int = 16
    # The share of answers that do the task: the others look fine (fluent, valid JSON, a declared tool)
    # but ignore it. A simulated judge tells them apart (see judge_answer).
    quality: float = 1.0
    judge_prefers_first: float = 0.0  # as a judge: the share of pairwise verdicts that say "A" regardless
    # Agents (a conversation whose tool results say which tool comes next, see agent_call): after the last
    # tool says it is done, call it again this many times before answering; at this model call of the
    # conversation (1: the first), call another declared tool than the right one.
    extra_steps: int = 0
    wrong_tool_at_step: int = 0
    cached_prompt_share: float = 0.0  # usage reports this share of the prompt as cached (prefix caching)
    reasoning_tokens: int = 0  # usage reports this many reasoning tokens, within completion_tokens

    def __post_init__(self) -> None:
        rates = (
            "error_rate",
            "invalid_json_rate",
            "schema_mismatch_rate",
            "ignore_tool_choice_rate",
            "wrong_tool_rate",
            "bad_args_rate",
            "hang_rate",
            "malformed_rate",
            "break_after_done_rate",
            "quality",
            "judge_prefers_first",
            "cached_prompt_share",
        )
        for name in rates:
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if not 400 <= self.error_status <= 599:
            raise ValueError(f"error_status must be an HTTP error status, got {self.error_status}")
        if (
            self.latency_s < 0
            or self.done_delay_s < 0
            or self.time_per_token_s < 0
            or self.output_tokens < 1
            or self.embedding_dim < 1
            or self.extra_steps < 0
            or self.wrong_tool_at_step < 0
            or self.reasoning_tokens < 0
        ):
            raise ValueError(
                "latency_s, time_per_token_s, extra_steps and wrong_tool_at_step must be >= 0; "
                "output_tokens and embedding_dim >= 1"
            )


@dataclass
class Generation:
    """One choice: the pieces a stream would send, and how the answer ends."""

    pieces: list[str] = field(default_factory=list)
    tool_name: str | None = None
    tool_call_id: str | None = None
    legacy_function: bool = False
    finish_reason: str = "stop"

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def rng_for(request: dict[str, Any], model: str, prompt: str) -> random.Random:
    seed = request.get("seed")
    temperature = request.get("temperature", 1.0)
    if isinstance(seed, int):
        return random.Random(f"{model}:{seed}:{prompt}")
    if temperature == 0:
        return random.Random(f"{model}:{prompt}")
    return random.Random()


def prompt_text(request: dict[str, Any]) -> str:
    parts: list[str] = []
    messages = request.get("messages")
    for message in messages if isinstance(messages, list) else []:  # e.g. a stray field on completions
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list):
        parts.extend(p for p in prompt if isinstance(p, str))
    return "\n".join(parts)


def count_tokens(text: str) -> int:
    return max(1, len(text.split())) if text else 0


def chat(request: dict[str, Any], knobs: Knobs, rng: random.Random) -> Generation:
    verdict = judge_answer(request, knobs, rng)
    if verdict is not None:
        return Generation(pieces=_split(verdict, 8))
    good = knobs.quality >= 1 or rng.random() < knobs.quality  # no draw at 1: seeded answers stay the same
    call = agent_call(request, knobs)
    if call is None:
        call = _tool_to_call(request, rng, rng.random() < knobs.ignore_tool_choice_rate, good)
    if call is not None and knobs.wrong_tool_at_step and knobs.wrong_tool_at_step == model_call(request):
        call = _another_tool(request, call, rng)
    if call is not None:
        name, parameters, legacy = call
        return _tool_call(name, parameters, legacy, knobs, rng)
    marker = task_marker(prompt_text(request)) if good else None
    fmt = request.get("response_format") or {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_object", "json_schema"):
        schema: Any = (fmt.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
        value = (
            instance(schema, rng)
            if isinstance(schema, dict)
            else {"answer": _words(rng, 6), "confidence": 0.9}
        )
        text_field = (
            next((k for k, v in value.items() if isinstance(v, str)), None)
            if isinstance(value, dict)
            else None
        )
        if marker is not None and text_field is not None:
            value[text_field] = f"{marker} {value[text_field]}"
        if rng.random() < knobs.schema_mismatch_rate:
            value = {"unexpected": True, "note": "this object ignores the requested schema"}
        content = json.dumps(value)
        if rng.random() < knobs.invalid_json_rate:
            content = content[: max(1, len(content) * 2 // 3)]
        return Generation(pieces=_split(content, 4))
    answer = text(request, knobs, rng)
    if marker is not None:
        answer.pieces[0] = marker  # the same length; the first word now answers this prompt
    return answer


def text(request: dict[str, Any], knobs: Knobs, rng: random.Random) -> Generation:
    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    count = knobs.output_tokens
    finish = "stop"
    if isinstance(limit, int) and 0 < limit < count:
        count, finish = limit, "length"
    words = [rng.choice(WORDS) for _ in range(count)]
    return Generation(pieces=[w if i == 0 else " " + w for i, w in enumerate(words)], finish_reason=finish)


def _tool_to_call(
    request: dict[str, Any], rng: random.Random, defy: bool = False, good: bool = True
) -> tuple[str, dict[str, Any], bool] | None:
    """The tool the model calls, if any; defy makes it do the opposite of what tool_choice says. Unless
    tool_choice names one, the right tool for the prompt (right_tool); not good: another declared one."""
    messages = request.get("messages") or []
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") in ("tool", "function"):
        return None  # the tool already answered: reply in words
    tools = [t["function"] for t in request.get("tools") or [] if isinstance(t, dict) and "function" in t]
    choice = request.get("tool_choice", "auto")
    legacy = False
    if not tools and request.get("functions"):
        tools, choice, legacy = list(request["functions"]), request.get("function_call", "auto"), True
    if not tools:
        return None
    if defy:
        if choice == "none":
            picked = rng.choice(tools)
            return picked["name"], picked.get("parameters") or {}, legacy
        if choice == "required" or isinstance(choice, dict):
            return None
    if choice == "none":
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name") or choice.get("name")
        named = [t for t in tools if t.get("name") == wanted]
        if named:
            return named[0]["name"], named[0].get("parameters") or {}, legacy
    index = right_tool(prompt_text(request), len(tools))
    if not good and len(tools) > 1:
        index = (index + 1 + rng.randrange(len(tools) - 1)) % len(tools)
    picked = tools[index]
    return picked["name"], picked.get("parameters") or {}, legacy


def model_call(request: dict[str, Any]) -> int:
    """Which model call of its conversation this is: 1 + the assistant turns it already holds."""
    messages = request.get("messages") or []
    return 1 + sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")


def agent_call(request: dict[str, Any], knobs: Knobs) -> tuple[str, dict[str, Any], bool] | None:
    """An agent's next tool, read from the last tool result: {"next": NAME} calls that tool; {"done":
    true} answers in words, unless knobs.extra_steps says to call the same tool again first. None when
    the last message is no tool result naming either (the usual rules then apply)."""
    messages = request.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else None
    if last is None or last.get("role") != "tool":
        return None
    result = _json_content(last)
    if result is None:
        return None
    tools = {t["function"]["name"]: t["function"] for t in request.get("tools") or [] if _function(t)}
    wanted = result.get("next")
    if result.get("done") is True:
        done = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "tool" and _done(m))
        wanted = _last_called(messages) if done <= knobs.extra_steps else None
        if wanted is None:
            return None
    if not isinstance(wanted, str) or wanted not in tools:
        return None
    return wanted, tools[wanted].get("parameters") or {}, False


def _another_tool(
    request: dict[str, Any], call: tuple[str, dict[str, Any], bool], rng: random.Random
) -> tuple[str, dict[str, Any], bool]:
    others = [
        t["function"] for t in request.get("tools") or [] if _function(t) and t["function"]["name"] != call[0]
    ]
    if not others:
        return call
    picked = rng.choice(others)
    return picked["name"], picked.get("parameters") or {}, call[2]


def _function(tool: Any) -> bool:
    return isinstance(tool, dict) and isinstance(tool.get("function"), dict) and "name" in tool["function"]


def _json_content(message: dict[str, Any]) -> dict[str, Any] | None:
    content = message.get("content")
    if not isinstance(content, str):
        return None
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _done(message: dict[str, Any]) -> bool:
    result = _json_content(message)
    return result is not None and result.get("done") is True


def _last_called(messages: list[Any]) -> str | None:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "assistant" and message.get("tool_calls"):
            calls = message["tool_calls"]
            if isinstance(calls, list) and calls and isinstance(calls[-1], dict):
                function = calls[-1].get("function")
                name = function.get("name") if isinstance(function, dict) else None
                return name if isinstance(name, str) else None
    return None


def task_marker(prompt: str) -> str:
    """The word an answer that does the task carries: it depends on the prompt, so an answer that ignores
    the task (or answers another prompt) cannot have it."""
    return "re-" + sha256(prompt.encode()).hexdigest()[:8]


def right_tool(prompt: str, count: int) -> int:
    """The index of the declared tool that is right for this prompt."""
    return int(sha256(prompt.encode()).hexdigest()[8:16], 16) % count


JUDGE_SCHEMAS = ("canarygate_rubric", "canarygate_pairwise")


def judge_answer(request: dict[str, Any], knobs: Knobs, rng: random.Random) -> str | None:
    """As a judge: the verdict on a canarygate judge prompt (None for any other request), read from what
    the simulator generates. An answer does the task when it carries the prompt's task marker, or calls
    the prompt's right tool; a rubric scores 5 or 1, a pairwise verdict prefers the one that does."""
    fmt = request.get("response_format")
    schema = fmt.get("json_schema") if isinstance(fmt, dict) else None
    name = schema.get("name") if isinstance(schema, dict) else None
    if name not in JUDGE_SCHEMAS:
        return None
    asked = prompt_text(request)
    original = _tagged(asked, "request")
    try:
        conversation = json.loads(original or "")
    except ValueError:
        conversation = None
    if not isinstance(conversation, dict):
        verdict: dict[str, Any] = {"reason": "the request could not be read", "score": 3, "winner": "tie"}
    elif name == "canarygate_rubric":
        good = _does_task(conversation, _tagged(asked, "answer") or "")
        verdict = {"reason": "does the task" if good else "ignores the task", "score": 5 if good else 1}
    else:
        a = _does_task(conversation, _tagged(asked, "answer_a") or "")
        b = _does_task(conversation, _tagged(asked, "answer_b") or "")
        winner = "tie" if a == b else "A" if a else "B"
        if rng.random() < knobs.judge_prefers_first:
            winner = "A"
        verdict = {"reason": f"A {'does' if a else 'ignores'} the task, B {'does' if b else 'ignores'} it",
                   "winner": winner}  # fmt: skip
    keys = ("reason", "score") if name == "canarygate_rubric" else ("reason", "winner")
    return json.dumps({k: verdict[k] for k in keys})


def _as_chat(conversation: dict[str, Any]) -> dict[str, Any]:
    """A Responses or Messages request (as the judge prompt shows it) read as the chat request it means:
    what the simulator answered it from."""
    from gateway import simulated_apis  # it builds on this module

    tools = conversation.get("tools")
    if "input" in conversation or "instructions" in conversation:
        return simulated_apis.responses_to_chat(conversation, [])
    if "system" in conversation or (
        isinstance(tools, list) and any(isinstance(t, dict) and "input_schema" in t for t in tools)
    ):
        return simulated_apis.messages_to_chat(conversation)
    return conversation


def _tagged(text: str, tag: str) -> str | None:
    start, end = text.find(f"<{tag}>\n"), text.find(f"\n</{tag}>")
    return text[start + len(tag) + 3 : end] if start >= 0 and end > start else None


def _does_task(conversation: dict[str, Any], answer: str) -> bool:
    conversation = _as_chat(conversation)
    prompt = prompt_text(conversation)
    tools = [
        t["function"] for t in conversation.get("tools") or [] if isinstance(t, dict) and "function" in t
    ]
    if tools and answer.startswith("["):  # tool calls, as JSON
        try:
            calls = json.loads(answer)
        except ValueError:
            return False
        called = calls[0].get("function", {}).get("name") if calls and isinstance(calls[0], dict) else None
        return bool(called == tools[right_tool(prompt, len(tools))].get("name"))
    return task_marker(prompt) in answer


def _tool_call(
    name: str, parameters: dict[str, Any], legacy: bool, knobs: Knobs, rng: random.Random
) -> Generation:
    args: Any = instance(parameters, rng) if parameters else {}
    arguments = json.dumps(args)
    if rng.random() < knobs.wrong_tool_rate:
        name = f"{name}_undeclared"
    if rng.random() < knobs.args_mismatch_rate:
        first = next(iter(args), "value") if isinstance(args, dict) else "value"
        broken = {k: v for k, v in args.items() if k != first} if isinstance(args, dict) else {}
        broken[first + "_x"] = [1, 2]  # a declared key gone, an unexpected one added
        arguments = json.dumps(broken)
    if rng.random() < knobs.bad_args_rate:
        arguments = arguments[: max(1, len(arguments) // 2)]  # does not parse
    return Generation(
        pieces=_split(arguments, 6),
        tool_name=name,
        tool_call_id=f"call_{uuid.UUID(int=rng.getrandbits(128)).hex[:24]}",
        legacy_function=legacy,
        finish_reason="function_call" if legacy else "tool_calls",
    )


def instance(schema: dict[str, Any], rng: random.Random, depth: int = 0) -> Any:
    """A value that satisfies the common subset of JSON Schema that LLM structured output uses."""
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return instance(schema[key][0], rng, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if depth > 8:
        kind = "null" if kind in ("object", "array") else kind
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: instance(v if isinstance(v, dict) else {}, rng, depth + 1) for k, v in props.items()}
    if kind == "array":
        items: dict[str, Any] = schema["items"] if isinstance(schema.get("items"), dict) else {}
        return [instance(items, rng, depth + 1) for _ in range(max(1, int(schema.get("minItems", 1))))]
    if kind == "integer":
        low, high = int(schema.get("minimum", 0)), int(schema.get("maximum", 100))
        return rng.randint(low, max(low, high))
    if kind == "number":
        lowf, highf = float(schema.get("minimum", 0)), float(schema.get("maximum", 100))
        return round(rng.uniform(lowf, max(lowf, highf)), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    word = rng.choice(WORDS)
    return word * max(1, -(-int(schema.get("minLength", 0)) // len(word)))


def embedding(text: str, model: str, dim: int) -> list[float]:
    raw = b""
    counter = 0
    while len(raw) < dim:
        raw += sha256(f"{model}:{counter}:{text}".encode()).digest()
        counter += 1
    vector = [(b - 127.5) / 127.5 for b in raw[:dim]]
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [v / norm for v in vector]


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def _split(data: str, size: int) -> list[str]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [""]
