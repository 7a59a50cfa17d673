"""The hf engine's decode-step optimisations (issue 14, item 2) give exactly what the slow path gave:
incremental detokenisation (only the tokens since the last complete character are decoded) equals decoding the whole
answer at every step, and choosing the greedy rows' tokens with one argmax over the batch equals each row's own pick,
also in a batch mixing greedy, seeded sampling and repetition-penalty rows."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from medgpt.serving.engine import SamplingParams
from medgpt.serving.hf_engine import _Row, pick_tokens

TEXTS = ["A fever of 38.5 °C in adults: rest, fluids — and see a doctor if it lasts > 3 days.",
         "发烧时多喝水，注意休息。如果持续三天以上，请就医。", "Emoji 🤒🌡️💊 and accents: café, naïve, Zürich.",
         "  leading spaces,\ttabs\nand\n\nnew lines  ", "<|im_end|> special tokens <|im_start|>assistant inside text"]


def row(params: SamplingParams, prompt=(1, 2, 3)) -> _Row:
    return _Row(SimpleNamespace(params=params, prompt_ids=list(prompt)), ())


def incremental(tokenizer, ids: list[int]) -> list[tuple[str, str]]:
    r = row(SamplingParams())
    out = []
    for t in ids:
        r.ids.append(t)
        out.append((r.decoded(tokenizer), tokenizer.decode(r.ids, skip_special_tokens=True)))
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoding_equals_decoding_the_whole_answer(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    steps = incremental(tokenizer, ids)
    assert [got for got, _ in steps] == [whole for _, whole in steps]
    assert steps[-1][0] == tokenizer.decode(ids, skip_special_tokens=True)


def test_incremental_decoding_of_random_tokens_with_broken_characters_and_special_tokens(tokenizer):
    rng = random.Random(0)
    specials = tokenizer.all_special_ids
    for _ in range(20):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tokenizer)) for _ in range(60)]
        steps = incremental(tokenizer, ids)
        assert [got for got, _ in steps] == [whole for _, whole in steps]


def test_batch_picks_equal_each_row_picked_alone():
    torch.manual_seed(0)
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=7), SamplingParams(temperature=0, repetition_penalty=1.3),
             SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=3),
             SamplingParams(temperature=0)]
    batch, slow = [row(p) for p in kinds], [row(p) for p in kinds]  # the same seeds: the same sampler streams
    for _ in range(5):
        logits = torch.randn(len(kinds), 300)
        logits[:, 2] += 3  # a prompt token is likely: the repetition penalty changes the greedy row's choice sometimes
        fast = pick_tokens(batch, logits.clone())
        assert fast == [pick_tokens([r], lg[None].clone())[0] for r, lg in zip(slow, logits)]
        for a, b, t in zip(batch, slow, fast):
            a.seen.add(t), b.seen.add(t)
    assert [r.greedy for r in batch] == [True, False, False, True, False, True]


def test_all_greedy_batch_is_one_argmax():
    rows = [row(SamplingParams(temperature=0)) for _ in range(4)]
    logits = torch.randn(4, 50)
    assert pick_tokens(rows, logits) == logits.argmax(-1).tolist()
