"""Dialogue data for SFT: files -> records -> train/eval split -> tokenised (cached) -> optionally packed."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from omegaconf import DictConfig

from medgpt.data.cache import cached_datasets, content_key, tokenizer_fingerprint
from medgpt.data.collate import pack
from medgpt.data.formats import Record, expand_files, load_records
from medgpt.data.templates import Template
from medgpt.data.tokenize import IGNORE, encode_dialogue
from medgpt.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class SFTData:
    train: Dataset
    eval: Dataset | None
    eval_records: list[Record]  # for the before/after sample answers
    stats: dict
    cache_hit: bool


def eval_limit(max_samples: int | None) -> int | None:
    return None if max_samples is None else max(8, max_samples // 4)


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic hold-out of `fraction` of the records (at least one, never all)."""
    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(records) * fraction)), len(records) - 1)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def load_dialogues(data: DictConfig, root: Path, seed: int) -> tuple[list[Record], list[Record], dict]:
    train_files = expand_files(list(data.train_files), root)
    train, report, fmt = load_records(train_files, data.format, data.columns, data.on_error, data.system_prompt, data.max_samples)
    if fmt in ("text", "preference"):
        raise DataError(f"{train_files[0]}: holds {fmt} data, but method=sft needs dialogues (sharegpt, messages or alpaca); "
                        f"use method={'pt' if fmt == 'text' else 'dpo'} or another data file.")
    stats = {"format": fmt, "skipped": report.skipped}
    if data.eval_files:
        held, eval_report, _ = load_records(expand_files(list(data.eval_files), root), fmt, data.columns, data.on_error,
                                            data.system_prompt, eval_limit(data.max_samples))
        stats["skipped"] += eval_report.skipped
    else:
        train, held = split_records(train, data.eval_split, seed)
    return train, held, stats


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


def build_sft_data(cfg: DictConfig, tokenizer, template: Template) -> SFTData:
    root = Path(cfg.paths.root)
    m = cfg.method
    train_rec, eval_rec, stats = load_dialogues(cfg.data, root, cfg.seed)
    files = expand_files(list(cfg.data.train_files) + list(cfg.data.eval_files), root)
    key = content_key(files, {
        "kind": "sft", "format": cfg.data.format, "columns": dict(cfg.data.columns), "max_samples": cfg.data.max_samples,
        "eval_split": cfg.data.eval_split, "system_prompt": cfg.data.system_prompt, "seed": cfg.seed,
        "template": template.__dict__, "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": m.max_length,
        "train_on_inputs": m.train_on_inputs, "packing": m.packing,
    })

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
    return SFTData(splits["train"], splits.get("eval"), eval_rec, {**stats, **split_stats}, hit)
