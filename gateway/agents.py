"""Simulated agents, for the demo, tests and benchmarks: one user request answered by a run of model
calls through the gateway, the official openai client doing the calls.

A task is a plan of tools (refund: lookup_order, check_policy, issue_refund). The run forces the plan's
first tool, then executes every tool the model calls and sends back its result, which names the next
tool ({"next": NAME}) or says the plan is done ({"done": true}); a tool that does not help answers
with an error and the tool that would. The run ends when the model answers in words (or after
max_steps calls). Every call carries the run's conversation id (x-conversation-id), which the
gateway's default trace keys read: the run is one trace. The simulator reads tool results the same way
(synth.agent_call), and its knobs extra_steps and wrong_tool_at_step make a candidate's runs longer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

TRACE_HEADER = "x-conversation-id"


def _tool(name: str, description: str, **properties: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {key: {"type": kind} for key, kind in properties.items()},
                "required": list(properties),
            },
        },
    }


TOOLS = [
    _tool("lookup_order", "Find an order by id", order_id="string"),
    _tool("check_policy", "The refund policy that applies to an order", order_id="string"),
    _tool("issue_refund", "Refund an order", order_id="string", amount="number"),
    _tool("send_email", "Write to the customer", subject="string", body="string"),
]
PLANS = {
    "status": ("lookup_order",),
    "refund": ("lookup_order", "check_policy", "issue_refund"),
    "escalate": ("lookup_order", "check_policy", "send_email"),
}
MAX_STEPS = 12


@dataclass
class Run:
    conversation: str
    task: str
    steps: int = 0  # model calls
    tools: list[str] = field(default_factory=list)  # tools called, in order
    arms: list[str] = field(default_factory=list)  # the arm of each call (x-canarygate-arm)
    answer: str | None = None  # the final words; None when the run never got there
    error: str | None = None  # the client error that stopped it


async def run_agent(
    client: Any,
    model: str,
    conversation: str,
    task: str = "refund",
    *,
    order: str = "1042",
    user: str | None = None,
    max_steps: int = MAX_STEPS,
    headers: dict[str, str] | None = None,
    on_call: Callable[[Mapping[str, str], float], object] | None = None,
) -> Run:
    """One agent run through an openai.AsyncOpenAI client pointed at the gateway. on_call: told each
    answered call's response headers and seconds."""
    plan = PLANS[task]
    run = Run(conversation, task)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a support agent: use the tools, then answer the customer."},
        {"role": "user", "content": f"Please handle a {task} request for order {order}."},
    ]
    position = 0  # how much of the plan is done
    extra = {"user": user} if user is not None else {}
    sent = {TRACE_HEADER: conversation, **(headers or {})}
    while run.steps < max_steps:
        choice: Any = {"type": "function", "function": {"name": plan[0]}} if run.steps == 0 else "auto"
        started = time.perf_counter()
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=messages, tools=TOOLS, tool_choice=choice, extra_headers=sent, **extra
            )
            completion = raw.parse()
        except Exception as exc:  # the run stops there, and says why
            run.error = f"{type(exc).__name__}: {str(exc)[:200]}"
            return run
        run.steps += 1
        run.arms.append(str(raw.headers.get("x-canarygate-arm", "?")))
        if on_call is not None:
            on_call(raw.headers, time.perf_counter() - started)
        message = completion.choices[0].message
        if not message.tool_calls:
            run.answer = message.content or ""
            return run
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            name = call.function.name
            run.tools.append(name)
            if position < len(plan) and name == plan[position]:
                position += 1
                result: dict[str, Any] = {"ok": True, "order_id": order}
            elif position >= len(plan) and name == plan[-1]:
                result = {"ok": True, "order_id": order, "note": "already done"}
            else:
                result = {"error": f"{name} does not help with this {task} request"}
            if position < len(plan):
                result["next"] = plan[position]
            else:
                result["done"] = True
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    return run
