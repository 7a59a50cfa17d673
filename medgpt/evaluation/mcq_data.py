"""Read multiple-choice benchmark files, as they are published, into one list of `MCQItem`s.

Formats (`fmt`, or `auto`: per file, from the extension and the header / first record):
  medqa    .jsonl  {"question", "options": {"A": ..., ...}, "answer_idx": "C", "answer"?: text, "meta_info"?}
  medmcqa  .json / .jsonl  {"id", "question", "opa".."opd", "cop", "subject_name", ...}; the released
           .json files hold one object per line; a JSON list is read too. `cop` is 1-4 in the released
           files and 0-3 in some copies: a 0 anywhere in the file means 0-based, else 1-based (a note says which)
  mmlu     .csv, no header: question, A, B, C, D, answer letter; subject from the file name
  ceval    .csv, header id,question,A,B,C,D,answer,explanation; subject from the file name
  cmmlu    .csv, header ,Question,A,B,C,D,Answer (an index column with an empty name); subject from the file name
  plain    .jsonl  {"question", "options": [...], "answer": "B" or 1 (0-based index), "id"?, "subject"?}

Subjects from file names drop a trailing _test/_val/_dev (`clinical_knowledge_test.csv` -> clinical_knowledge).
Ids are the record's own `id` (MedMCQA, plain), "<file stem>:<id>" for C-Eval/CMMLU (their ids are row
numbers that repeat from file to file), else "<file stem>:<line>"; an id used twice in one load is an error.
MedQA reads an optional `subject` field (medgpt's demo files carry one); its `meta_info` is ignored.

Every error is a `DataError` with one sentence naming the file, the line and the field. With
on_error="skip" bad records are dropped and counted; whole-file errors (empty file, unreadable JSON list
or CSV, unknown layout, a file without any answers) still raise.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgpt.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMATS = ("medqa", "medmcqa", "mmlu", "ceval", "cmmlu", "plain")
JSON_FORMATS = ("medqa", "medmcqa", "plain")
CSV_FORMATS = ("mmlu", "ceval", "cmmlu")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NO_ANSWERS = "has no answers (a test split?): evaluate the dev/val split or your own labelled file."
_SPLIT_SUFFIX = re.compile(r"_(test|val|dev)$")
_MEDMCQA_OPTIONS = ("opa", "opb", "opc", "opd")


@dataclass(frozen=True)
class MCQItem:
    id: str  # stable: the file's own id, else "<file stem>:<line>"
    subject: str  # MedMCQA subject_name; C-Eval/CMMLU/MMLU: the file name minus _test/_val/_dev; else ""
    question: str
    options: dict[str, str]  # ordered {"A": ..., "B": ...}; at least 2
    answer: str | None  # a letter among options (None only when allow_unanswered=True)
    source: str  # "file:line" for messages


@dataclass
class _File:
    """One file read into raw rows, with what its parser needs to know."""

    path: Path
    fmt: str
    rows: list[tuple[int, Any]]  # (line, dict | list[str] | DataError)
    header: dict | None = None  # CSV formats with a header: column positions
    cop_base: int = 1  # MedMCQA
    note: str | None = None


def subject_from_name(path: Path) -> str:
    """`clinical_knowledge_test.csv` -> "clinical_knowledge" (C-Eval, CMMLU and MMLU name files by subject)."""
    return _SPLIT_SUFFIX.sub("", path.stem)


def load_mcq(files: list[Path], fmt: str = "auto", on_error: str = "fail", allow_unanswered: bool = False,
             limit: int | None = None) -> tuple[list[MCQItem], dict]:
    """Read `files` in order; returns (items, report) with report = {"format": {path: fmt}, "skipped": n, "notes": [...]}.

    `limit` stops after that many items (later files are not read; a note lists them).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"unknown multiple-choice format '{fmt}' (use auto or one of {', '.join(FORMATS)}).")
    if on_error not in ("fail", "skip"):
        raise ConfigError(f"on_error must be 'fail' or 'skip', got {on_error!r}.")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of questions or None, got {limit!r}.")
    items: list[MCQItem] = []
    report: dict = {"format": {}, "skipped": 0, "notes": []}
    first_error: str | None = None
    seen: dict[str, str] = {}  # id -> source
    files = [Path(f) for f in files]
    if not files:
        raise DataError("no multiple-choice files given.")
    for n, path in enumerate(files):
        if limit is not None and len(items) >= limit:
            report["notes"].append(f"limit={limit} reached; not read: {', '.join(map(str, files[n:]))}.")
            break
        data = _read(path, fmt)
        report["format"][str(path)] = data.fmt
        if data.note:
            report["notes"].append(data.note)
        parsed = [(line, _parse(data, line, raw)) for line, raw in data.rows]
        good = [p for _, p in parsed if not isinstance(p, DataError)]
        if good and not allow_unanswered and all(item.answer is None for item, _ in good):
            raise DataError(f"{path}: {NO_ANSWERS}")
        kept = 0
        for _, result in parsed:
            try:
                if isinstance(result, DataError):
                    raise result
                item, answer_field = result
                if item.answer is None and not allow_unanswered:
                    raise DataError(f"{item.source}: missing answer (field '{answer_field}').")
                if item.id in seen:
                    raise DataError(f"{item.source}: id '{item.id}' was already used at {seen[item.id]}; ids must be unique.")
            except DataError as e:
                if on_error != "skip":
                    raise
                report["skipped"] += 1
                first_error = first_error or str(e)
                continue
            seen[item.id] = item.source
            items.append(item)
            kept += 1
            if limit is not None and len(items) >= limit:
                break
        if not kept:
            report["notes"].append(f"{path}: every record was skipped.")
    if report["skipped"]:
        report["notes"].append(f"skipped {report['skipped']} bad record(s) (on_error=skip); first: {first_error}")
        log.warning("skipped %d bad multiple-choice records (on_error=skip); first: %s", report["skipped"], first_error)
    if not items:
        raise DataError(f"no usable questions in {', '.join(map(str, files))} ({report['skipped']} skipped; first error: {first_error}).")
    return items, report


