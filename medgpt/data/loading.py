"""Train/eval records for any stage: data.train_files, then data.eval_files or a held-out data.eval_split."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from omegaconf import DictConfig

from medgpt.data.cache import cached_datasets, content_key, tokenizer_fingerprint
from medgpt.data.formats import Record, detect_format, expand_files, iter_raw, load_records
from medgpt.errors import DataError


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


def data_format(data: DictConfig, root: Path) -> tuple[str, str]:
    """(the format of data.train_files, where it was seen): data.format, or detected from the first record."""
    train_files = expand_files(list(data.train_files), root)
    if data.format != "auto":
        return data.format, str(train_files[0])
    for path in train_files:
        for lineno, raw in iter_raw(path):
            if isinstance(raw, DataError):
                continue  # load_records reports it (or skips it with data.on_error=skip)
            try:
                return detect_format(raw, f"{path}:{lineno}"), str(path)
            except DataError:
                if data.on_error != "skip":
                    raise
    raise DataError(f"no usable records in {', '.join(map(str, train_files))}.")


def load_train_eval(data: DictConfig, root: Path, seed: int) -> tuple[list[Record], list[Record], dict]:
    """(train records, eval records, stats)."""
    train_files = expand_files(list(data.train_files), root)
    train, report, fmt = load_records(train_files, data.format, data.columns, data.on_error, data.system_prompt, data.max_samples)
    stats = {"format": fmt, "skipped": report.skipped}
    if data.eval_files:
        held, eval_report, _ = load_records(expand_files(list(data.eval_files), root), fmt, data.columns, data.on_error,
                                            data.system_prompt, eval_limit(data.max_samples))
        stats["skipped"] += eval_report.skipped
    else:
        train, held = split_records(train, data.eval_split, seed)
    return train, held, stats


def data_files(data: DictConfig, root: Path) -> list[Path]:
    return expand_files(list(data.train_files) + list(data.eval_files), root)


def cache_settings(cfg: DictConfig, kind: str, template, tokenizer_fp: str) -> dict:
    """Everything besides file contents that changes the tokens of a stage's dataset."""
    d = cfg.data
    return {"kind": kind, "format": d.format, "columns": dict(d.columns), "max_samples": d.max_samples, "eval_split": d.eval_split,
            "system_prompt": d.system_prompt, "seed": cfg.seed, "template": template.__dict__, "tokenizer": tokenizer_fp,
            "method": {k: v for k, v in cfg.method.items() if k in ("max_length", "max_prompt_length", "train_on_inputs", "packing",
                                                                     "drop_last_block")}}


@dataclass
class StageData:
    train: Dataset
    eval: Dataset | None
    eval_records: list[Record]  # held-out records (SFT: for the before/after sample answers)
    stats: dict  # format, skipped records, and per split: examples, tokens, truncation counts, ...
    cache_hit: bool


Encoder = Callable[[list[Record], str], tuple[Dataset, dict]]  # (records, split name) -> (dataset, stats)


def tokenised_splits(cfg: DictConfig, stage: str, tokenizer, template, encode: Encoder) -> StageData:
    """Records of both splits, encoded by `encode` once and then served from the content-hash cache."""
    root = Path(cfg.paths.root)
    train_rec, eval_rec, stats = load_train_eval(cfg.data, root, cfg.seed)
    key = content_key(data_files(cfg.data, root), cache_settings(cfg, stage, template, tokenizer_fingerprint(tokenizer)))

    def build():
        splits, split_stats = {}, {}
        for name, recs in (("train", train_rec), ("eval", eval_rec)):
            if recs:
                splits[name], split_stats[name] = encode(recs, name)
        return splits, split_stats

    splits, split_stats, hit = cached_datasets(Path(cfg.paths.cache_dir), key, build)
    return StageData(splits["train"], splits.get("eval"), eval_rec, {**stats, **split_stats}, hit)
