"""Read data files and normalise every supported format to one internal message list.

Formats (`data.format`, or `auto` from the first record's fields):
  sharegpt    {"conversations": [{"from": "human|user|gpt|assistant|system", "value": ...}], "system_prompt"?}
  messages    {"messages": [{"role": "system|user|assistant", "content": ...}]}
  alpaca      {"instruction", "input"?, "output", "system"?, "history"?: [[question, answer], ...]}
  text        .txt one document per line, or .jsonl/.json with "text"
  preference  {"conversations" | "messages": prompt turns, "chosen", "rejected"} (a response is a string
              or a {"from"/"role", "value"/"content"} turn), or the flat MedicalGPT form
              {"system", "history", "question", "response_chosen", "response_rejected"}
  unpaired    {"conversations" | "messages": prompt turns, "completion": the answer, "label": true|false}, or
              the answer as the final assistant turn and no "completion" (method=kto; label = desirable or not)
  mcq         {"question", "options": {"A": ...} | [...], "answer_idx" | "answer"}, or MedMCQA's {"question",
              "opa".."opd", "cop"}: multiple-choice questions (method=grpo; read by medgpt.evaluation.mcq_data)
`data.columns` renames fields ({our_name: their_name}). Every error names the file, the line and the
field; with `data.on_error=skip` malformed records are dropped and counted instead.
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgpt.errors import DataError

log = logging.getLogger(__name__)

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                "model": "assistant", "system": "system"}
FORMATS = ("sharegpt", "messages", "alpaca", "text", "preference", "unpaired", "mcq")


@dataclass
class Record:
    """One normalised example and where it came from (for error messages)."""

    source: str  # "path:line"
    messages: list[dict] = field(default_factory=list)  # dialogue; for preference: the prompt turns
    text: str | None = None  # text format
    chosen: str | None = None  # preference format
    rejected: str | None = None
    completion: str | None = None  # unpaired format: the answer judged, and whether it is desirable
    label: bool | None = None


@dataclass
class LoadReport:
    records: int = 0
    skipped: int = 0
    first_error: str | None = None


def expand_files(patterns: list[str], root: Path) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern) if Path(pattern).is_absolute() else root / pattern
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True)) if glob.has_magic(str(p)) else [p]
        for m in matches:
            if not m.is_file():
                raise DataError(f"data file {pattern} does not exist (looked in {m.parent}); check data.train_files / data.eval_files.")
            files.append(m)
    if not files and patterns:
        raise DataError(f"no data file matches {patterns}; check data.train_files / data.eval_files.")
    return files


def iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, raw record) pairs; .txt yields strings, .jsonl/.json yield parsed JSON."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        yield lineno, line.rstrip("\n")
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        yield lineno, json.loads(line)
                    except json.JSONDecodeError as e:
                        yield lineno, DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}).")
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json data file must hold a list of records.")
            yield from ((i + 1, r) for i, r in enumerate(data))  # "line" = record number here
        else:
            raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json or .txt).")
    except UnicodeDecodeError as e:
        lineno = _line_of_byte(path, e.start)
        raise DataError(f"{path}:{lineno}: not valid UTF-8 text (byte {e.start}); convert the file to UTF-8.") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}).") from None


def _line_of_byte(path: Path, offset: int) -> int:
    with open(path, "rb") as fh:
        return fh.read(offset).count(b"\n") + 1


def detect_format(record: Any, where: str) -> str:
    if isinstance(record, str):
        return "text"
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}.")
    keys = set(record)
    if "chosen" in keys or "response_chosen" in keys:
        return "preference"
    if "question" in keys and keys & {"options", "opa"}:
        return "mcq"
    if "completion" in keys or ("label" in keys and keys & {"conversations", "messages"}):
        return "unpaired"
    for key, fmt in (("conversations", "sharegpt"), ("messages", "messages"), ("instruction", "alpaca"), ("text", "text")):
        if key in keys:
            return fmt
    raise DataError(f"{where}: cannot tell the data format from fields {sorted(keys)}; set data.format "
                    f"({', '.join(FORMATS)}) and data.columns if your fields have other names.")


def _get(rec: dict, name: str, columns: dict, where: str, kind: type | tuple = str, required: bool = True, default: Any = None):
    key = columns.get(name, name)
    if key not in rec or rec[key] is None:
        if required:
            raise DataError(f"{where}: missing field '{key}'" + (f" (mapped from '{name}' by data.columns)" if key != name else "") + ".")
        return default
    value = rec[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{key}' must be a {names}, got {type(value).__name__}.")
    return value


def _turns(raw: list, where: str, field_name: str, role_key: str, content_key: str) -> list[dict]:
    out = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {field_name}[{i}] must be an object with '{role_key}' and '{content_key}'.")
        role = turn.get(role_key)
        if role not in ROLE_ALIASES:
            raise DataError(f"{where}: {field_name}[{i}].{role_key}={role!r} is not a known role "
                            f"(use one of {', '.join(sorted(ROLE_ALIASES))}).")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise DataError(f"{where}: {field_name}[{i}].{content_key} must be a string.")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


def check_dialogue(messages: list[dict], where: str, end_with: str = "assistant") -> list[dict]:
    """Optional system first, then user/assistant alternating, ending with `end_with`."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise DataError(f"{where}: the dialogue has no user/assistant turns.")
    for i, msg in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise DataError(f"{where}: turn {i + len(messages) - len(body)} is '{msg['role']}' where '{expected}' was expected "
                            "(turns must alternate user/assistant after an optional first system message).")
    if body[-1]["role"] != end_with:
        raise DataError(f"{where}: the dialogue must end with a{'n' if end_with[0] == 'a' else ''} {end_with} turn.")
    for msg in body:
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise DataError(f"{where}: an assistant turn is empty.")
    return messages


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def _sharegpt(rec: dict, where: str, cols: dict) -> list[dict]:
    msgs = _turns(_get(rec, "conversations", cols, where, list), where, cols.get("conversations", "conversations"), "from", "value")
    return _with_system(msgs, _get(rec, "system_prompt", cols, where, required=False))