# ---------------------------------------------------------------------------------------------- reading files


def _text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: the multiple-choice file does not exist.")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text (byte {e.start}); convert the file to UTF-8.") from None


def _read(path: Path, fmt: str) -> _File:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unsupported file type '{suffix}' for multiple-choice data (use .jsonl, .json or .csv).")
    is_csv = suffix == ".csv"
    if fmt != "auto" and (fmt in CSV_FORMATS) != is_csv:
        wanted = "a .csv file" if fmt in CSV_FORMATS else "a .jsonl or .json file"
        raise DataError(f"{path}: format '{fmt}' reads {wanted}; use format auto or one of "
                        f"{', '.join(CSV_FORMATS if is_csv else JSON_FORMATS)} for this file.")
    text = _text(path)
    data = _read_csv(path, text, fmt) if is_csv else _read_json(path, text, fmt, suffix)
    if not data.rows:
        raise DataError(f"{path}: empty file: no questions in it.")
    return data


def _read_json(path: Path, text: str, fmt: str, suffix: str) -> _File:
    stripped = text.lstrip()
    rows = _json_list(path, text) if suffix == ".json" and stripped.startswith("[") else _json_lines(path, text)
    if not rows:
        raise DataError(f"{path}: empty file: no questions in it.")
    if fmt == "auto":
        kinds = [(line, _json_kind(raw)) for line, raw in rows]
        known = [(line, kind) for line, kind in kinds if kind]
        if not known:
            line, raw = rows[0]
            if isinstance(raw, DataError):
                raise raw
            fields = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise DataError(f"{path}:{line}: cannot tell the multiple-choice format from fields {fields}; "
                            f"set the format ({', '.join(JSON_FORMATS)}).")
        first_line, fmt = known[0]
        for i, (line, kind) in enumerate(kinds):  # one file holds one format
            if kind and kind != fmt:
                rows[i] = (line, DataError(f"{path}:{line}: a {kind} record in a {fmt} file (as its line {first_line} says); "
                                           "one file must hold one format."))
    data = _File(path, fmt, rows)
    if fmt == "medmcqa":
        zero = next((line for line, raw in rows if isinstance(raw, dict) and _cop(raw.get("cop")) == 0), None)
        data.cop_base = 0 if zero is not None else 1
        data.note = (f"{path}: MedMCQA 'cop' read as 0-based (0-3 = A-D): line {zero} has cop 0." if zero is not None else
                     f"{path}: MedMCQA 'cop' read as 1-based (1-4 = A-D, as released): no cop is 0.")
    return data


def _json_lines(path: Path, text: str) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    for line, s in enumerate(text.splitlines(), 1):
        if not s.strip():
            continue
        try:
            rows.append((line, json.loads(s)))
        except json.JSONDecodeError as e:
            rows.append((line, DataError(f"{path}:{line}: invalid JSON ({e.msg} at column {e.colno}).")))
    return rows


def _json_list(path: Path, text: str) -> list[tuple[int, Any]]:
    """A JSON list of records, each with the line it starts on (a list that does not parse is a whole-file error)."""
    decoder, rows = json.JSONDecoder(), []
    ws = re.compile(r"\s*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, counted = 1, 0

    def line_at(i: int) -> int:
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, i), i
        return line

    def fail(i: int, what: str):
        raise DataError(f"{path}:{line_at(i)}: invalid JSON ({what}).")

    if text.startswith("]", pos):
        if ws.match(text, pos + 1).end() != len(text):
            fail(ws.match(text, pos + 1).end(), "extra data after the list")
        return rows
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}).") from None
        rows.append((line_at(pos), record))
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            pos = ws.match(text, pos + 1).end()
            if pos != len(text):
                fail(pos, "extra data after the list")
            return rows
        else:
            fail(pos, "',' or ']' expected after a record")


