"""Tool calls as text, per template family (`tool_style` in conf/template/*.yaml), and back.

Supports the canonical messages of medgpt.data.tool_calls — an assistant message with
`tool_calls: [{"name", "arguments": dict}]`, a `tool` message with the result — and `tools`, a list of
OpenAI function schemas. Styles (the special strings and their order are each family's published format):

    hermes / plain  tools listed in the system turn inside <tools></tools>; a call is
                    `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the assistant's answer;
                    results go back in a user turn as `<tool_response>\\n...\\n</tool_response>` (consecutive
                    results share one turn). Qwen2.5 / Qwen3 / Hermes use it; `plain` is the same markup inside
                    any other family's own user/assistant turns (the default).
    llama3          tools in the system turn (Llama 3.1's JSON tool calling, "Environment: ipython"); a call is
                    the JSON `{"name": ..., "parameters": {...}}`; results come back in an `ipython` turn.
    mistral         `[AVAILABLE_TOOLS] [...][/AVAILABLE_TOOLS]` before the last user turn; a call is
                    `[TOOL_CALLS] [{"name": ..., "arguments": {...}}]`; a result `[TOOL_RESULTS] {"content": ...}[/TOOL_RESULTS]`.
    glm4            tools in the system turn ("# 可用工具"); a call is `name\\n{arguments}`; results come back
                    in an `<|observation|>` turn.
    none            no tool format: dialogues with calls are refused (and serving answers 400).

`parse_calls` reads a generated answer back into (text, calls) for the OpenAI API (mode=serve); only calls to
tools the request offered count. Written here rather than taken from transformers' response schemas,
which need a Jinja template per model; these are small and each mirrors its renderer below.
"""

from __future__ import annotations

import json
import re

from medgpt.errors import DataError

STYLES = ("plain", "hermes", "llama3", "mistral", "glm4", "none")
_HERMES_TOOLS = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                 "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
                 "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
                 "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")
_LLAMA3_TOOLS = ("Environment: ipython\n\nGiven the following functions, please respond with a JSON for a function call with its "
                 "proper arguments that best answers the given prompt.\n\nRespond in the format {{\"name\": function name, "
                 "\"parameters\": dictionary of argument name and its value}}. Do not use variables.\n\n{tools}")
_GLM4_TOOLS = "# 可用工具{tools}"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def dumps(value) -> str:
    """JSON as the families' templates write it (Jinja's tojson: ', ' and ': ' separators, non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


def tools_block(style: str, tools: list[dict]) -> str:
    """The tool list as the text that goes in the system turn ('' for mistral: see `before_last_user`)."""
    if style in ("hermes", "plain"):
        return _HERMES_TOOLS.format(tools="".join("\n" + dumps(t) for t in tools))
    if style == "llama3":
        return _LLAMA3_TOOLS.format(tools="\n\n".join(json.dumps(t, ensure_ascii=False, indent=4) for t in tools))
    if style == "glm4":
        return _GLM4_TOOLS.format(tools="".join(f"\n\n## {t['function']['name']}\n\n{json.dumps(t['function'], ensure_ascii=False, indent=4)}"
                                                "\n在调用上述函数时，请使用 Json 格式表示调用的参数。" for t in tools))
    return ""


def before_last_user(style: str, tools: list[dict] | None) -> str:
    """Text placed before the last user turn (mistral's [AVAILABLE_TOOLS])."""
    if style == "mistral" and tools:
        return "[AVAILABLE_TOOLS] [" + ", ".join(dumps(t) for t in tools) + "][/AVAILABLE_TOOLS]"
    return ""


def with_tools(style: str, system: str | None, tools: list[dict] | None) -> str | None:
    """The system prompt with the tool list appended (the list alone when there is no system prompt)."""
    block = tools_block(style, tools) if tools else ""
    if not block:
        return system
    return f"{system}\n\n{block}" if system else block


def refuse_without_format(style: str, name: str) -> None:
    if style == "none":
        raise DataError(f"template {name} has no tool-call format (tool_style: none): use a template with one "
                        "(e.g. qwen, llama3, mistral, glm4, chatml).")


def answer_text(style: str, name: str, content: str, calls: list[dict]) -> str:
    """An assistant message's text: its content, then its calls in the family's markup."""
    if not calls:
        return content
    refuse_without_format(style, name)
    args = [_arguments(c) for c in calls]
    if style in ("hermes", "plain"):
        parts = [f"<tool_call>\n{{\"name\": \"{c['name']}\", \"arguments\": {dumps(a)}}}\n</tool_call>" for c, a in zip(calls, args)]
    elif style == "llama3":
        parts = [dumps({"name": c["name"], "parameters": a}) for c, a in zip(calls, args)]
    elif style == "mistral":
        parts = ["[TOOL_CALLS] " + dumps([{"name": c["name"], "arguments": a} for c, a in zip(calls, args)])]
    else:  # glm4
        parts = [f"{c['name']}\n{dumps(a)}" for c, a in zip(calls, args)]
    return "\n".join(([content] if content else []) + parts)


def result_text(style: str, content: str) -> str:
    """A tool result as it goes into its turn (hermes/plain: in <tool_response>; mistral: {"content": ...})."""
    if style in ("hermes", "plain"):
        return f"<tool_response>\n{content}\n</tool_response>"
    if style == "mistral":
        return dumps({"content": content})
    return content


def _arguments(call: dict) -> dict | str:
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


def parse_calls(style: str, text: str, tool_names: set[str]) -> tuple[str, list[dict]]:
    """(the answer's text without its calls, [{"name", "arguments": dict}]) from a generated answer.

    Text that holds no well-formed call to one of `tool_names` is returned whole, with no calls."""
    calls: list[dict] = []
    if style in ("hermes", "plain"):
        for body in _CALL.findall(text):
            call = _call(_json(body), tool_names, "arguments")
            if call is None:
                return text, []
            calls.append(call)
        return (_CALL.split(text, maxsplit=1)[0].strip() if calls else text), calls
    if style == "llama3":
        objects = [_json(line) for line in text.strip().splitlines() if line.strip()]
        calls = [c for c in (_call(o, tool_names, "parameters") for o in objects) if c]
        return ("", calls) if calls and len(calls) == len(objects) else (text, [])
    if style == "mistral":
        head, marker, tail = text.partition("[TOOL_CALLS]")
        listed = _json(tail if marker else text)
        if isinstance(listed, list) and listed:
            calls = [c for c in (_call(o, tool_names, "arguments") for o in listed) if c]
            if len(calls) == len(listed):
                return head.strip(), calls
        return text, []
    if style == "glm4":
        name, _, rest = text.strip().partition("\n")
        args = _json(rest)
        if name.strip() in tool_names and isinstance(args, dict):
            return "", [{"name": name.strip(), "arguments": args}]
    return text, []


def _json(text: str):
    try:
        return json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None


def _call(obj, tool_names: set[str], key: str) -> dict | None:
    if not (isinstance(obj, dict) and obj.get("name") in tool_names):
        return None
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        args = _json(args)
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None
