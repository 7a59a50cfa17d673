"""Dialogues to token ids with an exact label mask, and truncation that keeps whole turns.

The template renders the dialogue message by message into segments that know their role in the
mask (prompt, answer, stop, separator). The rendered text is tokenised ONCE, with character
offsets, so the ids are exactly the ids serving will see for the same text (tokenising segments
separately can change tokens at segment boundaries); each token takes the role of the segment it
starts in, and is trained if it overlaps an answer or its stop string (so a stop string that merges
with the next turn's first characters is still learned). A token that straddles the end of an answer and
its stop string counts as part of the stop: a stop string that is several tokens of this tokenizer (e.g.
llama3's `<|eot_id|>` on a tokenizer without Llama 3's specials) then stays whole when the answer is cut. Tokenizers without offsets (slow ones)
fall back to tokenising segment by segment.

Labels are -100 on prompt tokens (unless `train_on_inputs`) and on the separator after an answer.
Truncation to `max_length`: whole (user, assistant) turns are dropped from the end while more than
one remains; a single turn that is still too long keeps its stop tokens, cuts the answer from the
right and, if the prompt leaves less than half the row, the prompt from the left. A cut falls between
whole characters: byte-level tokenizers split a Chinese character (3 UTF-8 bytes) over several tokens,
and a cut between them would train the model on half a character (decoded: U+FFFD) before the stop
token, so the answer loses the last bytes of an unfinished character too (and a prompt cut from the
left its first ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from medgpt.data.templates import Segment, Template

IGNORE = -100
TRAINED = ("answer", "answer_end")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


Token = tuple[int, str, int]  # (id, segment kind, turn index; 0 = the head: prefix and system)


def tokens_with_roles(turns: list[list[Segment]], tokenizer) -> list[Token]:
    if not getattr(tokenizer, "is_fast", False):
        return [(i, seg.kind, t) for t, turn in enumerate(turns) for seg in turn
                for i in tokenizer(seg.text, add_special_tokens=False)["input_ids"]]
    spans, text = [], ""
    for turn_idx, turn in enumerate(turns):
        for seg in turn:
            spans.append((len(text), len(text) + len(seg.text), seg.kind, turn_idx))
            text += seg.text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    out: list[Token] = []
    j = 0
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        while j < len(spans) - 1 and spans[j][1] <= start:
            j += 1
        kind, turn = spans[j][2], spans[j][3]
        k = j + 1
        while kind != "answer_end" and k < len(spans) and spans[k][0] < end:  # overlaps a trained span? the stop first
            kind = spans[k][2] if spans[k][2] == "answer_end" or (spans[k][2] == "answer" and kind not in TRAINED) else kind
            k += 1
        out.append((token_id, kind, turn))
    return out


def encode_dialogue(messages: list[dict], template: Template, tokenizer, max_length: int, train_on_inputs: bool = False,
                    tools: list[dict] | None = None) -> Encoded:
    """`tools`: the function schemas the dialogue may call (rendered into the prompt, never trained)."""
    turns = template.segments(messages, tokenizer.bos_token or "", tokenizer.eos_token or "", tools=tools)
    tokens = tokens_with_roles(turns, tokenizer)
    truncated = False
    last_turn = max((t for _, _, t in tokens), default=0)
    while len(tokens) > max_length and last_turn > 1:  # drop whole turns from the end
        tokens = [tok for tok in tokens if tok[2] < last_turn]
        last_turn -= 1
        truncated = True
    if len(tokens) > max_length:
        tokens = _fit_turn(tokens, max_length, tokenizer)
        truncated = True
    labels = [i if (kind in TRAINED or (train_on_inputs and kind == "prompt")) else IGNORE for i, kind, _ in tokens]
    return Encoded([i for i, _, _ in tokens], labels, truncated)


def _fit_turn(tokens: list[Token], max_length: int, tokenizer) -> list[Token]:
    """One over-long turn: keep the stop tokens; cut the answer from the right, the prompt from the left."""
    prompt = [t for t in tokens if t[1] == "prompt"]
    answer = [t for t in tokens if t[1] == "answer"]
    tail = [t for t in tokens if t[1] in ("answer_end", "turn_end")]
    room = max_length - len(tail)
    keep_prompt = min(len(prompt), max(room - len(answer), room // 2))
    prompt = prompt[_clean_start(prompt, len(prompt) - keep_prompt, tokenizer):]
    return prompt + answer[: _clean_end(answer, room - len(prompt), tokenizer)] + tail


REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of an unfinished character
WINDOW = 8  # tokens decoded to judge a cut: a character is at most 4 bytes, so at most 4 tokens


def _clean_end(tokens: list[Token], end: int, tokenizer) -> int:
    """The largest cut <= end after which tokens[:cut] ends on a whole character."""
    end = max(0, min(end, len(tokens)))
    if end == len(tokens):
        return end  # nothing cut
    for cut in range(end, max(0, end - WINDOW // 2) - 1, -1):
        if cut == 0 or not tokenizer.decode([i for i, _, _ in tokens[max(0, cut - WINDOW):cut]]).endswith(REPLACEMENT):
            return cut
    return end  # not a split character (e.g. a literal U+FFFD in the data): cut where asked


def _clean_start(tokens: list[Token], start: int, tokenizer) -> int:
    """The smallest cut >= start before which nothing of a character is left: tokens[cut:] starts on a whole character."""
    start = max(0, min(start, len(tokens)))
    if start == 0:
        return start  # nothing cut
    for cut in range(start, min(len(tokens), start + WINDOW // 2) + 1):
        if cut == len(tokens) or not tokenizer.decode([i for i, _, _ in tokens[cut:cut + WINDOW]]).startswith(REPLACEMENT):
            return cut
    return start


@dataclass
class EncodedResponse:
    input_ids: list[int]
    labels: list[int]  # only the final answer (and its stop string) is labelled
    prompt_truncated: bool = False
    response_truncated: bool = False


def encode_response(prompt: list[dict], response: str, template: Template, tokenizer, max_length: int,
                    max_prompt_length: int) -> EncodedResponse:
    """A prompt (ending with a user turn) plus one answer; for preference pairs.

    A prompt longer than `max_prompt_length` is cut from the left so the answers survive; an answer
    that still does not fit is cut from the right, keeping its stop tokens.
    """
    turns = template.segments(prompt + [{"role": "assistant", "content": response}], tokenizer.bos_token or "", tokenizer.eos_token or "")
    tokens = tokens_with_roles(turns, tokenizer)
    last = len(turns) - 1
    split = next((i for i, (_, kind, turn) in enumerate(tokens) if turn == last and kind in TRAINED), len(tokens))
    head, resp = tokens[:split], tokens[split:]
    prompt_cut = len(head) > max_prompt_length
    if prompt_cut:
        head = head[_clean_start(head, len(head) - max_prompt_length, tokenizer):]
    response_cut = len(head) + len(resp) > max_length
    if response_cut:
        tail = [t for t in resp if t[1] != "answer"]
        answer = [t for t in resp if t[1] == "answer"]
        resp = answer[: _clean_end(answer, max_length - len(head) - len(tail), tokenizer)] + tail
    ids = [i for i, _, _ in head + resp]
    labels = [IGNORE] * len(head) + [i if kind in TRAINED else IGNORE for i, kind, _ in resp]
    return EncodedResponse(ids, labels, prompt_cut, response_cut)
