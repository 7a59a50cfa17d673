"""Dialogue data for SFT: files -> records -> train/eval split -> tokenised (cached) -> optionally packed.

A record's `tools` (function schemas) go into its prompt; its assistant tool calls are trained like answers."""

from __future__ import annotations

import logging

from datasets import Dataset
from omegaconf import DictConfig

from medgpt.data.collate import pack
from medgpt.data.formats import Record
from medgpt.data.loading import StageData, tokenised_splits
from medgpt.data.templates import Template
from medgpt.data.tokenize import IGNORE, encode_dialogue
from medgpt.errors import DataError

log = logging.getLogger(__name__)


def _encode_all(records: list[Record], template: Template, tokenizer, max_length: int, train_on_inputs: bool) -> tuple[Dataset, dict]:
    cols: dict[str, list] = {"input_ids": [], "labels": []}
    truncated = empty = 0
    for rec in records:
        try:
            enc = encode_dialogue(rec.messages, template, tokenizer, max_length, train_on_inputs, getattr(rec, "tools", None))
        except DataError as e:
            raise DataError(f"{rec.source}: {e}") from None
        truncated += enc.truncated
        if all(label == IGNORE for label in enc.labels):
            empty += 1  # nothing left to learn after truncation
            continue
        cols["input_ids"].append(enc.input_ids)
        cols["labels"].append(enc.labels)
    tokens = sum(map(len, cols["input_ids"]))
    trained = sum(sum(1 for t in labels if t != IGNORE) for labels in cols["labels"])
    return Dataset.from_dict(cols), {"examples": len(cols["input_ids"]), "truncated": truncated, "dropped_empty": empty,
                                     "tokens": tokens, "trained_tokens": trained}


def build_sft_data(cfg: DictConfig, tokenizer, template: Template) -> StageData:
    m = cfg.method

    def encode(records: list[Record], split: str) -> tuple[Dataset, dict]:  # record by record (in shards)
        return _encode_all(records, template, tokenizer, m.max_length, m.train_on_inputs)

    def finish(ds: Dataset, split: str) -> tuple[Dataset, dict]:  # the whole split: packing crosses shards
        if split == "train" and m.packing:
            ds = Dataset.from_list(pack(ds, m.max_length))
            return ds, {"packed_rows": len(ds)}
        return ds, {}

    data = tokenised_splits(cfg, "sft", tokenizer, template, encode, finish)
    train = data.stats["train"]
    log.info("data: %d train / %d eval examples (%s)%s", train["examples"], data.stats.get("eval", {}).get("examples", 0),
             data.stats["format"], " [tokenised-data cache hit]" if data.cache_hit else "")
    if train["truncated"]:  # most examples cut: their later turns (often the answers) are lost, so say it loudly
        many = train["truncated"] * 2 > train["examples"] + train["dropped_empty"]
        (log.warning if many else log.info)("data: %d of %d training examples truncated to method.max_length=%d%s",
                                            train["truncated"], train["examples"] + train["dropped_empty"], m.max_length,
                                            "; raise method.max_length (mode=preview shows the lengths)" if many else "")
    return data