def _messages(rec: dict, where: str, cols: dict) -> list[dict]:
    return _turns(_get(rec, "messages", cols, where, list), where, cols.get("messages", "messages"), "role", "content")


def _alpaca(rec: dict, where: str, cols: dict) -> list[dict]:
    msgs: list[dict] = []
    for i, pair in enumerate(_get(rec, "history", cols, where, list, required=False, default=[])):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: history[{i}] must be a [question, answer] pair of strings.")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _get(rec, "instruction", cols, where)
    extra = _get(rec, "input", cols, where, required=False, default="")
    msgs += [{"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction},
             {"role": "assistant", "content": _get(rec, "output", cols, where)}]
    return _with_system(msgs, _get(rec, "system", cols, where, required=False))


def _response(value: Any, where: str, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        content = value.get("value", value.get("content"))
        if isinstance(content, str):
            return content
    raise DataError(f"{where}: field '{name}' must be a string or one assistant turn {{'from': 'gpt', 'value': ...}}.")


def _preference(rec: dict, where: str, cols: dict) -> Record:
    if cols.get("response_chosen", "response_chosen") in rec:  # the flat MedicalGPT form
        history = []
        for i, pair in enumerate(_get(rec, "history", cols, where, list, required=False, default=[])):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise DataError(f"{where}: history[{i}] must be a [question, answer] pair.")
            history += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = _with_system(history + [{"role": "user", "content": _get(rec, "question", cols, where)}],
                              _get(rec, "system", cols, where, required=False))
        chosen, rejected = _get(rec, "response_chosen", cols, where), _get(rec, "response_rejected", cols, where)
    else:
        key = "conversations" if cols.get("conversations", "conversations") in rec else "messages"
        role_key, content_key = ("from", "value") if key == "conversations" else ("role", "content")
        prompt = _turns(_get(rec, key, cols, where, list), where, cols.get(key, key), role_key, content_key)
        if prompt and prompt[-1]["role"] == "assistant":  # some datasets keep the shared prefix only
            raise DataError(f"{where}: the prompt must end with a user turn; put the answers in 'chosen' and 'rejected'.")
        prompt = _with_system(prompt, _get(rec, "system_prompt", cols, where, required=False))
        chosen = _response(_get(rec, "chosen", cols, where, (str, dict, list)), where, "chosen")
        rejected = _response(_get(rec, "rejected", cols, where, (str, dict, list)), where, "rejected")
    check_dialogue(prompt, where, end_with="user")
    if not chosen.strip() or not rejected.strip():
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be non-empty.")
    return Record(where, messages=prompt, chosen=chosen, rejected=rejected)


def _unpaired(rec: dict, where: str, cols: dict) -> Record:
    key = "conversations" if cols.get("conversations", "conversations") in rec else "messages"
    role_key, content_key = ("from", "value") if key == "conversations" else ("role", "content")
    turns = _turns(_get(rec, key, cols, where, list), where, cols.get(key, key), role_key, content_key)
    turns = _with_system(turns, _get(rec, "system_prompt", cols, where, required=False))
    if cols.get("completion", "completion") in rec:
        if turns and turns[-1]["role"] == "assistant":
            raise DataError(f"{where}: with a 'completion' field the turns must end with a user turn (the completion is the answer).")
        prompt, completion = turns, _response(_get(rec, "completion", cols, where, (str, dict, list)), where, "completion")
    elif turns and turns[-1]["role"] == "assistant":
        prompt, completion = turns[:-1], turns[-1]["content"]
    else:
        raise DataError(f"{where}: an unpaired record needs a 'completion' field or a final assistant turn (the answer to judge).")
    check_dialogue(prompt, where, end_with="user")
    if not completion.strip():
        raise DataError(f"{where}: the completion is empty.")
    label_key = cols.get("label", "label")
    label = rec.get(label_key)
    if label is None:
        raise DataError(f"{where}: missing field '{label_key}' (true if the completion is a desirable answer, false if not).")
    if not isinstance(label, bool) and label not in (0, 1):
        raise DataError(f"{where}: field '{label_key}' must be true or false, got {label!r}.")
    return Record(where, messages=prompt, completion=completion, label=bool(label))


_DIALOGUE: dict[str, Callable[[dict, str, dict], list[dict]]] = {"sharegpt": _sharegpt, "messages": _messages, "alpaca": _alpaca}


def normalise(raw: Any, fmt: str, where: str, columns: dict, system_prompt: str | None = None) -> Record:
    if isinstance(raw, DataError):
        raise raw
    if fmt == "text":
        text = raw if isinstance(raw, str) else _get(raw, "text", columns, where) if isinstance(raw, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{where}: a text record must be a line of text or an object with 'text'.")
        return Record(where, text=text)
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a {fmt} record must be a JSON object, got {type(raw).__name__}.")
    if fmt in ("preference", "unpaired"):
        rec = (_preference if fmt == "preference" else _unpaired)(raw, where, columns)
        rec.messages = _with_system(rec.messages, system_prompt)
        return rec
    if fmt not in _DIALOGUE:
        raise DataError(f"unknown data.format '{fmt}' (use auto or one of {', '.join(FORMATS)}).")
    return Record(where, messages=check_dialogue(_with_system(_DIALOGUE[fmt](raw, where, columns), system_prompt), where))


def load_records(files: list[Path], fmt: str = "auto", columns: dict | None = None, on_error: str = "fail",
                 system_prompt: str | None = None, limit: int | None = None) -> tuple[list[Record], LoadReport, str]:
    """Read and normalise `files`; returns (records, report, the format used)."""
    columns = dict(columns or {})
    records: list[Record] = []
    report = LoadReport()
    for path in files:
        before = len(records)
        for lineno, raw in iter_raw(path):
            where = f"{path}:{lineno}"
            try:
                if fmt == "auto" and not isinstance(raw, DataError):
                    fmt = detect_format(raw, where)
                records.append(normalise(raw, fmt, where, columns, system_prompt))
            except DataError as e:
                if on_error != "skip":
                    raise
                report.skipped += 1
                report.first_error = report.first_error or str(e)
            if limit is not None and len(records) >= limit:
                break
        if len(records) == before and report.skipped == 0:
            raise DataError(f"{path}: the file holds no records.")
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"no usable records in {', '.join(map(str, files))}" +
                        (f" ({report.skipped} skipped; first error: {report.first_error})" if report.skipped else "."))
    if report.skipped:
        log.warning("skipped %d malformed records (data.on_error=skip); first: %s", report.skipped, report.first_error)
    report.records = len(records)
    return records, report, fmt
