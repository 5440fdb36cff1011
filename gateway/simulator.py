"""A simulated OpenAI-compatible model server (vLLM-shaped) with failure knobs, for tests, demo and bench.

The server as a whole may list served_models (then it answers 404 "model does not exist" for any other,
as vLLM does), require an api_key (401 otherwise), refuse an x-request-id that is not a UUID (400, as
llama-cpp-python does: uuid_request_ids), and stop a running stream when another request arrives
(interrupt, as llama-cpp-python does by default: the stream ends at once, without a finish_reason).
Knobs are set per instance and per model name, and
per "MODEL@PROFILE" for requests whose body says
`metadata: {sim_profile: PROFILE}` (one intent or tenant behaving differently); `metadata: {sim_stamp:
true}` puts the send time before each streamed event as an SSE comment (`: sent <unix time>`), which
clients ignore, so a benchmark can time every chunk's trip. GET/PUT /sim/knobs
changes them live, /sim/stats and /sim/requests show what arrived (tests use them to see what the
gateway really sent upstream).
"""

from __future__ import annotations

import asyncio
import base64
import random
import struct
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, fields, replace
from functools import partial
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway import simulated_apis, synth
from gateway.synth import Generation, Knobs

STORED = 10_000  # stored responses kept (the oldest go first)


