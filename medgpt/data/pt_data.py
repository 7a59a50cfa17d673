"""Plain text for continued pretraining: documents -> tokens + eos -> packed blocks (or one row per document)."""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset
from omegaconf import DictConfig

from medgpt.data.cache import cached_datasets, content_key, tokenizer_fingerprint
from medgpt.data.collate import chunk_documents, pack_documents
from medgpt.data.loading import cache_settings, data_files, load_train_eval
from medgpt.data.sft_data import StageData
from medgpt.data.tokenize import IGNORE

log = logging.getLogger(__name__)


def build_pt_data(cfg: DictConfig, tokenizer, template) -> StageData:
    root, m = Path(cfg.paths.root), cfg.method
    train_rec, eval_rec, stats = load_train_eval(cfg.data, root, cfg.seed, "pt")
    key = content_key(data_files(cfg.data, root), cache_settings(cfg, "pt", template, tokenizer_fingerprint(tokenizer)))
    eos = tokenizer.eos_token_id

    def rows(records) -> tuple[Dataset, dict]:
        docs = [ids + [eos] for ids in tokenizer([r.text for r in records], add_special_tokens=False)["input_ids"]]
        built = (pack_documents(docs, m.max_length, tokenizer.pad_token_id, m.drop_last_block) if m.packing
                 else chunk_documents(docs, m.max_length))
        trained = sum(sum(1 for t in r["labels"] if t != IGNORE) for r in built)
        return Dataset.from_list(built), {"documents": len(docs), "examples": len(built), "tokens": sum(map(len, docs)),
                                          "trained_tokens": trained}

    def build():
        splits, split_stats = {}, {}
        for name, recs in (("train", train_rec), ("eval", eval_rec)):
            if recs:
                splits[name], split_stats[name] = rows(recs)
        return splits, split_stats

    splits, split_stats, hit = cached_datasets(Path(cfg.paths.cache_dir), key, build)
    log.info("data: %d documents -> %d rows of %d tokens%s", split_stats["train"]["documents"], split_stats["train"]["examples"],
             m.max_length, " [tokenised-data cache hit]" if hit else "")
    return StageData(splits["train"], splits.get("eval"), [], {**stats, **split_stats}, hit)
