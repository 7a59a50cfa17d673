"""Templates: exact label masks, Jinja equivalence (what serving uses), and template=auto."""

from __future__ import annotations

import pytest
from conftest import ROOT

from medgpt.data.templates import Template, available_templates, identify_template, load_template, resolve_template
from medgpt.data.tokenize import IGNORE, encode_dialogue
from medgpt.errors import ConfigError

TEMPLATES = available_templates()
SYSTEM = {"role": "system", "content": "You are a careful medical assistant."}
TURNS = [
    {"role": "user", "content": "I have had a headache for two days."},
    {"role": "assistant", "content": "Rest, drink water and take paracetamol if needed."},
    {"role": "user", "content": "When should I see a doctor?"},
    {"role": "assistant", "content": "If it is sudden and severe, or comes with fever and a stiff neck: now."},
]
CONVERSATIONS = [TURNS[:2], [SYSTEM] + TURNS, TURNS, [SYSTEM] + TURNS[:1], TURNS[:3]]


def test_the_required_templates_exist():
    assert {"chatml", "qwen", "llama3", "llama2", "vicuna", "alpaca"} <= set(TEMPLATES)


@pytest.mark.parametrize("name", TEMPLATES)
def test_jinja_renders_the_same_text(name, tokenizer):
    template = load_template(name)
    jinja = template.to_jinja()
    for conv in CONVERSATIONS:
        generation = conv[-1]["role"] == "user"
        ours = template.render(conv, tokenizer.bos_token, tokenizer.eos_token, add_generation_prompt=generation)
        theirs = tokenizer.apply_chat_template(conv, chat_template=jinja, tokenize=False, add_generation_prompt=generation)
        assert ours == theirs


@pytest.mark.parametrize("name", TEMPLATES)
def test_mask_trains_exactly_the_answers_and_their_stop(name, tokenizer):
    template = load_template(name)
    stop = template.stop_string(tokenizer.bos_token, tokenizer.eos_token)
    enc = encode_dialogue([SYSTEM] + TURNS, template, tokenizer, max_length=1024)
    assert len(enc.input_ids) == len(enc.labels) and not enc.truncated
    trained = [t for t in enc.labels if t != IGNORE]
    lead, tail = template.special(template.assistant, tokenizer.bos_token, tokenizer.eos_token).split("{content}")
    answers = [lead + m["content"] + tail for m in TURNS if m["role"] == "assistant"]
    if len(tokenizer(stop, add_special_tokens=False)["input_ids"]) == 1:
        assert tokenizer.decode(trained) == "".join(answers)
    else:  # e.g. llama3's <|eot_id|> is plain text to this tokenizer: a token straddling the stop is trained too
        assert all(a in tokenizer.decode(trained) for a in answers)
        assert len(tokenizer.decode(trained)) <= len("".join(answers)) + 2
    # every answer ends with the stop string, and it is TRAINED: each trained run of labels (one per answer) ends with it
    runs, run = [], []
    for label in enc.labels + [IGNORE]:
        if label != IGNORE:
            run.append(label)
        elif run:
            runs, run = runs + [tokenizer.decode(run)], []
    assert len(runs) == len(answers)
    for text, answer in zip(runs, answers):
        assert stop in answer and text.startswith(answer[: answer.rindex(stop)])
        _, found, after = text.rpartition(stop)
        assert found and len(after) <= 2, text  # <= 2: a token straddling a plain-text stop and what follows (see above)
    # prompt tokens are masked: the user's words never appear in the trained text
    assert "headache" not in tokenizer.decode(trained) and "headache" in tokenizer.decode(enc.input_ids)


