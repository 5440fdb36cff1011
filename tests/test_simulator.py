"""The simulated model server speaks OpenAI's shapes and its knobs do what they say."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.cli import _model_knobs
from gateway.server import BackgroundServer
from gateway.simulator import Simulator
from gateway.synth import Knobs, instance

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["query", "limit"],
            },
        },
    }
]
ASK = [{"role": "user", "content": "find shoes"}]


@pytest.fixture
def sim() -> Iterator[tuple[Simulator, openai.OpenAI, str]]:
    simulator = Simulator()
    with BackgroundServer(simulator.app()) as server:
        yield simulator, openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0), server.url


def test_chat_shapes_and_usage(sim) -> None:  # type: ignore[no-untyped-def]
    _, client, _ = sim
    completion = client.chat.completions.create(model="m", messages=ASK, n=2, temperature=0, max_tokens=4)
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    again = client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=4)
    assert again.choices[0].message.content == completion.choices[0].message.content  # deterministic at T=0


def test_streamed_tool_call_deltas(sim) -> None:  # type: ignore[no-untyped-def]
    _, client, _ = sim
    chunks = list(
        client.chat.completions.create(
            model="m", messages=ASK, tools=TOOLS, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    first_call = next(
        c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls
    )
    assert first_call.id and first_call.type == "function" and first_call.function.name == "search"
    arguments = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
    )
    assert set(json.loads(arguments)) == {"query", "limit"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_legacy_function_call_and_tool_choice_none(sim) -> None:  # type: ignore[no-untyped-def]
    _, client, _ = sim
    legacy = client.chat.completions.create(model="m", messages=ASK, functions=[TOOLS[0]["function"]])
    assert legacy.choices[0].message.function_call is not None
    assert legacy.choices[0].finish_reason == "function_call"
    words = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none")
    assert words.choices[0].message.tool_calls is None and words.choices[0].message.content


def test_failure_knobs(sim) -> None:  # type: ignore[no-untyped-def]
    simulator, client, _ = sim

    def first_call(**extra: Any) -> Any:
        calls = client.chat.completions.create(model="m", messages=ASK, **extra).choices[0].message.tool_calls
        return (calls or [None])[0]

    def content(**extra: Any) -> str:
        return (
            client.chat.completions.create(model="m", messages=ASK, **extra).choices[0].message.content or ""
        )

    simulator.default = Knobs(invalid_json_rate=1)
    with pytest.raises(json.JSONDecodeError):
        json.loads(content(response_format={"type": "json_object"}))
    simulator.default = Knobs(schema_mismatch_rate=1)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert "a" not in json.loads(
        content(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    )
    simulator.default = Knobs(wrong_tool_rate=1, args_mismatch_rate=1)
    call = first_call(tools=TOOLS)
    assert call.function.name == "search_undeclared"
    assert not {"query", "limit"} <= json.loads(call.function.arguments).keys()
    simulator.default = Knobs(bad_args_rate=1)
    with pytest.raises(json.JSONDecodeError):
        json.loads(first_call(tools=TOOLS).function.arguments)
    simulator.default = Knobs(ignore_tool_choice_rate=1)
    assert first_call(tools=TOOLS, tool_choice="required") is None
    assert first_call(tools=TOOLS, tool_choice="none") is not None


def test_per_model_knobs_and_live_changes(sim) -> None:  # type: ignore[no-untyped-def]
    simulator, client, url = sim
    simulator.models["tuned"] = Knobs(error_rate=1, error_status=502)
    assert client.chat.completions.create(model="base", messages=ASK).choices
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="tuned", messages=ASK)
    assert failed.value.status_code == 502
    response = httpx.put(f"{url}/sim/knobs", json={"models": {"tuned": {"error_rate": 0}}})
    assert response.json()["models"]["tuned"]["error_rate"] == 0
    assert client.chat.completions.create(model="tuned", messages=ASK).choices
    bad = httpx.put(f"{url}/sim/knobs", json={"default": {"error_rate": 3}})
    assert bad.status_code == 400 and "within [0, 1]" in bad.json()["error"]["message"]
    assert httpx.put(f"{url}/sim/knobs", json={"default": {"nope": 1}}).status_code == 400


def test_embeddings_formats(sim) -> None:  # type: ignore[no-untyped-def]
    _, client, url = sim
    assert len(client.embeddings.create(model="e", input="hi", dimensions=8).data[0].embedding) == 8
    floats = httpx.post(
        f"{url}/v1/embeddings", json={"model": "e", "input": ["a", "b"], "encoding_format": "float"}
    )
    vectors = [d["embedding"] for d in floats.json()["data"]]
    assert len(vectors) == 2 and abs(sum(v * v for v in vectors[0]) - 1) < 1e-9


def test_schema_instances_satisfy_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 12},
            "n": {"type": "integer", "minimum": 5, "maximum": 9},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2},
            "kind": {"const": "x"},
            "maybe": {"type": ["null", "number"]},
            "nested": {"properties": {"ok": {"type": "boolean"}}},
        },
    }
    value = instance(schema, random.Random(1))
    assert len(value["name"]) >= 12 and 5 <= value["n"] <= 9
    assert len(value["tags"]) == 2 and set(value["tags"]) <= {"a", "b"}
    assert (
        value["kind"] == "x" and isinstance(value["maybe"], float) and isinstance(value["nested"]["ok"], bool)
    )


def test_knob_parsing_for_the_cli() -> None:
    name, knobs = _model_knobs("tuned:invalid_json_rate=0.25,latency_s=0.5", Knobs(output_tokens=7))
    assert name == "tuned" and knobs == Knobs(invalid_json_rate=0.25, latency_s=0.5, output_tokens=7)
    with pytest.raises(ValueError, match="unknown knob"):
        _model_knobs("tuned:speed=1", Knobs())
    with pytest.raises(ValueError, match="within"):
        _model_knobs("tuned:error_rate=2", Knobs())


def test_the_prompt_is_read_from_any_request_shape_without_failing() -> None:
    from gateway import synth

    for body in (
        {"messages": 1.5, "prompt": "p"},
        {"messages": [{"content": [{"text": 5}, {"text": "a"}, "x"]}, 7]},
        {"prompt": ["a", 3, None]},
        {"messages": "text", "prompt": {"x": 1}},
    ):
        assert isinstance(synth.prompt_text(body), str)
    assert synth.prompt_text({"messages": 1.5, "prompt": "p"}) == "p"
