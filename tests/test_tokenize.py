"""Truncation keeps whole turns and never loses the final end-of-turn token."""

from __future__ import annotations

from medgpt.data.templates import load_template
from medgpt.data.tokenize import IGNORE, encode_dialogue

CHATML = load_template("chatml")


def conversation(turns: int, answer_words: int = 10) -> list[dict]:
    msgs = []
    for t in range(turns):
        msgs += [{"role": "user", "content": f"question {t} " + "why " * 5},
                 {"role": "assistant", "content": f"answer {t} " + "because " * answer_words}]
    return msgs


def trained_text(enc, tokenizer) -> str:
    return tokenizer.decode([t for t in enc.labels if t != IGNORE])


def test_no_truncation_when_it_fits(tokenizer):
    enc = encode_dialogue(conversation(3), CHATML, tokenizer, 1024)
    assert not enc.truncated and trained_text(enc, tokenizer).count("<|im_end|>") == 3


def test_whole_turns_are_dropped_from_the_end(tokenizer):
    full = encode_dialogue(conversation(3), CHATML, tokenizer, 1024)
    limit = len(full.input_ids) - 5  # the last turn no longer fits
    enc = encode_dialogue(conversation(3), CHATML, tokenizer, limit)
    text = tokenizer.decode(enc.input_ids)
    assert enc.truncated and len(enc.input_ids) <= limit
    assert "answer 1" in text and "question 2" not in text  # turn 2 dropped whole, turns 0-1 intact
    assert text.endswith("<|im_end|>\n") and trained_text(enc, tokenizer).count("<|im_end|>") == 2


def test_single_long_turn_keeps_its_stop_token(tokenizer):
    enc = encode_dialogue(conversation(1, answer_words=400), CHATML, tokenizer, 64)
    assert enc.truncated and len(enc.input_ids) == 64
    assert trained_text(enc, tokenizer).endswith("<|im_end|>")
    assert "<|im_start|>assistant\n" in tokenizer.decode(enc.input_ids)  # the prompt still ends in the generation prefix


def test_long_prompt_is_cut_from_the_left(tokenizer):
    msgs = [{"role": "user", "content": "context " * 300 + "final question?"}, {"role": "assistant", "content": "Short answer."}]
    enc = encode_dialogue(msgs, CHATML, tokenizer, 48)
    text = tokenizer.decode(enc.input_ids)
    assert len(enc.input_ids) <= 48 and "final question?" in text and trained_text(enc, tokenizer) == "Short answer.<|im_end|>"
