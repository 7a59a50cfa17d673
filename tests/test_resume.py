"""Interrupt and resume: a run stopped by SIGINT saves a checkpoint and is marked interrupted; `run=<dir>
resume=true` continues it in place and ends with exactly the steps and losses of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
from conftest import dialogue, launch, read_jsonl, write_jsonl

STEPS, CUT = 4, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    data = write_jsonl(folder / "train.jsonl", [dialogue(i, turns=1 + i % 2) for i in range(24)])
    # a high, linearly decaying learning rate: weights, optimiser state and scheduler all matter for the later losses
    args = ("model=tiny", "debug=smoke", f"data.train_files=[{data}]", "data.eval_files=[]", "data.eval_split=0.25",
            f"method.max_steps={STEPS}", "method.learning_rate=1e-2", "method.lr_scheduler=linear", "method.warmup_ratio=0",
            "method.sample_questions=0")
    # one after the other in this process: side by side they would need two fresh interpreters (~9 s of CPU each)
    full = launch(*args, f"hydra.run.dir={folder / 'full'}")
    cut = launch(*args, f"hydra.run.dir={folder / 'cut'}", env={"MEDGPT_TEST_INTERRUPT_AT_STEP": str(CUT)})
    assert full.returncode == 0, full.stderr[-2000:]
    interrupted = {"res": cut, "summary": json.loads((folder / "cut/summary.json").read_text()),
                   "rows": read_jsonl(folder / "cut/metrics.jsonl")}
    resumed = launch(f"run={folder / 'cut'}", "resume=true")
    return folder, interrupted, resumed


def test_interrupt_saves_a_checkpoint_and_marks_the_run(runs):
    folder, interrupted, _ = runs
    res, summary = interrupted["res"], interrupted["summary"]
    assert res.returncode == 130  # 128 + SIGINT
    assert summary["status"] == "interrupted" and summary["steps"] == CUT
    assert summary["checkpoint"] == str(folder / f"cut/checkpoints/checkpoint-{CUT}")
    assert "resume=true" in res.stderr and "Traceback" not in res.stderr
    assert [r["step"] for r in interrupted["rows"] if "loss" in r] == list(range(1, CUT + 1))
    assert not any("eval_loss" in r and r["step"] > 0 for r in interrupted["rows"])  # no final eval
    state = json.loads((folder / f"cut/checkpoints/checkpoint-{CUT}/trainer_state.json").read_text())
    assert state["global_step"] == CUT


def test_resumed_run_matches_the_uninterrupted_run(runs):
    folder, _, resumed = runs
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full, cut = (json.loads((folder / name / "summary.json").read_text()) for name in ("full", "cut"))
    assert cut["status"] == "completed" and cut["steps"] == full["steps"] == STEPS
    assert cut["resumed_from"].endswith(f"checkpoint-{CUT}")
    full_rows, cut_rows = read_jsonl(folder / "full/metrics.jsonl"), read_jsonl(folder / "cut/metrics.jsonl")
    key = lambda rows: [(r["step"], "loss" if "loss" in r else "eval_loss") for r in rows]  # noqa: E731
    assert key(cut_rows) == key(full_rows)  # the same rows, none duplicated (the eval before training is not written again)
    for a, b in zip(full_rows, cut_rows):
        assert b.get("loss", b.get("eval_loss")) == pytest.approx(a.get("loss", a.get("eval_loss")), abs=1e-4), (a, b)
    assert cut["eval_loss"] == pytest.approx(full["eval_loss"], abs=1e-4) and cut["train_loss"] == pytest.approx(full["train_loss"], abs=1e-4)
    assert cut["train_loss_mean"] == pytest.approx(full["train_loss_mean"], abs=1e-4)  # over every step, not only the resumed ones
    assert full_rows[-2]["loss"] < full_rows[1]["loss"] - 0.05  # the run learns: equal losses are not equal by accident
    assert (folder / "cut/adapter/adapter_model.safetensors").exists()
    assert "resuming" in (folder / "cut/train.log").read_text()  # the run's own log goes on


def test_resuming_a_completed_run_is_refused_in_one_sentence(runs):
    folder, _, _ = runs
    res = launch(f"run={folder / 'full'}", "resume=true")
    assert res.returncode == 1 and "has already completed; there is nothing to resume" in res.stderr and "Traceback" not in res.stderr
    assert json.loads((folder / "full/summary.json").read_text())["status"] == "completed"  # untouched


def test_resume_needs_a_checkpoint(tmp_path):
    from medgpt.errors import ConfigError
    from medgpt.tracking.resume import latest_checkpoint, prepare_resume

    (tmp_path / "config.yaml").write_text("method: {name: sft}\n")
    (tmp_path / "summary.json").write_text('{"status": "interrupted"}')
    (tmp_path / "checkpoints/checkpoint-4").mkdir(parents=True)  # cut short: no trainer_state.json
    with pytest.raises(ConfigError, match="has no checkpoint to resume from"):
        prepare_resume(tmp_path, None)
    (tmp_path / "checkpoints/checkpoint-2").mkdir()
    (tmp_path / "checkpoints/checkpoint-2/trainer_state.json").write_text('{"global_step": 2}')
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"  # the newest complete one
