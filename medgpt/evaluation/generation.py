"""eval=generation: free answers to held-out questions, scored against reference answers.

Input: dialogue files in any SFT format (sharegpt, messages, alpaca; read by medgpt.data.formats exactly as
training's eval files are): the last assistant turn is the reference, the turns before it the prompt
(rendered with the run's chat template). Default: data/eval/medical_eval_en.jsonl.

Each answer is greedy, at most eval.max_new_tokens tokens, from the run's hf engine in batches of
eval.batch_size. Metrics (medgpt.evaluation.textmetrics; Chinese segmented by characters):
  rougeL               mean ROUGE-L F-measure of the answers against their references (0..1)
  bleu                 corpus BLEU (sacrebleu, 0..100; `bleu_tokenize` says 13a or zh)
  mean_answer_tokens   generated tokens per answer, the stop token not counted
  stop_rate            answers that ended on the stop token (or stop string), not on the token budget
predictions.jsonl: id ("<file>:<line>"), question (the last user turn), reference, answer, rougeL, stopped, answer_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medgpt.evaluation.common import greedy_answers, rel, resolve_files
from medgpt.evaluation.stats import mean
from medgpt.evaluation.textmetrics import corpus_bleu, rouge_l

SUMMARY_METRICS = ("n", "rougeL", "bleu", "mean_answer_tokens", "stop_rate")
MAIN = "rougeL"  # the metric a stage-by-stage table shows (per_question() is its per-question score)


@dataclass(frozen=True)
class Question:
    id: str
    messages: list  # the prompt: ends with a user turn
    reference: str


@dataclass
class GenerationData:
    items: list[Question]
    files: list[Path]
    report: dict


def settings(e, root: Path) -> dict:
    return {"files": [rel(p, root) for p in resolve_files(e.files, root, "eval.files")], "max_new_tokens": e.max_new_tokens,
            "limit": e.limit}


def prepare(e, root: Path) -> GenerationData:
    from medgpt.data.formats import load_records

    files = resolve_files(e.files, root, "eval.files")
    items, formats, skipped = [], {}, 0
    for f in files:  # the format is told per file
        if e.limit is not None and len(items) >= e.limit:
            break
        records, report, fmt = load_records([f], "auto", {}, e.on_error, None, None if e.limit is None else e.limit - len(items))
        formats[rel(f, root)], skipped = fmt, skipped + report.skipped
        for r in records:  # every record ends with an assistant turn (formats.check_dialogue)
            path, _, line = r.source.rpartition(":")
            items.append(Question(f"{rel(Path(path), root)}:{line}", r.messages[:-1], r.messages[-1]["content"]))
    return GenerationData(items, files, {"format": formats, "skipped": skipped})


def answers(loaded, questions: list[Question], max_new_tokens: int) -> list[dict]:
    """Greedy answers to `questions` (one batch): answer text, whether it ended on the stop token, its tokens."""
    done = greedy_answers(loaded, [loaded.chat_ids(q.messages) for q in questions], max_new_tokens)
    out = []
    for c in done:
        stopped = c.finish_reason == "stop"
        out.append({"answer": c.text.strip(), "stopped": stopped, "answer_tokens": max(0, c.completion_tokens - int(stopped))})
    return out


def predict(loaded, cfg, data: GenerationData, todo: list, write, bar) -> dict:
    e = cfg.eval
    for start in range(0, len(todo), e.batch_size):
        batch = todo[start:start + e.batch_size]
        rows = [{"id": q.id, "question": q.messages[-1]["content"], "reference": q.reference, **a,
                 "rougeL": rouge_l(a["answer"], q.reference)} for q, a in zip(batch, answers(loaded, batch, e.max_new_tokens))]
        write(rows)
        bar.update(len(batch))
    return {}


def metrics(rows: list[dict], e) -> dict:
    bleu, tokenize = corpus_bleu([r["answer"] for r in rows], [r["reference"] for r in rows])
    return {"n": len(rows), "rougeL": mean(r["rougeL"] for r in rows), "bleu": bleu, "bleu_tokenize": tokenize,
            "mean_answer_tokens": mean(r["answer_tokens"] for r in rows), "stop_rate": mean(bool(r["stopped"]) for r in rows),
            "max_new_tokens": e.max_new_tokens}


def per_question(row: dict) -> float:
    """The paired score of a row (eval.baseline: sign test): its ROUGE-L."""
    return row["rougeL"]


def flat(m: dict) -> dict:
    return {k: m[k] for k in SUMMARY_METRICS}


def describe(m: dict) -> str:
    return (f"ROUGE-L {m['rougeL']:.3f}, BLEU {m['bleu']:.2f} ({m['bleu_tokenize']}) on {m['n']} answers; "
            f"{m['mean_answer_tokens']:.1f} tokens per answer, {100 * m['stop_rate']:.0f}% ended on the stop token")
