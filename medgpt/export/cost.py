"""The cost of quantising a run, measured: one row per `quantize` setting (none first, the reference).

Each row loads the run as the inference modes do (medgpt.serving.loading.load with `quantize=<kind>`), then
measures: memory (the weights' footprint, transformers' get_memory_footprint), load time, generation speed
through the engine (`requests` greedy prompts submitted together, `max_tokens` each; completion tokens per
second of wall time), the held-out loss (mean token loss of the assistant answers of a ShareGPT file, default
the demo's held-out dialogues) and, when `mcq` is set, MCQ accuracy with its Wilson interval through
mode=eval's own suite (a quantised evaluation gets its own eval/mcq-<hash>/ folder). Deltas are against the
first row. Timings mean something only on an otherwise idle machine: `scripts/quantise_table.py` is the
entry point and says so; nothing here runs in the test suite's timing path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from medgpt.data.formats import detect_format, normalise

DEFAULT_HELDOUT = "data/eval/medical_eval_en.jsonl"
PROMPTS = ["What are the warning signs of a stroke?", "How much water should an adult drink in a day?",
           "Is a fever of 38.5 C in a two-year-old dangerous?", "What does a high LDL cholesterol result mean?",
           "What is the normal resting heart rate for an adult?", "Can I take ibuprofen and paracetamol together?",
           "What are the symptoms of type 2 diabetes?", "How long does a common cold usually last?"]


@torch.no_grad()
def heldout_loss(loaded, path: Path, limit: int = 32) -> float:
    """Mean token loss of the last assistant answer of each dialogue in `path` (ShareGPT / messages JSONL)."""
    model = loaded.engine.model
    device = next(model.parameters()).device
    total, count = 0.0, 0
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()][:limit]
    for i, line in enumerate(lines):
        raw, where = json.loads(line), f"{path}:{i + 1}"
        record = normalise(raw, detect_format(raw, where), where, {})
        messages = record.messages
        prompt = loaded.chat_ids(messages[:-1])
        answer = loaded.text_ids(messages[-1]["content"])[: max(1, loaded.context_length - len(prompt) - 1)]
        ids = torch.tensor([prompt + answer], device=device)
        labels = torch.tensor([[-100] * len(prompt) + answer], device=device)
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        total, count = total + float(loss) * len(answer), count + len(answer)
    return total / max(count, 1)


def _speed(loaded, requests: int, max_tokens: int) -> float:
    from medgpt.serving.engine import SamplingParams

    prompts = [loaded.chat_ids([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(requests)]
    started = time.perf_counter()
    done = loaded.engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    return sum(c.completion_tokens for c in done) / (time.perf_counter() - started)


def measure(cfg, kind: str, requests: int = 8, max_tokens: int = 64, heldout: Path | None = None, mcq: bool = True) -> dict:
    """One row for `cfg` (mode=eval or serve, with run=...) loaded with quantize=`kind`."""
    import copy

    from omegaconf import open_dict

    from medgpt.serving.loading import load

    c = copy.deepcopy(cfg)
    with open_dict(c):
        c.quantize = kind
        c.serve.engine = "hf"
    started = time.perf_counter()
    loaded = load(c)
    load_s = time.perf_counter() - started
    try:
        row = {"quantize": kind, "memory_mb": round(loaded.engine.model.get_memory_footprint() / 2**20, 2), "load_s": round(load_s, 2),
               "tokens_per_s": round(_speed(loaded, requests, max_tokens), 2),
               "heldout_loss": round(heldout_loss(loaded, heldout or Path(c.paths.root) / DEFAULT_HELDOUT), 4)}
        if mcq:
            from medgpt.evaluation.modes import resolve_target, run_suite

            with open_dict(c):
                c.mode = "eval"
            results = run_suite(c, resolve_target(c, Path(c.paths.output_dir)), loaded=loaded)
            row.update(mcq_accuracy=results.get("accuracy"), mcq_ci95=results.get("ci95"), mcq_n=results.get("n"))
    finally:
        loaded.engine.close()
    return row


def with_deltas(rows: list[dict]) -> list[dict]:
    """Each row with its differences from the first (the unquantised reference)."""
    ref = rows[0]
    for row in rows:
        row["heldout_loss_delta"] = round(row["heldout_loss"] - ref["heldout_loss"], 4)
        if row.get("mcq_accuracy") is not None and ref.get("mcq_accuracy") is not None:
            row["mcq_accuracy_delta"] = round(row["mcq_accuracy"] - ref["mcq_accuracy"], 4)
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| quantize | memory (MB) | load (s) | tokens/s | held-out loss (Δ) | MCQ accuracy [95% CI] (Δ) |\n|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        mcq = "-" if r.get("mcq_accuracy") is None else (
            f"{r['mcq_accuracy']:.3f} [{r['mcq_ci95'][0]:.3f}, {r['mcq_ci95'][1]:.3f}] ({r.get('mcq_accuracy_delta', 0):+.3f})")
        lines.append(f"| {r['quantize']} | {r['memory_mb']:.1f} | {r['load_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['heldout_loss']:.4f} ({r['heldout_loss_delta']:+.4f}) | {mcq} |")
    return "\n".join(lines)
