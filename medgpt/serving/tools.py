"""Tool calling in the OpenAI chat API (mode=serve): request messages in, `tool_calls` out.

Supports: `tools` (function schemas) and `tool_choice` "auto" | "none" in a chat-completions request; earlier
assistant `tool_calls` (arguments as a JSON string) and `tool` messages (matched to their call by
`tool_call_id`) in the history. The prompt is rendered by the run's template (medgpt.data.tool_render: hermes,
llama3, mistral, glm4 or the plain default); an answer holding well-formed calls to offered tools comes back
as `message.tool_calls` (`{"id": "call_...", "type": "function", "function": {"name", "arguments": "<JSON>"}}`)
with `finish_reason: "tool_calls"`, otherwise as plain content. A streamed answer with tools offered is held
until it is complete (a call cannot be told from text before its end), then sent as one delta.
Refuses (400, one sentence): tools with a template whose `tool_style` is none; arguments that are not a JSON
object; a `tool` message whose tool_call_id names no earlier call.
"""

from __future__ import annotations

import json
import uuid

from medgpt.data.tool_render import parse_calls
from medgpt.serving.protocol import ChatRequest, RequestError


def uses_tools(body: ChatRequest) -> bool:
    return bool(body.offered_tools() or any(m.role == "tool" or m.tool_calls for m in body.messages))


def request_messages(body: ChatRequest, template) -> list[dict]:
    """The request's messages in medgpt's canonical form (tool calls with dict arguments, results with their tool's name)."""
    if uses_tools(body) and template.tool_style == "none":
        raise RequestError("tools", f"tools: the served template '{template.name}' has no tool-call format; serve the run with "
                           "a template that has one (e.g. template=qwen, llama3, mistral or glm4).")
    names: dict[str, str] = {}
    messages = []
    for i, m in enumerate(body.messages):
        msg: dict = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            msg["tool_calls"] = []
            for j, call in enumerate(m.tool_calls):
                try:
                    args = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    args = None
                if not isinstance(args, dict):
                    raise RequestError(f"messages.{i}.tool_calls.{j}.function.arguments",
                                       f"messages.{i}.tool_calls.{j}.function.arguments: must be a JSON object as a string.")
                msg["tool_calls"].append({"name": call.function.name, "arguments": args})
                if call.id:
                    names[call.id] = call.function.name
        if m.role == "tool":
            if m.tool_call_id is not None and m.tool_call_id not in names:
                raise RequestError(f"messages.{i}.tool_call_id", f"messages.{i}.tool_call_id: {m.tool_call_id!r} names no earlier "
                                   "assistant tool call.")
            name = names.get(m.tool_call_id or "", m.name)
            if name:
                msg["name"] = name
        messages.append(msg)
    return messages


def openai_calls(calls: list[dict]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}} for c in calls]


def answer(text: str, finish_reason: str, template, tools: list[dict] | None) -> tuple[dict, str]:
    """(the assistant message, finish_reason) of a finished answer: calls parsed out when tools were offered."""
    if tools:
        content, calls = parse_calls(template.tool_style, text, {t["function"]["name"] for t in tools})
        if calls:
            return {"role": "assistant", "content": content or None, "tool_calls": openai_calls(calls)}, "tool_calls"
    return {"role": "assistant", "content": text}, finish_reason


def stream_delta(message: dict) -> dict:
    """The one delta a held stream sends: the content, or the calls with their index."""
    if message.get("tool_calls"):
        delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]}
        return {"content": message["content"], **delta} if message["content"] else delta
    return {"content": message["content"]} if message["content"] else {}