@pytest.mark.parametrize("name", TEMPLATES)
def test_mask_matches_transformers_assistant_mask(name, tokenizer):
    """The {% generation %} marks in the saved Jinja give transformers the same mask as ours."""
    template = load_template(name)
    conv = [SYSTEM] + TURNS
    out = tokenizer.apply_chat_template(conv, chat_template=template.to_jinja(), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    theirs = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    ours = tokenizer.decode([t for t in encode_dialogue(conv, template, tokenizer, 1024).labels if t != IGNORE])
    assert theirs == ours


@pytest.mark.parametrize("name", ["chatml", "smollm2", "qwen", "llama3", "alpaca"])
def test_segment_tokens_equal_whole_text_tokens(name, tokenizer):
    """Tokenising message by message gives the ids that tokenising the rendered prompt gives at serving time."""
    template = load_template(name)
    conv = [SYSTEM] + TURNS
    enc = encode_dialogue(conv, template, tokenizer, 1024)
    whole = tokenizer(template.render(conv, tokenizer.bos_token, tokenizer.eos_token), add_special_tokens=False)["input_ids"]
    assert enc.input_ids == whole


def test_train_on_inputs_trains_everything_but_separators(tokenizer):
    template = load_template("chatml")
    enc = encode_dialogue([SYSTEM] + TURNS, template, tokenizer, 1024, train_on_inputs=True)
    masked = [i for i, t in zip(enc.input_ids, enc.labels) if t == IGNORE]
    assert tokenizer.decode(masked) == "\n\n"  # only the separators after each answer


def test_default_system_and_first_user_position(tokenizer):
    vicuna, llama2 = load_template("vicuna"), load_template("llama2")
    assert vicuna.render(TURNS[:2]).startswith(vicuna.default_system)
    text = llama2.render([SYSTEM] + TURNS[:2], "<s>", "</s>")
    assert text.startswith("<s>[INST] <<SYS>>\nYou are a careful medical assistant.\n<</SYS>>\n\nI have had")


def test_auto_identifies_the_tokenizer_template(tokenizer):
    assert identify_template(tokenizer).name == "smollm2"  # SmolLM2's own: ChatML with its default system prompt
    cfg_auto = {"name": "auto"}
    assert resolve_template(cfg_auto, "qwen", tokenizer).name == "qwen"  # model.template wins over the tokenizer
    assert resolve_template(cfg_auto, "auto", tokenizer).name == "smollm2"
    assert resolve_template(load_template("llama3").__dict__, "qwen", tokenizer).name == "llama3"  # template=<name> wins


def test_auto_refuses_an_unknown_template(tokenizer):
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
        with pytest.raises(ConfigError, match="matches none"):
            identify_template(tokenizer)
    finally:
        tokenizer.chat_template = original


def test_bad_template_definitions_are_refused():
    with pytest.raises(ConfigError, match="content"):
        Template.from_mapping({"name": "x", "user": "no slot", "system": "{content}", "assistant": "{content}", "stop": "."})
    with pytest.raises(ConfigError, match="stop"):
        Template.from_mapping({"name": "x", "user": "{content}", "system": "{content}", "assistant": "{content}"})


# --- ≥ 14 families, each against its published prompt format ------------------------------------------------------------

FAMILIES = {"chatml", "qwen", "qwen3", "qwen3_nothink", "llama2", "llama3", "mistral", "mistral_tekken", "gemma", "phi3", "phi4",
            "deepseek", "deepseek3", "glm4", "baichuan2", "yi", "vicuna", "alpaca", "smollm2"}
DIALOGUE = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}]
# Written by this project from each family's documented format (bos "<s>", eos "</s>" where the family uses the tokenizer's):
# system prompt, one answered turn, a second question and the generation prompt.
EXPECTED = {
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
              "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n",
    "qwen3_nothink": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
                     "A1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "llama2": "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
              "Q1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
              "Q2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Q1[/INST] A1</s>[INST] S\n\nQ2[/INST]",
    "mistral_tekken": "<s>[INST]Q1[/INST]A1</s>[INST]S\n\nQ2[/INST]",
    "gemma": "<s><start_of_turn>user\nS\n\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n<start_of_turn>user\nQ2<end_of_turn>\n"
             "<start_of_turn>model\n",
    "phi3": "<|system|>\nS<|end|>\n<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nQ2<|end|>\n<|assistant|>\n",
    "phi4": "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>Q1<|im_end|><|im_start|>assistant<|im_sep|>A1<|im_end|>"
            "<|im_start|>user<|im_sep|>Q2<|im_end|><|im_start|>assistant<|im_sep|>",
    "deepseek": "<s>S\n\nUser: Q1\n\nAssistant: A1</s>User: Q2\n\nAssistant:",
    "deepseek3": "<s>S<｜User｜>Q1<｜Assistant｜>A1<｜end▁of▁sentence｜><｜User｜>Q2<｜Assistant｜>",
    "glm4": "[gMASK]<sop><|system|>\nS<|user|>\nQ1<|assistant|>\nA1</s><|user|>\nQ2<|assistant|>",
    "baichuan2": "S<reserved_106>Q1<reserved_107>A1</s><reserved_106>Q2<reserved_107>",
    "vicuna": "S USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
    "alpaca": "S\n\n### Instruction:\nQ1\n\n### Response:\nA1</s>\n\n### Instruction:\nQ2\n\n### Response:\n",
}
for _same in ("qwen", "qwen3", "yi", "smollm2"):  # ChatML families: the same text once a system prompt is given
    EXPECTED[_same] = EXPECTED["chatml"]


