"""Dialogues to token ids with an exact label mask, and truncation that keeps whole turns.

Each template segment is tokenised on its own (no special tokens added), so every token knows
whether it belongs to a prompt or to an answer. Labels are -100 on prompt tokens (unless
`train_on_inputs`) and on the separator after an answer; the answer and its stop string are trained.

Truncation to `max_length`: whole (user, assistant) turns are dropped from the end while more than
one remains; a single turn that is still too long keeps its answer's stop tokens, cuts the answer
from the right and, if the prompt alone leaves no room for half the row, the prompt from the left.
"""

from __future__ import annotations

from dataclasses import dataclass

from medgpt.data.templates import Template

IGNORE = -100
TRAINED = ("answer", "answer_end")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_dialogue(messages: list[dict], template: Template, tokenizer, max_length: int, train_on_inputs: bool = False) -> Encoded:
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    turns = [[(_ids(tokenizer, s.text), s.kind) for s in turn] for turn in template.segments(messages, bos, eos)]
    head, body = turns[0], turns[1:]
    size = lambda segs: sum(len(ids) for ids, _ in segs)  # noqa: E731
    truncated = False
    while len(body) > 1 and size(head) + sum(map(size, body)) > max_length:
        body.pop()
        truncated = True
    if body and size(head) + size(body[0]) > max_length:
        head, body = [], [_fit_turn(head + body[0], max_length)]
        truncated = True
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, kind in [seg for turn in [head] + body for seg in turn]:
        input_ids += ids
        labels += ids if (kind in TRAINED or (train_on_inputs and kind == "prompt")) else [IGNORE] * len(ids)
    return Encoded(input_ids, labels, truncated)


def _fit_turn(segs: list[tuple[list[int], str]], max_length: int) -> list[tuple[list[int], str]]:
    """One over-long turn: keep the stop tokens; cut the answer from the right, the prompt from the left."""
    prompt = [t for ids, k in segs if k == "prompt" for t in ids]
    answer = [t for ids, k in segs if k == "answer" for t in ids]
    tail = [(ids, k) for ids, k in segs if k in ("answer_end", "turn_end")]
    tail_len = sum(len(ids) for ids, _ in tail)
    room = max_length - tail_len
    keep_prompt = min(len(prompt), max(room - len(answer), room // 2))
    prompt = prompt[len(prompt) - keep_prompt:]
    answer = answer[: room - len(prompt)]
    return [(prompt, "prompt"), (answer, "answer")] + tail

