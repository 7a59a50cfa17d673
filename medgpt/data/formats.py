"""Data formats as registered declarations, normalised to one internal Record; detection and record loading.

A format is one `register_format(DataFormat(...))`: its name, how a raw record is recognised (`detect`, tried
in `priority` order when data.format=auto), how a raw record becomes a `Record` (`normalise`), and the kind
of Record it yields (dialogue, text, preference, unpaired, mcq). `FORMATS`, detection, the `data.format`
choice in medgpt.config and the methods' format check (`accepts`) all read the registry, so a new format
touches nothing else. The built-in formats:

  sharegpt    {"conversations": [{"from": "human|user|gpt|assistant|system|function_call|observation", "value": ...}],
              "system_prompt"?, "tools"?}
  messages    {"messages": [{"role": "system|user|assistant|tool", "content": ..., "tool_calls"?}], "tools"?}
  alpaca      {"instruction", "input"?, "output", "system"?, "history"?: [[question, answer], ...]}
  text        .txt one document per line, or records with "text"
  preference  {"conversations" | "messages": prompt turns, "chosen", "rejected"} (a response is a string
              or a {"from"/"role", "value"/"content"} turn), or the flat MedicalGPT form
              {"system", "history", "question", "response_chosen", "response_rejected"}
  unpaired    {"conversations" | "messages": prompt turns, "completion": the answer, "label": true|false}, or
              the answer as the final assistant turn and no "completion" (method=kto; label = desirable or not)
  mcq         {"question", "options": {"A": ...} | [...], "answer_idx" | "answer"}, or MedMCQA's {"question",
              "opa".."opd", "cop"}: multiple-choice questions (method=grpo; read by medgpt.evaluation.mcq_data)

Tool calls (ShareGPT function_call/observation, OpenAI tool_calls/tool) are parsed by medgpt.data.tool_calls.
`data.columns` renames fields ({our_name: their_name}). Files and other sources are read by medgpt.data.sources.
Every error names the file, the line (or row) and the field; with `data.on_error=skip` malformed records are
dropped and counted instead.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgpt.data.sources import expand_files, iter_raw, json_problem  # noqa: F401  (expand_files, iter_raw: re-exported)
from medgpt.data.tool_calls import (
    CALL_ROLES,
    RESULT_ROLES,
    append_calls,
    check_tool_names,
    finish_calls,
    parse_call,
    parse_tools,
    result_message,
    sharegpt_calls,
)
from medgpt.errors import DataError

log = logging.getLogger(__name__)

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                "model": "assistant", "system": "system"}
KINDS = ("dialogue", "text", "preference", "unpaired", "mcq")  # what a Record of each kind carries: see Record


@dataclass
class Record:
    """One normalised example and where it came from (for error messages)."""

    source: str  # "path:line" (or "path:row" for Parquet/CSV/Arrow)
    messages: list[dict] = field(default_factory=list)  # dialogue; for preference: the prompt turns
    text: str | None = None  # text format
    chosen: str | None = None  # preference format
    rejected: str | None = None
    completion: str | None = None  # unpaired format: the answer judged, and whether it is desirable
    label: bool | None = None
    tools: list[dict] | None = None  # OpenAI function schemas the dialogue may call
    margin: float | None = None  # preference format: the pair's own reward margin (method=rm), when it has one


@dataclass(frozen=True)
class DataFormat:
    """A data format's declaration."""

    name: str
    kind: str  # the Record it yields (KINDS); methods accept data by format name or by kind
    detect: Callable[[Any], bool] | None  # (raw record) -> is it this format? None: only by data.format=<name>
    normalise: Callable[[Any, str, dict], Record] | None  # (raw, "file:line", data.columns) -> Record; None: read by its method
    priority: int = 100  # detection order (lower first)


_REGISTRY: dict[str, DataFormat] = {}


def register_format(fmt: DataFormat) -> DataFormat:
    if fmt.kind not in KINDS:
        raise ValueError(f"data format '{fmt.name}': kind '{fmt.kind}' is not one of {', '.join(KINDS)}")
    if fmt.name in _REGISTRY and _REGISTRY[fmt.name] != fmt:
        raise ValueError(f"data format '{fmt.name}' registered twice")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> DataFormat:
    if name not in _REGISTRY:
        raise DataError(f"unknown data.format '{name}' (use auto or one of {', '.join(FORMATS)}).")
    return _REGISTRY[name]


class FormatNames(Sequence):
    """The registered format names (live: a format registered later is in it), optionally after fixed `first` names."""

    def __init__(self, *first: str):
        self.first = first

    def _names(self) -> tuple[str, ...]:
        return self.first + tuple(_REGISTRY)

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


FORMATS = FormatNames()  # every registered format
FORMAT_CHOICES = FormatNames("auto")  # the values of data.format


def accepts(method_formats: Iterable[str], fmt: str) -> bool:
    """Whether a method declared for `method_formats` trains on `fmt` data: named, or a registered format of the same kind."""
    method_formats = tuple(method_formats)
    kinds = {_REGISTRY[f].kind for f in method_formats if f in _REGISTRY}
    return fmt in method_formats or (fmt in _REGISTRY and _REGISTRY[fmt].kind in kinds)