class Simulator:
    def __init__(
        self,
        default: Knobs | None = None,
        models: dict[str, Knobs] | None = None,
        served_models: list[str] | None = None,
        api_key: str | None = None,
        interrupt: bool = False,
        uuid_request_ids: bool = False,
    ) -> None:
        self.interrupt = interrupt
        self.uuid_request_ids = uuid_request_ids
        self.arrivals = 0  # requests admitted so far: a stream that sees it move on was interrupted
        self.default = default or Knobs()
        self.models: dict[str, Knobs] = dict(models or {})
        self.served_models = served_models or []  # when set, the only model names answered
        self.api_key = api_key  # when set, requests must carry it as a bearer token
        self.requests: Counter[str] = Counter()
        self.streams = Counter({"started": 0, "completed": 0, "cancelled": 0, "interrupted": 0})
        self.active_streams = 0
        self.hangs = Counter({"started": 0, "released": 0})
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)
        # Stored responses (the Responses API's state): id -> the conversation it leaves, as chat messages.
        self.stored: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.answers: dict[str, dict[str, Any]] = {}  # stored responses as GET /v1/responses/{id} reads them
        self.conversations: dict[str, list[dict[str, Any]]] = {}

    def knobs(self, model: str, body: dict[str, Any] | None = None) -> Knobs:
        metadata = body.get("metadata") if body is not None else None
        profile = metadata.get("sim_profile") if isinstance(metadata, dict) else None
        if isinstance(profile, str) and f"{model}@{profile}" in self.models:
            return self.models[f"{model}@{profile}"]
        return self.models.get(model, self.default)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/responses/{rid}", self._stored, methods=["GET", "DELETE"]),
                Route("/v1/responses/{rid}/cancel", self._stored, methods=["POST"]),
                Route("/v1/responses/{rid}/input_items", self._stored, methods=["GET"]),
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/sim/knobs", self._get_knobs, methods=["GET"]),
                Route("/sim/knobs", self._put_knobs, methods=["PUT"]),
                Route("/sim/stats", self._stats, methods=["GET"]),
                Route("/sim/requests", self._recent, methods=["GET"]),
                Route("/sim/reset", self._reset, methods=["POST"]),
            ]
        )

    # --- OpenAI endpoints -------------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        body, failure = await self._admit(request, "chat", "messages")
        if failure is not None:
            return failure
        model, knobs = body["model"], self.knobs(body["model"], body)
        prompt = synth.prompt_text(body)
        rng = synth.rng_for(body, model, prompt)
        n = body["n"] if isinstance(body.get("n"), int) and body["n"] > 0 else 1
        choices = [synth.chat(body, knobs, rng) for _ in range(min(n, 16))]
        usage = _usage(prompt, choices, knobs)
        malformed = rng.random() < knobs.malformed_rate
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = _chat_chunks(model, choices, usage if include_usage else None, knobs.repeat_tool_fields)
            return self._stream(
                request, _malform_chunks(chunks, rng) if malformed else chunks, knobs, _stamped(body)
            )
        await asyncio.sleep(knobs.latency_s + knobs.time_per_token_s * usage["completion_tokens"])
        answer = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [_chat_choice(i, g) for i, g in enumerate(choices)],
            "usage": usage,
        }
        return _json(_malform(answer, rng) if malformed else answer)

    async def _completions(self, request: Request) -> Response:
        body, failure = await self._admit(request, "completions", "prompt")
        if failure is not None:
            return failure
        model, knobs = body["model"], self.knobs(body["model"], body)
        prompt = synth.prompt_text(body)
        choices = [synth.text(body, knobs, synth.rng_for(body, model, prompt))]
        usage = _usage(prompt, choices)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._stream(
                request,
                _completion_chunks(model, choices, usage if include_usage else None),
                knobs,
                _stamped(body),
            )
        await asyncio.sleep(knobs.latency_s + knobs.time_per_token_s * usage["completion_tokens"])
        return _json(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "usage": usage,
                "choices": [
                    {
                        "index": 0,
                        "text": choices[0].text,
                        "logprobs": None,
                        "finish_reason": choices[0].finish_reason,
                    }
                ],
            }
        )

    async def _embeddings(self, request: Request) -> Response:
        body, failure = await self._admit(request, "embeddings", "input")
        if failure is not None:
            return failure
        model, knobs = body["model"], self.knobs(body["model"], body)
        raw = body["input"]
        inputs = (
            [raw]
            if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int))
            else raw
        )
        dim: int = body["dimensions"] if isinstance(body.get("dimensions"), int) else knobs.embedding_dim
        await asyncio.sleep(knobs.latency_s)
        data = []
        tokens = 0
        for index, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += synth.count_tokens(text)
            vector = synth.embedding(text, model, dim)
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        return _json(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _responses(self, request: Request) -> Response:
        """OpenAI's Responses API, with its state: a stored response (store, by default) can be continued
        by previous_response_id, a conversation by its id; an unknown previous response is a 404, as a
        server that never made it answers."""
        body, failure = await self._admit(request, "responses", "model")
        if failure is not None:
            return failure
        model, knobs = body["model"], self.knobs(body["model"], body)
        previous = body.get("previous_response_id")
        conversation = body.get("conversation")
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
        history: list[dict[str, Any]] = []
        if previous is not None:
            if previous not in self.stored:
                return _error(
                    404,
                    f"Previous response with id '{previous}' not found.",
                    "invalid_request_error",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            history = self.stored[previous]
        elif isinstance(conversation, str):
            history = self.conversations.get(conversation, [])
        chat = simulated_apis.responses_to_chat(body, history)
        g, usage, malformed = _generate(chat, model, knobs)
        answer = simulated_apis.response_object(
            model, g, usage, body, conversation if isinstance(conversation, str) else None
        )
        turns = [m for m in chat["messages"] if m.get("role") != "system"] + [
            simulated_apis.assistant_turn(g)
        ]
        if body.get("store", True) is not False:
            self.stored[answer["id"]] = turns
            self.answers[answer["id"]] = answer
            while len(self.stored) > STORED:
                self.answers.pop(self.stored.popitem(last=False)[0], None)
        if isinstance(conversation, str):
            self.conversations[conversation] = turns
        if body.get("background") is True and not body.get("stream"):  # made later: read it by its id
            return _json({**answer, "status": "queued", "output": [], "usage": None})
        events = partial(simulated_apis.response_events, answer, g, malformed)
        return await self._answer(request, body, knobs, usage, answer, events, malformed, "output")

    async def _stored(self, request: Request) -> Response:
        """GET or DELETE a stored response, cancel it, or list its input items: only on the server that
        made it (404 elsewhere)."""
        rid = request.path_params["rid"]
        self.recent.append({"endpoint": "stored", "method": request.method, "path": request.url.path,
                            "headers": dict(request.headers), "body": {}})  # fmt: skip
        answer = self.answers.get(rid)
        if answer is None:
            return _error(
                404, f"Response with id '{rid}' not found.", "invalid_request_error", code="not_found"
            )
        if request.url.path.endswith("/cancel"):
            return _json({**answer, "status": "cancelled"})
        if request.url.path.endswith("/input_items"):
            items = [
                {
                    "type": "message",
                    "role": m["role"],
                    "content": [{"type": "input_text", "text": m["content"]}],
                }
                for m in self.stored.get(rid, [])
                if isinstance(m.get("content"), str) and m["role"] != "assistant"
            ]
            return _json({"object": "list", "data": items, "has_more": False})
        if request.method == "DELETE":
            self.answers.pop(rid, None)
            self.stored.pop(rid, None)
            return _json({"id": rid, "object": "response", "deleted": True})
        return _json(answer)

    async def _messages(self, request: Request) -> Response:
        """Anthropic's Messages API (errors in its shape, x-api-key accepted as the key)."""
        body, failure = await self._admit(request, "messages", "messages")
        if failure is not None:
            return failure
        model, knobs = body["model"], self.knobs(body["model"], body)
        chat = simulated_apis.messages_to_chat(body)
        g, usage, malformed = _generate(chat, model, knobs)
        answer = simulated_apis.message_object(model, g, usage)
        events = partial(simulated_apis.message_events, answer, g, malformed)
        return await self._answer(request, body, knobs, usage, answer, events, malformed, "content")

    async def _answer(
        self,
        request: Request,
        body: dict[str, Any],
        knobs: Knobs,
        usage: dict[str, Any],
        answer: dict[str, Any],
        events: Callable[[], list[bytes]],
        malformed: bool,
        field: str,
    ) -> Response:
        """A Responses or Messages answer, streamed (its API's events, no [DONE]) or whole; malformed: its
        field of items or blocks is a number."""
        if body.get("stream"):
            return self._stream(request, events(), knobs, _stamped(body), done=False)
        await asyncio.sleep(knobs.latency_s + knobs.time_per_token_s * usage["completion_tokens"])
        if malformed:
            answer[field] = 5
        return _json(answer)

    async def _models(self, request: Request) -> Response:
        self.requests["models"] += 1
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided", "authentication_error")
        if not self.served_models:  # like a server that ignores the model name: nothing to list
            return _error(
                404, "this simulated server answers any model name (served_models lists some)", "NotFound"
            )
        return _json(
            {
                "object": "list",
                "data": [
                    {"id": n, "object": "model", "created": 0, "owned_by": "simulator"}
                    for n in self.served_models
                ],
            }
        )

    # --- shared steps -----------------------------------------------------------------------------

    async def _admit(
        self, request: Request, endpoint: str, field: str
    ) -> tuple[dict[str, Any], Response | None]:
        body, failure = await self._admitted(request, endpoint, field)
        if failure is not None and endpoint == "messages" and failure.status_code != 504:
            # Anthropic's error shape: {"type": "error", "error": {"type", "message"}}
            message = orjson.loads(failure.body)["error"]["message"]
            error = simulated_apis.anthropic_error(failure.status_code, message)
            failure = Response(
                orjson.dumps(error),
                status_code=failure.status_code,
                media_type="application/json",
                headers={k: v for k, v in failure.headers.items() if k == "retry-after"},
            )
        return body, failure

    async def _admitted(
        self, request: Request, endpoint: str, field: str
    ) -> tuple[dict[str, Any], Response | None]:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return {}, _error(400, "request body is not valid JSON", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or field not in body:
            return {}, _error(400, f"'model' and '{field}' are required", "invalid_request_error")
        problem = _shape_problem(endpoint, body)
        if problem is not None:  # a real server's request schema refuses these with a 400 too
            return {}, _error(400, problem, "invalid_request_error")
        self.requests[f"{endpoint}:{body['model']}"] += 1
        self.arrivals += 1
        self.recent.append({"endpoint": endpoint, "headers": dict(request.headers), "body": body})
        knobs = self.knobs(body["model"], body)
        rng = random.Random()
        key = request.headers.get("authorization")
        if endpoint == "messages" and key is None and "x-api-key" in request.headers:
            key = f"Bearer {request.headers['x-api-key']}"
        if self.api_key is not None and key != f"Bearer {self.api_key}":
            return body, _error(401, "Incorrect API key provided", "authentication_error")
        given_id = request.headers.get("x-request-id")
        if self.uuid_request_ids and given_id is not None and not _is_uuid(given_id):
            return body, _error(
                400, f"x-request-id must be a UUID, got {given_id[:80]!r}", "invalid_request_error"
            )
        if self.served_models and body["model"] not in self.served_models:
            return body, _error(404, f"The model `{body['model']}` does not exist.", "NotFoundError")
        if rng.random() < knobs.hang_rate:
            self.hangs["started"] += 1
            await _hang(request)
            self.hangs["released"] += 1
            return body, Response(status_code=504)
        if rng.random() < knobs.error_rate:
            await asyncio.sleep(knobs.latency_s)
            kind = "rate_limit_error" if knobs.error_status == 429 else "server_error"
            headers = {"retry-after": "0"} if knobs.error_status == 429 else None
            return body, _error(knobs.error_status, "simulated upstream failure", kind, headers)
        return body, None

    def _stream(
        self, request: Request, chunks: list[bytes], knobs: Knobs, stamp: bool = False, done: bool = True
    ) -> StreamingResponse:
        """done: end with `data: [DONE]` (chat and completions; the Responses and Messages APIs end with
        their own last event)."""
        marker = b"data: [DONE]\n\n" if done else b""
        arrival = self.arrivals
        rng = random.Random()

        async def events() -> AsyncIterator[bytes]:
            self.streams["started"] += 1
            self.active_streams += 1
            ended = False
            try:
                if knobs.keepalive_first:
                    yield b": keepalive\n\n"
                await asyncio.sleep(knobs.latency_s)
                for index, chunk in enumerate(chunks):
                    if index and knobs.time_per_token_s:
                        await asyncio.sleep(knobs.time_per_token_s)
                    if self.interrupt and self.arrivals != arrival and index:
                        self.streams["interrupted"] += 1
                        break  # another request came: this generation stops where it is, no finish_reason
                    yield b": sent %.6f\n%b" % (time.time(), chunk) if stamp else chunk
                if marker:
                    yield marker
                if rng.random() < knobs.break_after_done_rate:
                    raise ConnectionAbortedError("simulated: the connection drops before the stream's end")
                if knobs.done_delay_s:
                    await asyncio.sleep(knobs.done_delay_s)
                ended = True
            finally:
                self.active_streams -= 1
                self.streams["completed" if ended else "cancelled"] += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    # --- control ----------------------------------------------------------------------------------

    async def _get_knobs(self, _: Request) -> Response:
        return _json(
            {
                "default": asdict(self.default),
                "models": {k: asdict(v) for k, v in self.models.items()},
                "server": {"served_models": self.served_models, "api_key_set": self.api_key is not None},
            }
        )

    async def _put_knobs(self, request: Request) -> Response:
        """{"default": {knob: value}, "models": {name: {knob: value}}, "server": {"served_models": [...],
        "api_key": "..." or null}}: each part optional."""
        try:
            body = orjson.loads(await request.body())
            default = replace(self.default, **body.get("default", {}))
            models = {
                name: replace(self.models.get(name, default), **values)
                for name, values in body.get("models", {}).items()
            }
            server = body.get("server", {})
            served = server.get("served_models", self.served_models)
            api_key = server.get("api_key", self.api_key)
            if not isinstance(served, list) or not all(isinstance(m, str) for m in served):
                raise ValueError("server.served_models must be a list of model names")
            if api_key is not None and not isinstance(api_key, str):
                raise ValueError("server.api_key must be a string or null")
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
            allowed = ", ".join(f.name for f in fields(Knobs))
            return _error(400, f"bad knobs: {exc}; allowed: {allowed}", "invalid_request_error")
        self.default = default
        self.models.update(models)
        self.served_models, self.api_key = served, api_key
        return await self._get_knobs(request)

    async def _stats(self, _: Request) -> Response:
        return _json(
            {
                "requests": dict(self.requests),
                "streams": dict(self.streams),
                "active_streams": self.active_streams,
                "hangs": dict(self.hangs),
            }
        )

    async def _recent(self, _: Request) -> Response:
        return _json(list(self.recent))

    async def _reset(self, _: Request) -> Response:
        self.requests.clear()
        self.streams = Counter({"started": 0, "completed": 0, "cancelled": 0, "interrupted": 0})
        self.hangs = Counter({"started": 0, "released": 0})
        self.recent.clear()
        return _json({"reset": True})

    async def _health(self, _: Request) -> Response:
        return _json({"status": "ok"})


def _chat_choice(index: int, g: Generation) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": g.text}
    if g.tool_name is not None and g.legacy_function:
        message = {
            "role": "assistant",
            "content": None,
            "function_call": {"name": g.tool_name, "arguments": g.text},
        }
    elif g.tool_name is not None:
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": g.tool_call_id,
                    "type": "function",
                    "function": {"name": g.tool_name, "arguments": g.text},
                }
            ],
        }
    return {"index": index, "message": message, "logprobs": None, "finish_reason": g.finish_reason}


