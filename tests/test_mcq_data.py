"""Multiple-choice benchmark files read as published; bad input gets one error naming the file, the line and the field."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from medgpt.errors import ConfigError, DataError
from medgpt.evaluation.mcq_data import FORMATS, MCQItem, load_mcq

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "mcq"
SHIPPED = ROOT / "data" / "eval" / "mcq"


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows), encoding="utf-8")
    return path


def medqa(answer_idx="B", **kw) -> dict:
    return {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": answer_idx} | kw


def test_interface():
    assert FORMATS == ("medqa", "medmcqa", "mmlu", "ceval", "cmmlu", "plain")
    items, report = load_mcq([FIX / "medqa.jsonl"])
    assert isinstance(items[0], MCQItem) and set(report) == {"format", "skipped", "notes"}
    with pytest.raises(AttributeError):
        items[0].answer = "A"  # frozen


def test_medqa():
    items, report = load_mcq([FIX / "medqa.jsonl"], fmt="medqa")
    path = str(FIX / "medqa.jsonl")
    assert report == {"format": {path: "medqa"}, "skipped": 0, "notes": []}
    first, second = items
    assert first == MCQItem(id="medqa:1", subject="", question="Which vitamin is given to newborns to prevent bleeding?",
                            options={"A": "Vitamin A", "B": "Vitamin K", "C": "Vitamin C", "D": "Vitamin D"}, answer="B",
                            source=f"{path}:1")
    assert list(second.options) == list("ABCDE") and second.answer == "E" and second.id == "medqa:3"  # line 2 is blank


def test_medmcqa_released_one_based_with_note():
    items, report = load_mcq([FIX / "medmcqa_dev.json"])  # .json holding one object per line, as released
    assert report["format"] == {str(FIX / "medmcqa_dev.json"): "medmcqa"}
    assert [(i.id, i.subject, i.answer) for i in items] == [("0c1b2e5a-0001", "Pathology", "C"), ("0c1b2e5a-0002", "Pharmacology", "D"),
                                                            ("0c1b2e5a-0003", "Biochemistry", "A")]
    assert items[0].options == {"A": "Factor IX", "B": "Factor XI", "C": "Factor VIII", "D": "Factor VII"}
    assert len(report["notes"]) == 1 and "1-based" in report["notes"][0] and "medmcqa_dev.json" in report["notes"][0]


def test_medmcqa_zero_based_detected_with_note():
    items, report = load_mcq([FIX / "medmcqa_zero_based.jsonl"])
    assert [i.answer for i in items] == ["C", "A", "D"]
    assert len(report["notes"]) == 1 and "0-based" in report["notes"][0] and "line 2" in report["notes"][0]


def test_medmcqa_json_list_keeps_real_lines(tmp_path):
    rec = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2, "subject_name": "Anatomy", "id": "x"}
    path = tmp_path / "list.json"
    path.write_text(json.dumps([rec, rec | {"id": "y", "cop": 9}], indent=2))
    with pytest.raises(DataError, match=rf"^{path}:12: field 'cop' must be an option number 1-4"):
        load_mcq([path])
    items, report = load_mcq([path], on_error="skip")
    assert [i.source for i in items] == [f"{path}:2"] and items[0].answer == "B" and report["skipped"] == 1


def test_mmlu_no_header_subject_from_file_name():
    items, report = load_mcq([FIX / "clinical_knowledge_test.csv"])
    assert report["format"] == {str(FIX / "clinical_knowledge_test.csv"): "mmlu"}
    assert [i.answer for i in items] == ["B", "C", "A", "D"] and {i.subject for i in items} == {"clinical_knowledge"}
    assert items[1].question == "Which is a short-acting beta-2 agonist, used for quick relief?"
    assert items[2].question == "A question that spans\ntwo lines" and items[3].source.endswith("clinical_knowledge_test.csv:5")
    assert items[0].id == "clinical_knowledge_test:1"


def test_ceval_header_subject_and_ids():
    items, report = load_mcq([FIX / "anatomy_val.csv"])
    assert report["format"] == {str(FIX / "anatomy_val.csv"): "ceval"}
    assert [(i.id, i.subject, i.answer) for i in items] == [("anatomy_val:0", "anatomy", "C"), ("anatomy_val:1", "anatomy", "A")]
    assert items[0].options["C"] == "展神经" and items[0].source.endswith("anatomy_val.csv:2")


def test_cmmlu_index_column_and_bom():
    items, report = load_mcq([FIX / "college_medicine.csv"])
    assert report["format"] == {str(FIX / "college_medicine.csv"): "cmmlu"}
    assert [(i.id, i.subject, i.answer) for i in items] == [("college_medicine:0", "college_medicine", "B"),
                                                            ("college_medicine:1", "college_medicine", "D")]


def test_plain_letters_and_indices():
    items, report = load_mcq([FIX / "plain.jsonl"])
    assert report["format"] == {str(FIX / "plain.jsonl"): "plain"}
    assert (items[0].id, items[0].subject, items[0].options, items[0].answer) == (
        "p1", "cardiology", {"A": "Creatine kinase", "B": "Cardiac troponin", "C": "Myoglobin"}, "B")
    assert (items[1].id, items[1].answer, items[1].options) == ("plain:2", "A", {"A": "hCG", "B": "Progesterone"})


def test_auto_detects_each_file_and_keeps_order():
    files = [FIX / n for n in ("medqa.jsonl", "medmcqa_dev.json", "clinical_knowledge_test.csv", "anatomy_val.csv",
                               "college_medicine.csv", "plain.jsonl")]
    items, report = load_mcq(files)
    assert list(report["format"].values()) == ["medqa", "medmcqa", "mmlu", "ceval", "cmmlu", "plain"]
    assert len(items) == 2 + 3 + 4 + 2 + 2 + 2 and items[0].source.startswith(str(files[0]))
    assert len({i.id for i in items}) == len(items)


def test_limit_stops_early_and_says_what_was_not_read():
    items, report = load_mcq([FIX / "medmcqa_dev.json", FIX / "plain.jsonl"], limit=2)
    assert len(items) == 2 and list(report["format"]) == [str(FIX / "medmcqa_dev.json")]
    assert any("not read" in n and "plain.jsonl" in n for n in report["notes"])


def test_explicit_format_for_the_wrong_file_type():
    with pytest.raises(DataError, match=r"anatomy_val.csv: format 'medqa' reads a .jsonl or .json file"):
        load_mcq([FIX / "anatomy_val.csv"], fmt="medqa")
    with pytest.raises(DataError, match=r"anatomy_val.csv:1: this is a header row, but MMLU files have none"):
        load_mcq([FIX / "anatomy_val.csv"], fmt="mmlu")
    with pytest.raises(DataError, match=r"clinical_knowledge_test.csv:1: no header row"):
        load_mcq([FIX / "clinical_knowledge_test.csv"], fmt="ceval")
    with pytest.raises(ConfigError, match="unknown multiple-choice format 'mmmlu'"):
        load_mcq([FIX / "plain.jsonl"], fmt="mmmlu")


# ------------------------------------------------------------------------------------------------ bad input

RECORD_ERRORS = [  # (file name, lines, line of the bad one, message)
    ("a.jsonl", [medqa(), medqa(answer_idx=None)], 2, r"missing answer \(field 'answer_idx'\)"),
    ("a.jsonl", [medqa(), {k: v for k, v in medqa().items() if k != "answer_idx"}], 2, r"missing answer \(field 'answer_idx'\)"),
    ("a.jsonl", [medqa(), medqa(answer_idx="E")], 2, r"answer 'E' in 'answer_idx' is not one of the options \(A, B, C, D\)"),
    ("a.jsonl", [medqa(), medqa(options={"A": "only one"}, answer_idx="A")], 2, r"'options' has 1 non-empty option; a question needs at least 2"),
    ("a.jsonl", [medqa(), medqa(options={"A": "a", "B": " "}, answer_idx="A")], 2, r"'options' has 1 non-empty option"),
    ("a.jsonl", [medqa(), '{"question": "Q?", "options": '], 2, r"invalid JSON"),
    ("a.jsonl", [medqa(), medqa(question="")], 2, r"field 'question' must be a non-empty string"),
    ("a.jsonl", [medqa(), medqa(answer_idx="AB")], 2, r"field 'answer_idx' must be an option letter"),
    ("a.jsonl", [medqa(), {"question": "Q?", "opa": "a", "opb": "b", "cop": 1}], 2,
     r"a medmcqa record in a medqa file \(as its line 1 says\); one file must hold one format"),
    ("p.jsonl", [{"question": "Q?", "options": ["a", "b"], "answer": 0}, {"question": "Q?", "options": ["a", "b"], "answer": 2}], 2,
     r"field 'answer' 2 is not an index into the 2 options \(0-1\)"),
    ("p.jsonl", [{"question": "Q?", "options": ["a", "b"], "answer": 0}, {"question": "Q?", "options": ["a", "b"], "answer": "C"}], 2,
     r"answer 'C' in 'answer' is not one of the options \(A, B\)"),
    ("p.jsonl", [{"question": "Q?", "options": ["a", "b"], "answer": 0}, {"question": "Q?", "options": ["a"], "answer": 0}], 2,
     r"'options' has 1 non-empty option"),
    ("p.jsonl", [{"id": "x", "question": "Q?", "options": ["a", "b"], "answer": 0},
                 {"id": "x", "question": "Q?", "options": ["a", "b"], "answer": 1}], 2,
     r"id 'x' was already used at .*p.jsonl:1; ids must be unique"),
    ("m.jsonl", [{"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4},
                 {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 5}], 2, r"field 'cop' must be an option number 1-4"),
    ("m.jsonl", [{"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0},
                 {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4}], 2,
     r"field 'cop' must be an option number 0-3 \(0-based in this file\), got 4"),
    ("m.jsonl", [{"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1},
                 {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": None}], 2, r"missing answer \(field 'cop'\)"),
    ("x_test.csv", ["Q1,a,b,c,d,A", "Q2,a,b,c,d,F"], 2, r"answer 'F' in 'column 6 \(answer\)' is not one of the options \(A, B, C, D\)"),
    ("x_test.csv", ["Q1,a,b,c,d,A", "Q2,a,b,c,d,"], 2, r"missing answer \(field 'column 6 \(answer\)'\)"),
    ("x_test.csv", ["Q1,a,b,c,d,A", "Q2,a,b,c"], 2, r"4 columns where an MMLU row has 6"),
    ("x_val.csv", ["id,question,A,B,C,D,answer,explanation", "0,Q,a,b,c,d,A,", "1,Q,a,b,c,d,,"], 3, r"missing answer \(field 'answer'\)"),
    ("x_val.csv", ["id,question,A,B,C,D,answer,explanation", "0,Q,a,b,c,d,A,", "1,Q,a,b,c,d,A"], 3, r"7 columns where the header has 8"),
    ("x.csv", [",Question,A,B,C,D,Answer", "0,Q,a,b,c,d,A", "1,Q,a,b,c,d,E"], 3, r"answer 'E' in 'Answer' is not one of the options"),
]


@pytest.mark.parametrize(("name", "lines", "bad_line", "message"), RECORD_ERRORS)
def test_bad_record_names_file_line_and_field(tmp_path, name, lines, bad_line, message):
    path = write(tmp_path / name, lines)
    with pytest.raises(DataError, match=rf"^{path}:{bad_line}: {message}") as e:
        load_mcq([path])
    assert str(e.value).count(". ") == 0 or "e.g." in str(e.value)  # one sentence
    items, report = load_mcq([path], on_error="skip")  # the same record is skipped and counted
    assert report["skipped"] == 1 and len(items) == len(lines) - 1 - (name.startswith("x_val") or name == "x.csv")
    assert any(n.startswith("skipped 1 bad record") for n in report["notes"])


def test_skip_counts_several_and_keeps_the_rest(tmp_path):
    path = write(tmp_path / "a.jsonl", [medqa(), medqa(answer_idx="Z"), "not json", medqa(answer_idx=None), medqa(answer_idx="d")])
    items, report = load_mcq([path], on_error="skip")
    assert [i.source for i in items] == [f"{path}:1", f"{path}:5"] and items[1].answer == "D" and report["skipped"] == 3


def test_allow_unanswered_keeps_questions_without_answers(tmp_path):
    path = write(tmp_path / "a.jsonl", [medqa(), medqa(answer_idx=None)])
    items, _ = load_mcq([path], allow_unanswered=True)
    assert [i.answer for i in items] == ["B", None]


@pytest.mark.parametrize(("name", "lines"), [
    ("medqa_test.jsonl", [medqa(answer_idx=None), {k: v for k, v in medqa().items() if k != "answer_idx"}]),
    ("medmcqa_test.json", [{"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": -1, "id": "t1"}]),
    ("clinical_knowledge_test.csv", ["Q1,a,b,c,d", "Q2,a,b,c,d"]),
    ("clinical_medicine_test.csv", ["id,question,A,B,C,D", "0,Q,a,b,c,d"]),
])
def test_a_test_split_without_answers(tmp_path, name, lines):
    path = write(tmp_path / name, lines)
    expected = f"{path}: has no answers (a test split?): evaluate the dev/val split or your own labelled file."
    for on_error in ("fail", "skip"):  # a whole-file error
        with pytest.raises(DataError) as e:
            load_mcq([path], on_error=on_error)
        assert str(e.value) == expected
    items, _ = load_mcq([path], allow_unanswered=True)
    assert items and all(i.answer is None for i in items)


@pytest.mark.parametrize("name", ["e.jsonl", "e.json", "e.csv"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n  \n")
    for on_error in ("fail", "skip"):
        with pytest.raises(DataError, match=rf"^{path}: empty file: no questions in it\.$"):
            load_mcq([path], on_error=on_error)


def test_header_only_csv_is_empty(tmp_path):
    path = write(tmp_path / "x_val.csv", ["id,question,A,B,C,D,answer,explanation"])
    with pytest.raises(DataError, match=rf"^{path}: empty file"):
        load_mcq([path])


def test_whole_file_errors(tmp_path):
    bad_csv = write(tmp_path / "q_test.csv", ["Q1,a,b,c,d,A", 'Q2,"a"b,c,d,e,A'])
    with pytest.raises(DataError, match=rf"^{bad_csv}:2: malformed CSV"):
        load_mcq([bad_csv], on_error="skip")
    unterminated = write(tmp_path / "u_test.csv", ["Q1,a,b,c,d,A", '"Q2,a,b,c,d,A'])
    with pytest.raises(DataError, match=rf"^{unterminated}:2: malformed CSV"):
        load_mcq([unterminated])
    bad_list = tmp_path / "l.json"
    bad_list.write_text('[\n{"question": "Q?", "options": ["a", "b"], "answer": 0},\n{"question": \n]\n')
    with pytest.raises(DataError, match=rf"^{bad_list}:4: invalid JSON"):
        load_mcq([bad_list], on_error="skip")
    unknown = write(tmp_path / "u.jsonl", [{"prompt": "Q?", "choices": ["a", "b"]}])
    with pytest.raises(DataError, match=rf"^{unknown}:1: cannot tell the multiple-choice format from fields \['choices', 'prompt'\]"):
        load_mcq([unknown])
    bad_header = write(tmp_path / "h.csv", ["id,question,B,C,answer", "0,Q,a,b,B"])
    with pytest.raises(DataError, match=rf"^{bad_header}:1: the header must name option columns A, B, ..."):
        load_mcq([bad_header])
    txt = tmp_path / "q.txt"
    txt.write_text("Q?\n")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        load_mcq([txt])
    with pytest.raises(DataError, match=r"does not exist"):
        load_mcq([tmp_path / "missing.jsonl"])


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "q_test.csv"
    path.write_bytes(b"Q1,a,b,c,d,A\nQ2,\xff,b,c,d,A\n")
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        load_mcq([path])


# ------------------------------------------------------------------------------------------------ shipped demo data


@pytest.mark.parametrize(("name", "fmt", "n", "letters"), [
    ("medical_mcq_en.jsonl", "medqa", 100, "ABCDE"),
    ("clinical_medicine_val.csv", "ceval", 50, "ABCD"),
    ("medical_mcq_en_dev.jsonl", "medqa", 5, "ABCDE"),
])
def test_shipped_files_load_with_balanced_answers(name, fmt, n, letters):
    items, report = load_mcq([SHIPPED / name])
    assert report["format"] == {str(SHIPPED / name): fmt} and report["skipped"] == 0 and len(items) == n
    assert all(set(i.options) <= set(letters) and len(i.options) >= 4 for i in items)
    counts = Counter(i.answer for i in items)
    if n >= 50:
        assert max(counts.values()) <= 0.4 * n and set(counts) >= set("ABCD"), counts
        assert len({i.subject for i in items}) >= (10 if fmt == "medqa" else 1)
    if fmt == "ceval":
        assert {i.subject for i in items} == {"clinical_medicine"}


def test_dev_questions_do_not_overlap_the_test_ones():
    test, _ = load_mcq([SHIPPED / "medical_mcq_en.jsonl"])
    dev, _ = load_mcq([SHIPPED / "medical_mcq_en_dev.jsonl"])
    assert not {i.question for i in test} & {i.question for i in dev}
    assert len({i.question for i in test}) == len(test)


def test_medqa_without_answer_idx_uses_the_answer_text(tmp_path):
    row = {k: v for k, v in medqa().items() if k != "answer_idx"} | {"answer": "c"}
    path = write(tmp_path / "a.jsonl", [row, medqa(answer_idx="d")])
    items, _ = load_mcq([path])
    assert [i.answer for i in items] == ["C", "D"]