# Two answered turns, no system prompt, no generation prompt (a training dialogue): the default system prompts appear.
ANSWERED_TURNS = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                  {"role": "assistant", "content": "A2"}]
EXPECTED_TRAINING = {
    "alpaca": 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n'
        '\n### Instruction:\nQ1\n\n### Response:\nA1</s>\n\n### Instruction:\nQ2\n\n### Response:\nA2</s>\n'
        '\n',
    "baichuan2": '<reserved_106>Q1<reserved_107>A1</s><reserved_106>Q2<reserved_107>A2</s>',
    "chatml": '<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\n'
        'Q2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n',
    "deepseek": '<s>User: Q1\n\nAssistant: A1</s>User: Q2\n\nAssistant: A2</s>',
    "deepseek3": '<s><｜User｜>Q1<｜Assistant｜>A1<｜end▁of▁sentence｜><｜User｜>Q2<｜Assistant｜>A2<｜end▁of▁sentence｜>',
    "gemma": '<s><start_of_turn>user\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n'
        '<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n',
    "glm4": '[gMASK]<sop><|user|>\nQ1<|assistant|>\nA1</s><|user|>\nQ2<|assistant|>\nA2</s>',
    "llama2": '<s>[INST] Q1 [/INST] A1 </s><s>[INST] Q2 [/INST] A2 </s>',
    "llama3": '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n'
        'Q1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
        'A1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n'
        'Q2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>',
    "mistral": '<s>[INST] Q1[/INST] A1</s>[INST] Q2[/INST] A2</s>',
    "mistral_tekken": '<s>[INST]Q1[/INST]A1</s>[INST]Q2[/INST]A2</s>',
    "phi3": '<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nQ2<|end|>\n<|assistant|>\nA2<|end|>\n',
    "phi4": '<|im_start|>user<|im_sep|>Q1<|im_end|><|im_start|>assistant<|im_sep|>A1<|im_end|><|im_star'
        't|>user<|im_sep|>Q2<|im_end|><|im_start|>assistant<|im_sep|>A2<|im_end|>',
    "qwen": '<|im_start|>system\n'
        'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n'
        'Q1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n'
        '<|im_start|>assistant\nA2<|im_end|>\n',
    "qwen3": '<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\n'
        'Q2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n',
    "qwen3_nothink": '<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA1<|im_end|>\n'
        '<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA2<|im_end|>\n',
    "smollm2": '<|im_start|>system\n'
        'You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n'
        'Q1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n'
        '<|im_start|>assistant\nA2<|im_end|>\n',
    "vicuna": 'A chat between a curious user and an artificial intelligence assistant. The assistant give'
        "s helpful, detailed, and polite answers to the user's questions. USER: Q1 ASSISTANT: A1</s"
        '>USER: Q2 ASSISTANT: A2</s>',
    "yi": '<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\n'
        'Q2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n',

}


def test_at_least_fourteen_families_and_the_old_names():
    assert FAMILIES <= set(TEMPLATES) and len(TEMPLATES) >= 14
    assert set(EXPECTED) == set(EXPECTED_TRAINING) == FAMILIES


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rendering_follows_the_published_format(name):
    assert load_template(name).render(DIALOGUE, "<s>", "</s>", add_generation_prompt=True) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_TRAINING))
def test_training_dialogue_follows_the_published_format(name):
    assert load_template(name).render(ANSWERED_TURNS, "<s>", "</s>") == EXPECTED_TRAINING[name]


def test_default_system_prompts_and_their_absence():
    user = [{"role": "user", "content": "Q"}]
    assert load_template("qwen").render(user, add_generation_prompt=True).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ")
    for name in ("chatml", "qwen3", "yi"):
        assert load_template(name).render(user, add_generation_prompt=True) == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert load_template("mistral").render(user, "<s>", "</s>", True) == "<s>[INST] Q[/INST]"
    assert load_template("gemma").render(user, "<bos>", "<eos>", True) == "<bos><start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\n"


# --- parity with the families' own (official) chat templates, stored under tests/fixtures/chat_templates -----------------

