"""`make demo`: LoRA SFT of the embedded SmolLM2-135M on the project's medical dialogues, then a report.

Runs `python launch.py experiment=sft_lora_demo` (one epoch over 243 dialogues; about 7 minutes on
2 CPU cores) and prints the run directory, the training loss at the start and the end, the held-out
eval loss before and after, and the untuned and tuned answers to the same held-out question.
Exits non-zero if the held-out eval loss did not go down.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wrap(text: str, indent: str = "    ") -> str:
    return textwrap.fill(text or "(empty)", width=100, initial_indent=indent, subsequent_indent=indent)


def main(extra: list[str]) -> int:
    run_dir = ROOT / "outputs" / time.strftime("%Y-%m-%d") / f"{time.strftime('%H-%M-%S')}-sft-smollm2-135m-demo"
    cmd = [sys.executable, "launch.py", "experiment=sft_lora_demo", f"hydra.run.dir={run_dir}", *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    started = time.time()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        print(f"\nthe demo run failed; see {run_dir / 'train.log'}", file=sys.stderr)
        return 1
    s = json.loads((run_dir / "summary.json").read_text())
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    k = max(1, min(5, len(losses) // 4))
    head, tail = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print("\n" + "=" * 100)
    print(f"run directory        {run_dir}")
    print(f"steps / tokens       {s['steps']} optimiser steps, {s['tokens_seen']} tokens, {s['tokens_per_s']} tokens/s, "
          f"{time.time() - started:.0f} s in all")
    print(f"train loss           {head:.3f} (mean of the first {k} steps) -> {tail:.3f} (mean of the last {k})")
    print(f"held-out eval loss   {s['eval_loss_before']:.3f} before -> {s['eval_loss']:.3f} after "
          f"({s['data']['eval']['examples']} held-out dialogues; perplexity {s['eval_perplexity']:.1f})")
    for sample in s.get("samples", []):
        print(f"\nheld-out question:\n{wrap(sample['question'])}")
        print(f"untuned model:\n{wrap(sample['before'])}")
        print(f"tuned model:\n{wrap(sample['after'])}")
        print(f"reference answer:\n{wrap(sample['reference'])}")
    print(f"\nloss plot: {run_dir / 'plots' / 'loss.png'}   adapter: {run_dir / 'adapter'}")
    if not s["eval_loss"] < s["eval_loss_before"]:
        print("held-out eval loss did not go down", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
