"""Tool calls rendered per template family, trained only on the assistant's calls and answers, and parsed back."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from medgpt.data.templates import available_templates, load_template
from medgpt.data.tokenize import IGNORE, encode_dialogue
from medgpt.data.tool_render import parse_calls
from medgpt.errors import DataError

OFFICIAL = ROOT / "tests" / "fixtures" / "chat_templates"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "dose", "description": "Paracetamol dose", "parameters": {"type": "object"}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
TWO_CALLS = {"role": "assistant", "content": "Let me check.",
             "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "dose", "arguments": {"kg": 70}}]}
DIALOGUE = [{"role": "user", "content": "Weather in Paris?"}, CALL, {"role": "tool", "content": "22 C, sunny", "name": "get_weather"},
            {"role": "assistant", "content": "It is 22 C and sunny."}]
PARALLEL = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather and my dose?"}, TWO_CALLS,
            {"role": "tool", "content": "22 C"}, {"role": "tool", "content": "1 g"}]


@pytest.mark.parametrize("ours,official,conv,generation", [
    ("qwen", "qwen2_5.jinja", DIALOGUE, False), ("qwen", "qwen2_5.jinja", PARALLEL, True),
    ("qwen3", "qwen3.jinja", PARALLEL, True), ("qwen3", "qwen3.jinja", DIALOGUE[:3], True),
])
def test_hermes_tools_equal_the_official_qwen_templates(ours, official, conv, generation, tokenizer):
    theirs = tokenizer.apply_chat_template(conv, tools=TOOLS, chat_template=(OFFICIAL / official).read_text(), tokenize=False,
                                           add_generation_prompt=generation)
    assert load_template(ours).render(conv, add_generation_prompt=generation, tools=TOOLS) == theirs


def test_llama3_mistral_glm4_tool_formats():
    tools = TOOLS[:1]
    llama3 = load_template("llama3").render(DIALOGUE, tools=tools)
    assert llama3.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\n")
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
            "<|start_header_id|>ipython<|end_header_id|>\n\n22 C, sunny<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 22 C and sunny.<|eot_id|>") in llama3
    mistral = load_template("mistral").render(DIALOGUE, "<s>", "</s>", tools=tools)
    assert mistral == ("<s>[AVAILABLE_TOOLS] [" + json.dumps(tools[0]) + "][/AVAILABLE_TOOLS][INST] Weather in Paris?[/INST] "
                       '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>'
                       '[TOOL_RESULTS] {"content": "22 C, sunny"}[/TOOL_RESULTS] It is 22 C and sunny.</s>')
    glm4 = load_template("glm4").render(DIALOGUE, "<s>", "<|endoftext|>", tools=tools)
    assert glm4.startswith("[gMASK]<sop><|system|>\n# 可用工具\n\n## get_weather\n\n{\n")
    assert glm4.endswith('<|user|>\nWeather in Paris?<|assistant|>\nget_weather\n{"city": "Paris"}<|endoftext|>'
                         "<|observation|>\n22 C, sunny<|assistant|>\nIt is 22 C and sunny.<|endoftext|>")


def test_plain_default_uses_the_familys_own_turns():
    text = load_template("vicuna").render(DIALOGUE, "<s>", "</s>", tools=TOOLS[:1])
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in text
    assert text.endswith('USER: Weather in Paris? ASSISTANT: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                         "</tool_call></s>USER: <tool_response>\n22 C, sunny\n</tool_response> ASSISTANT: It is 22 C and sunny.</s>")


@pytest.mark.parametrize("name", [n for n in available_templates() if load_template(n).tool_style != "none"])
def test_only_calls_and_answers_are_trained(name, tokenizer):
    template = load_template(name)
    enc = encode_dialogue(DIALOGUE, template, tokenizer, 4096, tools=TOOLS)
    trained = tokenizer.decode([t for t in enc.labels if t != IGNORE])
    whole = tokenizer.decode(enc.input_ids)
    assert "Paris" in trained and "It is 22 C and sunny." in trained  # the call's arguments and the final answer
    assert "22 C, sunny" not in trained and "Weather in a city" not in trained and "Weather in Paris?" not in trained
    assert "22 C, sunny" in whole and "Weather in a city" in whole  # results and tool list are prompt
    stop = template.stop_string(tokenizer.bos_token, tokenizer.eos_token)
    assert trained.count(stop) == 2  # both assistant messages end with the stop string, trained


def test_truncation_drops_the_tool_result_and_answer_first(tokenizer):
    template = load_template("qwen")
    full = encode_dialogue(DIALOGUE, template, tokenizer, 4096, tools=TOOLS)
    enc = encode_dialogue(DIALOGUE, template, tokenizer, len(full.input_ids) - 3, tools=TOOLS)
    text = tokenizer.decode(enc.input_ids)
    assert enc.truncated and "<tool_call>" in text and "22 C, sunny" not in text and text.endswith("</tool_call><|im_end|>\n")


def test_a_template_without_tool_format_refuses_calls_and_the_jinja_refuses_tools(tokenizer):
    for conv, tools in ((DIALOGUE, None), (DIALOGUE[:1], TOOLS)):  # calls, or only a tool list
        with pytest.raises(DataError, match="template alpaca has no tool-call format"):
            load_template("alpaca").render(conv, tools=tools)
    jinja = load_template("qwen").to_jinja()
    for kwargs, conv in (({"tools": TOOLS}, DIALOGUE[:1]), ({}, DIALOGUE)):
        with pytest.raises(Exception, match="medgpt only"):
            tokenizer.apply_chat_template(conv, chat_template=jinja, tokenize=False, **kwargs)


@pytest.mark.parametrize("name", ["qwen", "llama3", "mistral", "glm4", "vicuna"])
def test_generated_calls_parse_back(name):
    template = load_template(name)
    names = {t["function"]["name"] for t in TOOLS}
    for message in (CALL, TWO_CALLS) if template.tool_style in ("hermes", "plain", "mistral") else (CALL,):
        turns = template.segments([{"role": "user", "content": "q"}, message])
        answer = next(s.text for s in turns[-1] if s.kind == "answer").removeprefix(template.assistant.split("{content}")[0])
        content, calls = parse_calls(template.tool_style, answer, names)
        assert calls == message["tool_calls"], answer
        assert content == (message["content"] if template.tool_style != "llama3" else "")
    assert parse_calls("hermes", "No call here.", names) == ("No call here.", [])
    assert parse_calls("hermes", '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>', names)[1] == []
    assert parse_calls("hermes", "<tool_call>\nnot json\n</tool_call>", names)[1] == []
