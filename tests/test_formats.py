"""Data formats normalise to one message list; bad records get one error naming file, line and field."""

from __future__ import annotations

import dataclasses
import json

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


# --- tool calls (ShareGPT function_call/observation, OpenAI tool_calls/tool) normalise to one canonical shape ---

DOSE_TOOL = {"name": "dose_lookup", "description": "Adult dose of a drug", "parameters": {"type": "object", "properties": {
    "drug": {"type": "string"}}, "required": ["drug"]}}
CANONICAL = [
    {"role": "user", "content": "Paracetamol dose?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [{"name": "dose_lookup", "arguments": {"drug": "paracetamol"}}]},
    {"role": "tool", "content": "500-1000 mg every 4-6 h, max 4 g/day", "name": "dose_lookup"},
    {"role": "assistant", "content": "500 mg to 1 g every 4 to 6 hours, at most 4 g a day."},
]


def _sharegpt_tools(call='{"name": "dose_lookup", "arguments": {"drug": "paracetamol"}}', tools=None, obs_first=False):
    turns = [{"from": "human", "value": "Paracetamol dose?"}, {"from": "gpt", "value": "Let me check."},
             {"from": "function_call", "value": call}, {"from": "observation", "value": "500-1000 mg every 4-6 h, max 4 g/day"},
             {"from": "gpt", "value": "500 mg to 1 g every 4 to 6 hours, at most 4 g a day."}]
    if obs_first:
        turns = [turns[0], turns[3], *turns[4:]]
    return {"conversations": turns, "tools": json.dumps([DOSE_TOOL]) if tools is None else tools}


def test_sharegpt_function_call_and_observation_become_canonical(tmp_path):
    (rec,), _, fmt = load(tmp_path, [_sharegpt_tools()])
    assert fmt == "sharegpt" and rec.messages == CANONICAL
    assert rec.tools == [{"type": "function", "function": DOSE_TOOL}]  # a JSON string of bare schemas, wrapped


def test_consecutive_function_calls_merge_and_results_take_their_names(tmp_path):
    second = {"name": "interaction_check", "arguments": {"drugs": ["warfarin", "aspirin"]}}
    row = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "function_call", "value": json.dumps({"name": "dose_lookup",
           "arguments": {"drug": "warfarin"}})}, {"from": "function_call", "value": json.dumps(second)},
           {"from": "observation", "value": "2-10 mg"}, {"from": "observation", "value": "major"}, {"from": "gpt", "value": "A."}]}
    (rec,), _, _ = load(tmp_path, [row])
    assert rec.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"name": "dose_lookup", "arguments": {"drug": "warfarin"}}, second]}
    assert [m.get("name") for m in rec.messages[2:4]] == ["dose_lookup", "interaction_check"] and rec.tools is None


