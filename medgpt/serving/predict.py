"""mode=predict: answer every prompt of a file, batched, into a .jsonl — resumable.

Input (`predict.input`):
  .txt     one prompt per line (blank lines skipped)
  .jsonl   one object per line with `prompt` (text), `messages` ([{role, content}]) or ShareGPT
           `conversations` ([{from, value}], optional `system_prompt`); a trailing assistant turn is
           taken as the reference answer and copied to the output. An `id` field is copied too.
Output (`predict.output`, default <input>.predictions.jsonl), one row per input line:
  {"line", "id"?, "prompt", "messages"?, "output", "prompt_tokens", "completion_tokens", "finish_reason", "reference"?}
Rows are written as they finish, in input order; a rerun skips the lines already in the output (a
half-written last row from a crash is dropped), so an interrupted run resumes where it stopped.
`predict.batch_size` requests are decoded together; the next waiting prompt takes a finished one's slot.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

from tqdm import tqdm

from medgpt.data.formats import ROLE_ALIASES, iter_raw
from medgpt.errors import ConfigError, DataError
from medgpt.serving.engine import sampling_params


def check_paths(pcfg) -> tuple[Path, Path]:
    if not pcfg.input:
        raise ConfigError("mode=predict needs predict.input=<prompts .txt or .jsonl> (and optionally predict.output=<answers .jsonl>).")
    inp = Path(pcfg.input).expanduser()
    if not inp.is_file():
        raise ConfigError(f"predict.input={pcfg.input} does not exist.")
    if inp.suffix.lower() not in (".txt", ".jsonl"):
        raise ConfigError(f"predict.input={pcfg.input}: use a .txt file (one prompt per line) or a .jsonl file.")
    out = Path(pcfg.output).expanduser() if pcfg.output else inp.with_name(inp.stem + ".predictions.jsonl")
    if out.suffix.lower() != ".jsonl":
        raise ConfigError(f"predict.output={out} must be a .jsonl file.")
    if out.resolve() == inp.resolve():
        raise ConfigError("predict.output must differ from predict.input.")
    return inp, out


def _turns(raw, where: str, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: expected a non-empty list of turns.")
    turns = []
    for i, t in enumerate(raw):
        role = t.get(role_key) if isinstance(t, dict) else None
        if role not in ROLE_ALIASES or not isinstance(t.get(content_key), str):
            raise DataError(f"{where}: turn {i} needs '{role_key}' (one of {', '.join(sorted(ROLE_ALIASES))}) and a string '{content_key}'.")
        turns.append({"role": ROLE_ALIASES[role], "content": t[content_key]})
    return turns


def read_inputs(path: Path) -> list[dict]:
    items = []
    for lineno, raw in iter_raw(path):
        where = f"{path}:{lineno}"
        if isinstance(raw, DataError):
            raise raw
        item: dict = {"line": lineno}
        if isinstance(raw, str):
            messages = [{"role": "user", "content": raw}]
        elif isinstance(raw, dict) and isinstance(raw.get("prompt"), str):
            messages = [{"role": "user", "content": raw["prompt"]}]
        elif isinstance(raw, dict) and "messages" in raw:
            messages = _turns(raw["messages"], f"{where}: messages", "role", "content")
        elif isinstance(raw, dict) and "conversations" in raw:
            messages = _turns(raw["conversations"], f"{where}: conversations", "from", "value")
            if isinstance(raw.get("system_prompt"), str) and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": raw["system_prompt"]})
        else:
            raise DataError(f"{where}: expected an object with 'prompt' (text), 'messages' or 'conversations'.")
        if isinstance(raw, dict) and "id" in raw:
            item["id"] = raw["id"]
        if messages[-1]["role"] == "assistant":
            item["reference"] = messages.pop()["content"]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{where}: the conversation must end with a user turn (optionally followed by a reference answer).")
        item["messages"] = messages
        items.append(item)
    return items


def finished_lines(out: Path) -> set[int]:
    """Input lines already answered in `out`; a broken row (a crash mid-write) is dropped from the file."""
    if not out.exists():
        return set()
    done, good, broken = set(), [], False
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            done.add(int(row["line"]))
            good.append(line)
        except (ValueError, KeyError, TypeError):
            broken = True
    if broken:
        out.write_text("".join(g + "\n" for g in good), encoding="utf-8")
    return done


def run_predict(loaded, generation, items: list[dict], inp: Path, out: Path, batch_size: int) -> dict:
    done = finished_lines(out)
    todo = [it for it in items if it["line"] not in done]
    print(f"predict: {len(items)} prompts in {inp}; {len(items) - len(todo)} already answered in {out}; {len(todo)} to go", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    inflight: deque = deque()
    pending = iter(todo)
    with open(out, "a", encoding="utf-8") as fh, tqdm(total=len(items), initial=len(items) - len(todo), desc="predict", unit="prompt") as bar:
        while True:
            while len(inflight) < 2 * batch_size:  # keep the engine's batch full; results are written in input order
                item = next(pending, None)
                if item is None:
                    break
                inflight.append((item, _submit(loaded, generation, item)))
            if not inflight:
                break
            item, handle = inflight.popleft()
            row = {k: item[k] for k in ("line", "id") if k in item}
            row["prompt"] = item["messages"][-1]["content"]
            if len(item["messages"]) > 1:
                row["messages"] = item["messages"]
            if isinstance(handle, str):  # refused before generation
                row.update(output="", prompt_tokens=None, completion_tokens=0, finish_reason="error", error=handle)
            else:
                result = handle.result()
                row.update(output=result.text, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                           finish_reason=result.finish_reason)
            if "reference" in item:
                row["reference"] = item["reference"]
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            written += 1
            bar.update(1)
    print(f"predict: wrote {written} rows to {out}", flush=True)
    return {"output": str(out), "written": written, "skipped": len(items) - len(todo)}


def _submit(loaded, generation, item):
    try:
        ids = loaded.chat_ids(item["messages"])
    except DataError as e:  # e.g. a system turn that is not the first
        return f"the template cannot render this conversation: {e}"
    room = loaded.context_length - len(ids)
    if room <= 0:
        return f"the prompt has {len(ids)} tokens, more than the model's context of {loaded.context_length}"
    return loaded.engine.submit(ids, sampling_params(generation, max_tokens=min(generation.max_new_tokens, room)))