def _json_kind(raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return None
    if "cop" in raw or "opa" in raw:
        return "medmcqa"
    options = raw.get("options")
    return "medqa" if isinstance(options, dict) else "plain" if isinstance(options, list) else None


def _read_csv(path: Path, text: str, fmt: str) -> _File:
    rows: list[tuple[int, Any]] = []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                rows.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{start}: malformed CSV ({e}).") from None
    if not rows:
        raise DataError(f"{path}: empty file: no questions in it.")
    line, first = rows[0]
    names = [c.strip() for c in first]
    lowered = [c.lower() for c in names]
    is_header = "question" in lowered
    if fmt == "auto":
        fmt = ("ceval" if "id" in lowered else "cmmlu") if is_header else "mmlu"
    if fmt == "mmlu":
        if is_header:
            raise DataError(f"{path}:{line}: this is a header row, but MMLU files have none; use format ceval, cmmlu or auto.")
        return _File(path, fmt, rows)
    expected = "id,question,A,B,C,D,answer,explanation" if fmt == "ceval" else ",Question,A,B,C,D,Answer"
    if not is_header:
        raise DataError(f"{path}:{line}: no header row (a {fmt} file starts with {expected}); for header-less MMLU files use format mmlu or auto.")
    options = [(c, i) for i, c in enumerate(names) if len(c) == 1 and c in LETTERS]
    if [c for c, _ in options] != list(LETTERS[: len(options)]) or len(options) < 2:
        raise DataError(f"{path}:{line}: the header must name option columns A, B, ... in order (found {names}; expected {expected}).")
    ids = [i for i, c in enumerate(lowered) if c == "id"] or ([0] if names[0] == "" else [])
    header = {"question": lowered.index("question"), "answer": lowered.index("answer") if "answer" in lowered else None,
              "answer_name": names[lowered.index("answer")] if "answer" in lowered else "answer",
              "id": ids[0] if ids else None, "options": options, "width": len(first)}
    return _File(path, fmt, rows[1:], header=header)


# ---------------------------------------------------------------------------------------------- parsing records


def _parse(data: _File, line: int, raw: Any) -> tuple[MCQItem, str] | DataError:
    """(item with answer None where the record has none, the answer's field name), or the record's error."""
    where = f"{data.path}:{line}"
    try:
        if isinstance(raw, DataError):
            return raw
        if data.fmt in CSV_FORMATS:
            return _csv_row(data, line, where, raw)
        if not isinstance(raw, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(raw).__name__}.")
        return {"medqa": _medqa, "medmcqa": _medmcqa, "plain": _plain}[data.fmt](data, line, where, raw)
    except DataError as e:
        return e


def _item(data: _File, line: int, where: str, rec_id: Any, subject: Any, question: Any, options: dict[str, Any],
          options_field: str, answer: str | None, answer_field: str) -> tuple[MCQItem, str]:
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question' must be a non-empty string.")
    texts: dict[str, str] = {}
    for letter, text in options.items():
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise DataError(f"{where}: option {letter} in '{options_field}' must be text, got {type(text).__name__}.")
        texts[letter] = str(text).strip()
    filled = sum(1 for t in texts.values() if t)
    if filled < 2:
        raise DataError(f"{where}: '{options_field}' has {filled} non-empty option{'s' if filled != 1 else ''}; a question needs at least 2.")
    if answer is not None and answer not in texts:
        raise DataError(f"{where}: answer '{answer}' in '{answer_field}' is not one of the options ({', '.join(texts)}).")
    if rec_id is None or rec_id == "":
        rec_id = f"{data.path.stem}:{line}"
    elif isinstance(rec_id, (dict, list, bool)):
        raise DataError(f"{where}: field 'id' must be a string or a number, got {type(rec_id).__name__}.")
    if not isinstance(subject, str):
        raise DataError(f"{where}: the subject field must be a string, got {type(subject).__name__}.")
    item = MCQItem(id=str(rec_id), subject=subject.strip(), question=question.strip(), options=texts, answer=answer, source=where)
    return item, answer_field


def _letter(value: Any, where: str, field: str) -> str | None:
    """A letter answer: "c" -> "C"; missing / null / "" -> None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or len(value.strip()) != 1 or value.strip().upper() not in LETTERS:
        raise DataError(f"{where}: field '{field}' must be an option letter (A, B, ...), got {value!r}.")
    return value.strip().upper()


def _medqa(data: _File, line: int, where: str, rec: dict) -> tuple[MCQItem, str]:
    raw_options = rec.get("options")
    if not isinstance(raw_options, dict):
        raise DataError(f"{where}: field 'options' must be an object {{\"A\": ..., \"B\": ...}}"
                        f"{', got ' + type(raw_options).__name__ if 'options' in rec else ' and is missing'}.")
    options: dict[str, Any] = {}
    for key in sorted(raw_options, key=lambda k: k.strip().upper()):
        letter = key.strip().upper()
        if len(letter) != 1 or letter not in LETTERS or letter in options:
            raise DataError(f"{where}: 'options' key {key!r} is not an option letter (A, B, ...).")
        options[letter] = raw_options[key]
    answer = _letter(rec.get("answer_idx"), where, "answer_idx")
    if answer is None and isinstance(rec.get("answer"), str):  # no answer_idx: the answer text may name the option
        answer = next((k for k, v in options.items() if isinstance(v, str) and v.strip() == rec["answer"].strip()), None)
    return _item(data, line, where, rec.get("id"), rec.get("subject") or "", rec.get("question"), options, "options",
                 answer, "answer_idx")


def _cop(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _medmcqa(data: _File, line: int, where: str, rec: dict) -> tuple[MCQItem, str]:
    options = {LETTERS[i]: rec[key] for i, key in enumerate(_MEDMCQA_OPTIONS) if rec.get(key) is not None}
    raw, answer = rec.get("cop"), None
    if not (raw is None or raw == "" or _cop(raw) == -1):  # -1 / null / absent: unlabelled (the test split)
        cop = _cop(raw)
        if cop is None or not 0 <= cop - data.cop_base < len(_MEDMCQA_OPTIONS):
            lo = data.cop_base
            raise DataError(f"{where}: field 'cop' must be an option number {lo}-{lo + 3} "
                            f"({'0' if lo == 0 else '1'}-based in this file), got {raw!r}.")
        answer = LETTERS[cop - data.cop_base]
    return _item(data, line, where, rec.get("id"), rec.get("subject_name") or "", rec.get("question"), options, "opa..opd",
                 answer, "cop")


def _plain(data: _File, line: int, where: str, rec: dict) -> tuple[MCQItem, str]:
    raw_options = rec.get("options")
    if not isinstance(raw_options, list):
        raise DataError(f"{where}: field 'options' must be a list of option texts"
                        f"{', got ' + type(raw_options).__name__ if 'options' in rec else ' and is missing'}.")
    if len(raw_options) > len(LETTERS):
        raise DataError(f"{where}: 'options' has {len(raw_options)} options; at most {len(LETTERS)} are supported.")
    options = dict(zip(LETTERS, raw_options))
    raw = rec.get("answer")
    if isinstance(raw, int) and not isinstance(raw, bool):
        if not 0 <= raw < len(raw_options):
            raise DataError(f"{where}: field 'answer' {raw} is not an index into the {len(raw_options)} options "
                            f"(0-{len(raw_options) - 1}).")
        answer = LETTERS[raw]
    elif raw is None or isinstance(raw, str):
        answer = _letter(raw, where, "answer")
    else:
        raise DataError(f"{where}: field 'answer' must be an option letter or a 0-based index, got {type(raw).__name__}.")
    return _item(data, line, where, rec.get("id"), rec.get("subject") or "", rec.get("question"), options, "options",
                 answer, "answer")


def _csv_row(data: _File, line: int, where: str, cells: list[str]) -> tuple[MCQItem, str]:
    subject = subject_from_name(data.path)
    if data.fmt == "mmlu":
        if len(cells) not in (5, 6):  # 5: no answer column
            raise DataError(f"{where}: {len(cells)} columns where an MMLU row has 6 (question, A, B, C, D, answer).")
        answer = _letter(cells[5], where, "column 6 (answer)") if len(cells) == 6 else None
        return _item(data, line, where, None, subject, cells[0], dict(zip("ABCD", cells[1:5])), "columns 2-5", answer,
                     "column 6 (answer)")
    h = data.header
    assert h is not None
    if len(cells) != h["width"]:
        raise DataError(f"{where}: {len(cells)} columns where the header has {h['width']}.")
    answer = _letter(cells[h["answer"]], where, h["answer_name"]) if h["answer"] is not None else None
    own_id = cells[h["id"]].strip() if h["id"] is not None else ""
    rec_id = f"{data.path.stem}:{own_id}" if own_id else None
    options = {letter: cells[i] for letter, i in h["options"]}
    return _item(data, line, where, rec_id, subject, cells[h["question"]], options, "columns " + ", ".join(options), answer,
                 h["answer_name"])
