"""Tokenisation in shards and worker processes gives exactly the tokens of encoding every record at once (the path
before streaming: records in one list, one encoder call, packing over the whole list), for sft (packed and not),
pt, dpo and kto; a second build is a cache hit that reads no data file; the held-out records come back from the cache."""

from __future__ import annotations

import pytest
from conftest import ROOT, compose

from medgpt.data import loading
from medgpt.data.collate import chunk_documents, pack, pack_documents
from medgpt.data.formats import load_records
from medgpt.data.templates import load_template

TEMPLATE = "chatml"


def _cfg(tmp_path, method: str, data: str, *extra: str):
    return compose([f"method={method}", f"data={data}", "model=tiny", f"paths.root={ROOT}", f"paths.cache_dir={tmp_path}", *extra])


def _rows(ds) -> list[dict]:
    return [dict(r) for r in ds]


def _build(cfg, tokenizer, monkeypatch, shard: int, procs: int):
    from medgpt.data.dpo_data import build_dpo_data
    from medgpt.data.kto_data import build_kto_data
    from medgpt.data.pt_data import build_pt_data
    from medgpt.data.sft_data import build_sft_data

    monkeypatch.setattr(loading, "SHARD_RECORDS", shard)
    cfg.data.num_proc = procs
    builder = {"sft": build_sft_data, "pt": build_pt_data, "dpo": build_dpo_data, "kto": build_kto_data}[cfg.method.name]
    return builder(cfg, tokenizer, load_template(TEMPLATE))


def _records(cfg):
    records, _, _ = load_records([ROOT / f for f in cfg.data.train_files], cfg.data.format, cfg.data.columns)
    train, held = loading.split_records(records, cfg.data.eval_split, cfg.seed)
    return train, held


@pytest.mark.parametrize("packing", [False, True])
def test_sft_shards_in_two_processes_equal_one_pass(tmp_path, tokenizer, monkeypatch, packing):
    from medgpt.data.sft_data import _encode_all

    cfg = _cfg(tmp_path, "sft", "sharegpt", f"method.packing={packing}", "method.max_length=96")
    data = _build(cfg, tokenizer, monkeypatch, shard=7, procs=2)  # 36 training records: 6 shards
    train, held = _records(cfg)
    expected, stats = _encode_all(train, load_template(TEMPLATE), tokenizer, 96, False)
    expected = pack(expected, 96) if packing else _rows(expected)
    assert _rows(data.train) == expected and len(expected) > 10
    assert data.stats["train"]["tokens"] == stats["tokens"] and data.stats["train"]["truncated"] == stats["truncated"] > 0
    assert data.stats["train"].get("packed_rows") == (len(expected) if packing else None)
    assert [r.messages for r in data.eval_records] == [r.messages for r in held] and len(held) == 4
    assert data.stats["sources"] == {"sample_sharegpt": {"entry": "data/sft/sample_sharegpt.jsonl", "records": 40, "train": 36,
                                                         "held_out": 4}}


def test_pt_blocks_cross_shards_as_in_one_pass(tmp_path, tokenizer, monkeypatch):
    cfg = _cfg(tmp_path, "pt", "pretrain_demo", "method.max_length=64")
    data = _build(cfg, tokenizer, monkeypatch, shard=5, procs=2)
    train, _ = _records(cfg)
    docs = [ids + [tokenizer.eos_token_id] for ids in tokenizer([r.text for r in train], add_special_tokens=False)["input_ids"]]
    m = cfg.method
    expected = (pack_documents(docs, 64, tokenizer.pad_token_id, m.drop_last_block) if m.packing else chunk_documents(docs, 64))
    assert _rows(data.train) == expected and len(expected) > 5
    assert data.stats["train"]["documents"] == len(docs) and data.stats["train"]["tokens"] == sum(map(len, docs))


@pytest.mark.parametrize("method,data_name", [("dpo", "dpo_demo"), ("kto", "kto_demo")])
def test_preference_shards_equal_one_pass(tmp_path, tokenizer, monkeypatch, method, data_name):
    from medgpt.data.dpo_data import encode_pairs
    from medgpt.data.kto_data import encode_unpaired

    cfg = _cfg(tmp_path, method, data_name, "method.max_length=128")
    data = _build(cfg, tokenizer, monkeypatch, shard=9, procs=2)
    train, _ = _records(cfg)
    encode = encode_pairs if method == "dpo" else encode_unpaired
    expected, stats = encode(train, load_template(TEMPLATE), tokenizer, 128, cfg.method.max_prompt_length)
    assert _rows(data.train) == _rows(expected) and data.stats["train"] == stats


def test_second_build_is_a_cache_hit_without_reading_data(tmp_path, tokenizer, monkeypatch):
    cfg = _cfg(tmp_path, "sft", "sharegpt")
    first = _build(cfg, tokenizer, monkeypatch, shard=4096, procs=0)
    monkeypatch.setattr(loading, "load_sources", lambda *a, **k: pytest.fail("a cache hit read the data files"))
    second = _build(cfg, tokenizer, monkeypatch, shard=4096, procs=0)
    assert not first.cache_hit and second.cache_hit
    assert _rows(second.train) == _rows(first.train) and second.stats == first.stats
    assert [r.source for r in second.eval_records] == [r.source for r in first.eval_records]
    assert not list((tmp_path / "tokenized").glob(".work-*"))  # the work folder is gone once the entry is written


@pytest.mark.parametrize("max_length, level", [(256, "WARNING"), (1024, None)])
def test_most_examples_truncated_is_a_warning(tmp_path, tokenizer, monkeypatch, caplog, max_length, level):
    """The tool sample's dialogues run to ~820 tokens: at 256 every one loses its answer, which must not pass quietly."""
    cfg = _cfg(tmp_path, "sft", "medical_tools", f"method.max_length={max_length}")
    with caplog.at_level("INFO", logger="medgpt.data.sft_data"):
        data = _build(cfg, tokenizer, monkeypatch, shard=4096, procs=1)
    cut = [r for r in caplog.records if "truncated to method.max_length" in r.getMessage()]
    if level is None:
        assert data.stats["train"]["truncated"] == 0 and not cut
    else:
        assert [r.levelname for r in cut] == [level] and "raise method.max_length" in cut[0].getMessage()
        assert f"{data.stats['train']['truncated']} of 27 training examples" in cut[0].getMessage()


def test_no_held_out_split_builds_and_hits_the_cache(tmp_path, tokenizer, monkeypatch):
    """No eval data at all (eval_files=[] and eval_split=0): the cache entry stores no empty split (datasets cannot read
    one back: IndexError in concat_tables) and the second build reads it."""
    cfg = _cfg(tmp_path, "sft", "sharegpt", "data.eval_files=[]", "data.eval_split=0")
    first = _build(cfg, tokenizer, monkeypatch, shard=4096, procs=1)
    second = _build(cfg, tokenizer, monkeypatch, shard=4096, procs=1)
    assert not first.cache_hit and second.cache_hit
    assert first.eval is None and second.eval is None and first.eval_records == second.eval_records == []
    assert _rows(second.train) == _rows(first.train) and len(first.train) == 40
