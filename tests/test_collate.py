"""Padding masks labels; packing restarts position ids per example so attention never crosses examples."""

from __future__ import annotations

import torch

from medgpt.data.collate import PadCollator, pack
from medgpt.data.tokenize import IGNORE


def test_pad_collator_masks_padding():
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pack_restarts_positions_and_respects_length():
    examples = [{"input_ids": [1] * 3, "labels": [1] * 3}, {"input_ids": [2] * 4, "labels": [2] * 4}, {"input_ids": [3] * 5, "labels": [3] * 5}]
    rows = pack(examples, max_length=8)
    assert [r["input_ids"] for r in rows] == [[1, 1, 1, 2, 2, 2, 2], [3, 3, 3, 3, 3]]
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1, 2, 3]
    batch = PadCollator(0)(rows)
    assert "attention_mask" not in batch  # the block-diagonal mask comes from position ids
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 1] and batch["labels"][1, 5:].tolist() == [IGNORE, IGNORE]


def test_packed_rows_do_not_attend_across_examples(tiny_path):
    """The logits of an example are the same alone and packed behind another one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="sdpa").eval()
    a, b = [10, 11, 12, 13], [20, 21, 22]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b])).logits[0]
        packed = model(input_ids=torch.tensor([a + b]), position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]]), use_cache=False).logits[0, 4:]
    assert torch.allclose(alone, packed, atol=1e-5)