def test_openai_tool_calls_and_tool_messages_become_canonical(tmp_path):
    row = {"messages": [
        {"role": "user", "content": "Paracetamol dose?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "dose_lookup", "arguments": '{"drug": "paracetamol"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "500-1000 mg every 4-6 h, max 4 g/day"},
        {"role": "assistant", "content": "500 mg to 1 g every 4 to 6 hours, at most 4 g a day."}],
        "tools": [{"type": "function", "function": DOSE_TOOL}]}
    (rec,), _, fmt = load(tmp_path, [row])
    assert fmt == "messages" and rec.messages == CANONICAL and rec.tools == [{"type": "function", "function": DOSE_TOOL}]


def test_the_shipped_tool_sample_loads_with_calls_results_and_tools():
    from conftest import ROOT, compose

    from medgpt.data.loading import load_train_eval

    cfg = compose(["data=medical_tools", f"paths.root={ROOT}"])
    train, held, stats = load_train_eval(cfg.data, ROOT, seed=1)
    records = train + held
    assert stats["format"] == "sharegpt" == cfg.data.format and len(records) >= 30
    names = {"dose_lookup", "drug_interaction_check", "bmi_calculator", "lab_reference_range"}
    called = {c["name"] for r in records for m in r.messages for c in m.get("tool_calls", ())}
    assert called == names and all({t["function"]["name"] for t in r.tools} <= names for r in records)
    assert all(r.messages[-1]["role"] == "assistant" and not r.messages[-1].get("tool_calls") for r in records)
    assert sum(m["role"] == "tool" for r in records for m in r.messages) >= 30


@pytest.mark.parametrize("row,message", [
    (_sharegpt_tools(call='{"name": "dose_lookup", "arguments": {drug}}'),
     r"d\.jsonl:1: conversations\[2\]\.value is not valid JSON"),
    (_sharegpt_tools(call='{"name": "dose_lookup", "arguments": "{not json"}'),
     r"d\.jsonl:1: conversations\[2\]\.value: the arguments of the call to 'dose_lookup' are not valid JSON"),
    (_sharegpt_tools(call='{"name": "dose_lookup", "arguments": [1]}'), r"arguments of the call to 'dose_lookup' must be a JSON object"),
    (_sharegpt_tools(obs_first=True), r"d\.jsonl:1: conversations\[1\]\.value is a tool result with no tool call before it"),
    (_sharegpt_tools(call='{"name": "bmi", "arguments": {}}'), r"d\.jsonl:1: turn 1 calls the tool 'bmi', which is not in 'tools'"),
    ({"conversations": _sharegpt_tools()["conversations"][:4]}, r"d\.jsonl:1: the dialogue must end with an assistant turn"),
    ({"conversations": _sharegpt_tools()["conversations"][:3] + [{"from": "human", "value": "?"}]},
     r"d\.jsonl:1: turn 2 is 'user' where the results of turn 1's tool calls were expected"),
    ({"messages": [USER, {"role": "tool", "content": "x"}, ASSISTANT]}, r"messages\[1\]\.content is a tool result with no tool call"),
    (_sharegpt_tools(tools="[{"), r"d\.jsonl:1: field 'tools' is not valid JSON"),
    (_sharegpt_tools(tools=[{"description": "no name"}]), r"d\.jsonl:1: tools\[0\] must be a function schema with a 'name'"),
])
def test_bad_tool_calls_are_one_sentence_with_file_and_line(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load(tmp_path, [row])


# --- formats are registered declarations: a new one is one registration ---

def test_a_format_registered_in_a_test_loads_with_no_other_change(tmp_path):
    from medgpt.config import validate
    from medgpt.data import formats

    def qa(raw, where, cols):
        return formats.Record(where, messages=formats.check_dialogue(
            [{"role": "user", "content": raw["q"]}, {"role": "assistant", "content": raw["a"]}], where))

    spec = formats.register_format(formats.DataFormat("qa_pairs", "dialogue", lambda r: isinstance(r, dict) and "q" in r, qa,
                                                      priority=5))
    try:
        records, _, fmt = load(tmp_path, [{"q": "Q?", "a": "A."}])  # detected
        assert fmt == "qa_pairs" and records[0].messages == [USER, ASSISTANT]
        assert "qa_pairs" in formats.FORMATS and formats.accepts(("sharegpt", "messages", "alpaca"), "qa_pairs")
        from conftest import ROOT, compose

        cfg = compose(["method=sft", "model=tiny", "data=sharegpt", "data.format=qa_pairs", f"paths.root={ROOT}"])
        validate(cfg)  # the data.format choice reads the registry
        from medgpt.stages.lifecycle import check_data_format
        from medgpt.stages.protocol import methods

        check_data_format(cfg, methods()["sft"])  # SFT trains on any dialogue-kind format
        with pytest.raises(DataError, match="needs preference data"):
            check_data_format(cfg, methods()["dpo"])
    finally:
        formats._REGISTRY.pop(spec.name)
    assert "qa_pairs" not in formats.FORMATS


def test_data_format_choice_and_formats_read_the_registry():
    from medgpt.config import DataConfig, limits_of
    from medgpt.data.formats import _REGISTRY, FORMATS

    limits = limits_of(next(f for f in dataclasses.fields(DataConfig) if f.name == "format"))
    assert tuple(limits.names()) == ("auto", *_REGISTRY) and tuple(FORMATS) == tuple(_REGISTRY)
    assert set(FORMATS) == {"sharegpt", "messages", "alpaca", "text", "preference", "unpaired", "mcq"}


# --- small things: BOM, folders, JSON error text, which assistant turn is empty ---

def test_utf8_bom_is_accepted_in_jsonl_json_and_csv_and_stripped_from_txt(tmp_path):
    row = {"instruction": "Q?", "output": "A."}
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    (tmp_path / "b.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([row]).encode())
    (tmp_path / "c.csv").write_bytes(b"\xef\xbb\xbfinstruction,output\nQ?,A.\n")
    (tmp_path / "d.txt").write_bytes("\ufefffirst document\n".encode())
    for name in ("a.jsonl", "b.json", "c.csv"):
        (rec,), _, fmt = load_records([tmp_path / name])
        assert fmt == "alpaca" and rec.messages == [USER, ASSISTANT], name
    (rec,), _, _ = load_records([tmp_path / "d.txt"])
    assert rec.text == "first document"


def test_a_folder_is_expanded_never_said_not_to_exist(tmp_path):
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "dir" / "sub" / "b.jsonl", [dialogue(0)])
    write_jsonl(tmp_path / "dir" / "a.jsonl", [dialogue(1)])
    assert [p.relative_to(tmp_path).as_posix() for p in expand_files(["dir"], tmp_path)] == ["dir/a.jsonl", "dir/sub/b.jsonl"]


def test_json_error_says_at_once(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl:1: invalid JSON \(Unterminated string starting at column 19\)\.") as e:
        load(tmp_path, ['{"conversations": "x'])
    assert "at at" not in str(e.value)


def test_the_empty_assistant_turn_is_named_by_its_index(tmp_path):
    row = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q2"},
                             {"from": "gpt", "value": "  "}]}
    with pytest.raises(DataError, match=r"d\.jsonl:1: turn 3 \(an assistant turn\) is empty\."):
        load(tmp_path, [row])
