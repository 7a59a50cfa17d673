"""Unpaired examples for KTO: a prompt, one answer and whether it is desirable; preference pairs give one of each.

Each example is stored as its prompt tokens and its completion tokens (the final answer and its stop tokens, the
only labelled part), so the collator can also build the mismatched (prompt, completion) rows that KTO's KL
reference point is estimated from: in a batch of n, row i's prompt with row i−1's completion (TRL's rotation).
"""

from __future__ import annotations

import logging

from datasets import Dataset
from omegaconf import DictConfig

from medgpt.data.collate import PadCollator
from medgpt.data.loading import StageData, tokenised_splits
from medgpt.data.templates import Template
from medgpt.data.tokenize import IGNORE, encode_response
from medgpt.errors import DataError

log = logging.getLogger(__name__)


def unpaired(records):
    """(record, completion, desirable) for every example: unpaired records as they are, a pair as chosen + rejected."""
    for rec in records:
        if rec.label is not None:
            yield rec, rec.completion, rec.label
        elif rec.chosen.strip() != rec.rejected.strip():  # identical pairs carry no preference: dropped (counted)
            yield rec, rec.chosen, True
            yield rec, rec.rejected, False


def encode_unpaired(records, template: Template, tokenizer, max_length: int, max_prompt_length: int) -> tuple[Dataset, dict]:
    cols: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "completion_labels": [], "label": [], "length": []}
    stats = {"examples": 0, "desirable": 0, "undesirable": 0, "from_pairs": 0, "identical_pairs": 0, "prompt_truncated": 0,
             "response_truncated": 0, "tokens": 0}
    for rec in records:
        if rec.label is None:
            stats["from_pairs" if rec.chosen.strip() != rec.rejected.strip() else "identical_pairs"] += 1
    for rec, completion, desirable in unpaired(records):
        try:
            enc = encode_response(rec.messages, completion, template, tokenizer, max_length, max_prompt_length)
        except DataError as e:
            raise DataError(f"{rec.source}: {e}") from None
        split = next((i for i, t in enumerate(enc.labels) if t != IGNORE), len(enc.labels))
        cols["prompt_ids"].append(enc.input_ids[:split])
        cols["completion_ids"].append(enc.input_ids[split:])
        cols["completion_labels"].append(enc.labels[split:])
        cols["label"].append(bool(desirable))
        cols["length"].append(len(enc.input_ids))  # for method.group_by_length
        stats["desirable" if desirable else "undesirable"] += 1
        stats["prompt_truncated"] += enc.prompt_truncated
        stats["response_truncated"] += enc.response_truncated
        stats["tokens"] += len(enc.input_ids)
        stats["examples"] += 1
    return Dataset.from_dict(cols), stats


def build_kto_data(cfg: DictConfig, tokenizer, template: Template) -> StageData:
    m = cfg.method
    data = tokenised_splits(cfg, "kto", tokenizer, template,
                            lambda recs, split: encode_unpaired(recs, template, tokenizer, m.max_length, m.max_prompt_length))
    train = data.stats["train"]
    if train["identical_pairs"]:
        log.warning("data: %d pairs with chosen identical to rejected were dropped", train["identical_pairs"])
    if train["prompt_truncated"]:
        log.info("data: %d prompts longer than method.max_prompt_length=%d were cut from the left", train["prompt_truncated"],
                 m.max_prompt_length)
    if not train["examples"]:
        raise DataError(f"{cfg.data.train_files[0]}: no usable examples (all {train['identical_pairs']} pairs had chosen == rejected).")
    warn_weights(train["desirable"], train["undesirable"], m.desirable_weight, m.undesirable_weight)
    held = data.stats.get("eval", {})
    log.info("data: %d train examples (%d desirable, %d undesirable%s) / %d eval%s", train["examples"], train["desirable"],
             train["undesirable"], f"; from {train['from_pairs']} preference pairs" if train["from_pairs"] else "",
             held.get("examples", 0), " [tokenised-data cache hit]" if data.cache_hit else "")
    return data


def warn_weights(desirable: int, undesirable: int, w_d: float, w_u: float) -> None:
    """TRL's check of Eq. (8) of the KTO paper: w_d·n_d / (w_u·n_u) should lie in [1, 4/3]."""
    n_d, n_u = max(desirable, 1), max(undesirable, 1)
    if n_d == n_u:
        return
    d_low, d_high = round(n_u * w_u / n_d, 2), round(n_u * w_u / n_d * 1.33, 2)
    u_low, u_high = round(n_d * w_d / n_u / 1.33, 2), round(n_d * w_d / n_u, 2)
    if not (d_low <= w_d <= d_high or u_low <= w_u <= u_high):
        log.warning("data: %d desirable and %d undesirable examples: set method.desirable_weight in [%g, %g] or "
                    "method.undesirable_weight in [%g, %g] (KTO paper, Eq. 8)", desirable, undesirable, d_low, d_high, u_low, u_high)


class UnpairedCollator:
    """Rows prompt + completion (labels on the completion), the `desirable` flags, and with `kl` the mismatched rows
    `kl_input_ids`/`kl_attention_mask`/`kl_labels`: row i's prompt with row i−1's completion (cut to `max_length`).

    A batch of one has no other completion: its KL row is its own (as in TRL), and the KL estimate equals its reward."""

    def __init__(self, pad_token_id: int, max_length: int, kl: bool = True):
        self.pad, self.max_length, self.kl = PadCollator(pad_token_id), max_length, kl

    def __call__(self, rows: list[dict]):
        import torch

        def row(prompt, ids, labels):
            room = max(self.max_length - len(prompt), 0)
            return {"input_ids": list(prompt) + list(ids)[:room], "labels": [IGNORE] * len(prompt) + list(labels)[:room]}

        batch = self.pad([row(r["prompt_ids"], r["completion_ids"], r["completion_labels"]) for r in rows])
        batch["desirable"] = torch.tensor([bool(r["label"]) for r in rows])
        if self.kl:
            kl = self.pad([row(r["prompt_ids"], rows[i - 1]["completion_ids"], rows[i - 1]["completion_labels"])
                           for i, r in enumerate(rows)])  # rows[-1] for i = 0: the rotation (x_1, y_n), (x_2, y_1), ...
            batch.update({f"kl_{k}": v for k, v in kl.items()})
        return batch
