"""What a CPU run prints: no library noise (transformers' is_gradient_checkpointing FutureWarning, DeepSpeed's
"Setting accelerator to CPU"), no Trainer log dicts beside the progress bar, and a short table at the end."""

from __future__ import annotations

import json

from conftest import dialogue, launch, write_jsonl

from medgpt.run import end_table


def test_smoke_run_prints_no_noise_and_ends_with_a_table(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [dialogue(i) for i in range(16)])
    run = tmp_path / "run"
    res = launch("model=tiny", "debug=smoke", f"data.train_files=[{data}]", "data.eval_files=[]", "data.eval_split=0.25",
                 "method.max_steps=4", "method.sample_questions=0", f"hydra.run.dir={run}",
                 subprocess_only=True)  # a fresh interpreter: a warning shown once per process must not be hidden by earlier tests
    out = res.stdout + res.stderr
    assert res.returncode == 0, res.stderr[-2000:]
    assert "FutureWarning" not in out and "Setting accelerator" not in out
    assert "{'loss': '" not in out and "{'train_runtime'" not in out and "{'eval_loss'" not in out  # metrics.jsonl has them
    assert "%|" in res.stderr  # the progress bar stays
    s = json.loads((run / "summary.json").read_text())
    lines = res.stdout.splitlines()
    done = next(i for i, line in enumerate(lines) if line.endswith(f"done: {run}"))
    table = lines[done + 1:done + 7]
    assert [line.split()[0] for line in table] == ["steps", "train", "eval", "tokens/s", "wall", "artefact"]
    assert table[0].split() == ["steps", "4"]
    assert table[1].split() == ["train", "loss", f"{s['train_loss_first']:.4f}", "->", f"{s['train_loss']:.4f}"]
    assert table[2].split() == ["eval", "loss", f"{s['eval_loss_before']:.4f}", "->", f"{s['eval_loss']:.4f}"]
    assert table[3].split() == ["tokens/s", f"{s['tokens_per_s']:.1f}"]
    assert table[4].split() == ["wall", "time", f"{s['wall_time_s']:.1f}", "s"] or "min" in table[4]
    assert table[5].split() == ["artefact", str(run / "adapter")] and (run / "adapter/adapter_model.safetensors").exists()


def test_end_table_of_a_pipeline_and_missing_values(tmp_path):
    pipeline = {"stages": [{"stage": "pt", "steps": 3, "eval_loss_before": 2.5, "eval_loss": 2.0},
                           {"stage": "sft", "steps": 5, "eval_loss_before": 1.75, "eval_loss": 1.5}],
                "merged": "/runs/p/2-sft/merged", "wall_time_s": 125.0}
    assert end_table(pipeline, tmp_path).splitlines() == [
        "  stage pt    3 steps, eval loss 2.5000 -> 2.0000", "  stage sft   5 steps, eval loss 1.7500 -> 1.5000",
        "  wall time   2 min 05 s", "  artefact    /runs/p/2-sft/merged"]
    bare = end_table({"steps": 2, "train_loss": 1.0, "artefact": "model"}, tmp_path).splitlines()
    assert bare[1].split() == ["train", "loss", "-", "->", "1.0000"] and bare[2].split() == ["eval", "loss", "-", "->", "-"]
    assert bare[-1].split() == ["artefact", str(tmp_path / "model")]
