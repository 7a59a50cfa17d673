"""Data sources (folders, Parquet, CSV, Arrow folders, hub ids) and mixing: records, per-source counts, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import compose, dialogue, launch, write_jsonl

from medgpt.data.formats import load_records
from medgpt.data.loading import load_train_eval
from medgpt.data.sources import mix_targets, mixed_indices, resolve_sources
from medgpt.errors import DataError


def _data(tmp_path, *overrides: str):
    return compose(["data=sharegpt", f"paths.root={tmp_path}", "data.eval_split=0", *overrides]).data


def _alpaca(n: int, tag: str) -> list[dict]:
    return [{"instruction": f"{tag} question {i}?", "output": f"{tag} answer {i}."} for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One folder with the same 6 alpaca records as .jsonl, .parquet, .csv and an Arrow folder; plus a nested folder."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("corpus")
    rows = _alpaca(6, "p")
    ds = Dataset.from_list(rows)
    write_jsonl(root / "plain.jsonl", rows)
    ds.to_parquet(str(root / "rows.parquet"))
    ds.to_csv(str(root / "rows.csv"), index=False)
    ds.save_to_disk(str(root / "arrow"))
    (root / "tree" / "b").mkdir(parents=True)
    write_jsonl(root / "tree" / "b" / "two.jsonl", _alpaca(2, "b"))
    write_jsonl(root / "tree" / "one.jsonl", _alpaca(1, "a"))
    (root / "tree" / "notes.md").write_text("not data")
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize("entry", ["plain.jsonl", "rows.parquet", "rows.csv", "arrow"])
def test_parquet_csv_and_arrow_read_like_jsonl(corpus, entry):
    (source,) = resolve_sources([entry], corpus)
    records, report, fmt = load_records(source.files)
    assert fmt == "alpaca" and report.records == 6
    assert [r.messages[0]["content"] for r in records] == [f"p question {i}?" for i in range(6)]
    assert records[2].source == f"{corpus / entry}:3"  # file:row (1-based) for every kind


def test_a_folder_holding_an_arrow_dataset_reads_it_as_one_source_part(corpus):
    (source,) = resolve_sources(["."], corpus)  # the corpus: 4 files, an Arrow folder, a tree; its .json metadata is no data
    assert [p.relative_to(corpus).as_posix() for p in source.files] == [
        "arrow", "plain.jsonl", "rows.csv", "rows.parquet", "tree/b/two.jsonl", "tree/one.jsonl"]


def test_folder_is_every_data_file_under_it_sorted(corpus):
    train, _, stats = load_train_eval(_data(corpus, "data.train_files=[tree]", "data.format=alpaca"), corpus, seed=0)
    assert [r.messages[0]["content"] for r in train] == ["b question 0?", "b question 1?", "a question 0?"]  # b/two.jsonl < one.jsonl
    assert stats["sources"] == {"tree": {"entry": "tree", "records": 3, "train": 3, "held_out": 0}}


def test_csv_cells_holding_json_lists_are_read(tmp_path):
    from datasets import Dataset

    convs = [json.dumps(dialogue(i)["conversations"]) for i in range(3)]
    Dataset.from_dict({"conversations": convs}).to_csv(str(tmp_path / "d.csv"), index=False)
    records, _, fmt = load_records([tmp_path / "d.csv"])
    assert fmt == "sharegpt" and [r.messages for r in records] == [
        [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in dialogue(i)["conversations"]]
        for i in range(3)]


def _mixed(tmp_path, *overrides):
    write_jsonl(tmp_path / "big.jsonl", _alpaca(40, "big"))
    write_jsonl(tmp_path / "small.jsonl", _alpaca(10, "small"))
    data = _data(tmp_path, "data.train_files=[big.jsonl,small.jsonl]", "data.format=alpaca", *overrides)
    return load_train_eval(data, tmp_path, seed=3)


def test_mix_weights_share_the_named_sources_total_deterministically(tmp_path):
    train, _, stats = _mixed(tmp_path, "data.mix={big:1,small:1}")
    counts = {n: s["train"] for n, s in stats["sources"].items()}
    assert counts == {"big": 25, "small": 25}  # 50 records shared 1:1: small repeated (2 passes + 5 sampled), big subsampled
    tags = [r.messages[0]["content"].split()[0] for r in train]
    assert tags.count("big") == 25 and tags.count("small") == 25
    again, _, _ = _mixed(tmp_path, "data.mix={big:1,small:1}")
    assert [r.source for r in again] == [r.source for r in train]  # same seed, same mix
    other, _, _ = load_train_eval(_data(tmp_path, "data.train_files=[big.jsonl,small.jsonl]", "data.format=alpaca",
                                        "data.mix={big:1,small:1}"), tmp_path, seed=4)
    assert [r.source for r in other] != [r.source for r in train]


def test_mix_counts_max_samples_per_source_and_unnamed_sources(tmp_path):
    _, _, stats = _mixed(tmp_path, "data.mix={small:15}", "data.mix_by=count", "data.max_samples=20")
    assert {n: (s["records"], s["train"]) for n, s in stats["sources"].items()} == {"big": (20, 20), "small": (10, 15)}


def test_mix_by_entry_name_and_zero_weight_drops(tmp_path):
    _, _, stats = _mixed(tmp_path, "data.mix={big.jsonl:0,small:2}")
    assert {n: s["train"] for n, s in stats["sources"].items()} == {"big": 0, "small": 50}


def test_mixed_indices_repeat_whole_passes_then_sample():
    assert mixed_indices(3, 7, seed=0, name="x")[:6] == [0, 1, 2, 0, 1, 2] and len(mixed_indices(3, 7, 0, "x")) == 7
    assert mixed_indices(10, 4, 0, "x") == sorted(mixed_indices(10, 4, 0, "x")) and len(set(mixed_indices(10, 4, 0, "x"))) == 4
    assert mixed_indices(0, 5, 0, "x") == [] and mix_targets({"a": 4}, {}, "weight", {"a": "a.jsonl"}) == {"a": 4}


def test_held_out_split_is_counted_per_source(tmp_path):
    _, held, stats = _mixed(tmp_path, "data.eval_split=0.2")
    assert len(held) == 10 and sum(s["held_out"] for s in stats["sources"].values()) == 10
    assert all(s["train"] + s["held_out"] == s["records"] for s in stats["sources"].values())


@pytest.mark.parametrize("overrides,message", [
    (["data.mix={big:0,small:0}"], r"data\.mix weights \{'big': 0, 'small': 0\} sum to 0; give at least one source a positive weight"),
    (["data.mix={large:1}"], r"data\.mix key 'large' names no training source \(sources: big, small\)"),
    (["data.mix={big:-1}"], r"data\.mix\.big=-1 must be a number >= 0"),
    (["data.mix={small:2.5}", "data.mix_by=count"], r"data\.mix\.small=2\.5 must be a whole number of records"),
])
def test_bad_mix_is_one_sentence(tmp_path, overrides, message):
    with pytest.raises(DataError, match=message):
        _mixed(tmp_path, *overrides)


def test_bad_sources_are_one_sentence(corpus, tmp_path):
    with pytest.raises(DataError, match=r"data\.train_files: the folder empty holds no data files"):
        resolve_sources(["empty"], corpus)
    with pytest.raises(DataError, match=r"data file missing\.parquet does not exist"):
        resolve_sources(["missing.parquet"], corpus)
    with pytest.raises(DataError, match=r"rows\.parquet:1: missing field 'output' \(mapped from 'output' by data\.columns\)|"
                                        r"rows\.parquet:1: missing field 'answer'"):
        load_records(resolve_sources(["rows.parquet"], corpus)[0].files, "alpaca", {"output": "answer"})
    broken = tmp_path / "broken_arrow"
    broken.mkdir()
    (broken / "state.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken_arrow: not a readable Arrow dataset folder \(datasets\.load_from_disk\)"):
        load_records([broken])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        load_records([tmp_path / "bad.parquet"])


def test_hub_id_offline_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (source,) = resolve_sources(["FreedomIntelligence/medical-o1-sft"], tmp_path)
    assert source.hub_id == "FreedomIntelligence/medical-o1-sft" and source.name == "medical-o1-sft"
    with pytest.raises(DataError, match=r"FreedomIntelligence/medical-o1-sft is no local file or folder, and the Hugging Face "
                                        r"Hub cannot be reached \(HF_HUB_OFFLINE is set\)"):
        load_train_eval(_data(tmp_path, "data.train_files=[FreedomIntelligence/medical-o1-sft]"), tmp_path, seed=0)


@pytest.mark.slow
def test_mixed_tool_and_plain_dialogues_train_and_report_counts_in_summary(tmp_path):
    """End to end: the tool-call sample mixed 3:1 with the plain ShareGPT sample trains; summary.json has the counts."""
    res = launch("model=tiny", "method=sft", "debug=smoke", "data=medical_tools",
                 "data.train_files=[data/sft/medical_tools.jsonl,data/sft/sample_sharegpt.jsonl]", "data.mix={medical_tools:3,sample_sharegpt:1}",
                 f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    sources = summary["data"]["sources"]
    assert {n: s["records"] for n, s in sources.items()} == {"medical_tools": 30, "sample_sharegpt": 32}  # debug=smoke: max_samples=32
    # 10% (6) held out before mixing; the 56 left shared 3:1
    assert {n: s["train"] for n, s in sources.items()} == {"medical_tools": 42, "sample_sharegpt": 14}
    assert sum(s["held_out"] for s in sources.values()) == 6 and summary["data"]["train"]["examples"] == 56
