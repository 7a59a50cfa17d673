"""Data formats normalise to one message list; bad records get one error naming file, line and field."""

from __future__ import annotations

import pytest
from conftest import dialogue, write_jsonl

from medgpt.data.formats import expand_files, load_records
from medgpt.errors import DataError

USER, ASSISTANT = {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}


def load(tmp_path, rows, name="d.jsonl", **kw):
    path = write_jsonl(tmp_path / name, rows)
    return load_records([path], **kw)


def test_sharegpt_messages_alpaca_normalise_alike(tmp_path):
    share = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}], "system_prompt": "S"}
    msgs = {"messages": [{"role": "system", "content": "S"}, USER, ASSISTANT]}
    alpaca = {"instruction": "Q?", "output": "A.", "system": "S"}
    for row, fmt in ((share, "sharegpt"), (msgs, "messages"), (alpaca, "alpaca")):
        records, report, detected = load(tmp_path, [row])
        assert detected == fmt and report.records == 1
        assert records[0].messages == [{"role": "system", "content": "S"}, USER, ASSISTANT]


def test_alpaca_history_and_input_become_turns(tmp_path):
    row = {"instruction": "Explain", "input": "fever", "output": "A raised temperature.", "history": [["Hi", "Hello."]]}
    (rec,), _, _ = load(tmp_path, [row])
    assert [m["role"] for m in rec.messages] == ["user", "assistant", "user", "assistant"]
    assert rec.messages[2]["content"] == "Explain\nfever"


def test_columns_mapping_and_default_system_prompt(tmp_path):
    row = {"dialog": [{"from": "user", "value": "Q?"}, {"from": "assistant", "value": "A."}]}
    (rec,), _, _ = load(tmp_path, [row], fmt="sharegpt", columns={"conversations": "dialog"}, system_prompt="Be careful.")
    assert rec.messages[0] == {"role": "system", "content": "Be careful."} and rec.messages[1:] == [USER, ASSISTANT]


def test_preference_both_forms(tmp_path):
    nested = {"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt", "value": "good"},
              "rejected": {"from": "gpt", "value": "bad"}}
    flat = {"system": "", "history": [["Hi", "Hello."]], "question": "Q?", "response_chosen": "good", "response_rejected": "bad"}
    (a,), _, fmt = load(tmp_path, [nested], name="a.jsonl")
    (b,), _, _ = load(tmp_path, [flat], name="b.jsonl")
    assert fmt == "preference" and (a.chosen, a.rejected) == (b.chosen, b.rejected) == ("good", "bad")
    assert a.messages == [USER] and b.messages[-1] == USER and len(b.messages) == 3


def test_text_files(tmp_path):
    (tmp_path / "t.txt").write_text("first document\n\nsecond document\n")
    records, _, fmt = load_records([tmp_path / "t.txt"])
    assert fmt == "text" and [r.text for r in records] == ["first document", "second document"]


@pytest.mark.parametrize("bad,message", [
    ('{"conversations": [', r"d\.jsonl:3: invalid JSON"),
    ({"conversation": []}, r"d\.jsonl:3: missing field 'conversations'"),
    ({"conversations": [{"from": "doctor", "value": "x"}]}, r"d\.jsonl:3: conversations\[0\]\.from='doctor' is not a known role"),
    ({"conversations": [{"from": "human", "value": "x"}]}, r"d\.jsonl:3: the dialogue must end with an assistant turn"),
    ({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, r"d\.jsonl:3: turn 0 is 'assistant'"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]}, r"d\.jsonl:3: conversations\[0\]\.value must be a string"),
    ({"conversations": "hello"}, r"d\.jsonl:3: field 'conversations' must be a list"),
])
def test_malformed_record_names_file_line_and_field(tmp_path, bad, message):
    rows = [dialogue(0), dialogue(1), bad]
    with pytest.raises(DataError, match=message):
        load(tmp_path, rows, fmt="auto")


def test_missing_field_is_named(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field 'output'"):
        load(tmp_path, [{"instruction": "x"}], fmt="alpaca")


def test_on_error_skip_counts_and_keeps_the_rest(tmp_path):
    rows = [dialogue(0), "{broken", {"conversations": [{"from": "x", "value": "y"}]}, dialogue(1)]
    records, report, _ = load(tmp_path, rows, fmt="sharegpt", on_error="skip")
    assert len(records) == 2 and report.skipped == 2 and "d.jsonl:2" in report.first_error


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: the file holds no records"):
        load_records([tmp_path / "empty.jsonl"])
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        expand_files(["nope.jsonl"], tmp_path)


def test_non_utf8_text_names_the_line(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"fine line\nsecond line\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bin\.txt:3: not valid UTF-8"):
        load_records([tmp_path / "bin.txt"])


def test_globs_expand_in_order(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        write_jsonl(tmp_path / name, [dialogue(0)])
    assert [p.name for p in expand_files(["*.jsonl"], tmp_path)] == ["a.jsonl", "b.jsonl"]


def test_the_three_sample_formats_hold_the_same_dialogues():
    """data=sharegpt, data=messages and data=alpaca ship the same 40 dialogues in three formats."""
    from conftest import ROOT, compose

    from medgpt.data.loading import load_train_eval

    loaded = {}
    for name in ("sharegpt", "messages", "alpaca"):
        train, held, stats = load_train_eval(compose([f"data={name}"]).data, ROOT, seed=1)
        assert stats["format"] == name and len(train) + len(held) == 40
        loaded[name] = [r.messages for r in train + held]
    assert loaded["sharegpt"] == loaded["messages"]
    # Alpaca keeps the last turn as instruction/output and earlier turns as history: same dialogues
    assert loaded["alpaca"] == loaded["sharegpt"]
