"""The evaluators that need no judge: tool selection, regex, contains, max_length and json_path, each a
pure function of an answer (and, for tool selection, of the base's answer or the expected tool)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jsonpath
import orjson

from gateway.policy import Evaluator

MAX_TEXT = 64 * 1024  # what a regex or a search reads of an answer: bounded work on the event loop


@dataclass(frozen=True, slots=True)
class Result:
    """One evaluation: a score in [0, 1], a low-cardinality label, and why."""

    evaluator: str
    score: float
    label: str
    explanation: str = ""


def message_of(answer: dict[str, Any] | None) -> dict[str, Any]:
    """The first choice's message (a completion's text as its content)."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        if isinstance(choice.get("message"), dict):
            return dict(choice["message"])
        if isinstance(choice.get("text"), str):
            return {"content": choice["text"]}
    return {}


def text_of(answer: dict[str, Any] | None) -> str:
    """The answer's words: its content (text parts joined), else its tool calls as JSON."""
    message = message_of(answer)
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    if isinstance(content, str) and content:
        return content
    calls = tools_called(answer)
    return orjson.dumps(message.get("tool_calls") or message.get("function_call")).decode() if calls else ""


def tools_called(answer: dict[str, Any] | None) -> list[str]:
    """The names of the tools the answer calls, in order."""
    message = message_of(answer)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        return [
            str(c["function"].get("name"))
            for c in calls
            if isinstance(c, dict) and isinstance(c.get("function"), dict)
        ]
    if isinstance(message.get("function_call"), dict):
        return [str(message["function_call"].get("name"))]
    return []


@lru_cache(maxsize=256)
def compile_path(path: str) -> tuple[Any, str | None]:
    """(the compiled JSONPath, None), or (None, what is wrong with it)."""
    try:
        return jsonpath.compile(path), None
    except jsonpath.JSONPathError as exc:
        return None, str(exc).splitlines()[0]


@lru_cache(maxsize=256)
def _pattern(pattern: str, case_sensitive: bool) -> re.Pattern[str]:
    return re.compile(pattern, 0 if case_sensitive else re.IGNORECASE)


def check(evaluator: Evaluator, answer: dict[str, Any], payload: dict[str, Any]) -> Result | None:
    """A single-answer check; None when it does not apply (no expected tool named, say)."""
    name, kind = evaluator.name, evaluator.kind
    if kind == "max_length":
        return _max_length(evaluator, answer)
    if kind == "tool_selection":
        expected = _expected_tool(evaluator, payload)
        return tool_choice(name, answer, expected) if expected is not None else None
    text = text_of(answer)[:MAX_TEXT]
    if kind == "regex":
        assert evaluator.pattern is not None
        found = _pattern(evaluator.pattern, evaluator.case_sensitive).search(text) is not None
        return _expected(name, found, evaluator.expect, ("matches the pattern", "does not match the pattern"))
    if kind == "contains":
        assert evaluator.text is not None
        haystack = text if evaluator.case_sensitive else text.casefold()
        hits = [t for t in evaluator.text if (t if evaluator.case_sensitive else t.casefold()) in haystack]
        said = (f"contains {hits[0]!r}" if hits else "", "contains none of the texts")
        return _expected(name, bool(hits), evaluator.expect, said)
    if kind == "json_path":
        return _json_path(evaluator, text)
    raise ValueError(f"{kind} is not a deterministic check")


def tool_choice(name: str, answer: dict[str, Any] | None, expected: str) -> Result:
    """Is the first tool the answer calls the expected one?"""
    called = tools_called(answer)
    ok = called[:1] == [expected]
    shown = called[0] if called else "no tool"
    return Result(name, float(ok), "correct" if ok else "incorrect", f"called {shown}, expected {expected}")


def same_tools(
    evaluator: Evaluator, payload: dict[str, Any], base: dict[str, Any], other: dict[str, Any]
) -> Result | None:
    """tool_selection on a pair: does the other answer call the tools the base's does? None when the request
    declares no tools (there was nothing to choose)."""
    if not payload.get("tools") and not payload.get("functions"):
        return None
    wanted, called = tools_called(base), tools_called(other)
    ok = wanted == called
    why = f"called {', '.join(called) or 'no tool'}; the base called {', '.join(wanted) or 'no tool'}"
    return Result(evaluator.name, float(ok), "same_tool" if ok else "other_tool", why)


def _expected(name: str, found: bool, expect: bool, said: tuple[str, str]) -> Result:
    ok = found == expect
    return Result(name, float(ok), "pass" if ok else "fail", f"the answer {said[0] if found else said[1]}")


def _max_length(evaluator: Evaluator, answer: dict[str, Any]) -> Result:
    problems = []
    if evaluator.max_chars is not None:
        chars = len(text_of(answer))
        if chars > evaluator.max_chars:
            problems.append(f"{chars} characters, at most {evaluator.max_chars}")
    if evaluator.max_tokens is not None:
        usage = answer.get("usage")
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if isinstance(tokens, int) and tokens > evaluator.max_tokens:
            problems.append(f"{tokens} output tokens, at most {evaluator.max_tokens}")
    if problems:
        return Result(evaluator.name, 0.0, "fail", "; ".join(problems))
    return Result(evaluator.name, 1.0, "pass", "within the length")


def _json_path(evaluator: Evaluator, text: str) -> Result:
    assert evaluator.path is not None
    compiled, _ = compile_path(evaluator.path)
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError:
        return Result(evaluator.name, 0.0, "fail", "the answer is not JSON")
    values = compiled.findall(document)
    if "equals" in evaluator.model_fields_set:
        found = any(v == evaluator.equals for v in values)
        what = f"holds {orjson.dumps(evaluator.equals).decode()} at {evaluator.path}"
    else:
        found = bool(values)
        what = f"has {evaluator.path}"
    ok = found == evaluator.expect
    return Result(
        evaluator.name, float(ok), "pass" if ok else "fail", f"the answer {'' if found else 'never '}{what}"
    )


def _expected_tool(evaluator: Evaluator, payload: dict[str, Any]) -> str | None:
    assert evaluator.expected_from is not None
    field = evaluator.expected_from.partition(":")[2]
    metadata = payload.get("metadata")
    value = metadata.get(field) if isinstance(metadata, dict) else None
    return value if isinstance(value, str) and value else None
