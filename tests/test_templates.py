"""Templates: exact label masks, Jinja equivalence (what serving uses), and template=auto."""

from __future__ import annotations

import pytest

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
