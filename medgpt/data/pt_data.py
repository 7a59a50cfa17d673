"""Plain text for continued pretraining: documents -> tokens + eos -> packed blocks (or one row per document)."""

from __future__ import annotations

import logging

from datasets import Dataset
from omegaconf import DictConfig

from medgpt.data.collate import chunk_documents, pack_documents
from medgpt.data.loading import StageData, tokenised_splits
from medgpt.data.tokenize import IGNORE

log = logging.getLogger(__name__)


def build_pt_data(cfg: DictConfig, tokenizer, template) -> StageData:
    m = cfg.method
    eos = tokenizer.eos_token_id

    def documents(records, split: str) -> tuple[Dataset, dict]:  # record by record (in shards): tokens + eos
        docs = [ids + [eos] for ids in tokenizer([r.text for r in records], add_special_tokens=False)["input_ids"]]
        return Dataset.from_dict({"ids": docs}), {"documents": len(docs), "tokens": sum(map(len, docs))}

    def rows(ds: Dataset, split: str) -> tuple[Dataset, dict]:  # the whole split: blocks cross documents and shards
        docs = (ids for batch in ds.iter(batch_size=1000) for ids in batch["ids"])
        built = (pack_documents(docs, m.max_length, tokenizer.pad_token_id, m.drop_last_block) if m.packing
                 else chunk_documents(docs, m.max_length))
        trained = sum(sum(1 for t in r["labels"] if t != IGNORE) for r in built)
        return Dataset.from_list(built), {"examples": len(built), "trained_tokens": trained}

    data = tokenised_splits(cfg, "pt", tokenizer, template, documents, rows)
    train = data.stats["train"]
    log.info("data: %d documents -> %d rows of %d tokens%s", train["documents"], train["examples"], m.max_length,
             " [tokenised-data cache hit]" if data.cache_hit else "")
    return data
