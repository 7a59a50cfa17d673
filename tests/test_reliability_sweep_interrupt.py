"""Ctrl-C in a sweep (`python launch.py -m ...`): the sweep ends with one line, no traceback, and sweep_summary.md/csv
list the jobs so far, the interrupted one marked interrupted."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, dialogue, write_jsonl


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_ctrl_c_in_a_sweep_writes_the_summary_and_ends_in_one_line(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [dialogue(i) for i in range(16)])
    sweep_dir = tmp_path / "multirun"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "launch.py", "-m", "model=tiny", "debug=smoke", f"data.train_files=[{data}]",
                             "data.eval_files=[]", "data.eval_split=0.25", "method.max_steps=400", "method.sample_questions=0",
                             "method.learning_rate=1e-4,2e-4,3e-4", f"hydra.sweep.dir={sweep_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:  # SIGINT once the first job is training
            metrics = list(sweep_dir.glob("0-*/metrics.jsonl")) if sweep_dir.exists() else []
            if any('"loss"' in m.read_text() for m in metrics):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the first job ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (130, -signal.SIGINT), err[-3000:]  # ended by SIGINT, as a shell reports it
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("sweep stopped")]
    assert len(lines) == 1 and str(sweep_dir / "sweep_summary.md") in lines[0], err[-3000:]
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("-")[0]))
    assert len(jobs) == 1  # the sweep stopped: no second job
    summary = json.loads((jobs[0] / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["checkpoint"]
    with open(sweep_dir / "sweep_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "interrupted")]
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert "| interrupted |" in md and "Interrupted jobs: 0" in md and "resume=true" in md
