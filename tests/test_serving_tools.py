"""Tool calling through the OpenAI API (mode=serve), in-process on the untrained tiny model: the request plumbing
(tools rendered into the prompt, history with calls and results), the OpenAI response shape (tool_calls, ids,
arguments as a JSON string, finish_reason), streamed and not, and the 400s. A scripted engine stands in for the
model's answer where its text matters; one request goes through the real tiny model."""

from __future__ import annotations

import dataclasses
import json

import pytest
from fastapi.testclient import TestClient
from test_serving_support import load_tiny

from medgpt.data.templates import load_template
from medgpt.serving.api import create_app
from medgpt.serving.engine import Delta, Handle

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL_TEXT = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'


class Scripted:
    """An engine that answers every request with `text` (in a few deltas) and remembers the prompts."""

    name = "scripted"

    def __init__(self, text: str):
        self.text, self.prompts = text, []

    def submit(self, prompt_ids, params, loop=None, adapter=None):
        self.prompts.append(prompt_ids)
        handle = Handle(prompt_ids, params, loop=loop)
        pieces = [self.text[i:i + 7] for i in range(0, len(self.text), 7)]
        for n, piece in enumerate(pieces):
            handle.put(Delta(piece, "stop" if n == len(pieces) - 1 else None, len(prompt_ids), n + 1))
        return handle

    def stats(self):
        return {}


@pytest.fixture(scope="module")
def tiny():
    loaded, cfg = load_tiny("template=qwen", "generation.max_new_tokens=6")
    yield loaded, cfg
    loaded.engine.close()


def client_for(tiny, text: str | None = None, template: str | None = None):
    loaded, cfg = tiny
    changes = {"engine": Scripted(text)} if text is not None else {}
    if template:
        changes["template"] = load_template(template)
    stub = dataclasses.replace(loaded, **changes)
    return TestClient(create_app(stub, cfg.generation)), stub


def test_a_generated_call_comes_back_as_openai_tool_calls(tiny):
    client, stub = client_for(tiny, CALL_TEXT.removesuffix("<|im_end|>"))
    res = client.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS})
    assert res.status_code == 200, res.text
    choice = res.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Checking." and len(message["tool_calls"]) == 1
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    prompt = stub.tokenizer.decode(stub.engine.prompts[0])
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_a_streamed_call_is_one_delta_then_finish(tiny):
    client, _ = client_for(tiny, CALL_TEXT.removesuffix("<|im_end|>"))
    with client.stream("POST", "/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "stream": True}) as res:
        events = [line.removeprefix("data: ") for line in res.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and len(chunks) == 3
    call = deltas[1]["tool_calls"][0]
    assert deltas[1]["content"] == "Checking." and call["index"] == 0 and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_text_without_a_call_stays_content(tiny):
    client, _ = client_for(tiny, "It is sunny.")
    for stream in (False, True):
        res = client.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "stream": stream})
        if stream:
            chunks = [json.loads(line[6:]) for line in res.text.splitlines() if line.startswith("data: {")]
            assert chunks[1]["choices"][0]["delta"] == {"content": "It is sunny."} and chunks[-1]["choices"][0]["finish_reason"] == "stop"
        else:
            choice = res.json()["choices"][0]
            assert choice["message"] == {"role": "assistant", "content": "It is sunny."} and choice["finish_reason"] == "stop"
    # tool_choice "none": the tools are not offered, so a call-shaped answer stays text
    client, stub = client_for(tiny, CALL_TEXT)
    res = client.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "tool_choice": "none"})
    assert res.json()["choices"][0]["finish_reason"] == "stop" and "<tools>" not in stub.tokenizer.decode(stub.engine.prompts[0])


def test_history_with_calls_and_results_is_rendered_by_the_template(tiny):
    client, stub = client_for(tiny, "It is 22 C.")
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"}]
    res = client.post("/v1/chat/completions", json={"messages": history, "tools": TOOLS})
    assert res.status_code == 200, res.text
    prompt = stub.tokenizer.decode(stub.engine.prompts[0])
    expected = stub.template.render([ASK[0], {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather",
                                    "arguments": {"city": "Paris"}}]}, {"role": "tool", "content": "22 C, sunny"}],
                                    add_generation_prompt=True, tools=TOOLS)
    assert prompt == expected and prompt.endswith("<tool_response>\n22 C, sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("body,param,words", [
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                                 "arguments": "not json"}}]}]},
     "messages.1.tool_calls.0.function.arguments", "JSON object"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}, "messages.1.tool_call_id", "names no earlier"),
    ({"messages": ASK, "tools": [{"type": "function", "function": {}}]}, "tools.0.function.name", "required"),
    ({"messages": ASK, "tools": TOOLS, "tool_choice": "required"}, "tool_choice", "auto"),
])
def test_bad_tool_requests_are_400_naming_the_field(tiny, body, param, words):
    client, _ = client_for(tiny, "x")
    res = client.post("/v1/chat/completions", json=body)
    error = res.json()["error"]
    assert res.status_code == 400 and error["param"] == param and words in error["message"], error


def test_a_template_without_tool_format_answers_400(tiny):
    client, stub = client_for(tiny, "x", template="alpaca")
    res = client.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS})
    error = res.json()["error"]
    assert res.status_code == 400 and error["param"] == "tools" and "'alpaca' has no tool-call format" in error["message"]
    assert not stub.engine.prompts  # refused before anything was generated
    assert client.post("/v1/chat/completions", json={"messages": ASK}).status_code == 200  # without tools it still serves


def test_the_real_tiny_model_answers_a_request_with_tools(tiny):
    client, stub = client_for(tiny)
    res = client.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "max_tokens": 4})
    assert res.status_code == 200, res.text
    body = res.json()
    prompt = stub.template.render(ASK, stub.tokenizer.bos_token, stub.tokenizer.eos_token, True, tools=TOOLS)
    assert body["usage"]["prompt_tokens"] == len(stub.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert body["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
