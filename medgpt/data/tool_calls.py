"""Tool-calling dialogues: ShareGPT `function_call` / `observation` turns, OpenAI `tool_calls` / `tool` messages, `tools`.

Everything is normalised to one canonical shape (the templates render it):

    assistant with calls  {"role": "assistant", "content": "<text or empty>", "tool_calls": [{"name": str, "arguments": dict}]}
    tool result           {"role": "tool", "content": str, "name"?: the called tool's name when known}
    Record.tools          [{"type": "function", "function": {"name", "description", "parameters"}}] (bare schemas are wrapped)

ShareGPT: a `function_call` turn's value is JSON `{"name": ..., "arguments": {...}}` (or a list of such calls);
consecutive `function_call` turns, and a `gpt` turn followed by one, merge into one assistant message. An
`observation` turn is the result of the call before it. OpenAI: `arguments` is a JSON string (a JSON object is
accepted too); a `tool` message maps to its call by `tool_call_id`, or by position.

Refused, each in one sentence naming file:line and the turn: arguments that are not a JSON object, a tool
result with no call before it, a call to a tool that is not in `tools` (when `tools` is given).
"""

from __future__ import annotations

import json
from typing import Any

from medgpt.errors import DataError

CALL_ROLES = ("function_call",)  # ShareGPT: an assistant's tool call
RESULT_ROLES = ("observation", "tool", "function")  # ShareGPT observation, OpenAI tool (and the older function)


def parse_tools(value: Any, where: str, field_name: str = "tools") -> list[dict] | None:
    """The `tools` field (a JSON string or a list) as OpenAI function schemas; None when absent or empty."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field '{field_name}' is not valid JSON ({e.msg} at column {e.colno}).") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field_name}' must be a list of function schemas (or a JSON string of one).")
    tools = []
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" and "function" in tool else tool
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise DataError(f"{where}: {field_name}[{i}] must be a function schema with a 'name' "
                            "({'type': 'function', 'function': {'name', 'description', 'parameters'}} or the bare function).")
        tools.append({"type": "function", "function": dict(fn)})
    return tools


def parse_call(value: Any, where: str, turn: str) -> dict:
    """One call {"name", "arguments": dict} from a ShareGPT call object or an OpenAI tool_calls entry."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):  # OpenAI {"type": "function", "function": {...}}
        value = {**value["function"], **({"id": value["id"]} if "id" in value else {})}
    if not (isinstance(value, dict) and isinstance(value.get("name"), str) and value["name"]):
        raise DataError(f"{where}: {turn} must be a call {{\"name\": ..., \"arguments\": {{...}}}}.")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {turn}: the arguments of the call to '{value['name']}' are not valid JSON "
                            f"({e.msg} at column {e.colno}).") from None
    if not isinstance(arguments, dict):
        raise DataError(f"{where}: {turn}: the arguments of the call to '{value['name']}' must be a JSON object, "
                        f"got {type(arguments).__name__}.")
    call = {"name": value["name"], "arguments": arguments}
    return call | ({"id": str(value["id"])} if value.get("id") is not None else {})


def sharegpt_calls(value: Any, where: str, turn: str) -> list[dict]:
    """A `function_call` turn's value: a JSON string (or object) holding one call or a list of calls."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {turn} is not valid JSON ({e.msg} at column {e.colno}); a function_call turn holds "
                            '{"name": ..., "arguments": {...}}.') from None
    values = value if isinstance(value, list) else [value]
    return [parse_call(v, where, turn) for v in values]


def append_calls(messages: list[dict], calls: list[dict]) -> None:
    """Merge calls into the assistant message just before (a gpt turn or earlier calls), or start one."""
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).extend(calls)
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": list(calls)})


def result_message(content: Any, where: str, turn: str, messages: list[dict], call_id: Any = None, name: Any = None) -> dict:
    """A tool result; its tool name from `name`, the call with `call_id`, or the position among the last calls."""
    if not isinstance(content, str):
        if isinstance(content, dict | list):
            content = json.dumps(content, ensure_ascii=False)
        else:
            raise DataError(f"{where}: {turn} must be a string (the tool's result).")
    calls, done = _open_calls(messages)
    if calls is None:
        raise DataError(f"{where}: {turn} is a tool result with no tool call before it (an observation must follow a "
                        "function_call turn or an assistant message with tool_calls).")
    if not isinstance(name, str) or not name:
        match = next((c for c in calls if call_id is not None and c.get("id") == str(call_id)), None)
        if match is None and done < len(calls):
            match = calls[done]
        name = match["name"] if match else None
    return {"role": "tool", "content": content} | ({"name": name} if name else {})


def _open_calls(messages: list[dict]) -> tuple[list[dict] | None, int]:
    """(the calls of the last assistant message with calls, results already given) if only results follow it."""
    done = 0
    for msg in reversed(messages):
        if msg["role"] == "tool":
            done += 1
        elif msg["role"] == "assistant" and msg.get("tool_calls"):
            return msg["tool_calls"], done
        else:
            return None, 0
    return None, 0


def finish_calls(messages: list[dict]) -> list[dict]:
    """Drop the OpenAI call ids used to pair results (the canonical call is {"name", "arguments"})."""
    for msg in messages:
        for call in msg.get("tool_calls", ()):
            call.pop("id", None)
    return messages


def check_tool_names(messages: list[dict], tools: list[dict] | None, where: str) -> None:
    """With `tools` given, every call must name one of them."""
    if not tools:
        return
    names = [t["function"]["name"] for t in tools]
    for i, msg in enumerate(messages):
        for call in msg.get("tool_calls", ()):
            if call["name"] not in names:
                raise DataError(f"{where}: turn {i} calls the tool '{call['name']}', which is not in 'tools' "
                                f"({', '.join(names)}).")