OFFICIAL = ROOT / "tests" / "fixtures" / "chat_templates"
SINGLE = [[SYSTEM, TURNS[0]], [SYSTEM] + TURNS[:2], [TURNS[0]], TURNS[:2]]  # one question (+ its answer)
ASKING = [[SYSTEM] + TURNS[:3], TURNS[:3], [SYSTEM, TURNS[0]], [TURNS[0]]]  # ending in a question: generation prompts
NO_SYSTEM = [c for c in CONVERSATIONS if c[0]["role"] != "system"]
ANSWERED = [c for c in CONVERSATIONS if c[-1]["role"] == "assistant"]
# (ours, official file, bos, eos, template kwargs, dialogues); the comments in conf/template/<ours>.yaml say what differs
PARITY = [
    ("smollm2", "smollm2.jinja", None, None, {}, CONVERSATIONS),
    ("qwen", "qwen2_5.jinja", None, None, {}, CONVERSATIONS),
    ("qwen3", "qwen3.jinja", None, None, {}, ASKING),  # Qwen3 adds an empty think block to a dialogue's final answer
    ("qwen3_nothink", "qwen3.jinja", None, None, {"enable_thinking": False}, SINGLE),  # and drops it from earlier turns
    ("llama3", "llama3.jinja", "<|begin_of_text|>", None, {}, CONVERSATIONS),
    ("gemma", "gemma3.jinja", "<bos>", "<eos>", {}, CONVERSATIONS),
    ("gemma", "gemma.jinja", "<bos>", "<eos>", {}, NO_SYSTEM),  # Gemma 2 refuses a system prompt
    ("phi3", "phi3.jinja", None, "<|endoftext|>", {}, ASKING),  # Phi-3 appends eos after a dialogue without generation prompt
    ("phi3", "phi3_5.jinja", None, "<|endoftext|>", {}, ASKING),
    ("deepseek3", "deepseekv3.jinja", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", {}, ANSWERED),  # V3-0324 prompts "<think>\n"
]


@pytest.mark.parametrize("ours,official,bos,eos,kwargs,dialogues", PARITY, ids=[f"{p[0]}-{p[1]}" for p in PARITY])
def test_rendering_equals_the_official_chat_template(ours, official, bos, eos, kwargs, dialogues, tokenizer):
    template, jinja = load_template(ours), (OFFICIAL / official).read_text()
    bos, eos = bos or tokenizer.bos_token, eos or tokenizer.eos_token
    for conv in dialogues:
        generation = conv[-1]["role"] == "user"
        theirs = tokenizer.apply_chat_template(conv, chat_template=jinja, tokenize=False, add_generation_prompt=generation,
                                               bos_token=bos, eos_token=eos, **kwargs)
        assert template.render(conv, bos, eos, add_generation_prompt=generation) == theirs


def test_smollm2_matches_the_embedded_tokenizers_own_template(tokenizer):
    assert tokenizer.chat_template == (OFFICIAL / "smollm2.jinja").read_text()  # the stored copy is the model's own


# --- a stop string that is several tokens of this tokenizer stays whole in a truncated answer ------------------------------

def test_multi_token_stop_survives_truncation(tokenizer):
    template = load_template("llama3")  # <|eot_id|> is plain text (several tokens) to SmolLM2's tokenizer
    assert len(tokenizer("<|eot_id|>", add_special_tokens=False)["input_ids"]) > 1
    answer = "Drink water, rest and measure the temperature twice a day. " * 12 + "Then call."  # "." merges with "<"
    msgs = [{"role": "user", "content": "What should I do?"}, {"role": "assistant", "content": answer}]
    assert tokenizer.decode(tokenizer(".<|eot_id|>", add_special_tokens=False)["input_ids"][:1]) == ".<"  # the straddling token
    for limit in range(30, 80, 7):
        enc = encode_dialogue(msgs, template, tokenizer, limit)
        trained = tokenizer.decode([t for t in enc.labels if t != IGNORE])
        assert enc.truncated and len(enc.input_ids) <= limit
        assert trained.endswith("<|eot_id|>") and trained.count("<|eot_id|>") == 1 and trained.startswith("Drink water")
        assert tokenizer.decode(enc.input_ids).endswith("<|eot_id|>")


def test_template_definitions_refuse_unknown_positions_and_styles():
    base = {"name": "x", "user": "{content}", "system": "{content}", "assistant": "{content}", "stop": "."}
    with pytest.raises(ConfigError, match="system_position"):
        Template.from_mapping({**base, "system_position": "middle"})
    with pytest.raises(ConfigError, match="tool_style"):
        Template.from_mapping({**base, "tool_style": "xml"})
    with pytest.raises(ConfigError, match="'tool'"):
        Template.from_mapping({**base, "tool": "no slot"})
