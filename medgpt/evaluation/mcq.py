"""eval=mcq: multiple-choice questions (MedQA, MedMCQA, MMLU, C-Eval, CMMLU, plain; medgpt.evaluation.mcq_data).

The prompt is one user turn, rendered with the run's chat template and its generation prompt:

    <question>

    A. <option>
    B. <option> ...

    Answer with the letter of the correct option.        (Chinese questions: 请直接回答正确选项的字母。)

`eval.shots=k` puts k solved questions from `eval.dev_files` (the first k, in file order) before it as earlier
user/assistant turns, answered exactly as the continuation below.

eval.scoring=loglik (default): each option's continuation — its letter (`eval.target=letter`) or its text
(`eval.target=text`) — is scored by the summed log-probability of its tokens after the prompt
(medgpt.evaluation.loglik; all continuations of a batch of questions share their prompt's forward pass).
  `scores` in predictions.jsonl are the DECIDING scores: with eval.normalize=none the sums, with token the sum
  divided by the continuation's token count, with byte by its UTF-8 byte count; `predicted` = argmax(scores)
  (the first option on a tie), `correct` = predicted == answer, `accuracy` = mean(correct).
  results.json also reports `accuracy_sum` (decided by the sums) and `accuracy_norm` (decided by the
  normalised scores: eval.normalize, or token when it is none), each with its Wilson 95% interval; rows keep
  `loglik` (the sums), `tokens` and `predicted_sum` / `predicted_norm` so both can be recomputed.
  With target=letter every continuation is one token, so the three agree.
eval.scoring=generate: greedy answer of at most eval.max_new_tokens tokens; the letter is read from "A", "(A)",
  "A.", "Answer: A", "the answer is (A)", "答案：A", "选A" (first match, letters of the question's options only).
  An answer with no letter is wrong (predicted null, scores {}), counted as `unparsed`; otherwise scores is
  1.0 for the letter read and 0.0 for the others.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from medgpt.errors import ConfigError
from medgpt.evaluation.common import greedy_answers, rel, resolve_files
from medgpt.evaluation.stats import mean, wilson
from medgpt.evaluation.textmetrics import has_cjk

ASK = {("letter", False): "Answer with the letter of the correct option.",
       ("text", False): "Answer with the text of the correct option.",
       ("letter", True): "请直接回答正确选项的字母。",
       ("text", True): "请直接回答正确选项的内容。"}
SUMMARY_METRICS = ("n", "accuracy", "ci95_lo", "ci95_hi", "accuracy_norm")
MAIN = "accuracy"  # the metric a stage-by-stage table shows (per_question() is its per-question score)


@dataclass
class MCQData:
    items: list  # MCQItem
    shots: list  # MCQItem, the solved examples before every question
    files: list[Path]
    report: dict = field(default_factory=dict)  # load_mcq's: format per file, skipped, notes


def settings(e, root: Path) -> dict:
    """The settings that change this suite's predictions (they name its folder)."""
    s = {"files": [rel(p, root) for p in resolve_files(e.files, root, "eval.files")], "scoring": e.scoring, "shots": e.shots,
         "limit": e.limit}
    if e.scoring == "loglik":
        s.update(target=e.target, normalize=e.normalize)
    else:
        s["max_new_tokens"] = e.max_new_tokens
    if e.shots:
        s["dev_files"] = [rel(p, root) for p in resolve_files(e.dev_files, root, "eval.dev_files")]
    return s


def prepare(e, root: Path) -> MCQData:
    """The questions (and the solved examples); every data error here, before any model is loaded."""
    from medgpt.evaluation.mcq_data import load_mcq

    files = resolve_files(e.files, root, "eval.files")
    items, report = load_mcq(files, on_error=e.on_error, limit=e.limit)
    shots, dev_files = [], []
    if e.shots:
        dev_files = resolve_files(e.dev_files, root, "eval.dev_files")
        dev, _ = load_mcq(dev_files, on_error=e.on_error)
        test_ids = {it.id for it in items}
        shots = [d for d in dev if d.id not in test_ids][: e.shots]
        if len(shots) < e.shots:
            raise ConfigError(f"eval.shots={e.shots} but eval.dev_files hold only {len(shots)} usable solved questions.")
    report = {**report, "format": {rel(Path(p), root): f for p, f in report["format"].items()}}
    return MCQData(items, shots, files + dev_files, report)


def user_turn(item, target: str) -> str:
    lines = [item.question, ""] + [f"{letter}. {text}" for letter, text in item.options.items()]
    return "\n".join(lines + ["", ASK[(target, has_cjk(item.question))]])


def continuation(item, letter: str, target: str) -> str:
    return letter if target == "letter" else item.options[letter]


def messages(item, shots: list, target: str) -> list[dict]:
    turns = []
    for s in shots:
        turns += [{"role": "user", "content": user_turn(s, target)}, {"role": "assistant", "content": continuation(s, s.answer, target)}]
    return turns + [{"role": "user", "content": user_turn(item, target)}]


def predict(loaded, cfg, data: MCQData, todo: list, write, bar) -> dict:
    """Score `todo` batch by batch, writing each batch's rows at once; returns counters for results.json."""
    e = cfg.eval
    stats = {"truncated_prompts": 0}
    for start in range(0, len(todo), e.batch_size):
        batch = todo[start:start + e.batch_size]
        rows = _loglik_rows(loaded, e, data, batch, stats) if e.scoring == "loglik" else _generate_rows(loaded, e, data, batch)
        write(rows)
        bar.update(len(batch))
    return stats


