"""Batching: right-padding with masked labels, and packing several examples into one row.

Packed rows carry per-example `position_ids` (restarting at 0 for each example) and no
attention mask: transformers then builds a block-diagonal causal mask from the position ids
(sdpa/eager) or uses varlen kernels (flash-attention), so attention never crosses examples.
Padding inside a packed row forms its own block and is never in the loss.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from medgpt.data.tokenize import IGNORE


class PadCollator:
    """Pads `input_ids`/`labels` (and `position_ids` when present) to the longest row in the batch."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in rows[0]
        batch: dict[str, list] = {"input_ids": [], "labels": [], "position_ids" if packed else "attention_mask": []}
        for r in rows:
            n, pad = len(r["input_ids"]), width - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [IGNORE] * pad)
            if packed:
                batch["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * n + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def pack(examples: Iterable[dict], max_length: int) -> list[dict]:
    """Greedy first-fit-in-order packing of tokenised examples into rows of at most `max_length`."""
    rows: list[dict] = []
    current = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        ids, labels = list(ex["input_ids"])[:max_length], list(ex["labels"])[:max_length]
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ids
        current["labels"] += labels
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        rows.append(current)
    return rows


def pack_documents(documents: Iterable[list[int]], block: int, pad_token_id: int, drop_last: bool = False) -> list[dict]:
    """Continued-pretraining rows of exactly `block` tokens from tokenised documents (each ending in eos).

    Position ids restart at every document start, so attention never crosses documents, and the first
    token of a document that follows another in the row is not labelled (it would be predicted from the
    previous document). A document longer than the room left continues in the next row. The final
    partial row is padded (pads never labelled) unless `drop_last`.
    """
    rows: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []

    def flush():
        rows.append({"input_ids": ids[:], "labels": labels[:], "position_ids": positions[:]})
        ids.clear(), labels.clear(), positions.clear()

    for doc in documents:
        start = 0
        while start < len(doc):
            take = doc[start:start + block - len(ids)]
            ids.extend(take)
            labels.extend([IGNORE if (start == 0 and len(labels) > 0) else take[0]] + take[1:])
            positions.extend(range(len(take)))
            start += len(take)
            if len(ids) == block:
                flush()
    if ids and not drop_last:
        pad = block - len(ids)
        ids.extend([pad_token_id] * pad)
        labels.extend([IGNORE] * pad)
        positions.extend(range(pad))
        flush()
    return rows


def chunk_documents(documents: Iterable[list[int]], block: int) -> list[dict]:
    """Without packing: one row per document (long ones split into `block`-sized pieces); padding comes later."""
    return [{"input_ids": doc[i:i + block], "labels": doc[i:i + block]} for doc in documents for i in range(0, len(doc), block)]


class PreferenceCollator:
    """Chosen and rejected rows padded to one width and stacked: [chosen_0..chosen_B, rejected_0..rejected_B]."""

    def __init__(self, pad_token_id: int):
        self.pad = PadCollator(pad_token_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [{"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"]} for side in ("chosen", "rejected") for r in rows]
        batch = self.pad(seqs)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
        return batch