def _generate(chat: dict[str, Any], model: str, knobs: Knobs) -> tuple[Generation, dict[str, Any], bool]:
    """What the model says to a chat request (as a Responses or Messages request means it), its usage, and
    whether it is to be malformed."""
    prompt = synth.prompt_text(chat)
    rng = synth.rng_for(chat, model, prompt)
    g = synth.chat(chat, knobs, rng)
    return g, _usage(prompt, [g], knobs), rng.random() < knobs.malformed_rate


def _malform(answer: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The answer in a shape no OpenAI server sends: as real servers have broken under load or by bugs."""
    message = answer["choices"][0]["message"]
    if message.get("tool_calls"):
        message["tool_calls"][0]["function"]["name"] = [message["tool_calls"][0]["function"]["name"]]
    elif rng.random() < 0.5:
        answer["choices"] = 5
    else:
        answer["choices"][0]["message"] = "not an object"
    return answer


def _malform_chunks(chunks: list[bytes], rng: random.Random) -> list[bytes]:
    """A stream with one event in a shape no OpenAI server sends (after the first, so it starts normally)."""
    head = {"id": "chatcmpl-malformed", "object": "chat.completion.chunk", "created": int(time.time())}
    if rng.random() < 0.5:
        bad = _event({**head, "choices": 5})
    else:
        bad = _event({**head, "choices": [{"index": 0, "delta": {"tool_calls": 5}, "finish_reason": None}]})
    return [chunks[0], bad, *chunks[1:]]


def _chat_chunks(
    model: str, choices: list[Generation], usage: dict[str, int] | None, repeat_tool_fields: bool = False
) -> list[bytes]:
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }
    out = [
        _event(
            {
                **head,
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )
        for i in range(len(choices))
    ]
    for step in range(max(len(g.pieces) for g in choices)):
        for index, g in enumerate(choices):
            if step >= len(g.pieces):
                continue
            out.append(
                _event(
                    {
                        **head,
                        "choices": [
                            {
                                "index": index,
                                "delta": _delta(g, step, repeat_tool_fields),
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            )
    for index, g in enumerate(choices):
        out.append(
            _event(
                {
                    **head,
                    "choices": [
                        {"index": index, "delta": {}, "logprobs": None, "finish_reason": g.finish_reason}
                    ],
                }
            )
        )
    if usage is not None:
        out.append(_event({**head, "choices": [], "usage": usage}))
    return out


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _delta(g: Generation, step: int, repeat: bool = False) -> dict[str, Any]:
    piece = g.pieces[step]
    if g.tool_name is None:
        return {"content": piece}
    if g.legacy_function:
        return {
            "function_call": {"name": g.tool_name, "arguments": piece} if step == 0 else {"arguments": piece}
        }
    call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
    if step == 0 or repeat:  # llama.cpp repeats the id and name in every delta
        call = {
            "index": 0,
            "id": g.tool_call_id,
            "type": "function",
            "function": {"name": g.tool_name, "arguments": piece},
        }
    return {"tool_calls": [call]}


def _completion_chunks(model: str, choices: list[Generation], usage: dict[str, int] | None) -> list[bytes]:
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    g = choices[0]
    out = [
        _event({**head, "choices": [{"index": 0, "text": p, "logprobs": None, "finish_reason": None}]})
        for p in g.pieces
    ]
    out.append(
        _event(
            {
                **head,
                "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": g.finish_reason}],
            }
        )
    )
    if usage is not None:
        out.append(_event({**head, "choices": [], "usage": usage}))
    return out


def _usage(prompt: str, choices: list[Generation], knobs: Knobs | None = None) -> dict[str, Any]:
    prompt_tokens = synth.count_tokens(prompt)
    completion_tokens = sum(len(g.pieces) for g in choices)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if knobs is not None and knobs.cached_prompt_share:  # as OpenAI (and vLLM with prefix caching) say it
        usage["prompt_tokens_details"] = {"cached_tokens": int(prompt_tokens * knobs.cached_prompt_share)}
    if knobs is not None and knobs.reasoning_tokens:  # counted in completion_tokens, as OpenAI's are
        usage["completion_tokens"] += knobs.reasoning_tokens
        usage["total_tokens"] += knobs.reasoning_tokens
        usage["completion_tokens_details"] = {"reasoning_tokens": knobs.reasoning_tokens}
    return usage


async def _hang(request: Request) -> None:
    deadline = time.monotonic() + 3600
    # Polling is the only way Starlette offers to notice a disconnect while sending nothing.
    while time.monotonic() < deadline and not await request.is_disconnected():  # noqa: ASYNC110
        await asyncio.sleep(0.1)


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _shape_problem(endpoint: str, body: dict[str, Any]) -> str | None:
    """What a served model's request schema (vLLM's pydantic models) would refuse, or None."""
    if endpoint == "embeddings":
        return None if _embeddable(body["input"]) else "'input' must be text, texts, tokens or token arrays"
    if endpoint in ("responses", "messages"):  # their own shapes (tools without "function", ...)
        tools = body.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            return "'tools' must be an array of objects"
        if endpoint == "messages" and not (
            isinstance(body["messages"], list) and all(isinstance(m, dict) for m in body["messages"])
        ):
            return "messages: Input should be a valid list of objects"
        if endpoint == "responses" and not isinstance(body.get("input", ""), str | list):
            return "'input' must be text or an array of items"
        return None
    if endpoint == "chat" and not (
        isinstance(body["messages"], list)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in body["messages"])
    ):
        return "'messages' must be an array of objects with a 'role'"
    for field, fits in SHAPES.items():
        if field in body and body[field] is not None and not fits(body[field]):
            return f"'{field}' has the wrong shape"
    return None


def _function(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("name"), str)
        and isinstance(value.get("parameters", {}), dict | None)
    )


def _choice(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, dict) and isinstance(value.get("function", {}), dict) and _named(value)
    )


def _named(value: dict[str, Any]) -> bool:
    name = value.get("name", (value.get("function") or {}).get("name", ""))
    return isinstance(name, str)


SHAPES: dict[str, Any] = {
    "tools": lambda v: (
        isinstance(v, list) and all(isinstance(t, dict) and _function(t.get("function")) for t in v)
    ),
    "functions": lambda v: isinstance(v, list) and all(_function(f) for f in v),
    "tool_choice": _choice,
    "function_call": _choice,
    "response_format": lambda v: isinstance(v, dict) and isinstance(v.get("json_schema", {}), dict),
    "stream_options": lambda v: isinstance(v, dict),
}


def _embeddable(raw: Any) -> bool:
    def tokens(value: Any) -> bool:
        return isinstance(value, list) and all(type(i) is int for i in value)

    if isinstance(raw, str) or (tokens(raw) and raw):
        return True
    return (
        isinstance(raw, list)
        and bool(raw)
        and (all(isinstance(i, str) for i in raw) or all(map(tokens, raw)))
    )


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(
    status: int,
    message: str,
    kind: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or status}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _stamped(body: dict[str, Any]) -> bool:
    metadata = body.get("metadata")
    return isinstance(metadata, dict) and metadata.get("sim_stamp") is True