def _loglik_rows(loaded, e, data: MCQData, batch: list, stats: dict) -> list[dict]:
    from medgpt.evaluation.loglik import continuation_logliks

    tok = loaded.tokenizer
    target = e.target
    prompts, conts, letters = [], [], []
    for item in batch:
        cands = [k for k, v in item.options.items() if target == "letter" or v]  # an empty option text has nothing to score
        ids = [tok(continuation(item, k, target), add_special_tokens=False)["input_ids"] for k in cands]
        prompt = loaded.chat_ids(messages(item, data.shots, target))
        keep = loaded.context_length - max(map(len, ids))
        if len(prompt) > keep:  # too long for the model: keep the question's end (the options and the request)
            prompt, stats["truncated_prompts"] = prompt[-keep:], stats["truncated_prompts"] + 1
        prompts.append(prompt)
        conts.append(ids)
        letters.append(cands)
    sums = continuation_logliks(loaded.engine.model, prompts, conts, tok.pad_token_id)
    norm = e.normalize if e.normalize != "none" else "token"
    rows = []
    for item, cands, ids, s in zip(batch, letters, conts, sums):
        loglik = dict(zip(cands, s))
        tokens = {k: len(i) for k, i in zip(cands, ids)}
        nbytes = {k: len(continuation(item, k, target).encode("utf-8")) for k in cands}
        by = {"none": loglik, "token": {k: loglik[k] / tokens[k] for k in cands}, "byte": {k: loglik[k] / nbytes[k] for k in cands}}
        scores = by[e.normalize]
        predicted = max(scores, key=scores.get)
        rows.append({"id": item.id, "subject": item.subject, "answer": item.answer, "predicted": predicted,
                     "correct": predicted == item.answer, "scores": scores, "loglik": loglik, "tokens": tokens,
                     "predicted_sum": max(loglik, key=loglik.get), "predicted_norm": max(by[norm], key=by[norm].get)})
    return rows


def _generate_rows(loaded, e, data: MCQData, batch: list) -> list[dict]:
    prompts = [loaded.chat_ids(messages(item, data.shots, "letter")) for item in batch]
    rows = []
    for item, done in zip(batch, greedy_answers(loaded, prompts, e.max_new_tokens)):
        predicted = extract_letter(done.text, list(item.options))
        scores = {k: float(k == predicted) for k in item.options} if predicted else {}
        rows.append({"id": item.id, "subject": item.subject, "answer": item.answer, "predicted": predicted,
                     "correct": predicted == item.answer, "scores": scores, "output": done.text, "parsed": predicted is not None})
    return rows


_PATTERNS = [re.compile(p) for p in (
    r"(?i:answer|option)(?:\s+(?i:is))?\s*[:：]?\s*[(（]?([A-Z])(?![A-Za-z])",  # Answer: A / the answer is (B) / option C
    r"答案\s*(?:是|为)?\s*[:：]?\s*[(（]?([A-Z])",                                 # 答案：A / 答案是(B)
    r"^\s*[(（]?([A-Z])(?=[)）.．:：、,，]|\s*$|\s*\n)",                          # A / (A) / A. ... / A: ... at the start
    r"[(（]([A-Z])[)）]",                                                          # (A) anywhere
    r"选\s*([A-Z])(?![A-Za-z])",                                                    # 选A
)]


def extract_letter(text: str, letters: list[str]) -> str | None:
    """The option letter a generated answer names, or None (see the module docstring for the forms read)."""
    for pattern in _PATTERNS:
        for m in pattern.finditer(text or ""):
            if m.group(1) in letters:
                return m.group(1)
    return None


def metrics(rows: list[dict], e) -> dict:
    n = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    out: dict = {"n": n, "correct": correct, "accuracy": correct / n if n else None, "ci95": wilson(correct, n)}
    if e.scoring == "loglik":
        by_sum = sum(r["predicted_sum"] == r["answer"] for r in rows)
        by_norm = sum(r["predicted_norm"] == r["answer"] for r in rows)
        out.update(accuracy_sum=by_sum / n if n else None, accuracy_sum_ci95=wilson(by_sum, n),
                   accuracy_norm=by_norm / n if n else None, accuracy_norm_ci95=wilson(by_norm, n),
                   norm=e.normalize if e.normalize != "none" else "token")
    else:
        unparsed = sum(not r.get("parsed") for r in rows)
        out.update(unparsed=unparsed, unparsed_rate=unparsed / n if n else None)
    subjects = defaultdict(list)
    for r in rows:
        subjects[r.get("subject") or "unspecified"].append(bool(r["correct"]))
    out["per_subject"] = {s: {"n": len(v), "accuracy": mean(v)} for s, v in sorted(subjects.items())}
    return out


def per_question(row: dict) -> float:
    """The paired score of a row (eval.baseline: McNemar): 1.0 right, 0.0 wrong."""
    return float(bool(row["correct"]))


def flat(m: dict) -> dict:
    """The metrics a run's summary.json gets as eval/mcq/<metric>."""
    values = {"n": m["n"], "accuracy": m["accuracy"], "ci95_lo": m["ci95"][0], "ci95_hi": m["ci95"][1]}
    if "accuracy_norm" in m:
        values["accuracy_norm"] = m["accuracy_norm"]
    return values


def describe(m: dict) -> str:
    lo, hi = m["ci95"]
    extra = f"; length-normalised ({m['norm']}) {m['accuracy_norm']:.3f}" if "accuracy_norm" in m else f"; {m['unparsed']} unparsed"
    return f"accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}) on {m['n']} questions{extra}"

