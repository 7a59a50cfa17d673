"""Dialogue data for SFT: files -> records -> train/eval split -> tokenised (cached) -> optionally packed."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from omegaconf import DictConfig

from medgpt.data.cache import cached_datasets, content_key, tokenizer_fingerprint
from medgpt.data.collate import pack
from medgpt.data.formats import Record
from medgpt.data.loading import cache_settings, data_files, load_train_eval
from medgpt.data.templates import Template
from medgpt.data.tokenize import IGNORE, encode_dialogue
from medgpt.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class StageData:
    train: Dataset
    eval: Dataset | None
    eval_records: list[Record]  # held-out records (SFT: for the before/after sample answers)
    stats: dict
    cache_hit: bool


def _encode_all(records: list[Record], template: Template, tokenizer, max_length: int, train_on_inputs: bool) -> tuple[Dataset, dict]:
    cols: dict[str, list] = {"input_ids": [], "labels": []}
    truncated = empty = 0
    for rec in records:
        try:
            enc = encode_dialogue(rec.messages, template, tokenizer, max_length, train_on_inputs)
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
    root = Path(cfg.paths.root)
    m = cfg.method
    train_rec, eval_rec, stats = load_train_eval(cfg.data, root, cfg.seed, "sft")
    key = content_key(data_files(cfg.data, root), cache_settings(cfg, "sft", template, tokenizer_fingerprint(tokenizer)))

    def build():
        splits, split_stats = {}, {}
        for name, recs in (("train", train_rec), ("eval", eval_rec)):
            if not recs:
                continue
            ds, s = _encode_all(recs, template, tokenizer, m.max_length, m.train_on_inputs)
            if name == "train" and m.packing:
                ds = Dataset.from_list(pack(ds, m.max_length))
                s["packed_rows"] = len(ds)
            splits[name], split_stats[name] = ds, s
        return splits, split_stats

    splits, split_stats, hit = cached_datasets(Path(cfg.paths.cache_dir), key, build)
    log.info("data: %d train / %d eval examples (%s)%s", split_stats["train"]["examples"],
             split_stats.get("eval", {}).get("examples", 0), stats["format"], " [tokenised-data cache hit]" if hit else "")
    if split_stats["train"]["truncated"]:
        log.info("data: %d training examples truncated to method.max_length=%d", split_stats["train"]["truncated"], m.max_length)
    return StageData(splits["train"], splits.get("eval"), eval_rec, {**stats, **split_stats}, hit)
