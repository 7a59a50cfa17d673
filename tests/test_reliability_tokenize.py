"""Truncation of Chinese text: a cut never falls inside a character (a byte-level tokenizer splits one over several
tokens), so the trained text never holds U+FFFD and still ends with the stop token."""

from __future__ import annotations

import pytest
from conftest import ROOT

from medgpt.data.formats import load_records
from medgpt.data.templates import load_template
from medgpt.data.tokenize import IGNORE, encode_dialogue, encode_response

LENGTHS = range(40, 121, 7)  # several cut points: each lands on other bytes of the answers


def _trained(enc, tokenizer) -> str:
    return tokenizer.decode([t for t in enc.labels if t != IGNORE])


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_truncated_chinese_answers_are_cut_between_characters(name, tokenizer):
    template = load_template(name)
    stop = template.stop_string(tokenizer.bos_token, tokenizer.eos_token)
    records, _, _ = load_records([ROOT / "data/sft/medical_demo_zh.jsonl"])
    cut = 0
    for max_length in LENGTHS:
        for rec in records:
            enc = encode_dialogue(rec.messages, template, tokenizer, max_length)
            assert len(enc.input_ids) <= max_length
            if not enc.truncated:
                continue
            cut += 1
            text = _trained(enc, tokenizer)
            assert "\ufffd" not in text, (max_length, text)
            _, found, after = text.rpartition(stop.strip())
            assert found and len(after.strip()) <= 1, (max_length, text)  # ends with the stop (llama3's is plain text to this
            # tokenizer: the token straddling it and the next turn's "<" is trained too, see test_templates)
            assert "\ufffd" not in tokenizer.decode(enc.input_ids)  # nor a prompt cut from the left
    assert cut > 100  # the lengths really cut many answers


def test_truncated_chinese_preference_responses_are_cut_between_characters(tokenizer):
    template = load_template("chatml")
    records, _, _ = load_records([ROOT / "data/dpo/medical_demo_zh.jsonl"])
    cut = 0
    for max_length in LENGTHS:
        for rec in records:
            for response in (rec.chosen, rec.rejected):
                enc = encode_response(rec.messages, response, template, tokenizer, max_length, max_prompt_length=24)
                assert len(enc.input_ids) <= max_length
                if not enc.response_truncated:
                    continue
                cut += 1
                text = _trained(enc, tokenizer)
                assert "\ufffd" not in text and text.endswith("<|im_end|>"), (max_length, text)
                assert "\ufffd" not in tokenizer.decode(enc.input_ids)
    assert cut > 50


def test_a_cut_loses_at_most_the_unfinished_character(tokenizer):
    template = load_template("chatml")
    answer = "维生素D主要靠阳光照射皮肤产生，长期在室内的人容易缺乏。" * 6
    messages = [{"role": "user", "content": "需要补充维生素D吗？"}, {"role": "assistant", "content": answer}]
    for max_length in range(30, 80):
        text = _trained(encode_dialogue(messages, template, tokenizer, max_length), tokenizer)
        kept = text.removesuffix("<|im_end|>")
        assert answer.startswith(kept) and len(kept) > 0
        longer = _trained(encode_dialogue(messages, template, tokenizer, max_length + 8), tokenizer).removesuffix("<|im_end|>")
        assert len(longer) > len(kept)  # four more answer tokens (the prompt gets the other four) fit one more character


def test_english_truncation_is_unchanged(tokenizer):
    template = load_template("chatml")
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "because " * 400}]
    enc = encode_dialogue(messages, template, tokenizer, 64)
    assert len(enc.input_ids) == 64  # whole-character tokens: the cut is exactly where it was asked