def detect_format(record: Any, where: str) -> str:
    if not isinstance(record, str | dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}.")
    for fmt in sorted(_REGISTRY.values(), key=lambda f: f.priority):
        if fmt.detect is not None and fmt.detect(record):
            return fmt.name
    raise DataError(f"{where}: cannot tell the data format from fields {sorted(record)}; set data.format "
                    f"({', '.join(FORMATS)}) and data.columns if your fields have other names.")


def _get(rec: dict, name: str, columns: dict, where: str, kind: type | tuple = str, required: bool = True, default: Any = None):
    key = columns.get(name, name)
    if key not in rec or rec[key] is None:
        if required:
            raise DataError(f"{where}: missing field '{key}'" + (f" (mapped from '{name}' by data.columns)" if key != name else "") + ".")
        return default
    value = rec[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, str) and str not in kinds and value.lstrip()[:1] in ("[", "{"):
        value = _json_cell(value, where, key)  # a list/object kept as JSON text in a CSV cell
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{key}' must be a {names}, got {type(value).__name__}.")
    return value


def _json_cell(value: str, where: str, key: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: field '{key}' holds invalid JSON ({json_problem(e)}).") from None


def _turns(raw: list, where: str, field_name: str, role_key: str, content_key: str) -> list[dict]:
    """Turns to canonical messages; tool calls and results (medgpt.data.tool_calls) included."""
    out: list[dict] = []
    for i, turn in enumerate(raw):
        name = f"{field_name}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {name} must be an object with '{role_key}' and '{content_key}'.")
        role, content = turn.get(role_key), turn.get(content_key)
        if role in CALL_ROLES:
            append_calls(out, sharegpt_calls(content, where, f"{name}.{content_key}"))
            continue
        if role in RESULT_ROLES:
            out.append(result_message(content, where, f"{name}.{content_key}", out, turn.get("tool_call_id"), turn.get("name")))
            continue
        if role not in ROLE_ALIASES:
            raise DataError(f"{where}: {name}.{role_key}={role!r} is not a known role "
                            f"(use one of {', '.join(sorted((*ROLE_ALIASES, *CALL_ROLES, *RESULT_ROLES)))}).")
        calls = turn.get("tool_calls")
        if content is None and calls:
            content = ""  # OpenAI: an assistant message that only calls tools has content null
        if not isinstance(content, str):
            raise DataError(f"{where}: {name}.{content_key} must be a string.")
        msg = {"role": ROLE_ALIASES[role], "content": content}
        if calls:
            if msg["role"] != "assistant" or not isinstance(calls, list):
                raise DataError(f"{where}: {name}.tool_calls must be a list on an assistant turn.")
            msg["tool_calls"] = [parse_call(c, where, f"{name}.tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(msg)
    return finish_calls(out)


def check_dialogue(messages: list[dict], where: str, end_with: str = "assistant") -> list[dict]:
    """Optional system first, then user/assistant alternating (an assistant's tool calls followed by their results and
    another assistant turn), ending with `end_with`."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    if len(messages) == start:
        raise DataError(f"{where}: the dialogue has no user/assistant turns.")
    previous: dict | None = None
    for i, msg in enumerate(messages[start:], start):
        role = msg["role"]
        if previous is None:
            expected = ("user",)
        elif previous["role"] == "assistant":
            expected = ("tool",) if previous.get("tool_calls") else ("user",)
        else:
            expected = ("tool", "assistant") if previous["role"] == "tool" else ("assistant",)
        if role not in expected:
            if role == "tool":
                raise DataError(f"{where}: turn {i} is a tool result with no tool call before it.")
            if expected == ("tool",):
                raise DataError(f"{where}: turn {i} is '{role}' where the results of turn {i - 1}'s tool calls were expected.")
            raise DataError(f"{where}: turn {i} is '{role}' where '{expected[-1]}' was expected "
                            "(turns must alternate user/assistant after an optional first system message).")
        if role == "assistant" and not msg["content"].strip() and not msg.get("tool_calls"):
            raise DataError(f"{where}: turn {i} (an assistant turn) is empty.")
        previous = msg
    if previous["role"] != end_with:
        raise DataError(f"{where}: the dialogue must end with a{'n' if end_with[0] == 'a' else ''} {end_with} turn.")
    return messages


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def _tools(rec: dict, where: str, cols: dict) -> list[dict] | None:
    return parse_tools(_get(rec, "tools", cols, where, (str, list, dict), required=False), where, cols.get("tools", "tools"))


def _dialogue(messages: list[dict], rec: dict, where: str, cols: dict) -> Record:
    tools = _tools(rec, where, cols)
    check_dialogue(messages, where)
    check_tool_names(messages, tools, where)
    return Record(where, messages=messages, tools=tools)


def _sharegpt(rec: dict, where: str, cols: dict) -> Record:
    msgs = _turns(_get(rec, "conversations", cols, where, list), where, cols.get("conversations", "conversations"), "from", "value")
    return _dialogue(_with_system(msgs, _get(rec, "system_prompt", cols, where, required=False)), rec, where, cols)


def _messages(rec: dict, where: str, cols: dict) -> Record:
    msgs = _turns(_get(rec, "messages", cols, where, list), where, cols.get("messages", "messages"), "role", "content")
    return _dialogue(msgs, rec, where, cols)


def _alpaca(rec: dict, where: str, cols: dict) -> Record:
    msgs: list[dict] = []
    for i, pair in enumerate(_get(rec, "history", cols, where, list, required=False, default=[])):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: history[{i}] must be a [question, answer] pair of strings.")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _get(rec, "instruction", cols, where)
    extra = _get(rec, "input", cols, where, required=False, default="")
    msgs += [{"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction},
             {"role": "assistant", "content": _get(rec, "output", cols, where)}]
    return _dialogue(_with_system(msgs, _get(rec, "system", cols, where, required=False)), rec, where, cols)


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
    margin = rec.get(cols.get("margin", "margin"))
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin)):
        raise DataError(f"{where}: field '{cols.get('margin', 'margin')}' must be a number (the pair's reward margin), got {margin!r}.")
    return Record(where, messages=prompt, chosen=chosen, rejected=rejected, margin=None if margin is None else float(margin))


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


def _text(raw: Any, where: str, cols: dict) -> Record:
    text = raw if isinstance(raw, str) else _get(raw, "text", cols, where) if isinstance(raw, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{where}: a text record must be a line of text or an object with 'text'.")
    return Record(where, text=text)


def _is(*keys: str) -> Callable[[Any], bool]:
    return lambda raw: isinstance(raw, dict) and any(k in raw for k in keys)


register_format(DataFormat("preference", "preference", _is("chosen", "response_chosen"), _preference, priority=10))
register_format(DataFormat("mcq", "mcq", lambda r: isinstance(r, dict) and "question" in r and bool(set(r) & {"options", "opa"}),
                           None, priority=20))
register_format(DataFormat("unpaired", "unpaired", lambda r: isinstance(r, dict) and (
    "completion" in r or ("label" in r and bool(set(r) & {"conversations", "messages"}))), _unpaired, priority=30))
register_format(DataFormat("sharegpt", "dialogue", _is("conversations"), _sharegpt, priority=40))
register_format(DataFormat("messages", "dialogue", _is("messages"), _messages, priority=50))
register_format(DataFormat("alpaca", "dialogue", _is("instruction"), _alpaca, priority=60))
register_format(DataFormat("text", "text", lambda r: isinstance(r, str) or "text" in r, _text, priority=70))


def normalise(raw: Any, fmt: str, where: str, columns: dict, system_prompt: str | None = None) -> Record:
    if isinstance(raw, DataError):
        raise raw
    spec = get_format(fmt)
    if spec.normalise is None:
        raise DataError(f"{where}: {fmt} records are read by the method that trains on them, not as dialogues.")
    if spec.kind != "text" and not isinstance(raw, dict):
        raise DataError(f"{where}: a {fmt} record must be a JSON object, got {type(raw).__name__}.")
    rec = spec.normalise(raw, where, columns)
    if spec.kind != "text":
        rec.messages = _with_system(rec.messages, system_prompt)
    return rec


@dataclass
class LoadReport:
    records: int = 0
    skipped: int = 0
    first_error: str | None = None
    format: str | None = None  # the format used (data.format, or detected from the first readable record)


def iter_records(raws: Iterable[tuple[str, Any]], fmt: str, columns: dict, on_error: str, system_prompt: str | None,
                 report: LoadReport) -> Iterator[Record]:
    """The record of each ("file:line", raw) pair; `auto` is decided by the first readable record (report.format)."""
    fmt = report.format or fmt
    for where, raw in raws:
        try:
            if fmt == "auto" and not isinstance(raw, DataError):
                fmt = report.format = detect_format(raw, where)
            rec = normalise(raw, fmt, where, columns, system_prompt)
        except DataError as e:
            if on_error != "skip":
                raise
            report.skipped += 1
            report.first_error = report.first_error or str(e)
            continue
        report.records += 1
        report.format = fmt
        yield rec


def load_records(files: list[Path], fmt: str = "auto", columns: dict | None = None, on_error: str = "fail",
                 system_prompt: str | None = None, limit: int | None = None) -> tuple[list[Record], LoadReport, str]:
    """Read and normalise `files`; returns (records, report, the format used)."""
    columns = dict(columns or {})
    records: list[Record] = []
    report = LoadReport()
    for path in files:
        before = len(records)
        raws = ((f"{path}:{line}", raw) for line, raw in iter_raw(path))
        for rec in iter_records(raws, fmt, columns, on_error, system_prompt, report):
            records.append(rec)
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
    return records, report, report.format or fmt


def format_choices() -> tuple[str, ...]:
    """The values data.format takes (medgpt.config reads them when it checks the value)."""
    return tuple(FORMAT_CHOICES)
