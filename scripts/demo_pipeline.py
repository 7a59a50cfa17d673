"""`make demo-pipeline`: PT -> SFT -> DPO on the embedded SmolLM2-135M, then a per-stage report.

Runs `python launch.py experiment=medical_pipeline` (each stage one epoch on the project's demo data)
and prints the held-out eval loss before and after each stage, the DPO reward accuracy on held-out
pairs before and after (a tie, equal rewards up to float noise, counts as half; the ties are counted), and where
the merged final model is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(extra: list[str]) -> int:
    run_dir = ROOT / "outputs" / time.strftime("%Y-%m-%d") / f"{time.strftime('%H-%M-%S')}-pipeline-smollm2-135m-medical"
    cmd = [sys.executable, "launch.py", "experiment=medical_pipeline", f"hydra.run.dir={run_dir}", *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    started = time.time()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        print(f"\nthe pipeline failed; see {run_dir / 'train.log'}", file=sys.stderr)
        return 1
    s = json.loads((run_dir / "summary.json").read_text())
    print("\n" + "=" * 100)
    print(f"pipeline run directory  {run_dir}   ({time.time() - started:.0f} s in all)")
    print(f"{'stage':<6} {'data':<15} {'steps':>5}  held-out eval loss (before -> after)")
    for r in s["stages"]:
        print(f"{r['stage']:<6} {r['data']:<15} {r.get('steps', 0):>5}  {r['eval_loss_before']:.4f} -> {r['eval_loss']:.4f}")
    dpo = next((r for r in s["stages"] if r["stage"] == "dpo"), None)
    if dpo:
        before, after = reward_ties(Path(dpo["run_dir"]))
        print(f"DPO reward accuracy on held-out pairs: {dpo['eval_reward_accuracy_before']:.3f} -> {dpo['eval_reward_accuracy']:.3f}"
              f"   (ties count as half: {before} -> {after}; reference: {dpo['reference']['description']})")
    print(f"merged final model: {s['merged']}")
    return 0


def reward_ties(dpo_run: Path) -> tuple[str, str]:
    """'<ties> of <pairs>' among the held-out pairs before and after DPO training: pairs whose chosen and rejected
    rewards are equal up to float noise (all of them before training, when the policy is the reference).
    From the stage's metrics.jsonl (eval_rewards/ties, the share of ties) and summary.json (the number of pairs)."""
    try:
        pairs = json.loads((dpo_run / "summary.json").read_text())["data"]["eval"]["examples"]
        rows = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        ties = [r["eval_rewards/ties"] for r in rows if "eval_rewards/ties" in r]
        return tuple(f"{round(t * pairs)} of {pairs} tied" for t in (ties[0], ties[-1]))
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        return "?", "?"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
