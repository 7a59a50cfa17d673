"""Preference pairs for DPO and friends: prompt turns through the template, chosen and rejected answers labelled."""

from __future__ import annotations

import logging

from datasets import Dataset
from omegaconf import DictConfig

from medgpt.data.loading import StageData, tokenised_splits
from medgpt.data.templates import Template
from medgpt.data.tokenize import encode_response
from medgpt.errors import DataError

log = logging.getLogger(__name__)


def encode_pairs(records, template: Template, tokenizer, max_length: int, max_prompt_length: int) -> tuple[Dataset, dict]:
    cols: dict[str, list] = {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [], "rejected_labels": [], "length": []}
    stats = {"examples": 0, "identical_pairs": 0, "prompt_truncated": 0, "response_truncated": 0, "tokens": 0}
    for rec in records:
        if rec.chosen.strip() == rec.rejected.strip():
            stats["identical_pairs"] += 1  # no preference to learn: dropped
            continue
        try:
            chosen = encode_response(rec.messages, rec.chosen, template, tokenizer, max_length, max_prompt_length)
            rejected = encode_response(rec.messages, rec.rejected, template, tokenizer, max_length, max_prompt_length)
        except DataError as e:
            raise DataError(f"{rec.source}: {e}") from None
        stats["prompt_truncated"] += chosen.prompt_truncated
        stats["response_truncated"] += chosen.response_truncated or rejected.response_truncated
        for side, enc in (("chosen", chosen), ("rejected", rejected)):
            cols[f"{side}_input_ids"].append(enc.input_ids)
            cols[f"{side}_labels"].append(enc.labels)
            stats["tokens"] += len(enc.input_ids)
        cols["length"].append(max(len(chosen.input_ids), len(rejected.input_ids)))  # for method.group_by_length
        stats["examples"] += 1
    return Dataset.from_dict(cols), stats


def build_dpo_data(cfg: DictConfig, tokenizer, template: Template) -> StageData:
    m = cfg.method
    data = tokenised_splits(cfg, "dpo", tokenizer, template,
                            lambda recs, split: encode_pairs(recs, template, tokenizer, m.max_length, m.max_prompt_length))
    train = data.stats["train"]
    if train["identical_pairs"]:
        log.warning("data: %d pairs with chosen identical to rejected were dropped", train["identical_pairs"])
    if train["prompt_truncated"]:
        log.info("data: %d prompts longer than method.max_prompt_length=%d were cut from the left", train["prompt_truncated"],
                 m.max_prompt_length)
    if not train["examples"]:
        raise DataError(f"{cfg.data.train_files[0]}: no usable preference pairs (all {train['identical_pairs']} had chosen == rejected).")
    log.info("data: %d train / %d eval preference pairs%s", train["examples"], data.stats.get("eval", {}).get("examples", 0),
             " [tokenised-data cache hit]" if data.cache_hit else "")
    return data
